"""The vLLM adapter against vLLM 0.33.0's real API, without a GPU.

A fake `vllm` (tests/vllm_fake) records every call and models the engine behaviour the adapter
relies on; every recorded call must bind to the signatures snapshotted from the 0.33.0 wheel
(tests/data/vllm_0_33_0_signatures.json, bench/vllm_signatures.py). The last test runs the
real engine and is for a GPU machine with vllm installed.
"""

import functools
import importlib.util
import os
import sys

import pytest
import torch
import vllm_fake

from trainer import rollout
from trainer.config import ConfigError, RunConfig
from trainer.rollout import (
    SamplingSettings,
    check_rollout_startup,
    ensure_engine_weights,
    merge_shares,
    rank_share,
    rollout_phase,
    sample_problems,
    sync_weights,
)
from trainer.rollout.keyed_sampling import sequence_keys
from trainer.toy.model_dir import build_tokenizer
from trainer.toy.task import WORDS

FAKE_VLLM_DIR = os.path.join(os.path.dirname(__file__), "vllm_fake")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "VLLM_ENABLE_V1_MULTIPROCESSING")
SEED_MASK = (1 << 63) - 1
# The recipe's model: DeepSeek-R1-Distill-Qwen-14B, as read_model_shape reads its config.
QWEN_14B = dict(parameters=14_770_033_664, layers=48, kv_heads=8, head_dim=128, max_positions=131072)


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake vllm as `vllm`, a process without torchrun variables, and torch.cuda.empty_cache recorded."""
    environment = dict(os.environ)
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "vllm" or name.startswith("vllm.")}
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    monkeypatch.syspath_prepend(FAKE_VLLM_DIR)
    import vllm

    vllm.TOKENIZER = toy_tokenizer()
    freed = vllm.Call("torch.cuda.empty_cache", (), {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: vllm.CALLS.append(freed))
    yield vllm
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]
    sys.modules.update(hidden)
    os.environ.clear()
    os.environ.update(environment)


def engine_calls(fake):
    """The recorded calls that drive the engine: (name, arguments) of LLM methods and cache frees."""
    return [(call.name, call.kwargs or call.args) for call in fake.CALLS if call.name != "SamplingParams"]


def names(calls):
    return [name for name, _ in calls]


def make_engine(fake, **options):
    from trainer.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine("toy/model", fake.TOKENIZER, gpu_memory_utilization=0.4, seed=7, **options)


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


def prompts_of(*texts):
    return [toy_tokenizer()(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_the_snapshot_is_vllm_0_33_0_read_from_its_wheel():
    snapshot = vllm_fake.load_snapshot()
    assert snapshot["vllm_version"] == "0.33.0" and snapshot["wheel"].startswith("vllm-0.33.0-")
    assert {f"LLM.{m}" for m in ("__init__", "generate", "sleep", "wake_up", "reset_prefix_cache", "apply_model",
                                 "collective_rpc")} <= set(snapshot["methods"])
    engine_fields = {f["name"] for f in snapshot["fields"]["EngineArgs"]}
    assert {"enable_sleep_mode", "logprobs_mode", "distributed_executor_backend", "enable_prefix_caching",
            "max_model_len"} <= engine_fields
    assert "processed_logprobs" in snapshot["literals"]["LogprobsMode"]
    assert "external_launcher" in snapshot["literals"]["DistributedExecutorBackend"]
    sampling = {f["name"] for f in snapshot["fields"]["SamplingParams"]}
    assert {"seed", "include_stop_str_in_output", "logprobs", "prompt_logprobs", "min_p"} <= sampling


def test_start_up_binds_to_this_rank_and_sleeps_at_level_2(fake_vllm):
    engine = make_engine(fake_vllm)
    calls = engine_calls(fake_vllm)
    assert names(calls) == ["LLM.__init__", "LLM.sleep"] and calls[1][1] == {"level": 2}
    options = engine.llm.options
    assert options["distributed_executor_backend"] == "external_launcher"
    assert options["logprobs_mode"] == "processed_logprobs"
    assert options["enable_sleep_mode"] is True and options["enable_prefix_caching"] is True
    assert options["tensor_parallel_size"] == 1 and options["gpu_memory_utilization"] == 0.4
    # One process without torchrun: a world of one on this device, the engine core in this process.
    assert engine.llm.launcher == {"RANK": "0", "LOCAL_RANK": "0"}
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine.needs_weights and engine.weight_dtype == torch.bfloat16


def test_each_rank_seeds_its_engine_differently(fake_vllm, monkeypatch):
    seeds = []
    for rank in ("0", "3"):
        monkeypatch.setenv("RANK", rank)
        seeds.append(make_engine(fake_vllm).llm.options["seed"])
    assert seeds[0] != seeds[1] and all(0 <= seed < 2**32 for seed in seeds)


def test_a_sync_wakes_the_weights_once_loads_every_bucket_then_resets_the_prefix_cache(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    fake_vllm.CALLS.clear()
    sent = sync_weights(root, engine, bucket_bytes=4096)
    calls = engine_calls(fake_vllm)
    loads = len(calls) - 4  # besides the cache free, the wake, the completeness check and the reset
    assert loads > 1
    assert calls[:2] == [("torch.cuda.empty_cache", ()), ("LLM.wake_up", {"tags": ["weights"]})]
    assert names(calls[2:]) == ["LLM.apply_model"] * (loads + 1) + ["LLM.reset_prefix_cache"]
    expected = {name: float(t.to(torch.bfloat16).double().sum()) for name, t in root.causal_lm.state_dict().items()}
    assert engine.llm.model.values == expected  # every tensor, cast to the engine's bf16
    assert sent == sum(t.numel() * 2 for t in root.causal_lm.state_dict().values())
    assert not engine.needs_weights
    fake_vllm.CALLS.clear()
    sync_weights(root, engine, bucket_bytes=1 << 30)  # weights already awake: no second wake
    assert names(engine_calls(fake_vllm)) == ["LLM.apply_model", "LLM.apply_model", "LLM.reset_prefix_cache"]


def test_a_sync_that_misses_a_parameter_fails(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    fake_vllm.PARAMETERS.append("model.extra.weight")
    engine.llm.model = fake_vllm.FakeModel(fake_vllm.PARAMETERS)
    with pytest.raises(RuntimeError, match="model.extra.weight"):
        sync_weights(root, engine, bucket_bytes=1 << 20)
    assert engine.needs_weights


def test_a_prefix_cache_that_cannot_be_reset_fails_the_sync(fake_vllm, monkeypatch):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: False)
    with pytest.raises(RuntimeError, match="prefix cache"):
        sync_weights(root, engine, bucket_bytes=1 << 20)
    assert engine.needs_weights


def test_each_rollout_wakes_the_kv_cache_generates_then_sleeps(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    settings = SamplingSettings(n=2, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="synced"):  # start-up released the weights
        engine.generate(prompts_of("tom has 3 apples ."), settings)
    for step in range(2):
        assert ensure_engine_weights(root, engine, 1 << 20) > 0
        assert ensure_engine_weights(root, engine, 1 << 20) == 0  # due once per rollout only
        engine.generate(prompts_of("tom has 3 apples ."), settings, row_keys=sequence_keys(0, step, [0], 2))
    sync = ["torch.cuda.empty_cache", "LLM.wake_up", "LLM.apply_model", "LLM.apply_model", "LLM.reset_prefix_cache"]
    rollout_calls = ["torch.cuda.empty_cache", "LLM.wake_up", "LLM.generate", "LLM.sleep"]
    calls = engine_calls(fake_vllm)
    assert names(calls) == ["LLM.__init__", "LLM.sleep"] + (sync + rollout_calls) * 2
    assert calls[8] == ("LLM.wake_up", {"tags": ["kv_cache"]}) and calls[10] == ("LLM.sleep", {"level": 2})
    assert engine.needs_weights  # the next step syncs before it samples


def test_a_steps_sampling_rounds_share_one_wake(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    ensure_engine_weights(root, engine, 1 << 20)
    fake_vllm.CALLS.clear()
    with rollout_phase(engine):
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
    ensure_engine_weights(root, engine, 1 << 20)
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
    ensure_engine_weights(root, engine, 1 << 20)
    alone = engine.generate(prompts[1:], settings, row_keys=keys[3:])
    assert [c.token_ids for c in alone] == [c.token_ids for c in completions[3:]]
    ensure_engine_weights(root, engine, 1 << 20)
    other = engine.generate(prompts, settings, row_keys=sequence_keys(11, 5, [20, 21], 3))
    assert [c.token_ids for c in other] != [c.token_ids for c in completions]


def test_sampled_logprobs_are_read_by_token_id_from_each_positions_dict(fake_vllm):
    from trainer.rollout.vllm import sampled_logprobs

    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    ensure_engine_weights(root, engine, 1 << 20)
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
    for stop in ("apples", "never"):
        ensure_engine_weights(root, engine, 1 << 20)
        completion = engine.generate(prompts_of("how many"), SamplingSettings(n=1, max_new_tokens=20, stop=[stop]))[0]
        assert completion.finish_reason == "stop"
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=False)
        if stop == "apples":  # cut after the token that completes it, where the HF engine cuts
            assert completion.text.endswith("apples")
            assert len(completion.token_ids) == hf_engine._stop_end(tokens, [stop]) < len(tokens)
        else:  # ended by the end-of-sequence token, which stays, as the HF engine keeps it
            assert completion.token_ids == tokens and completion.text.endswith("<|im_end|>")
    ensure_engine_weights(root, engine, 1 << 20)
    cut = engine.generate(prompts_of("how many"), SamplingSettings(n=1, max_new_tokens=3))[0]
    assert cut.finish_reason == "length" and cut.token_ids == tokens[:3]


def run_whole_session(fake):
    """Start-up, syncs, keyed and unkeyed rollouts with stop strings, rounds, teacher-forced log-probs."""
    root = policy(fake)
    engine = make_engine(fake, max_model_len=64)
    ensure_engine_weights(root, engine, 2048)
    engine.generate(prompts_of("tom has 3 apples ."), SamplingSettings(n=2, stop=["."], max_new_tokens=5),
                    row_keys=sequence_keys(0, 0, [0], 2))
    sync_weights(root, engine, 2048)
    with rollout_phase(engine):
        engine.generate(prompts_of("ann gets 5 pears ."), SamplingSettings(n=1, temperature=0.0, max_new_tokens=3))
        engine.completion_logprobs([(prompts_of("tom has")[0], prompts_of("3 apples")[0])])


def test_every_recorded_call_binds_to_vllm_0_33_0(fake_vllm):
    run_whole_session(fake_vllm)
    snapshot = vllm_fake.load_snapshot()
    checked = set()
    for call in fake_vllm.CALLS:
        if call.name != "torch.cuda.empty_cache":
            vllm_fake.check_call(snapshot, call.name, call.args, call.kwargs)
            checked.add(call.name)
    assert checked == {"SamplingParams", "LLM.__init__", "LLM.sleep", "LLM.wake_up", "LLM.apply_model",
                       "LLM.reset_prefix_cache", "LLM.generate"}


@pytest.mark.parametrize("name, args, kwargs", [
    ("SamplingParams", (), {"include_stop_strings": True}),
    ("SamplingParams", (8,), {}),
    ("LLM.__init__", ("model",), {"sleep_level": 2}),
    ("LLM.__init__", ("model",), {"logprobs_mode": "processed"}),
    ("LLM.__init__", ("model",), {"distributed_executor_backend": "torchrun"}),
    ("LLM.wake_up", (), {"tags": ["weights", "kv"]}),
    ("LLM.sleep", (), {"level": 3}),
    ("LLM.reset_prefix_cache", (), {"device": "cuda"}),
    ("LLM.generate", ([{"prompt_ids": [1, 2]}],), {}),
    ("LLM.apply_model", (), {"fn": print}),
])
def test_the_binding_check_refuses_what_vllm_0_33_0_would(name, args, kwargs):
    with pytest.raises(TypeError):
        vllm_fake.check_call(vllm_fake.load_snapshot(), name, args, kwargs)


def test_an_argument_vllm_lacks_fails_the_session(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    monkeypatch.setattr(adapter, "LOGPROBS_MODE", "processed")
    with pytest.raises(TypeError, match="logprobs_mode"):
        make_engine(fake_vllm)


def test_start_up_errors_name_the_problem(fake_vllm, monkeypatch):
    from trainer.rollout.vllm import import_vllm

    monkeypatch.setattr(fake_vllm, "__version__", "0.32.1")
    with pytest.raises(ConfigError, match=r"vllm 0\.32\.1 is installed.*vLLM 0\.33"):
        import_vllm()
    monkeypatch.setattr(fake_vllm, "__version__", "0.33.2+cu130")
    assert import_vllm() is fake_vllm
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets when it is not installed
    with pytest.raises(ConfigError, match=r"eval.engine=vllm needs vllm 0\.33\.x .*cannot be imported"):
        import_vllm("eval.engine")


def recipe_config(beta=0.04):
    config = RunConfig()
    config.grpo.beta = beta
    return config


def split_error(utilization, world_size, max_model_len=512 + 16384, gpu_gib=80):
    """The memory-split error for the recipe's model at this share, or None when it fits."""
    from trainer.rollout.vllm import ModelShape, check_memory_split, training_state_bytes

    shape = ModelShape(**QWEN_14B)
    training, detail = training_state_bytes(shape.parameters, recipe_config(), world_size)
    try:
        check_memory_split(gpu_bytes=gpu_gib * 2**30, utilization=utilization, shape=shape, tensor_parallel_size=1,
                           max_model_len=max_model_len, training_bytes=training, training_detail=detail)
    except ConfigError as error:
        return str(error)
    return None


def test_the_memory_split_is_checked_with_the_numbers_named():
    assert split_error(0.5, world_size=8) is None  # the recipe's setting on 8 x 80 GiB
    too_small = split_error(0.3, world_size=8)
    assert "24.0 GiB" in too_small and "bf16 weights (27.5 GiB" in too_small and "at least 0.39" in too_small
    too_big = split_error(0.8, world_size=8)
    # fp32 master weights + 2 moments: 12 bytes x 14.77B / 8 = 20.6 GiB, the bf16 reference 3.4 GiB more.
    assert "leaves 16.0 GiB" in too_big and "24.1 GiB" in too_big and "at most 0.67" in too_big
    one_gpu = split_error(0.5, world_size=1)
    assert "no value fits" in one_gpu
    unbounded = split_error(0.5, world_size=8, max_model_len=None)  # the model's own 131072 positions
    assert "131072-token sequence (24.0 GiB)" in unbounded


def test_read_model_shape_counts_what_the_model_holds(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.rollout.vllm import read_model_shape
    from trainer.toy.model_dir import build_model_dir

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=3, heads=4, kv_heads=2)
    shape = read_model_shape(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (3, 2, 8)
    assert shape.kv_bytes_per_token(1) == 2 * 3 * 2 * 8 * 2 and shape.kv_bytes_per_token(4) == 2 * 3 * 1 * 8 * 2


def test_vllm_without_a_visible_gpu_is_refused_at_start_up(fake_vllm, monkeypatch):
    config = recipe_config()
    config.grpo.rollout_engine = "vllm"  # accepted by the config: a planner reads it on any machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="grpo.rollout_engine=vllm needs a CUDA GPU; none is visible"):
        check_rollout_startup(config, world_size=1)
    assert fake_vllm.CALLS == []


def test_the_rollout_start_up_check_runs_before_any_engine(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    config = recipe_config()
    config.grpo.rollout_engine, config.grpo.max_prompt_tokens = "vllm", 512
    config.grpo.vllm_gpu_memory_utilization = 0.5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(adapter, "read_model_shape", lambda path, trust_remote_code: adapter.ModelShape(**QWEN_14B))
    check_rollout_startup(config, world_size=8)
    config.grpo.vllm_gpu_memory_utilization = 0.9
    with pytest.raises(ConfigError, match=r"grpo.vllm_gpu_memory_utilization=0.9: it leaves 8.0 GiB"):
        check_rollout_startup(config, world_size=8)
    config.grpo.vllm_tensor_parallel_size = 3
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size=3"):
        check_rollout_startup(config, world_size=8)
    assert fake_vllm.CALLS == []  # nothing started
    config.grpo.rollout_engine = "hf"
    check_rollout_startup(config, world_size=8)


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
    engine = make_engine(fake_vllm, colocated=False)
    prompts = prompts_of("tom has 3 apples .", "ann gets 5 pears .", "how many", "tom gets 2", "so", "wait", "yes")
    settings = SamplingSettings(n=2, temperature=0.6, top_p=0.95, max_new_tokens=6)
    whole = sample_problems(engine, prompts, settings, seed=5)
    shares = []
    monkeypatch.setattr(rollout, "gather_shares", lambda indices, items, count: shares.append((indices, items)))
    fake_vllm.CALLS.clear()
    for rank in range(3):
        sample_problems(engine, prompts, settings, seed=5, rank=rank, world_size=3)
    merged = merge_shares(shares, len(prompts))
    assert [[c.token_ids for c in group] for group in merged] == [[c.token_ids for c in group] for group in whole]
    assert [[c.prompt_index for c in group] for group in merged] == [[i, i] for i in range(len(prompts))]
    # Dealt rank, rank + 3, ... and keyed as evaluate.sample_completions keys problem i: (seed, step 0, i, sample).
    seeds = [call.kwargs["seed"] for call in fake_vllm.CALLS if call.name == "SamplingParams"]
    dealt = [0, 3, 6, 1, 4, 2, 5]
    assert seeds == [int(k) & SEED_MASK for k in sequence_keys(5, 0, dealt, 2).tolist()]
    assert "LLM.sleep" not in names(engine_calls(fake_vllm))  # an evaluation engine stays awake


def test_eval_with_vllm_builds_one_awake_engine_and_returns_every_problem(fake_vllm, monkeypatch):
    import trainer.rollout.vllm as adapter

    checked = []
    monkeypatch.setattr(adapter, "check_startup", lambda *args, **kwargs: checked.append(kwargs))
    config = RunConfig()
    config.model.path, config.eval.samples, config.eval.budgets = "toy/model", 3, [8, 16]
    problems = [(prompt, "3") for prompt in prompts_of("tom has 3 apples .", "how many")]
    per_prompt, calls = adapter.sample_benchmark_with_vllm(config, problems, toy_tokenizer(), rank=0, world_size=1)
    assert [len(group) for group in per_prompt] == [3, 3] and calls == 1
    options = fake_vllm.CALLS[0].kwargs
    assert options["enable_sleep_mode"] is False and options["gpu_memory_utilization"] == 0.9
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


def test_completion_logprobs_are_the_prompt_logprobs_of_the_completion(fake_vllm):
    root = policy(fake_vllm)
    engine = make_engine(fake_vllm)
    ensure_engine_weights(root, engine, 1 << 20)
    prompt, completion = prompts_of("tom has")[0], prompts_of("3 apples .")[0]
    values = engine.completion_logprobs([(prompt, completion)])[0]
    sequence = prompt + completion
    assert values == [fake_vllm.prompt_logprob(sequence[:i], sequence[i]) for i in range(len(prompt), len(sequence))]
    params = next(call.kwargs for call in fake_vllm.CALLS if call.name == "SamplingParams")
    assert params["prompt_logprobs"] == 0 and params["temperature"] == 1.0


def completion_logprobs_of(model, prompt, completion):
    """log_softmax(logits) of the completion's tokens under `model`, as the trainer's loss reads them."""
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion, device="cuda")[:, None])[:, 0].cpu()


def bf16_tolerance(model, prompt, completion):
    """Twice the error of plain PyTorch in bf16 against fp32 (the flash-attention rule), at least 1e-2."""
    import copy

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
    """Greedy output survives a sync of unchanged weights; the engine's log-probs of a fixed
    completion match the trainer's within bf16 error, before and after an optimizer step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import CausalLMLoss
    from trainer.rollout.vllm import VLLMRolloutEngine
    from trainer.toy.model_dir import build_model_dir

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=128, layers=2, heads=2, kv_heads=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()  # fp32 master weights
    root = CausalLMLoss(model)
    engine = VLLMRolloutEngine(path, tokenizer, gpu_memory_utilization=0.2, max_model_len=128, enforce_eager=True)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("tom has 3 apples .", "how many")]
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=12)
    ensure_engine_weights(root, engine, 1 << 20)
    first = engine.generate(prompts, greedy)
    sync_weights(root, engine, 1 << 20)  # the same weights again, through a whole sleep-wake-load cycle
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == [c.token_ids for c in first]
    prompt, completion = prompts[0], first[0].token_ids
    sync_weights(root, engine, 1 << 20)
    before, tolerance = bf16_tolerance(model, prompt, completion)
    engine_before = torch.tensor(engine.completion_logprobs([(prompt, completion)])[0])
    assert (engine_before - before).abs().max().item() <= tolerance
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    sync_weights(root, engine, 1 << 20)
    after, tolerance = bf16_tolerance(model, prompt, completion)
    assert (after - before).abs().max().item() > 5 * tolerance  # the step moved the policy: stale weights fail
    engine_after = torch.tensor(engine.completion_logprobs([(prompt, completion)])[0])
    assert (engine_after - after).abs().max().item() <= tolerance
