"""Loading a model for FSDP shard by shard: each rank reads only its rows of the safetensors files."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from trainer.data import DataError
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_qwen2(path, *, tie, dtype=torch.float32, max_shard_size="5GB", vocab=96, hidden=64, intermediate=128,
               layers=2):
    """A random Qwen2 causal LM (biased q/k/v projections, grouped-query attention) saved with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tie)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return str(path)


def save_without_safetensors(path, source):
    """The same model with its weights in pytorch_model.bin only."""
    from safetensors.torch import load_file

    os.makedirs(path)
    shutil.copy(os.path.join(source, "config.json"), path)
    torch.save(load_file(os.path.join(source, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    toy = build_model_dir(str(root / "toy_tied"), WORDS, hidden_size=64, layers=2)
    return {
        "tied": toy,
        # bf16 on disk (as exported) loaded as fp32 weights, in several files with an index.
        "untied_sharded": save_qwen2(root / "untied_sharded", tie=False, dtype=torch.bfloat16, max_shard_size="20KB"),
        "no_safetensors": save_without_safetensors(root / "no_safetensors", toy),
        # Large enough (34M parameters, 132 MB in fp32) for its resident memory to show.
        "memory": save_qwen2(root / "memory", tie=False, dtype=torch.bfloat16, vocab=4096, hidden=512,
                             intermediate=2048, layers=8),
    }


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory):
    """What each of two gloo ranks holds after loading every model both ways (one torchrun launch)."""
    out = tmp_path_factory.mktemp("findings")
    checked = [models[name] for name in ("tied", "untied_sharded", "no_safetensors")]
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
         os.path.join(REPO, "tests", "sharded_load_check.py"), str(out), models["memory"], *checked],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = []
    for rank in range(2):
        with open(out / f"rank{rank}.json") as handle:
            ranks.append(json.load(handle))
    return ranks, completed.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tied", "untied_sharded"])
def test_each_rank_holds_exactly_its_rows_of_the_saved_weights(two_ranks, models, name):
    if name == "untied_sharded":
        assert len([f for f in os.listdir(models[name]) if f.endswith(".safetensors")]) >= 3
    for findings in (ranks[models[name]] for ranks in two_ranks[0]):
        assert findings["all_dim0_dtensor_shards"]
        assert findings["differ_from_files"] == []
        assert findings["differ_from_whole_load"] == []
        assert findings["dtypes"] == ["torch.float32"]
        assert findings["tied"] == findings["tied_in_config"] == findings["tied_whole_load"] == (name == "tied")
        assert 0.45 < findings["local_elements"] / findings["model_elements"] < 0.55
        assert findings["training_flag"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tied", "untied_sharded"])
def test_buffers_and_the_loss_are_those_of_the_whole_load(two_ranks, models, name):
    for findings in (ranks[models[name]] for ranks in two_ranks[0]):
        assert "causal_lm.model.rotary_emb.inv_freq" in findings["buffers"]
        assert findings["differ_buffers"] == []
        assert findings["loss"] == pytest.approx(findings["loss_whole_load"], rel=1e-6, abs=1e-6)


@pytest.mark.distributed
def test_a_frozen_reference_loads_the_same_weights_without_gradients(two_ranks, models):
    for ranks in two_ranks[0]:
        for name in ("tied", "untied_sharded"):
            findings = ranks[models[name]]
            assert not findings["frozen_requires_grad"] and not findings["frozen_training"]
            assert findings["frozen_differ"] == []


@pytest.mark.distributed
def test_weights_without_safetensors_load_whole_on_every_rank_and_say_so(two_ranks, models):
    ranks, stdout = two_ranks
    for findings in (rank[models["no_safetensors"]] for rank in ranks):
        assert findings["differ_from_files"] == [] and findings["differ_from_whole_load"] == []
    # Rank 0 says so once per load (the trained model and the frozen one), rank 1 never.
    assert stdout.count("no safetensors weights, so every rank loads the whole model") == 2


@pytest.mark.distributed
def test_no_rank_holds_the_whole_model_while_loading(two_ranks):
    fp32_mb = 34.6e6 * 4 / 2**20  # the memory model's parameters in fp32
    for ranks in two_ranks[0]:
        memory = ranks["memory"]
        assert memory["whole_extra_MB"] > 0.95 * fp32_mb  # the old way: the whole model, then the shard
        assert memory["sharded_extra_MB"] < 0.65 * fp32_mb  # half the model, plus one weight's rows at a time


def unloaded(path):
    from trainer.config import load_config
    from trainer.model import build_causal_lm_without_weights

    config = load_config(None, [f"model.path={path}", "data.train_files=[unused.jsonl]"])
    return build_causal_lm_without_weights(config.model, torch.device("cpu"), trainable=True)


def rewrite_weights(source, target, change):
    """A copy of a single-file model directory whose weights dict went through change(weights)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(target)
    shutil.copy(os.path.join(source, "config.json"), target)
    weights = change(load_file(os.path.join(source, "model.safetensors")))
    save_file(weights, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return str(target)


def test_a_tied_weight_stored_under_the_output_name_fills_both(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.model import load_local_shards

    def rename(weights):
        weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
        return weights

    path = rewrite_weights(models["tied"], tmp_path / "lm_head_only", rename)
    causal_lm = unloaded(path)
    load_local_shards(causal_lm, path)  # one process: whole tensors
    assert causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight
    expected = AutoModelForCausalLM.from_pretrained(models["tied"], dtype=torch.float32)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(causal_lm.state_dict()[name], tensor), name


def test_a_missing_weight_names_the_file_and_the_weight(models, tmp_path):
    from trainer.model import load_local_shards

    path = rewrite_weights(models["tied"], tmp_path / "missing",
                           lambda weights: {k: v for k, v in weights.items() if k != "model.norm.weight"})
    with pytest.raises(DataError, match=r"missing/model\.safetensors: no weight model\.norm\.weight"):
        load_local_shards(unloaded(path), path)


def test_a_missing_weight_of_a_sharded_checkpoint_names_its_index(models, tmp_path):
    from trainer.model import load_local_shards

    path = str(tmp_path / "sharded")
    shutil.copytree(models["untied_sharded"], path)
    with open(os.path.join(path, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    del index["weight_map"]["lm_head.weight"]
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump(index, handle)
    with pytest.raises(DataError, match=r"model\.safetensors\.index\.json: no weight lm_head\.weight"):
        load_local_shards(unloaded(path), path)


def test_a_weight_of_another_shape_names_the_file_and_both_shapes(models, tmp_path):
    from trainer.model import load_local_shards

    def shrink(weights):
        name = "model.layers.1.mlp.down_proj.weight"
        weights[name] = weights[name][:, :-1].contiguous()
        return weights

    path = rewrite_weights(models["tied"], tmp_path / "reshaped", shrink)
    with pytest.raises(DataError, match=r"reshaped/model\.safetensors: weight model\.layers\.1\.mlp\.down_proj\.weight "
                                        r"has shape \[64, 255\], the model's is \[64, 256\]"):
        load_local_shards(unloaded(path), path)


def test_building_without_weights_keeps_the_buffers_and_leaves_parameters_unwritten(models):
    from transformers import AutoModelForCausalLM

    causal_lm = unloaded(models["untied_sharded"])
    expected = AutoModelForCausalLM.from_pretrained(models["untied_sharded"], dtype=torch.float32)
    assert not any(p.is_meta for p in causal_lm.parameters())
    assert all(p.dtype == torch.float32 for p in causal_lm.parameters())
    buffers = dict(causal_lm.named_buffers())
    assert buffers.keys() == dict(expected.named_buffers()).keys()
    for name, buffer in expected.named_buffers():
        assert torch.equal(buffers[name], buffer) and buffers[name].dtype == buffer.dtype, name
    assert causal_lm.config.name_or_path == models["untied_sharded"] and not causal_lm.training
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"  # restored


@pytest.mark.parametrize("name", ["tied", "untied_sharded"])
def test_one_process_loads_weight_by_weight_as_from_pretrained_loads(models, name):
    # A GPU takes this path (load_causal_lm on CUDA); on CPU it is called directly.
    from transformers import AutoModelForCausalLM

    from trainer.config import ModelConfig
    from trainer.model import load_weight_by_weight

    model = load_weight_by_weight(ModelConfig(path=models[name]), torch.device("cpu"), trainable=True)
    whole = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    loaded, expected = model.state_dict(), whole.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert dict(model.named_buffers()).keys() == dict(whole.named_buffers()).keys()
    assert all(torch.equal(buffer, dict(whole.named_buffers())[key]) for key, buffer in model.named_buffers())
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    assert torch.equal(model(ids).logits, whole.eval()(ids).logits)
    if name == "tied":
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_one_process_loads_whole_where_the_files_cannot_fill_the_model(models):
    from trainer.config import ModelConfig
    from trainer.model import load_weight_by_weight

    assert load_weight_by_weight(ModelConfig(path=models["no_safetensors"]), torch.device("cpu")) is None
