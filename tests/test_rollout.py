"""Rollout engines: stop strings and the weight sync (the vLLM engine: test_vllm_engine.py, test_vllm_contract.py)."""

import os
import tempfile

import pytest
import torch

from trainer.model import CausalLMLoss
from trainer.rollout import SamplingSettings, sync_weights
from trainer.rollout.hf import HFRolloutEngine
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS


class RecordingEngine:
    """Stands in for an engine's weight store: keeps what sync_weights sends, sync by sync."""

    holds_weights = True

    def __init__(self):
        self.syncs = []

    def load_weights(self, named_tensors):
        self.syncs.append([(name, tensor.clone()) for name, tensor in named_tensors])


def load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=2)
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_one_sync_sends_every_tensor_whole_the_tied_head_included(tmp_path):
    _, _, model = load(tmp_path)
    root, engine = CausalLMLoss(model), RecordingEngine()
    sent = sync_weights(root, engine)
    expected = model.state_dict()
    (received,) = engine.syncs
    assert [name for name, _ in received] == list(expected)  # the state dict's order: layer by layer
    assert "lm_head.weight" in expected and model.config.tie_word_embeddings  # vLLM keeps an old head it is not sent
    assert all(torch.equal(tensor, expected[name]) for name, tensor in received)
    assert sent == sum(t.numel() * t.element_size() for t in expected.values())


def test_sync_sends_the_engines_dtype_from_fp32_master_weights(tmp_path):
    _, _, model = load(tmp_path)
    engine = RecordingEngine()
    engine.weight_dtype = torch.bfloat16
    sent = sync_weights(CausalLMLoss(model), engine)
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    received = dict(engine.syncs[0])
    assert all(received[name].dtype == torch.bfloat16 and torch.equal(received[name], expected[name])
               for name in expected)
    assert sent == sum(t.numel() * 2 for t in expected.values())  # half the fp32 bytes


def test_hf_engine_needs_no_sync(tmp_path):
    _, tokenizer, model = load(tmp_path)
    engine = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"))
    assert sync_weights(engine.root, engine) == 0


def test_stop_strings_end_completions(tmp_path):
    from trainer.rollout.keyed_sampling import sequence_keys

    _, tokenizer, model = load(tmp_path)
    engine = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"))
    prompt = tokenizer("tom has 3 apples .", add_special_tokens=False)["input_ids"]
    free = SamplingSettings(n=8, temperature=1.0, top_p=1.0, max_new_tokens=30)
    completions = engine.generate([prompt], free, row_keys=sequence_keys(0, 0, [0], 8))
    # Pick a word that the untrained model samples in some completion, and stop on it.
    word = next(w for w in WORDS if len(w) > 3 and any(w in c.text for c in completions))
    stopped = engine.generate([prompt], SamplingSettings(n=8, temperature=1.0, top_p=1.0, max_new_tokens=30,
                                                         stop=[word]), row_keys=sequence_keys(0, 0, [0], 8))
    for before, after in zip(completions, stopped):
        if word in before.text:
            assert after.text.rstrip().endswith(word) and len(after.token_ids) <= len(before.token_ids)
            assert after.token_ids == before.token_ids[: len(after.token_ids)]  # the same sample, cut
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids


def test_a_kv_budget_splits_the_rollout_into_calls_with_the_same_samples(tmp_path):
    from trainer.rollout.keyed_sampling import sequence_keys

    _, tokenizer, model = load(tmp_path)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("tom has 3 apples .", "ann has 12 pears and 4 more .", "5 plus 7")]
    settings = SamplingSettings(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12)
    keys = sequence_keys(0, 3, [0, 1, 2], 4)
    whole = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu")).generate(prompts, settings, keys)
    longest = max(len(ids) for ids in prompts)
    budgeted = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"),
                               max_batch_tokens=5 * (longest + 12))
    assert budgeted.rows_per_call(prompts, settings) == 5  # 12 rows: calls of 5, 5 and 2
    calls = []
    original = budgeted._generate_call
    budgeted._generate_call = lambda *args: calls.append(len(args[0])) or original(*args)
    split = budgeted.generate(prompts, settings, keys)
    assert calls == [5, 5, 2]
    assert [c.prompt_index for c in split] == [c.prompt_index for c in whole] == [0] * 4 + [1] * 4 + [2] * 4
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=1e-5) for a, b in zip(split, whole))


def gather_on_two_ranks(rank, init_file, out_dir):
    """One gloo rank: FSDP2-shard a model whose first dimensions do not split evenly, then sync it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=12, intermediate_size=21, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    root = CausalLMLoss(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(root)
    engine = RecordingEngine()
    engine.weight_dtype = torch.bfloat16
    sent = sync_weights(root, engine)
    received = dict(engine.syncs[0])
    torch.save({"expected": expected, "received": received, "sent": sent, "syncs": len(engine.syncs)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_weights_are_gathered_whole_in_the_engine_dtype_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(gather_on_two_ranks, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        expected, received = result["expected"], result["received"]
        assert received.keys() == expected.keys() and result["syncs"] == 1
        for name, tensor in expected.items():
            assert received[name].dtype == torch.bfloat16 and torch.equal(received[name], tensor), name
        assert result["sent"] == sum(t.numel() * 2 for t in expected.values())


def rows_per_call_on_two_ranks(rank, init_file, out_dir):
    """One gloo rank with prompts of its own lengths: the rows a generate call may hold under a KV budget."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    engine = HFRolloutEngine(None, None, torch.device("cpu"), max_batch_tokens=1000)
    prompts = [[1] * 10, [1] * 30] if rank == 0 else [[1] * 10, [1] * 90]  # rank 1 holds the longest prompt
    per_call = engine.rows_per_call(prompts, SamplingSettings(n=4, max_new_tokens=110))
    torch.save(per_call, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_makes_the_same_generate_calls_under_a_kv_budget(tmp_path):
    # Under FSDP each generate call is a collective: the ranks must agree on the rows per call.
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(rows_per_call_on_two_ranks, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)] == [1000 // 200] * 2  # 90 + 110 tokens
