"""Weight precision of trained models: fp32 master weights, low-precision compute."""

import os

import pytest
import torch

from trainer.model import CausalLMLoss, resolve_dtype
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS


@pytest.mark.parametrize(
    "name, device, trainable, expected",
    [
        ("auto", "cpu", True, torch.float32),
        ("auto", "cpu", False, torch.float32),
        ("auto", "cuda", True, torch.float32),  # the optimizer steps fp32 weights
        ("auto", "cuda", False, torch.bfloat16),  # inference and the frozen reference model
        ("bfloat16", "cuda", True, torch.bfloat16),
        ("float16", "cpu", False, torch.float16),
    ],
)
def test_auto_dtype_keeps_trained_weights_in_fp32(name, device, trainable, expected):
    assert resolve_dtype(name, torch.device(device), trainable) is expected


def test_bf16_weights_lose_small_adamw_updates_that_fp32_weights_keep():
    """Why trained weights stay fp32: one AdamW step at lr 4e-6 moves a 0.02 weight by 2e-4 of itself."""
    for dtype, expected_changed in ((torch.bfloat16, 0.0), (torch.float32, 1.0)):
        weight = torch.nn.Parameter((0.02 + 0.01 * torch.rand(4096)).to(dtype))
        before = weight.detach().clone()
        weight.grad = torch.randn(4096).to(dtype)
        torch.optim.AdamW([weight], lr=4e-6, weight_decay=0.0).step()
        changed = (weight.detach() != before).float().mean().item()
        assert changed == pytest.approx(expected_changed, abs=0.02)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_model_dir(str(tmp_path_factory.mktemp("model")), WORDS, hidden_size=64, layers=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_autocast_root_computes_in_bf16_and_trains_fp32_weights(toy_model):
    torch.manual_seed(0)
    input_ids = torch.randint(5, toy_model.config.vocab_size, (2, 24))
    position_ids = torch.arange(24).expand(2, 24)
    targets = torch.roll(input_ids, -1, dims=1)
    mask = torch.zeros(2, 1, 24, 24).masked_fill_(~torch.ones(24, 24, dtype=torch.bool).tril(), float("-inf"))

    def loss_and_grads(autocast_dtype):
        toy_model.zero_grad()
        root = CausalLMLoss(toy_model)
        root.autocast_dtype = autocast_dtype
        seen = {}

        def head(hidden, weight):
            seen["hidden"], seen["weight"] = hidden.dtype, weight.dtype
            return torch.nn.functional.cross_entropy(
                (hidden @ weight.T).float().flatten(0, 1), targets.flatten(), reduction="sum"
            )

        loss = root(input_ids, position_ids, mask, head=head)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in toy_model.named_parameters()}
        return loss.item(), grads, seen

    loss_fp32, grads_fp32, seen_fp32 = loss_and_grads(None)
    loss_bf16, grads_bf16, seen_bf16 = loss_and_grads(torch.bfloat16)
    assert seen_fp32 == {"hidden": torch.float32, "weight": torch.float32}
    assert seen_bf16 == {"hidden": torch.bfloat16, "weight": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in toy_model.parameters())
    assert all(g.dtype == torch.float32 for g in grads_bf16.values())
    # bf16 compute: close to the fp32 result, but not the same numbers.
    assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2) and loss_bf16 != loss_fp32
    layer = "model.layers.0.mlp.down_proj.weight"
    relative = (grads_bf16[layer] - grads_fp32[layer]).norm() / grads_fp32[layer].norm()
    assert 0 < relative < 0.05


@pytest.mark.gpu
def test_one_gpu_process_trains_fp32_weights_with_bf16_compute(tmp_path):
    from trainer.config import load_config
    from trainer.model import load_causal_lm
    from trainer.parallel import apply_fsdp

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    config = load_config(None, [f"model.path={path}", "data.train_files=[unused.jsonl]"])
    device = torch.device("cuda")
    root = apply_fsdp(CausalLMLoss(load_causal_lm(config.model, device, trainable=True)), device, config.parallel)
    assert root.autocast_dtype is torch.bfloat16
    assert all(p.dtype == torch.float32 for p in root.parameters())

    torch.manual_seed(0)
    input_ids = torch.randint(5, root.causal_lm.config.vocab_size, (2, 24), device=device)
    position_ids = torch.arange(24, device=device).expand(2, 24)
    targets = torch.roll(input_ids, -1, dims=1)
    allowed = torch.ones(24, 24, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(2, 1, 24, 24, device=device).masked_fill_(~allowed, float("-inf"))
    with torch.no_grad():  # fp32 reference of the same forward
        reference = torch.nn.functional.cross_entropy(
            root.causal_lm(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).logits.double()
            .flatten(0, 1), targets.flatten(), reduction="sum",
        ).item()
    before = [p.detach().clone() for p in root.parameters()]
    loss = root(input_ids, position_ids, mask, targets=targets)
    loss.backward()
    assert loss.item() == pytest.approx(reference, rel=2e-2) and loss.item() != pytest.approx(reference, rel=1e-7)
    torch.optim.AdamW(root.parameters(), lr=4e-6, weight_decay=0.0).step()
    changed = torch.cat([(p.detach() != b).flatten() for p, b in zip(root.parameters(), before)]).float().mean()
    assert all(p.dtype == torch.float32 for p in root.parameters()) and changed > 0.99


def test_export_writes_the_requested_dtype_and_says_so_in_its_config(toy_model, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import export_hf

    tokenizer = AutoTokenizer.from_pretrained(toy_model.name_or_path)
    directory = export_hf(CausalLMLoss(toy_model), tokenizer, str(tmp_path / "hf_model"), rank=0, dtype=torch.bfloat16)
    with open(f"{directory}/config.json") as handle:
        assert json.load(handle)["dtype"] == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    assert exported.dtype == torch.bfloat16
    trained = dict(toy_model.named_parameters())
    for name, parameter in exported.named_parameters():
        assert torch.equal(parameter, trained[name].detach().to(torch.bfloat16)), name
    assert all(p.dtype == torch.float32 for p in toy_model.parameters())  # the live weights stay fp32


def test_a_sharded_export_reloads_with_the_bf16_rounded_weights_and_an_index(toy_model, tmp_path):
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import export_hf

    tokenizer = AutoTokenizer.from_pretrained(toy_model.name_or_path)
    largest = max(p.numel() for p in toy_model.parameters()) * 2
    directory = export_hf(CausalLMLoss(toy_model), tokenizer, str(tmp_path / "hf_model"), rank=0,
                          dtype=torch.bfloat16, max_shard_bytes=largest)
    with open(f"{directory}/model.safetensors.index.json") as handle:
        index = json.load(handle)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not os.path.exists(f"{directory}.tmp")
    for shard in shards:
        with safe_open(f"{directory}/{shard}", framework="pt") as handle:
            stored = sum(handle.get_tensor(key).numel() * 2 for key in handle.keys())
        assert stored <= largest  # no shard above the limit
    exported = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    trained = dict(toy_model.named_parameters())
    assert set(dict(exported.named_parameters())) == set(trained)
    for name, parameter in exported.named_parameters():
        assert torch.equal(parameter, trained[name].detach().to(torch.bfloat16)), name
    # Tied embeddings are written once, as Hugging Face writes them.
    tied = toy_model.config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) != tied


@pytest.mark.distributed
def test_two_fsdp_ranks_export_the_whole_model_in_shards(tmp_path):
    import subprocess
    import sys

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=48, layers=2, kv_heads=1)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
         os.path.join(repo, "tests", "export_check.py"), model, str(tmp_path / "exported")],
        capture_output=True, text=True, cwd=repo, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "export matches" in completed.stdout
    assert len(list((tmp_path / "exported").glob("model-*-of-*.safetensors"))) >= 3
