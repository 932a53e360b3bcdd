import math
import os

import pytest
import torch

from trainer.config import load_config
from trainer.grpo_batch import kept_sequences, pack_rollouts, pack_step, rollout_sequences
from trainer.grpo_loss import StepTokens, aggregation, aggregation_weights
from trainer.grpo_rollouts import zero_variance_groups
from trainer.metrics import read_metrics
from trainer.rollout import Completion
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems


def test_packed_row_marks_exactly_the_completion_targets():
    prompts = [([5, 6, 7], "1"), ([8], "2")]
    completions = [Completion(0, [1, 2], "", "stop"), Completion(1, [3, 4, 9], "", "length")]
    sequences, starts = rollout_sequences(prompts, completions)
    assert sequences == [[5, 6, 7, 1, 2], [8, 3, 4, 9]] and starts == [3, 1]
    (row,) = pack_rollouts(sequences, starts, budget=None)
    assert row.inputs["input_ids"].tolist() == [[5, 6, 7, 1, 2, 8, 3, 4, 9]]
    assert row.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert row.inputs["document_boundaries"].tolist() == [0, 5, 9] and row.inputs["longest_document"] == 5
    # Position i predicts token i + 1 of its own sequence; counted where that token is a completion token.
    assert row.targets.tolist() == [6, 7, 1, 2, 0, 3, 4, 9, 0]
    assert row.completion_targets.tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 0]
    assert row.token_sequence.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1] and row.pad_tokens == 0


def test_truncated_completions_can_be_left_out_of_the_loss():
    completions = [Completion(0, [1, 2], "", "stop"), Completion(0, [3, 4], "", "length")]
    assert kept_sequences(completions, mask_truncated=True).tolist() == [1.0, 0.0]
    assert kept_sequences(completions, mask_truncated=False).tolist() == [1.0, 1.0]


def test_zero_variance_groups_count_groups_with_equal_finite_rewards():
    nan = float("nan")
    rewards = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, nan, 2.0, 0.5, 0.7, 0.5, 0.5]
    assert zero_variance_groups(rewards, 4) == 2  # group 1 (all 1.0) and group 2 (2.0 and NaN)


def aggregate(loss, mask, method, max_new_tokens, global_tokens=None, world_size=1):
    """A rank's aggregated loss of [B, L] token losses, through the per-token weights the trainer uses."""
    rows, length = mask.shape
    global_tokens = mask.sum() if global_tokens is None else global_tokens
    tokens = StepTokens(mask.flatten(), torch.arange(rows).repeat_interleave(length), rows, max_new_tokens,
                        global_tokens, world_size)
    return (aggregation_weights(method, tokens) * loss.flatten()).sum()


def test_loss_aggregations():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "dapo", 10, mask.sum()).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "bnpo", 10).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "grpo", 10).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(loss, mask, "dr_grpo", 10).item() == pytest.approx(10 / (2 * 10))
    with pytest.raises(ValueError, match="grpo.loss.aggregation: unknown aggregation 'dapo2'; available: grpo, bnpo"):
        aggregate(loss, mask, "dapo2", 10)


def _direct_aggregations(loss, mask, max_new_tokens, ranks):
    """Each aggregation written out per sequence in float64, over the global batch split into ranks."""
    sequences = [(loss[i].double(), mask[i].double()) for i in range(loss.shape[0])]
    all_tokens = sum(m.sum().item() for _, m in sequences)
    per_rank = {"grpo": [], "bnpo": [], "dr_grpo": [], "dapo": []}
    size = len(sequences) // ranks
    for rank in range(ranks):
        mine = sequences[rank * size : (rank + 1) * size]
        sums = [(losses * m).sum().item() for losses, m in mine]
        counts = [m.sum().item() for _, m in mine]
        per_rank["grpo"].append(sum(s / max(c, 1) for s, c in zip(sums, counts)) / len(mine))
        per_rank["bnpo"].append(sum(sums) / max(sum(counts), 1))
        per_rank["dr_grpo"].append(sum(sums) / (len(mine) * max_new_tokens))
        per_rank["dapo"].append(sum(sums) / all_tokens * ranks)
    # FSDP averages the ranks' gradients, so the effective loss is the mean of the rank losses.
    return {name: sum(values) / ranks for name, values in per_rank.items()}


@pytest.mark.parametrize("ranks", [1, 2])
def test_aggregations_match_their_formulas_in_float64(ranks):
    generator = torch.Generator().manual_seed(ranks)
    loss = torch.randn(6, 9, generator=generator)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).float()
    expected = _direct_aggregations(loss, mask, 16, ranks)
    global_tokens = mask.sum()
    for method in ("grpo", "bnpo", "dr_grpo", "dapo"):
        size = 6 // ranks
        rank_losses = [
            aggregate(loss[r * size : (r + 1) * size], mask[r * size : (r + 1) * size], method, 16, global_tokens,
                      ranks)
            for r in range(ranks)
        ]
        assert (sum(rank_losses) / ranks).item() == pytest.approx(expected[method], rel=1e-5, abs=1e-6), method


@aggregation("seq_mean_token_sum")
def _sum_per_sequence(tokens):
    """Each sequence's summed token loss, averaged over the sequences."""
    return tokens.counted / tokens.sequences


def test_a_registered_aggregation_weights_every_token_of_the_packed_step(tmp_path):
    config = toy_grpo_config(tmp_path, "grpo.loss.aggregation=seq_mean_token_sum",
                             "train.max_tokens_per_micro_batch=8")
    chosen = [([5, 6, 7], "1"), ([8, 9], "2")]
    lengths = [2, 1, 3, 4]
    completions = [Completion(prompt, list(range(10, 10 + length)), "", "stop")
                   for prompt, length in zip([0, 0, 1, 1], lengths)]
    step = pack_step(chosen, completions, torch.ones(4), config, 0, torch.device("cpu"), world_size=1)
    assert len(step.rows) > 1  # the 8-token budget splits the step: the weights still cover all of it
    weights, counted = torch.cat(step.weights), torch.cat(step.counted)
    assert counted.sum().item() == sum(lengths)
    assert torch.equal(weights, counted / 4)  # 1/4 on each of the 10 completion tokens, 0 elsewhere
    # The built-in per-sequence mean weights the same tokens by 1 / (4 x their sequence's length).
    config.grpo.loss.aggregation = "grpo"
    per_sequence = torch.cat(pack_step(chosen, completions, torch.ones(4), config, 0, torch.device("cpu"), 1).weights)
    assert sorted(set(per_sequence[per_sequence > 0].tolist())) == pytest.approx(sorted({1 / (4 * n) for n in lengths}))


@pytest.mark.slow
def test_grpo_with_reference_model_and_several_updates_per_rollout(tmp_path):
    from trainer.grpo import run_grpo

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 32, seed=3)
    config = load_config(None, [
        "stage=grpo", f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_files={data}",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.sampling.max_new_tokens=12",
        "grpo.rewards.cosine_max_len=100",
        "grpo.loss.beta=0.1", "grpo.num_iterations=2", "grpo.loss.eps_high=0.28",
        "grpo.loss.aggregation=dr_grpo", "grpo.loss.scale_rewards=batch",
        "train.max_steps=2", "optim.lr=1e-2", "checkpoint.export_hf=false",
    ])
    run_grpo(config)
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["min_completion_tokens"] <= record["completion_tokens"] <= record["max_completion_tokens"] <= 12
        assert 0.0 <= record["clip_fraction"] <= 1.0 and 0.0 <= record["zero_variance_groups"] <= 1.0
        assert record["entropy"] > 0.0
        for key in ("rollout_s", "train_s", "sync_s", "reward_format", "reward_cosine_length", "reward_length"):
            assert math.isfinite(record[key]), key
    # The first update starts at the reference (KL 0); the second, after a large step, has moved away.
    assert records[0]["kl"] > 0.0 and records[1]["kl"] > 0.0


def toy_grpo_config(tmp_path, *overrides):
    """A GRPO run on a tiny toy model: 4 prompts x 4 samples of at most 12 tokens per step."""
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 32, seed=3)
    return load_config(None, [
        "stage=grpo", f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_files={data}",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.sampling.max_new_tokens=12",
        "grpo.rewards.cosine_max_len=100",
        "checkpoint.export_hf=false", *overrides,
    ])


@pytest.mark.slow
def test_grpo_steps_run_and_report(tmp_path):
    from trainer.grpo import run_grpo

    config = toy_grpo_config(tmp_path, "train.max_steps=2", "optim.lr=1e-4")
    run_grpo(config)
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["reward"])
        assert 1 <= record["completion_tokens"] <= 12
        assert 0.0 <= record["accuracy"] <= 1.0
        # One process, no budget: the step's 16 sequences in one packed row, nothing padded.
        assert record["micro_batches"] == 1 and record["pad_fraction"] == 0.0
    assert os.path.exists(os.path.join(config.run_dir, "checkpoints", "step_00000002", "manifest.json"))


def test_low_memory_loss_gives_the_same_grpo_steps(tmp_path):
    from trainer.grpo import run_grpo

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 16, seed=4)
    runs = {}
    for name, low_memory in (("default", "false"), ("low_memory", "true")):
        config = load_config(None, [
            "stage=grpo", f"run_dir={tmp_path / name}", f"model.path={model}", f"data.train_files={data}",
            "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.sampling.max_new_tokens=10",
            "grpo.rewards.cosine_max_len=100",
            "train.max_steps=2", "optim.lr=1e-3", "checkpoint.export_hf=false",
            f"train.low_memory_loss={low_memory}",
        ])
        run_grpo(config)
        runs[name] = read_metrics(config.run_dir)
    assert len(runs["low_memory"]) == 2
    for measured, expected in zip(runs["low_memory"], runs["default"]):
        assert measured["completion_tokens"] == expected["completion_tokens"]
        assert measured["reward"] == pytest.approx(expected["reward"], rel=1e-6)
        assert measured["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-7)
        assert measured["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
        assert measured["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_two_fsdp_ranks_match_one_process_at_step_one(tmp_path, scale_rewards):
    """Batch scaling divides by the std of every rank's rewards, as one process would."""
    import subprocess
    import sys

    from trainer.metrics import read_metrics as metrics_of

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 32, seed=3)
    common = ["stage=grpo", f"model.path={model}", f"data.train_files={data}", "grpo.group_size=4",
              "grpo.sampling.max_new_tokens=12", "grpo.rewards.cosine_max_len=100", "train.max_steps=2",
              "optim.lr=1e-3",
              "checkpoint.export_hf=false", f"grpo.loss.scale_rewards={scale_rewards}"]

    def run(command, run_dir, prompts_per_rank):
        completed = subprocess.run(
            [sys.executable, *command, "-m", "trainer.run", f"run_dir={run_dir}",
             f"grpo.prompts_per_step={prompts_per_rank}", *common],
            capture_output=True, text=True, cwd=repo, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        return metrics_of(run_dir)

    # The same 4 prompts per step: all in one process, or 2 on each of two ranks.
    one = run([], tmp_path / "one", 4)
    two = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"], tmp_path / "two", 2)
    for key in ("reward", "accuracy", "completion_tokens"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-6), key  # the same rollouts
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5, abs=1e-7)
    assert abs(one[0]["loss"]) > 1e-6  # a real loss, not 0 == 0


def test_check_finite_raises_on_a_non_finite_loss_or_gradient_norm():
    from trainer.training import TrainingError, check_finite

    check_finite(torch.tensor(0.25), torch.tensor(3.0), what="GRPO loss")
    for loss, norm in ((float("nan"), 1.0), (0.5, float("inf"))):
        with pytest.raises(TrainingError, match="non-finite GRPO loss or gradient norm"):
            check_finite(torch.tensor(loss), torch.tensor(norm), what="GRPO loss")


def test_sampling_logprobs_line_up_with_the_targets():
    from trainer.grpo_batch import sampling_logprobs
    from trainer.grpo_loss import truncated_importance_weight

    prompts = [([5, 6, 7], "1"), ([8], "2")]
    completions = [Completion(0, [1, 2], "", "stop", logprobs=[-0.5, -1.5]),
                   Completion(1, [3, 4, 9], "", "length", logprobs=[-0.1, -0.2, -0.3])]
    sequences, starts = rollout_sequences(prompts, completions)
    (row,) = pack_rollouts(sequences, starts, budget=None)
    table = sampling_logprobs(completions, starts, row)
    # Each completion token is a target exactly where its sampling log-prob sits.
    counted = row.completion_targets.bool()
    assert row.targets[counted].tolist() == [1, 2, 3, 4, 9]
    assert table[counted].tolist() == pytest.approx([-0.5, -1.5, -0.1, -0.2, -0.3])
    assert (table[~counted] == 0).all()
    trainer_logp = table + torch.tensor([0.0, 0.0, 0.1, 2.0, 0.0, -0.2, 0.0, 0.0, 0.0])
    weight = truncated_importance_weight(trainer_logp, table, row.completion_targets, cap=2.0)
    assert weight.tolist() == pytest.approx([1.0, 1.0, math.exp(0.1), 2.0, 1.0, math.exp(-0.2), 1.0, 1.0, 1.0])


@pytest.mark.slow
def test_dynamic_sampling_and_the_importance_weight(tmp_path):
    from trainer.grpo import run_grpo

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 32, seed=3)
    common = [f"model.path={model}", f"data.train_files={data}", "stage=grpo", "grpo.prompts_per_step=4",
              "grpo.group_size=4", "grpo.sampling.max_new_tokens=12", "train.max_steps=1", "checkpoint.export_hf=false"]
    # An untrained model never boxes an answer: format rewards are all 0, every group is uninformative.
    run_grpo(load_config(None, common + [f"run_dir={tmp_path / 'dynamic'}", "grpo.rewards.weights={format: 1.0}",
                                         "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3"]))
    (record,) = read_metrics(tmp_path / "dynamic")
    assert record["sampling_rounds"] == 3 and record["zero_variance_groups"] == 1.0
    assert record["loss"] == 0.0  # the batch was filled back with zero-advantage groups
    # With the HF engine and no top-p or min-p filter the sampler is the policy itself: the truncated weights
    # are 1 and the loss is unchanged.
    unfiltered = ["grpo.sampling.top_p=1.0", "grpo.sampling.min_p=0.0"]
    for name, cap in (("plain", "0"), ("tis", "2.0")):
        run_grpo(load_config(None, common + unfiltered + [f"run_dir={tmp_path / name}", f"grpo.loss.tis_cap={cap}"]))
    plain, weighted = read_metrics(tmp_path / "plain")[0], read_metrics(tmp_path / "tis")[0]
    assert abs(plain["loss"]) > 1e-6
    assert weighted["loss"] == pytest.approx(plain["loss"], rel=1e-4)


def test_a_budget_below_prompt_plus_completion_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import trainer.grpo
    import trainer.training
    from trainer.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the budget was checked")

    monkeypatch.setattr(trainer.training, "Trainer", no_model)
    config = toy_grpo_config(tmp_path, "grpo.sampling.max_new_tokens=40", "train.max_tokens_per_micro_batch=50")
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch=50 cannot hold the longest prompt \((\d+) "
                                          r"tokens\) plus grpo.sampling.max_new_tokens=40"):
        trainer.grpo.run_grpo(config)


@pytest.mark.slow
def test_a_token_budget_splits_the_step_into_micro_batches(tmp_path):
    from trainer.grpo import run_grpo

    config = toy_grpo_config(tmp_path, "train.max_steps=1", "train.max_tokens_per_micro_batch=100")
    run_grpo(config)
    (record,) = read_metrics(config.run_dir)
    # 16 sequences of about 40 tokens in rows of at most 100: at least 16 * 30 / 100 rows.
    assert record["micro_batches"] >= 5 and record["pad_fraction"] == 0.0 and math.isfinite(record["loss"])


def test_kernels_backend_runs_the_stage_on_that_backend(tmp_path):
    from fastmath_kernels import _registry
    from fastmath_kernels._dispatch import resolve_backend
    from fastmath_kernels.group_advantages import group_advantages_reference
    from trainer.config import ConfigError
    from trainer.grpo import run_grpo

    calls = []

    def counted_advantages(rewards, group_size, scale, eps):
        calls.append(rewards.numel())
        return group_advantages_reference(rewards, group_size, scale, eps)

    _registry.register_backend("group_advantages", "counted", counted_advantages)
    try:
        with pytest.raises(ConfigError, match="kernels.backend: 'counter' is not one of cuda, triton, torch, counted"):
            toy_grpo_config(tmp_path, "kernels.backend=counter")
        config = toy_grpo_config(tmp_path, "kernels.backend=counted", "train.max_steps=2")
        run_grpo(config)
        # One call a step over its 4 prompts x 4 samples; the other ops have no such backend and keep theirs.
        assert calls == [16, 16]
        assert resolve_backend(None, torch.zeros(3), op="group_advantages") == "torch"  # only inside the stage
    finally:
        _registry.unregister_backend("group_advantages", "counted")
