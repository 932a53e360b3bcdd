"""Evaluation at token budgets: pass@1 over k samples, maj@k and mean tokens, checked by hand."""

import json
import os
import subprocess
import sys

import pytest

from trainer.evaluate import score_at_budgets
from trainer.rollout import Completion
from trainer.toy.model_dir import build_model_dir, build_tokenizer
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def completion(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Completion(0, ids, text, "stop")


def test_pass_at_1_majority_and_tokens_at_each_budget():
    tokenizer = build_tokenizer(WORDS)
    short_right = "3 + 4 = 7 . \\boxed{ 7 } </think>"  # 16 tokens + end of sequence
    long_right = "3 + 4 = 7 . wait , check 3 + 4 = 7 . yes . so 7 . \\boxed{ 7 } </think>"
    wrong = "3 + 4 = 8 . \\boxed{ 8 } </think>"
    samples = [[completion(tokenizer, t) for t in (short_right, long_right, wrong, wrong)],
               [completion(tokenizer, t) for t in (short_right, short_right, long_right, wrong)]]
    lengths = [len(c.token_ids) for c in samples[0]]
    short, long = lengths[0], lengths[1]
    assert short < long
    rows, unscored = score_at_budgets(samples, ["7", "7"], tokenizer, [short, 1000])
    assert unscored == 0
    at_short, at_full = rows
    # Full budget: problem 1 has 2/4 right and a 2-2 vote that goes to the first answer seen (7);
    # problem 2 has 3/4 right and a clear majority.
    assert at_full.pass_at_1 == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert at_full.maj_at_k == pytest.approx(1.0)
    assert at_full.mean_tokens == pytest.approx((sum(lengths) + 2 * short + long + lengths[3]) / 8)
    assert at_full.unfinished_fraction == 0.0
    # Budget = the short trace's length: the long one is cut before its box and counts as wrong.
    assert at_short.pass_at_1 == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert at_short.unfinished_fraction == pytest.approx(2 / 8)
    assert at_short.mean_tokens == pytest.approx(short)  # every sample here is `short` tokens or cut there


def test_a_completion_cut_at_the_largest_budget_is_unfinished_there():
    tokenizer = build_tokenizer(WORDS)
    ids = tokenizer("3 + 4 = 7 . \\boxed{ 7 }", add_special_tokens=False)["input_ids"]
    budget = len(ids) + 1
    ended = Completion(0, ids + [tokenizer.eos_token_id], "", "stop")  # its end-of-sequence is token `budget`
    cut = Completion(0, ids + [ids[0]], "", "length")  # max_new_tokens=budget reached, no end in sight
    (row,), _ = score_at_budgets([[ended, cut]], ["7"], tokenizer, [budget])
    assert row.unfinished_fraction == pytest.approx(1 / 2)
    assert row.pass_at_1 == pytest.approx(1.0)  # both hold the right box; being cut is reported, not scored
    # Completions without a finish reason: ending on end-of-sequence at the budget is finishing.
    unknown = [Completion(0, c.token_ids, "", None) for c in (ended, cut)]
    (row,), _ = score_at_budgets([unknown], ["7"], tokenizer, [budget])
    assert row.unfinished_fraction == pytest.approx(1 / 2)


def test_unfinished_fraction_of_sampled_completions_counts_those_without_an_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rollout import SamplingSettings
    from trainer.rollout.hf import sample_completions

    model_dir = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    problems = [json.loads(line) for line in open(write_problems(str(tmp_path / "p.jsonl"), 4, seed=2))]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["problem"]}], tokenize=False,
                                           add_generation_prompt=True) for p in problems]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    budget = 6
    per_prompt = sample_completions(model, tokenizer, prompts, SamplingSettings(n=3, max_new_tokens=budget),
                                    progress=False)
    samples = [c for completions in per_prompt for c in completions]
    # Independently of the finish reason: a completion ended when it holds the end-of-sequence token.
    without_end = sum(tokenizer.eos_token_id not in c.token_ids for c in samples) / len(samples)
    assert without_end > 0  # an untrained model runs into the budget
    (row,), _ = score_at_budgets(per_prompt, [p["answer"] for p in problems], tokenizer, [budget])
    assert row.unfinished_fraction == pytest.approx(without_end)


def test_majority_vote_ignores_samples_without_an_answer_and_can_be_wrong():
    tokenizer = build_tokenizer(WORDS)
    samples = [[completion(tokenizer, t) for t in ("\\boxed{ 8 } </think>", "\\boxed{ 8 } </think>",
                                                  "\\boxed{ 7 } </think>", "no answer </think>")]]
    (row,), _ = score_at_budgets(samples, ["7"], tokenizer, [100])
    assert row.pass_at_1 == pytest.approx(1 / 4)
    assert row.maj_at_k == 0.0


def test_stop_at_think_end_ignores_a_box_after_the_thinking():
    tokenizer = build_tokenizer(WORDS)
    samples = [[completion(tokenizer, "3 + 4 = 7 . </think> \\boxed{ 7 }")]]
    (plain,), _ = score_at_budgets(samples, ["7"], tokenizer, [100])
    (stopped,), _ = score_at_budgets(samples, ["7"], tokenizer, [100], stop_at_think_end=True)
    assert plain.pass_at_1 == 1.0 and stopped.pass_at_1 == 0.0
    # Counted up to and including </think>.
    thinking = len(tokenizer("3 + 4 = 7 . </think>", add_special_tokens=False)["input_ids"])
    assert thinking < len(samples[0][0].token_ids)
    assert stopped.mean_tokens == thinking


def test_unparseable_gold_answers_are_left_out_and_counted():
    tokenizer = build_tokenizer(WORDS)
    samples = [[completion(tokenizer, "\\boxed{ 7 } </think>")], [completion(tokenizer, "\\boxed{ 7 } </think>")]]
    (row,), unscored = score_at_budgets(samples, ["7", r"\\\\"], tokenizer, [100])
    assert unscored == 1
    assert row.pass_at_1 == 1.0


@pytest.mark.slow
def test_eval_command_writes_the_budget_table(tmp_path):
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_problems(str(tmp_path / "bench.jsonl"), 6, seed=5)
    out = tmp_path / "eval"
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--stage", "eval", f"model.path={model}", f"eval.data={data}",
         "eval.samples=2", "eval.budgets=4,16", "eval.batch_prompts=4", f"run_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert [row["budget"] for row in result["rows"]] == [4, 16]
    assert result["problems"] == 6 and result["samples_per_problem"] == 2
    # The same samples seen through two budgets: counted up to 4 tokens, then up to 16.
    small, large = result["rows"]
    assert 0 < small["mean_tokens"] <= 4 and small["mean_tokens"] <= large["mean_tokens"] <= 16
    assert small["unfinished_fraction"] >= large["unfinished_fraction"]
    assert "| model | budget | pass@1 | maj@k |" in (out / "eval.md").read_text()


def test_eval_command_rejects_a_bad_budget_before_loading_anything(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--stage", "eval", "model.path=/nonexistent",
         "eval.data=x.jsonl", "eval.budgets=[0]"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "eval.budgets" in completed.stderr


def test_the_kv_cache_budget_plans_more_calls_that_cover_every_sample():
    from trainer.rollout.hf import plan_generate_calls

    lengths = [10, 30, 20, 5]
    assert plan_generate_calls(lengths, 4, 90, batch_prompts=32) == [([0, 1, 2, 3], 0, 4)]
    assert plan_generate_calls(lengths, 4, 90, batch_prompts=3) == [([0, 1, 2], 0, 4), ([3], 0, 4)]
    # 4 rows x (30 + 90) = 480 tokens for prompt 1 alone: with 1000, prompts 0 and 1 fill one call.
    calls = plan_generate_calls(lengths, 4, 90, batch_prompts=32, max_batch_tokens=1000)
    assert calls == [([0, 1], 0, 4), ([2, 3], 0, 4)]
    # Below one prompt's samples: that prompt's samples are split (2 rows of 120 tokens per call).
    calls = plan_generate_calls(lengths, 4, 90, batch_prompts=32, max_batch_tokens=250)
    assert calls == [([0], 0, 2), ([0], 2, 4), ([1], 0, 2), ([1], 2, 4), ([2], 0, 2), ([2], 2, 4), ([3], 0, 2),
                     ([3], 2, 4)]
    for budget in (100, 250, 480, 1000, 10**6):
        calls = plan_generate_calls(lengths, 4, 90, batch_prompts=3, max_batch_tokens=budget)
        covered = sorted((p, s) for positions, first, end in calls for p in positions for s in range(first, end))
        assert covered == [(p, s) for p in range(4) for s in range(4)]  # every sample once
        for positions, first, end in calls:
            assert len(positions) <= 3
            assert len(positions) * (end - first) * (max(lengths[p] for p in positions) + 90) <= max(budget, 120)


def eval_command(model, data, out, *extra, launcher=()):
    return subprocess.run(
        [sys.executable, *launcher, "-m", "trainer.run", "--stage", "eval", f"model.path={model}", f"eval.data={data}",
         "eval.samples=3", "eval.budgets=4,16", "eval.batch_prompts=4", f"run_dir={out}", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_and_a_small_kv_budget_give_the_one_process_report(tmp_path):
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_problems(str(tmp_path / "bench.jsonl"), 7, seed=11)
    reports = {}
    runs = {
        "one": (), "small_budget": ("eval.max_batch_tokens=60",),
        "two_ranks": ("launcher",),
    }
    for name, extra in runs.items():
        launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573") \
            if extra == ("launcher",) else ()
        completed = eval_command(model, data, tmp_path / name, *(() if launcher else extra), launcher=launcher)
        assert completed.returncode == 0, completed.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    one = reports["one"]
    assert one["problems"] == 7 and one["generate_calls"] == 2  # 7 problems, 4 per call
    for name in ("small_budget", "two_ranks"):
        assert reports[name]["rows"] == one["rows"], name
    assert reports["small_budget"]["generate_calls"] > one["generate_calls"]
