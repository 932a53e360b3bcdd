"""The vLLM adapter against vLLM 0.33.0's API and on the paths only a GPU takes, without a GPU.

A fake `vllm` (tests/vllm_fake) records every call and models the engine behaviour the adapter
relies on. What this file covers:
- every recorded call binds to the signatures snapshotted from the 0.33.0 wheel
  (tests/data/vllm_0_33_0_signatures.json, written by bench/vllm_signatures.py), the worker's
  reload_weights reached through collective_rpc included;
- the GPU-only paths, which vLLM's CPU build cannot run: sleep mode (level 2 after start-up and
  after every rollout, the weights woken before each sync) and the memory split's check, with
  torch.cuda's queries patched;
- on both platforms, the sequence of calls the adapter makes: start-up on dummy weights, one
  reload of every state-dict tensor read lazily, the prefix-cache reset, keyed requests, the
  evaluation engine, the version check of each platform's release.
The CPU path's calls are bound to 0.33.0's signatures too. How the real engine behaves (its
log-probs, a layer reloaded in part, the prefix cache) is tested against vLLM's CPU build in
tests/test_vllm_engine.py. The last test here runs the real engine and is for a GPU machine with
vllm installed.
"""

import copy
import functools
import importlib.util
import json
import os
import sys
import types

import pytest
import torch
import vllm_fake

from trainer.config import ConfigError, RunConfig
from trainer.rollout import (
    SamplingSettings,
    engine_class,
    ensure_engine_weights,
    merge_shares,
    rank_share,
    sample_problems,
    sync_weights,
)
from trainer.rollout import shares as rollout_shares
from trainer.rollout import weights as rollout_weights
from trainer.rollout.keyed_sampling import sequence_keys
from trainer.toy.model_dir import build_tokenizer
from trainer.toy.task import WORDS

FAKE_VLLM_DIR = os.path.join(os.path.dirname(__file__), "vllm_fake")
# Variables the adapter sets for itself when they are unset: each test starts without them.
ADAPTER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")
SEED_MASK = (1 << 63) - 1
GIB = 2**30
SNAPSHOT = vllm_fake.load_snapshot()
# The recipe's model: DeepSeek-R1-Distill-Qwen-14B, as read_model_shape reads its config.
QWEN_14B = dict(parameters=14_770_033_664, layers=48, kv_heads=8, head_dim=128, max_positions=131072,
                hidden_size=5120, intermediate_size=13824, vocab_size=152064)
RELOAD = ("LLM.collective_rpc", ("reload_weights", {"is_checkpoint_format": True}))
RESET = ("LLM.reset_prefix_cache", ())
FREE = ("torch.cuda.empty_cache", ())


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    return build_tokenizer(WORDS)


def on_platform(fake, monkeypatch, platform):
    """Runs the adapter as on `platform`: "cuda" (vLLM 0.33, sleep mode, one 80 GiB GPU as device 0)
    or "cpu" (the CPU build's 0.32, no sleep mode)."""
    cuda = platform == "cuda"
    monkeypatch.setattr(fake, "CUDA", cuda)
    monkeypatch.setattr(fake, "__version__", "0.33.0" if cuda else "0.32.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if cuda:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(total_memory=80 * GIB))


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake vllm as `vllm` on the CPU platform, a process without the adapter's variables, and
    torch.cuda.empty_cache recorded."""
    environment = dict(os.environ)
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "vllm" or name.startswith("vllm.")}
    for name in ADAPTER_VARIABLES:
        os.environ.pop(name, None)
    monkeypatch.syspath_prepend(FAKE_VLLM_DIR)
    import vllm

    vllm.TOKENIZER = toy_tokenizer()
    on_platform(vllm, monkeypatch, "cpu")
    freed = vllm.Call("torch.cuda.empty_cache", (), {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: vllm.CALLS.append(freed))
    yield vllm
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]
    sys.modules.update(hidden)
    os.environ.clear()
    os.environ.update(environment)


def engine_calls(fake):
    """The recorded calls that drive the engine and the cache frees, as (name, arguments); a
    collective_rpc as (name, (worker method, its keyword arguments but the weights iterator))."""
    calls = []
    for call in fake.CALLS:
        if call.name == "SamplingParams":
            continue
        arguments = call.kwargs or call.args
        if call.name == "LLM.collective_rpc":
            bound = vllm_fake.check_call(SNAPSHOT, call.name, call.args, call.kwargs)
            worker = {k: v for k, v in (bound.get("kwargs") or {}).items() if k != "weights_iterator"}
            arguments = (bound["method"], worker)
        calls.append((call.name, arguments))
    return calls


def names(calls):
    return [name for name, _ in calls]


def make_engine(fake, **options):
    from trainer.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine("toy/model", fake.TOKENIZER, gpu_memory_utilization=0.4, seed=7, **options)


def cuda_engine(fake, monkeypatch, **options):
    """An engine started as on a GPU; its syncs gather on the CPU, which is all this machine has."""
    on_platform(fake, monkeypatch, "cuda")
    engine = make_engine(fake, **options)
    assert engine.weight_device == torch.device("cuda", 0) and engine.weight_dtype == torch.bfloat16
    engine.weight_device = None
    return engine


def policy(fake):
    """A tiny Llama as the trainer holds it (inside the loss module), and the fake engine set to its names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model import CausalLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fake.TOKENIZER), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    root = CausalLMLoss(LlamaForCausalLM(config))
    fake.PARAMETERS = list(root.causal_lm.state_dict())
    return root


def fingerprints(root, dtype):
    """What the fake engine holds after a full sync of `root` in `dtype`: each tensor's sum."""
    return {name: float(t.to(dtype).double().sum()) for name, t in root.causal_lm.state_dict().items()}


def move(root, amount):
    with torch.no_grad():
        for parameter in root.parameters():
            parameter.add_(amount)


def prompts_of(*texts):
    return [toy_tokenizer()(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_the_snapshot_is_vllm_0_33_0_read_from_its_wheel():
    snapshot = vllm_fake.load_snapshot()
    assert snapshot["vllm_version"] == "0.33.0" and snapshot["wheel"].startswith("vllm-0.33.0-")
    assert {f"LLM.{m}" for m in ("__init__", "generate", "sleep", "wake_up", "reset_prefix_cache",
                                 "collective_rpc")} <= set(snapshot["methods"])
    engine_fields = {f["name"] for f in snapshot["fields"]["EngineArgs"]}
    assert {"enable_sleep_mode", "logprobs_mode", "distributed_executor_backend", "enable_prefix_caching",
            "max_model_len", "load_format", "enable_chunked_prefill", "max_num_batched_tokens"} <= engine_fields
    assert "processed_logprobs" in snapshot["literals"]["LogprobsMode"]
    assert "external_launcher" in snapshot["literals"]["DistributedExecutorBackend"]
    assert {"dummy", "auto"} <= set(snapshot["literals"]["LoadFormats"])
    sampling = {f["name"] for f in snapshot["fields"]["SamplingParams"]}
    assert {"seed", "include_stop_str_in_output", "logprobs", "min_p"} <= sampling

    def parameters(method):
        return [(p["name"], p["kind"], p["default"]) for p in snapshot["methods"][method]]

    assert parameters("LLM.collective_rpc") == [
        ("self", "POSITIONAL_OR_KEYWORD", None), ("method", "POSITIONAL_OR_KEYWORD", None),
        ("timeout", "POSITIONAL_OR_KEYWORD", "None"), ("args", "POSITIONAL_OR_KEYWORD", "()"),
        ("kwargs", "POSITIONAL_OR_KEYWORD", "None")]
    # collective_rpc("reload_weights") runs the worker's method, which hands its arguments to the runner's.
    assert parameters("Worker.reload_weights") == [
        ("self", "POSITIONAL_OR_KEYWORD", None), ("args", "VAR_POSITIONAL", None), ("kwargs", "VAR_KEYWORD", None)]
    assert parameters("GPUModelRunner.reload_weights") == [
        ("self", "POSITIONAL_OR_KEYWORD", None), ("weights_iterator", "POSITIONAL_OR_KEYWORD", "None"),
        ("weights_path", "POSITIONAL_OR_KEYWORD", "None"), ("is_checkpoint_format", "POSITIONAL_OR_KEYWORD", "True")]


def test_start_up_on_cpu_reads_no_weights_and_never_sleeps(fake_vllm):
    engine = make_engine(fake_vllm)
    assert engine_calls(fake_vllm) == [("LLM.__init__", dict(
        model="toy/model", tokenizer="toy/model", dtype="float32", seed=7_000_021, tensor_parallel_size=1,
        distributed_executor_backend="external_launcher", gpu_memory_utilization=0.4, max_model_len=None,
        enable_prefix_caching=True, enable_sleep_mode=False, logprobs_mode="processed_logprobs",
        trust_remote_code=False, enforce_eager=True, load_format="dummy",
        enable_chunked_prefill=False, max_num_batched_tokens=8192))]  # whole prefills: CPU generators cannot rewind
    # One process without torchrun: a world of one, the engine core in this process, a 1 GiB KV cache.
    assert engine.llm.launcher == {"RANK": "0", "LOCAL_RANK": "0"}
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert engine.needs_weights and engine.weight_dtype == torch.float32 and engine.weight_device is None
    with pytest.raises(ValueError, match="Sleep mode is not supported"):  # what asking for it on a CPU meets
        fake_vllm.LLM("toy/model", enable_sleep_mode=True)


def test_start_up_on_a_gpu_reads_no_weights_then_sleeps_at_level_2(fake_vllm, monkeypatch):
    engine = cuda_engine(fake_vllm, monkeypatch)
    calls = engine_calls(fake_vllm)
    assert names(calls) == ["LLM.__init__", "LLM.sleep"] and calls[1][1] == {"level": 2}
    assert calls[0][1] == dict(
        model="toy/model", tokenizer="toy/model", dtype="bfloat16", seed=7_000_021, tensor_parallel_size=1,
        distributed_executor_backend="external_launcher", gpu_memory_utilization=0.4, max_model_len=None,
        enable_prefix_caching=True, enable_sleep_mode=True, logprobs_mode="processed_logprobs",
        trust_remote_code=False, enforce_eager=False, load_format="dummy")
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert engine.needs_weights and engine.llm.asleep == {"weights", "kv_cache"}
    fake_vllm.CALLS.clear()
    make_engine(fake_vllm, enforce_eager=True, max_model_len=64)
    assert fake_vllm.CALLS[0].kwargs["enforce_eager"] is True and fake_vllm.CALLS[0].kwargs["max_model_len"] == 64


def test_each_rank_seeds_its_engine_differently(fake_vllm, monkeypatch):
    seeds = []
    for rank in ("0", "3"):
        monkeypatch.setenv("RANK", rank)
        seeds.append(make_engine(fake_vllm).llm.options["seed"])
    assert seeds[0] != seeds[1] and all(0 <= seed < 2**32 for seed in seeds)


def test_a_sync_on_cpu_is_one_reload_of_every_tensor_then_a_prefix_cache_reset(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    state = root.causal_lm.state_dict()
    for _ in range(2):  # no wake before and no sleep after, the first sync or a later one
        fake_vllm.CALLS.clear()
        sent = sync_weights(root, engine)
        assert engine_calls(fake_vllm) == [RELOAD, RESET]
        assert sent == sum(t.numel() * 4 for t in state.values())
    reload = next(call for call in fake_vllm.CALLS if call.name == "LLM.collective_rpc")
    assert reload.args == ("reload_weights",) and set(reload.kwargs["kwargs"]) == {"weights_iterator",
                                                                                   "is_checkpoint_format"}
    received = engine.llm.model.received[-len(state):]
    assert [name for name, _ in received] == list(state)  # every name, the tied head included
    assert "lm_head.weight" in state
    assert all(tensor.dtype == torch.float32 and torch.equal(tensor, state[name]) for name, tensor in received)
    assert engine.llm.model.values == fingerprints(root, torch.float32)
    assert not engine.needs_weights


def test_the_engine_reads_each_tensor_as_it_is_gathered(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    received, read_before, gather = engine.llm.model.received, [], rollout_weights._full_tensor

    def recording(tensor, dtype, device):
        read_before.append(len(received))
        return gather(tensor, dtype, device)

    monkeypatch.setattr(rollout_weights, "_full_tensor", recording)
    sync_weights(root, engine)
    # When tensor i is gathered the engine has read the i before it: one gathered tensor at a time.
    assert read_before == list(range(len(fake_vllm.PARAMETERS)))
    assert len(received) == len(fake_vllm.PARAMETERS)


def test_a_sync_on_a_gpu_wakes_the_weights_once_before_the_reload(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = cuda_engine(fake_vllm, monkeypatch)
    with pytest.raises(RuntimeError, match="while the weights sleep"):  # why the wake comes first
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(()), "is_checkpoint_format": True})
    fake_vllm.CALLS.clear()
    sent = sync_weights(root, engine)
    assert engine_calls(fake_vllm) == [FREE, ("LLM.wake_up", {"tags": ["weights"]}), RELOAD, RESET]
    state = root.causal_lm.state_dict()
    assert sent == sum(t.numel() * 2 for t in state.values())
    received = engine.llm.model.received
    assert [name for name, _ in received] == list(state)
    assert all(tensor.dtype == torch.bfloat16 for _, tensor in received)  # cast from the fp32 master weights
    assert engine.llm.model.values == fingerprints(root, torch.bfloat16)
    assert not engine.needs_weights and engine.llm.asleep == {"kv_cache"}
    fake_vllm.CALLS.clear()
    sync_weights(root, engine)  # the weights still awake: no second wake
    assert engine_calls(fake_vllm) == [RELOAD, RESET]


def test_a_sync_that_sends_nothing_or_cannot_reset_the_prefix_cache_fails(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    with pytest.raises(RuntimeError, match="sent no tensors"):
        engine.sync(iter(()))
    assert engine.needs_weights and engine_calls(fake_vllm)[1:] == [RELOAD]
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: False)
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        sync_weights(root, engine)
    assert engine.needs_weights


def test_a_sync_inside_a_rollout_is_refused(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    ensure_engine_weights(root, engine)
    fake_vllm.CALLS.clear()
    with engine.phase():
        with pytest.raises(RuntimeError, match="inside a rollout"):
            sync_weights(root, engine)
    assert fake_vllm.CALLS == []


def test_every_tensor_is_sent_because_a_layer_sent_in_part_is_garbage_and_a_head_left_out_is_stale(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    sync_weights(root, engine)
    values, old_head = engine.llm.model.values, engine.llm.model.values["lm_head.weight"]
    move(root, 1.0)  # the embedding and the head it is tied to move together
    state = root.causal_lm.state_dict()
    engine.sync((name, tensor) for name, tensor in state.items() if name != "lm_head.weight")
    assert values["lm_head.weight"] == old_head != values["model.embed_tokens.weight"]
    engine.sync((name, tensor) for name, tensor in state.items() if ".0.self_attn.k_proj." not in name)
    assert engine.llm.model.uninitialised() == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    with pytest.raises(RuntimeError, match="uninitialised"):
        engine.generate(prompts_of("tom has 3 apples ."), SamplingSettings(n=1, max_new_tokens=2))
    sync_weights(root, engine)
    assert engine.llm.model.values == fingerprints(root, torch.float32)


def test_a_sync_resets_the_prefix_cache_so_the_next_rollout_samples_the_new_weights(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    prompts, settings = prompts_of("tom has 3 apples ."), SamplingSettings(n=4, max_new_tokens=8)
    keys = sequence_keys(0, 0, [0], 4)

    def sample():
        return [c.token_ids for c in engine.generate(prompts, settings, row_keys=keys)]

    ensure_engine_weights(root, engine)
    first = sample()
    assert sample() == first and ensure_engine_weights(root, engine) == 0  # on a CPU the copy stays current
    move(root, 0.5)
    sync_weights(root, engine)
    moved = sample()
    assert moved != first
    # What the reset is for: without it the prompt's cached blocks, computed with the old weights, serve it.
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
    move(root, 0.5)
    sync_weights(root, engine)
    assert sample() == moved


def test_each_rollout_on_a_gpu_wakes_the_kv_cache_generates_then_sleeps(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = cuda_engine(fake_vllm, monkeypatch)
    settings = SamplingSettings(n=2, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="comes first"):  # started on dummy weights, asleep
        engine.generate(prompts_of("tom has 3 apples ."), settings)
    for step in range(2):
        assert ensure_engine_weights(root, engine) > 0
        assert ensure_engine_weights(root, engine) == 0  # due once per rollout only
        engine.generate(prompts_of("tom has 3 apples ."), settings, row_keys=sequence_keys(0, step, [0], 2))
    sync = [FREE, ("LLM.wake_up", {"tags": ["weights"]}), RELOAD, RESET]
    rollout_calls = [FREE, ("LLM.wake_up", {"tags": ["kv_cache"]}), "LLM.generate", ("LLM.sleep", {"level": 2})]
    calls = [name if name == "LLM.generate" else (name, arguments) for name, arguments in engine_calls(fake_vllm)]
    assert calls[2:] == (sync + rollout_calls) * 2
    assert engine.needs_weights  # the level-2 sleep discarded the weights: the next step syncs before it samples


def test_a_steps_sampling_rounds_share_one_wake(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = cuda_engine(fake_vllm, monkeypatch)
    ensure_engine_weights(root, engine)
    fake_vllm.CALLS.clear()
    with engine.phase():
        for sampling_round in range(2):
            engine.generate(prompts_of("ann gets 5 pears ."), SamplingSettings(n=2, max_new_tokens=4),
                            row_keys=sequence_keys(0, sampling_round << 32, [1], 2))
    assert names(engine_calls(fake_vllm)) == ["torch.cuda.empty_cache", "LLM.wake_up", "LLM.generate",
                                              "LLM.generate", "LLM.sleep"]


def test_row_keys_seed_one_request_per_row_as_the_hf_engine_keys_its_rows(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    prompts = prompts_of("tom has 3 apples .", "ann gets 5 pears .")
    settings = SamplingSettings(n=3, temperature=0.7, top_p=0.9, min_p=0.05, max_new_tokens=5)
    keys = sequence_keys(11, 4, [20, 21], 3)
    ensure_engine_weights(root, engine)
    fake_vllm.CALLS.clear()
    completions = engine.generate(prompts, settings, row_keys=keys)
    params = [call.kwargs for call in fake_vllm.CALLS if call.name == "SamplingParams"]
    assert [p["seed"] for p in params] == [int(key) & SEED_MASK for key in keys.tolist()]
    assert all(p["n"] == 1 and p["temperature"] == 0.7 and p["top_p"] == 0.9 and p["min_p"] == 0.05
               and p["max_tokens"] == 5 and p["logprobs"] == 0 and p["include_stop_str_in_output"] for p in params)
    generate = next(call for call in fake_vllm.CALLS if call.name == "LLM.generate")
    assert [p["prompt_token_ids"] for p in generate.args[0]] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    # The same keys sample the same rows, alone or in another batch; other keys sample others.
    alone = engine.generate(prompts[1:], settings, row_keys=keys[3:])
    assert [c.token_ids for c in alone] == [c.token_ids for c in completions[3:]]
    other = engine.generate(prompts, settings, row_keys=sequence_keys(11, 5, [20, 21], 3))
    assert [c.token_ids for c in other] != [c.token_ids for c in completions]


def test_sampled_logprobs_are_read_by_token_id_from_each_positions_dict(fake_vllm):
    from trainer.rollout.vllm import sampled_logprobs

    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    ensure_engine_weights(root, engine)
    completions = engine.generate(prompts_of("tom has 3 apples ."), SamplingSettings(n=4, max_new_tokens=8))
    for completion, output in zip(completions, fake_vllm.OUTPUTS):
        positions = output.outputs[0].logprobs
        assert completion.logprobs == [position[token].logprob for token, position in
                                       zip(completion.token_ids, positions)]
        assert all(value < 0 for value in completion.logprobs)  # never the decoy's 0.0 listed first
    Logprob = fake_vllm.Logprob
    assert sampled_logprobs([5, 9], [{1: Logprob(-0.1), 5: Logprob(-2.0)}, {9: Logprob(-0.5)}]) == [-2.0, -0.5]
    with pytest.raises(RuntimeError, match="1 of 2"):
        sampled_logprobs([5, 9], [{5: Logprob(-2.0)}])
    with pytest.raises(RuntimeError, match="0 of 2"):
        sampled_logprobs([5, 9], None)


def scripted(fake, words):
    """Makes the fake model write `words` then the end-of-sequence token; returns those tokens."""
    tokenizer = toy_tokenizer()
    tokens = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    fake.SCRIPT = lambda prompt, so_far, rng: tokens[len(so_far)]
    return tokens


def test_stop_strings_stay_in_the_text_and_end_where_the_hf_engine_ends(fake_vllm):
    from trainer.rollout.hf import HFRolloutEngine

    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    tokenizer = fake_vllm.TOKENIZER
    tokens = scripted(fake_vllm, ["so", "tom", "has", "3", "apples", ".", "wait", "check"])
    hf_engine = HFRolloutEngine(None, tokenizer, torch.device("cpu"))
    ensure_engine_weights(root, engine)
    for stop in ("apples", "never"):
        completion = engine.generate(prompts_of("how many"), SamplingSettings(n=1, max_new_tokens=20, stop=[stop]))[0]
        assert completion.finish_reason == "stop"
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=False)
        if stop == "apples":  # cut after the token that completes it, where the HF engine cuts
            assert completion.text.endswith("apples")
            assert len(completion.token_ids) == hf_engine._stop_end(tokens, [stop]) < len(tokens)
        else:  # ended by the end-of-sequence token, which stays, as the HF engine keeps it
            assert completion.token_ids == tokens and completion.text.endswith("<|im_end|>")
    cut = engine.generate(prompts_of("how many"), SamplingSettings(n=1, max_new_tokens=3))[0]
    assert cut.finish_reason == "length" and cut.token_ids == tokens[:3]


def run_whole_session(fake, monkeypatch, platform):
    """Start-up, syncs, keyed and unkeyed rollouts with stop strings, sampling rounds."""
    root = policy(fake)
    engine = cuda_engine(fake, monkeypatch, max_model_len=64) if platform == "cuda" else make_engine(fake,
                                                                                                   max_model_len=64)
    ensure_engine_weights(root, engine)
    engine.generate(prompts_of("tom has 3 apples ."), SamplingSettings(n=2, stop=["."], max_new_tokens=5),
                    row_keys=sequence_keys(0, 0, [0], 2))
    sync_weights(root, engine)
    with engine.phase():
        engine.generate(prompts_of("ann gets 5 pears ."), SamplingSettings(n=1, temperature=0.0, max_new_tokens=3))
        engine.generate(prompts_of("how many"), SamplingSettings(n=2, top_p=0.5, max_new_tokens=3))


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_every_recorded_call_binds_to_vllm_0_33_0(fake_vllm, monkeypatch, platform):
    run_whole_session(fake_vllm, monkeypatch, platform)
    checked = set()
    for call in fake_vllm.CALLS:
        if call.name != "torch.cuda.empty_cache":
            vllm_fake.check_call(SNAPSHOT, call.name, call.args, call.kwargs)
            checked.add(call.name)
    expected = {"SamplingParams", "LLM.__init__", "LLM.collective_rpc", "LLM.reset_prefix_cache", "LLM.generate"}
    assert checked == (expected | {"LLM.sleep", "LLM.wake_up"} if platform == "cuda" else expected)


@pytest.mark.parametrize("name, args, kwargs", [
    ("SamplingParams", (), {"include_stop_strings": True}),
    ("SamplingParams", (8,), {}),
    ("LLM.__init__", ("model",), {"sleep_level": 2}),
    ("LLM.__init__", ("model",), {"logprobs_mode": "processed"}),
    ("LLM.__init__", ("model",), {"distributed_executor_backend": "torchrun"}),
    ("LLM.__init__", ("model",), {"load_format": "random"}),
    ("LLM.wake_up", (), {"tags": ["weights", "kv"]}),
    ("LLM.sleep", (), {"level": 3}),
    ("LLM.reset_prefix_cache", (), {"device": "cuda"}),
    ("LLM.generate", ([{"prompt_ids": [1, 2]}],), {}),
    ("LLM.collective_rpc", ("load_weights",), {"kwargs": {"weights": []}}),
    ("LLM.collective_rpc", ("reload_weights",), {"kwargs": {"weights": []}}),
    ("LLM.collective_rpc", ("reload_weights",), {"args": ([], None, True, False)}),
    ("LLM.collective_rpc", ("reload_weights", None, (), {}, True), {}),
])
def test_the_binding_check_refuses_what_vllm_0_33_0_would(name, args, kwargs):
    with pytest.raises(TypeError):
        vllm_fake.check_call(SNAPSHOT, name, args, kwargs)


def test_the_binding_check_accepts_the_reload_in_every_form_vllm_0_33_0_does():
    weights = {"weights_iterator": iter(()), "is_checkpoint_format": True}
    for args, kwargs in ((("reload_weights",), {"kwargs": weights}), (("reload_weights", None, (iter(()),)), {}),
                         ((), {"method": "reload_weights", "kwargs": {"weights_path": "/m"}})):
        vllm_fake.check_call(SNAPSHOT, "LLM.collective_rpc", args, kwargs)
    vllm_fake.check_call(SNAPSHOT, "LLM.__init__", ("model",), {"load_format": "DUMMY"})  # lowercased by vLLM


def test_an_argument_vllm_lacks_fails_the_session(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    monkeypatch.setattr(adapter, "LOGPROBS_MODE", "processed")
    with pytest.raises(TypeError, match="logprobs_mode"):
        make_engine(fake_vllm)


def test_each_platform_takes_its_own_release(fake_vllm, monkeypatch):
    from trainer.rollout.vllm import import_vllm

    monkeypatch.setattr(fake_vllm, "__version__", "0.33.0")  # on the CPU: the CPU build's 0.32
    with pytest.raises(ConfigError, match=r"vllm 0\.33\.0 is installed, but on cpu .* vLLM 0\.32 \(bash \.ci/vllm_env"):
        import_vllm()
    monkeypatch.setattr(fake_vllm, "__version__", "0.32.1")
    assert import_vllm() is fake_vllm
    on_platform(fake_vllm, monkeypatch, "cuda")
    monkeypatch.setattr(fake_vllm, "__version__", "0.32.1")
    with pytest.raises(ConfigError, match=r"vllm 0\.32\.1 is installed, but on cuda .* vLLM 0\.33 \(pip install"):
        import_vllm()
    monkeypatch.setattr(fake_vllm, "__version__", "0.33.2+cu130")
    assert import_vllm() is fake_vllm
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets when it is not installed
    with pytest.raises(ConfigError, match=r"eval.engine=vllm needs vllm 0\.33\.x on cuda .*cannot be imported"):
        import_vllm("eval.engine")
    on_platform(fake_vllm, monkeypatch, "cpu")
    with pytest.raises(ConfigError, match=r"needs vllm 0\.32\.x on cpu \(bash \.ci/vllm_env\.sh"):
        import_vllm()


def recipe_config(beta=0.04):
    config = RunConfig()
    config.grpo.loss.beta = beta
    return config


def split_error(utilization, world_size, max_model_len=512 + 16384, gpu_gib=80, enforce_eager=False):
    """The memory-split error for the recipe's model at this share, or None when it fits."""
    from trainer.rollout.vllm import ModelShape, check_memory_split, training_state_bytes

    shape = ModelShape(**QWEN_14B)
    training, detail = training_state_bytes(shape.parameters, recipe_config(), world_size)
    try:
        check_memory_split(gpu_bytes=gpu_gib * GIB, utilization=utilization, shape=shape, tensor_parallel_size=1,
                           max_model_len=max_model_len, training_bytes=training, training_detail=detail,
                           enforce_eager=enforce_eager)
    except ConfigError as error:
        return str(error)
    return None


def test_the_memory_split_is_checked_with_the_numbers_named():
    assert split_error(0.5, world_size=8) is None  # the recipe's setting on 8 x 80 GiB
    too_small = split_error(0.3, world_size=8)
    # (27.5 GiB of bf16 weights + 5.1 GiB of vLLM's overhead + 3.1 GiB of KV cache) / 80 GiB = 0.447
    assert "24.0 GiB" in too_small and "bf16 weights (27.5 GiB" in too_small and "at least 0.45" in too_small
    assert "one 16896-token sequence (3.1 GiB)" in too_small
    assert split_error(0.45, world_size=8) is None and "at least 0.45" in split_error(0.44, world_size=8)
    too_big = split_error(0.8, world_size=8)
    # fp32 master weights + 2 moments: 12 bytes x 14.77B / 8 = 20.6 GiB, the bf16 reference 3.4 GiB more.
    assert "leaves 16.0 GiB" in too_big and "24.1 GiB" in too_big and "at most 0.67" in too_big
    one_gpu = split_error(0.5, world_size=1)
    assert "no value fits" in one_gpu
    unbounded = split_error(0.5, world_size=8, max_model_len=None)  # the model's own 131072 positions
    assert "131072-token sequence (24.0 GiB)" in unbounded and "at least 0.71" in unbounded


def test_vllms_own_overhead_is_counted_and_named():
    from trainer.rollout.vllm import ModelShape, engine_overhead_bytes

    shape = ModelShape(**QWEN_14B)
    # Profiling 16384 tokens: gate, up and activation outputs (3 x 13824) and 4 x 5120 of hidden states in
    # bf16; the sampler's fp32 logits, probabilities and sort buffers over 1024 x 152064; graphs; workspaces.
    activations, sampler = 16384 * (3 * 13824 + 4 * 5120) * 2, 1024 * 152064 * 4 * 3
    total, detail = engine_overhead_bytes(shape, 1)
    assert total == activations + sampler + GIB + GIB // 2  # 5.13 GiB
    assert detail == ("1.9 GiB profiling activations (16384 tokens), 1.7 GiB sampler buffers (1024 sequences), "
                      "1.0 GiB CUDA graphs, 0.5 GiB workspaces")
    assert engine_overhead_bytes(shape, 1, enforce_eager=True)[0] == total - GIB  # no graphs
    assert engine_overhead_bytes(shape, 2)[0] == total - 16384 * 3 * 13824  # the MLP split over two GPUs
    assert f"its own overhead (5.1 GiB: {detail})" in split_error(0.3, world_size=8)
    eager = split_error(0.3, world_size=8, enforce_eager=True)
    assert "its own overhead (4.1 GiB: " in eager and "0.0 GiB CUDA graphs" in eager and "at least 0.44" in eager
    assert split_error(0.44, world_size=8, enforce_eager=True) is None  # 1 GiB less: 0.44 fits


def test_read_model_shape_counts_what_the_model_holds(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.rollout.vllm import read_model_shape
    from trainer.toy.model_dir import build_model_dir

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=3, heads=4, kv_heads=2)
    shape = read_model_shape(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.max_positions) == (3, 2, 8, 4096)
    assert (shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (32, 128, len(toy_tokenizer()))
    assert shape.kv_bytes_per_token(1) == 2 * 3 * 2 * 8 * 2 and shape.kv_bytes_per_token(4) == 2 * 3 * 1 * 8 * 2


def test_on_cpu_the_start_up_check_takes_the_cpu_build_and_checks_no_memory(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    config = recipe_config()
    config.grpo.engine.name, config.grpo.engine.vllm_gpu_memory_utilization = "vllm", 0.99  # no GPU to split
    monkeypatch.setattr(adapter, "read_model_shape", lambda *args, **kwargs: pytest.fail("read on a CPU"))
    engine_class(config.grpo.engine.name).check_startup(config, world_size=1)
    config.grpo.engine.vllm_tensor_parallel_size = 3
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size=3"):
        engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    config.grpo.engine.vllm_tensor_parallel_size = 1
    monkeypatch.setattr(fake_vllm, "__version__", "0.33.0")
    with pytest.raises(ConfigError, match=r"grpo.engine.name=vllm: vllm 0\.33\.0 is installed, but on cpu"):
        engine_class(config.grpo.engine.name).check_startup(config, world_size=1)
    assert fake_vllm.CALLS == []  # nothing started


def test_the_rollout_start_up_check_runs_before_any_engine(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    on_platform(fake_vllm, monkeypatch, "cuda")
    config = recipe_config()
    config.grpo.engine.name, config.grpo.max_prompt_tokens = "vllm", 512
    config.grpo.engine.vllm_gpu_memory_utilization = 0.5
    monkeypatch.setattr(adapter, "read_model_shape", lambda path, trust_remote_code: adapter.ModelShape(**QWEN_14B))
    engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    config.grpo.engine.vllm_gpu_memory_utilization = 0.9
    with pytest.raises(ConfigError, match=r"grpo.engine.vllm_gpu_memory_utilization=0.9: it leaves 8.0 GiB"):
        engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    config.grpo.engine.vllm_gpu_memory_utilization = 0.44  # 512 + 16384 tokens: fits without CUDA graphs only
    with pytest.raises(ConfigError, match=r"=0.44: .*1.0 GiB CUDA graphs.*at least 0.45"):
        engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    config.grpo.engine.vllm_enforce_eager = True
    engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    config.grpo.engine.vllm_tensor_parallel_size = 3
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size=3"):
        engine_class(config.grpo.engine.name).check_startup(config, world_size=8)
    assert fake_vllm.CALLS == []  # nothing started
    config.grpo.engine.name = "hf"
    engine_class(config.grpo.engine.name).check_startup(config, world_size=8)


def test_tensor_parallel_groups_pool_their_rows_and_keep_their_own():
    from trainer.rollout.vllm import check_tensor_parallel, concatenate_shares

    assert concatenate_shares([["a", "b"], ["c"], ["d", "e"]], 1) == (["a", "b", "c", "d", "e"], slice(2, 3))
    assert concatenate_shares([[], ["x"]], 0) == (["x"], slice(0, 0))
    check_tensor_parallel(2, 8, 8)
    for size, world, local in ((3, 8, 8), (2, 8, 1), (0, 8, 8)):
        with pytest.raises(ConfigError):
            check_tensor_parallel(size, world, local)


def pool_rows_on_two_ranks(rank, init_file, out_dir):
    """One gloo rank of a tensor-parallel pair: it brings its own rows and must get the pair's back."""
    import json

    import torch.distributed as dist

    from trainer.rollout.vllm import TensorParallelPeers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    peers = TensorParallelPeers(2)
    rows = [[rank, 10]] + [[rank, 11]] * rank  # rank 0 brings one row, rank 1 two
    everyone, mine = peers.gather(rows)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"everyone": everyone, "mine": everyone[mine], "index": peers.index}, handle)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_a_tensor_parallel_pair_pools_its_rows_on_two_gloo_ranks(tmp_path):
    import json
    import tempfile

    import torch.multiprocessing as mp

    mp.spawn(pool_rows_on_two_ranks, args=(tempfile.mktemp(dir=tmp_path), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["everyone"] == [[0, 10], [1, 10], [1, 11]] and result["index"] == 0
        assert result["mine"] == ([[0, 10]] if rank == 0 else [[1, 10], [1, 11]])


def test_rank_shares_partition_the_problems():
    for count in range(12):
        for world_size in range(1, 5):
            shares = [rank_share(count, rank, world_size) for rank in range(world_size)]
            assert sorted(i for share in shares for i in share) == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert merge_shares([([2, 0], ["c", "a"]), ([1], ["b"])], 3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="two ranks"):
        merge_shares([([0], ["a"]), ([0], ["a"])], 1)
    with pytest.raises(ValueError, match="1 of 2 items came from no rank"):
        merge_shares([([0], ["a"])], 2)


def test_evaluation_split_across_ranks_samples_what_one_rank_samples(fake_vllm, monkeypatch):
    on_platform(fake_vllm, monkeypatch, "cuda")  # where an engine could sleep
    engine = make_engine(fake_vllm, colocated=False)
    prompts = prompts_of("tom has 3 apples .", "ann gets 5 pears .", "how many", "tom gets 2", "so", "wait", "yes")
    settings = SamplingSettings(n=2, temperature=0.6, top_p=0.95, max_new_tokens=6)
    whole = sample_problems(engine, prompts, settings, seed=5)
    shares = []
    monkeypatch.setattr(rollout_shares, "gather_shares", lambda indices, items, count: shares.append((indices, items)))
    fake_vllm.CALLS.clear()
    for rank in range(3):
        sample_problems(engine, prompts, settings, seed=5, rank=rank, world_size=3)
    merged = merge_shares(shares, len(prompts))
    assert [[c.token_ids for c in group] for group in merged] == [[c.token_ids for c in group] for group in whole]
    assert [[c.prompt_index for c in group] for group in merged] == [[i, i] for i in range(len(prompts))]
    # Dealt rank, rank + 3, ... and keyed as rollout.hf.sample_completions keys problem i: (seed, step 0, i, sample).
    seeds = [call.kwargs["seed"] for call in fake_vllm.CALLS if call.name == "SamplingParams"]
    dealt = [0, 3, 6, 1, 4, 2, 5]
    assert seeds == [int(k) & SEED_MASK for k in sequence_keys(5, 0, dealt, 2).tolist()]
    assert set(names(engine_calls(fake_vllm))) == {"LLM.generate"}  # an evaluation engine stays awake
    assert engine.llm.options["enable_sleep_mode"] is False and not engine.needs_weights


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_eval_with_vllm_builds_one_awake_engine_on_the_checkpoint_and_returns_every_problem(fake_vllm, monkeypatch,
                                                                                           platform):
    import trainer.rollout.vllm as adapter

    on_platform(fake_vllm, monkeypatch, platform)
    checked = []
    monkeypatch.setattr(adapter, "check_vllm_startup", lambda *args, **kwargs: checked.append(kwargs))
    config = RunConfig()
    config.model.path, config.eval.samples, config.eval.budgets = "toy/model", 3, [8, 16]
    problems = [(prompt, "3") for prompt in prompts_of("tom has 3 apples .", "how many")]
    per_prompt, calls = adapter.VLLMRolloutEngine.sample_benchmark(config, problems, toy_tokenizer(), None, rank=0,
                                                                      world_size=1)
    assert [len(group) for group in per_prompt] == [3, 3] and calls == 1
    options = fake_vllm.CALLS[0].kwargs
    assert options["load_format"] == "auto" and options["enable_sleep_mode"] is False  # model.path's weights
    assert options["gpu_memory_utilization"] == 0.9 and options["enforce_eager"] is (platform == "cpu")
    assert options["dtype"] == ("bfloat16" if platform == "cuda" else "float32")
    assert names(engine_calls(fake_vllm)) == ["LLM.__init__", "LLM.generate"]  # no sync, no sleep
    assert options["max_model_len"] == max(len(p) for p, _ in problems) + 16 == checked[0]["max_model_len"]
    assert checked[0]["training"] is False
    params = [call.kwargs for call in fake_vllm.CALLS if call.name == "SamplingParams"]
    assert {(p["temperature"], p["top_p"], p["max_tokens"]) for p in params} == {(0.6, 0.95, 16)}


def test_stop_at_think_end_reads_vllm_completions_like_hf_ones(fake_vllm):
    from trainer.evaluate import score_at_budgets

    engine = make_engine(fake_vllm, colocated=False)
    tokens = scripted(fake_vllm, ["so", "\\boxed{", "3", "}", "</think>", "\\boxed{", "4", "}"])
    per_prompt = sample_problems(engine, prompts_of("how many"), SamplingSettings(n=1, max_new_tokens=32), seed=0)
    completion = per_prompt[0][0]
    assert completion.finish_reason == "stop" and "</think>" in completion.text
    tokenizer = fake_vllm.TOKENIZER
    thinking, _ = score_at_budgets(per_prompt, ["3"], tokenizer, [32], stop_at_think_end=True)
    whole, _ = score_at_budgets(per_prompt, ["3"], tokenizer, [32], stop_at_think_end=False)
    assert thinking[0].pass_at_1 == 1.0 and whole[0].pass_at_1 == 0.0  # the answer before </think> is 3
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    assert thinking[0].mean_tokens == tokens.index(think_end) + 1  # counted up to and including </think>


def completion_logprobs_of(model, prompt, completion):
    """log_softmax(logits) of the completion's tokens under `model`, as the trainer's loss reads them."""
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion, device="cuda")[:, None])[:, 0].cpu()


def bf16_tolerance(model, prompt, completion):
    """Twice the error of plain PyTorch in bf16 against fp32 (the flash-attention rule), at least 1e-2."""
    exact = completion_logprobs_of(model, prompt, completion)
    plain = completion_logprobs_of(copy.deepcopy(model).to(torch.bfloat16), prompt, completion)
    return exact, max(2 * (plain - exact).abs().max().item(), 1e-2)


@pytest.fixture
def real_vllm_process():
    """Undoes what a real engine leaves in this process: torchrun variables and vLLM's process groups."""
    environment = dict(os.environ)
    yield
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install -e .[vllm])")
def test_the_engine_follows_the_trainer_on_a_gpu(tmp_path, real_vllm_process):
    """Greedy output survives a sleep and a sync of unchanged weights; the log-probs the engine reports for
    its samples (temperature 1, no top-p) match the trainer's within bf16 error, before and after an
    optimizer step, through the level-2 sleep, the weights' wake and the reload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import CausalLMLoss
    from trainer.rollout.vllm import VLLMRolloutEngine
    from trainer.toy.model_dir import build_model_dir

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=128, layers=2, heads=2, kv_heads=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()  # fp32 master weights
    root = CausalLMLoss(model)
    engine = VLLMRolloutEngine(path, tokenizer, gpu_memory_utilization=0.2, max_model_len=128, enforce_eager=True)
    assert engine.needs_weights  # started on dummy weights, asleep
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("tom has 3 apples .", "how many")]
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=12)
    assert ensure_engine_weights(root, engine) > 0
    first = engine.generate(prompts, greedy)
    assert engine.needs_weights  # the rollout's level-2 sleep released them
    sync_weights(root, engine)  # the same weights again, through a whole sleep-wake-reload cycle
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == [c.token_ids for c in first]
    sampled, prompt = SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_new_tokens=12), prompts[0]

    def engine_sample():
        sync_weights(root, engine)
        completion = engine.generate([prompt], sampled, row_keys=sequence_keys(0, 0, [0], 1))[0]
        return completion.token_ids, torch.tensor(completion.logprobs)

    tokens, engine_logprobs = engine_sample()
    expected, tolerance = bf16_tolerance(model, prompt, tokens)
    assert (engine_logprobs - expected).abs().max().item() <= tolerance
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tokens, engine_logprobs = engine_sample()
    expected, tolerance = bf16_tolerance(model, prompt, tokens)
    stale = completion_logprobs_of(before, prompt, tokens)
    assert (expected - stale).abs().max().item() > 5 * tolerance  # the step moved the policy: stale weights fail
    assert (engine_logprobs - expected).abs().max().item() <= tolerance


def test_on_cpu_every_prompt_is_prefilled_in_one_engine_step(tmp_path):
    from trainer.rollout.vllm import _whole_prefills

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert _whole_prefills(str(tmp_path), None) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 32768}
    assert _whole_prefills(str(tmp_path), 300) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert _whole_prefills(str(tmp_path), 20000)["max_num_batched_tokens"] == 20000
