"""Packed, micro-batched GRPO updates equal whole-batch ones, and the formula in float64."""

import json
import os
import subprocess
import sys

import grpo_step_check as check
import pytest
import torch
from helpers import max_relative_error

from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model_dir(str(tmp_path_factory.mktemp("grpo_model") / "model"), WORDS, hidden_size=64, layers=2)


def assert_same_update(first, second, what):
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5, abs=1e-8), what
    assert len(first["gradients"]) == len(second["gradients"]), what
    for iteration, (ours, expected) in enumerate(zip(first["gradients"], second["gradients"])):
        ours, expected = torch.as_tensor(ours), torch.as_tensor(expected)
        assert expected.abs().max() > 0, f"{what}: update {iteration} has no gradient"
        assert max_relative_error(ours, expected) < 1e-5, f"{what}, update {iteration}"


@pytest.mark.parametrize("aggregation", check.AGGREGATIONS)
def test_micro_batched_equals_whole_batch_in_one_process(model, tmp_path, aggregation):
    """beta > 0 and two updates per rollout: the second one's ratio is no longer 1."""
    micro = check.policy_update(model, tmp_path / "micro", aggregation, budget=40, num_iterations=2)
    whole = check.policy_update(model, tmp_path / "whole", aggregation, budget=None, num_iterations=2)
    assert whole["rows"] == 1 and micro["rows"] >= 3
    assert_same_update(micro, whole, aggregation)


def formula_update(model, aggregation, rank=0):
    """float64, sequence by sequence, every term written out: the loss and its gradient."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).requires_grad_(False)
    chosen, completions, advantages = check.fixed_rollouts(rank)
    sums, counts, all_tokens = [], [], 0.0
    for completion, advantage in zip(completions, advantages.double()):
        prompt = chosen[completion.prompt_index][0]
        ids = torch.tensor([prompt + completion.token_ids])
        targets = ids[0, 1:]

        def logprobs(network, ids=ids, targets=targets):
            logits = network(input_ids=ids).logits[0, :-1] / check.TEMPERATURE
            return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]

        logp, ref_logp = logprobs(policy), logprobs(reference)
        # Completion tokens only, and none of a completion cut at max_new_tokens (grpo.loss.mask_truncated).
        counted = (torch.arange(len(targets)) >= len(prompt) - 1) & (completion.finish_reason != "length")
        ratio = torch.exp(logp - logp.detach())
        clipped = ratio.clamp(1 - 0.2, 1 + 0.28)
        delta = ref_logp - logp
        per_token = -torch.minimum(ratio * advantage, clipped * advantage) + check.BETA * (delta.exp() - delta - 1)
        sums.append(per_token[counted].sum())
        counts.append(int(counted.sum()))
        all_tokens += int(counted.sum())
    sequences = len(sums)
    loss = {
        "grpo": sum(s / max(c, 1) for s, c in zip(sums, counts)) / sequences,
        "bnpo": sum(sums) / max(sum(counts), 1),
        "dr_grpo": sum(sums) / (sequences * check.MAX_NEW_TOKENS),
        "dapo": sum(sums) / all_tokens,
    }[aggregation]
    loss.backward()
    return {"loss": loss.item(), "gradients": [torch.cat([p.grad.flatten() for p in policy.parameters()])]}


@pytest.mark.parametrize("aggregation", check.AGGREGATIONS)
def test_one_packed_update_equals_the_formula_in_float64(model, tmp_path, aggregation):
    chosen, completions, _ = check.fixed_rollouts(0)
    assert sum(c.finish_reason == "length" for c in completions) == 1
    trainer = check.policy_update(model, tmp_path, aggregation, budget=40, num_iterations=1)
    assert trainer["rows"] >= 3
    assert_same_update(trainer, formula_update(model, aggregation), aggregation)


@pytest.mark.slow
@pytest.mark.distributed
def test_micro_batched_equals_whole_batch_on_two_gloo_ranks(model, tmp_path):
    out = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29553",
         os.path.join(REPO, "tests", "grpo_step_check.py"), model, str(tmp_path / "runs"), str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.json.rank{rank}").read_text()) for rank in (0, 1)]
    for aggregation in check.AGGREGATIONS:
        for results in ranks:
            micro, whole = results[f"{aggregation}_40"], results[f"{aggregation}_None"]
            assert whole["rows"] == 1 and micro["rows"] >= 3
            assert_same_update(micro, whole, f"{aggregation}, 2 ranks")
        # Both ranks ran as many rows; the one with fewer sequences' tokens filled up with one-token rows.
        assert ranks[0][f"{aggregation}_40"]["rows"] == ranks[1][f"{aggregation}_40"]["rows"]
        assert ranks[0][f"{aggregation}_40"]["pad_tokens"] > 0
        assert ranks[0][f"{aggregation}_40"]["gradients"] == ranks[1][f"{aggregation}_40"]["gradients"]


@pytest.mark.gpu
def test_micro_batched_equals_whole_batch_on_cuda_in_bf16(model, tmp_path, monkeypatch):
    """On a GPU: varlen attention and bf16 compute over fp32 master weights, rows vs one row."""
    import trainer.attention

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    calls = []
    varlen = trainer.attention.varlen_document_attention
    monkeypatch.setattr(trainer.attention, "varlen_document_attention",
                        lambda *args: calls.append(1) or varlen(*args))
    micro = check.policy_update(model, tmp_path / "micro", "dapo", budget=40, num_iterations=2)
    assert calls, "the varlen kernels never ran"
    whole = check.policy_update(model, tmp_path / "whole", "dapo", budget=None, num_iterations=2)
    assert micro["rows"] >= 3 and whole["rows"] == 1
    assert micro["loss"] == pytest.approx(whole["loss"], rel=2e-2, abs=1e-4)
    for ours, expected in zip(micro["gradients"], whole["gradients"]):
        assert max_relative_error(ours, expected) < 2e-2
