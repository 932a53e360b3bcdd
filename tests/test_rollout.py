"""Rollout engines: stop strings, weight sync in buckets, and the vLLM engine (GPU, optional)."""

import importlib.util

import pytest
import torch

from trainer.model import CausalLMLoss
from trainer.rollout import SamplingSettings, sync_weights
from trainer.rollout.hf import HFRolloutEngine
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS


class RecordingEngine:
    """Stands in for an engine's weight store: keeps what sync_weights sends, bucket by bucket."""

    holds_weights = True

    def __init__(self):
        self.buckets = []

    def load_weights(self, named_tensors):
        self.buckets.append([(name, tensor.clone()) for name, tensor in named_tensors])


def load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=2)
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_weights_are_sent_whole_in_buckets_of_the_given_size(tmp_path):
    _, _, model = load(tmp_path)
    root, engine = CausalLMLoss(model), RecordingEngine()
    bucket_bytes = 64 * 1024
    sent = sync_weights(root, engine, bucket_bytes)
    expected = model.state_dict()
    received = dict(pair for bucket in engine.buckets for pair in bucket)
    assert received.keys() == expected.keys()
    assert all(torch.equal(received[name], expected[name]) for name in expected)
    assert sent == sum(t.numel() * t.element_size() for t in expected.values())
    assert len(engine.buckets) > 1
    for bucket in engine.buckets[:-1]:  # each bucket closes as soon as it reaches the size
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert sum(sizes) >= bucket_bytes and sum(sizes[:-1]) < bucket_bytes


def test_sync_sends_the_engines_dtype_from_fp32_master_weights(tmp_path):
    _, _, model = load(tmp_path)
    engine = RecordingEngine()
    engine.weight_dtype = torch.bfloat16
    sent = sync_weights(CausalLMLoss(model), engine, 64 * 1024)
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    received = dict(pair for bucket in engine.buckets for pair in bucket)
    assert all(received[name].dtype == torch.bfloat16 and torch.equal(received[name], expected[name])
               for name in expected)
    assert sent == sum(t.numel() * 2 for t in expected.values())  # half the fp32 bytes


def test_hf_engine_needs_no_sync(tmp_path):
    _, tokenizer, model = load(tmp_path)
    engine = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"))
    assert sync_weights(engine.root, engine, 1) == 0


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


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install -e .[vllm])")
def test_vllm_engine_generates_and_takes_new_weights(tmp_path):
    from trainer.rollout.vllm import VLLMRolloutEngine

    path, tokenizer, model = load(tmp_path)
    engine = VLLMRolloutEngine(path, tokenizer, gpu_memory_utilization=0.2, dtype="float32")
    prompt = tokenizer("tom has 3 apples .", add_special_tokens=False)["input_ids"]
    settings = SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8)
    completions = engine.generate([prompt, prompt], settings)
    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4
    assert all(1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids) for c in completions)
    # Zeroed weights make every logit equal: sampling becomes uniform, so the log-probs say -log V.
    sync_weights(CausalLMLoss(model.apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)])),
                 engine, 1 << 20)
    completions = engine.generate([prompt], settings)
    vocab = len(tokenizer)
    for c in completions:
        assert all(abs(lp + torch.log(torch.tensor(float(vocab))).item()) < 1e-3 for lp in c.logprobs)
