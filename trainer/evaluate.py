"""Sampled evaluation at token budgets: pass@1 averaged over k samples, maj@k, and mean output tokens.

This is the recipe's results-table format (for AIME: budgets 8k/12k/16k/24k/32k). Each problem
is sampled k times once, up to the largest budget; a smaller budget B sees every completion cut
to its first B tokens, which is what sampling with max_new_tokens=B would have produced.
Length is measured on sampled completions: greedy decoding can hide how long a model's
typical answer is.
"""

import collections
import dataclasses

import torch

from fastmath_kernels import preferred_backend

from .errors import UnparseableGold
from .metrics import pyplot, save_figure
from .rewards import THINK_END, last_boxed, verify_answer
from .rollout import SamplingSettings, engine_class, eval_sampling
from .rollout.hf import HFRolloutEngine, sample_completions
from .rollout.keyed_sampling import sequence_keys


@dataclasses.dataclass
class BudgetRow:
    budget: int
    pass_at_1: float  # mean over problems of the fraction of correct samples
    maj_at_k: float  # the most common extracted answer, checked against the gold one
    mean_tokens: float  # output tokens, each completion counted up to the budget
    unfinished_fraction: float  # completions cut by the budget before they ended


@dataclasses.dataclass
class EvalResult:
    problems: int  # problems scored (those with a parseable gold answer)
    unscored_problems: int  # gold answer that math-verify cannot parse: left out, counted
    samples_per_problem: int
    temperature: float
    top_p: float
    rows: list  # one BudgetRow per budget, smallest first
    min_p: float = 0.0

    @property
    def final(self):
        return self.rows[-1]

    @property
    def accuracy(self):
        return self.final.pass_at_1

    @property
    def mean_tokens(self):
        return self.final.mean_tokens

    def as_dict(self):
        return {**dataclasses.asdict(self), "accuracy": self.accuracy, "mean_tokens": self.mean_tokens}


def _think_end_token(tokenizer):
    token_id = tokenizer.convert_tokens_to_ids(THINK_END)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def _ended_within(completion, budget, eos_token_id):
    """Whether the completion ended on its own (end-of-sequence or a stop string) within budget tokens.

    A completion of exactly max_new_tokens may have been cut there or have ended there: the
    engine's finish reason tells which. Without one, a last token of end-of-sequence does.
    """
    length = len(completion.token_ids)
    if completion.finish_reason in ("stop", "length"):
        return completion.finish_reason == "stop" and length <= budget
    return length < budget or (length == budget and completion.token_ids[-1] == eos_token_id)


def _answer_and_length(completion, budget, tokenizer, stop_at_think_end, think_end_id):
    """(extracted answer or None, tokens counted, finished within the budget)."""
    kept = completion.token_ids[:budget]
    thought_out = False  # the thinking ended within the budget, so the answer region is whole
    if stop_at_think_end and think_end_id is not None and think_end_id in kept:
        kept = kept[: kept.index(think_end_id) + 1]
        thought_out = True
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if stop_at_think_end and THINK_END in text:
        text = text[: text.index(THINK_END)]
        thought_out = True
    finished = thought_out or _ended_within(completion, budget, tokenizer.eos_token_id)
    return last_boxed(text), len(kept), finished


def _normalised(answer):
    return " ".join(answer.split())


def score_at_budgets(per_prompt, answers, tokenizer, budgets, *, stop_at_think_end=False, timeout_s=5):
    """(rows, unscored problems) for completions already sampled up to max(budgets)."""
    think_end_id = _think_end_token(tokenizer)
    verdicts = {}

    def correct(answer, gold):
        if answer is None:
            return False
        key = (answer, gold)
        if key not in verdicts:
            verdicts[key] = verify_answer(answer, gold, timeout_s)
        return verdicts[key]

    scorable = []
    for completions, gold in zip(per_prompt, answers):
        try:
            verify_answer("0", str(gold), timeout_s)
            scorable.append((completions, str(gold)))
        except UnparseableGold:
            pass
    rows = []
    for budget in sorted(budgets):
        pass_sum = majority_sum = tokens = unfinished = samples = 0
        for completions, gold in scorable:
            extracted = []
            for completion in completions:
                answer, length, finished = _answer_and_length(
                    completion, budget, tokenizer, stop_at_think_end, think_end_id
                )
                extracted.append(answer)
                tokens += length
                unfinished += not finished
            samples += len(completions)
            pass_sum += sum(correct(a, gold) for a in extracted) / len(completions)
            votes = collections.Counter(_normalised(a) for a in extracted if a is not None)
            majority_sum += bool(votes) and correct(votes.most_common(1)[0][0], gold)
        problems = max(len(scorable), 1)
        rows.append(BudgetRow(budget, pass_sum / problems, majority_sum / problems,
                              tokens / max(samples, 1), unfinished / max(samples, 1)))
    return rows, len(per_prompt) - len(scorable)


def evaluate(causal_lm, tokenizer, prompts, answers, *, samples=1, temperature=1.0, top_p=1.0, min_p=0.0,
             max_new_tokens=128, budgets=None, batch_prompts=64, stop_at_think_end=False, progress=False,
             device=None, seed=0):
    budgets = sorted(set(budgets or [max_new_tokens]))
    settings = SamplingSettings(n=samples, temperature=temperature, top_p=top_p, min_p=min_p,
                                max_new_tokens=max(budgets))
    per_prompt = sample_completions(causal_lm, tokenizer, prompts, settings, batch_prompts, progress, device, seed)
    rows, unscored = score_at_budgets(per_prompt, answers, tokenizer, budgets, stop_at_think_end=stop_at_think_end)
    return EvalResult(len(prompts) - unscored, unscored, samples, temperature, top_p, rows, min_p)


def format_table(results):
    """Markdown: one row per (model, budget), the recipe's results-table columns."""
    lines = ["| model | budget | pass@1 | maj@k | mean tokens | unfinished |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for row in result.rows:
            lines.append(
                f"| {name} | {row.budget} | {row.pass_at_1:.1%} | {row.maj_at_k:.1%} | "
                f"{row.mean_tokens:.1f} | {row.unfinished_fraction:.1%} |"
            )
    return "\n".join(lines)


def plot_accuracy_vs_budget(results, path, title="accuracy against token budget"):
    """PNG of pass@1 against budget, one line per model; returns path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        axis.plot([r.budget for r in result.rows], [100 * r.pass_at_1 for r in result.rows], marker="o", label=name)
    axis.legend()
    return save_figure(figure, axis, path, "token budget", "pass@1 (%)", title)


def run_eval(config):
    """The eval stage: model.path sampled on eval.data; table, JSON and plot written to run_dir.

    Under torchrun each rank loads the model and samples its share of the problems; rank 0
    scores them all and writes the report.
    """
    from .grpo_rollouts import load_prompts
    from .model import load_tokenizer
    from .parallel import init_distributed, shutdown

    settings = config.eval
    rank, world_size, device = init_distributed(config.parallel.timeout_minutes)
    torch.manual_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model)
    problems = load_prompts(config, tokenizer, files=[settings.data], answer_field=settings.answer_field,
                            split=settings.split, what="eval.data")
    if settings.max_problems:
        problems = problems[: settings.max_problems]
    if rank == 0:
        print(f"eval: {len(problems)} problems from {settings.data}, {settings.samples} samples each, "
              f"temperature {settings.temperature}, top-p {settings.top_p}, min-p {settings.min_p}, "
              f"budgets {sorted(settings.budgets)}, {world_size} rank(s)", flush=True)
    sample = engine_class(settings.engine, key="eval.engine").sample_benchmark
    with preferred_backend(config.kernels.backend, "kernels.backend"):
        per_prompt, calls = sample(config, problems, tokenizer, device, rank, world_size)
    result = None
    if rank == 0:
        budgets = sorted(set(settings.budgets))
        rows, unscored = score_at_budgets(per_prompt, [a for _, a in problems], tokenizer, budgets,
                                          stop_at_think_end=settings.stop_at_think_end,
                                          timeout_s=settings.reward_timeout_s)
        result = EvalResult(len(problems) - unscored, unscored, settings.samples, settings.temperature,
                            settings.top_p, rows, settings.min_p)
        write_eval_report(config, result, calls)
    shutdown()
    return result


def write_eval_report(config, result, generate_calls):
    import json
    import os

    settings = config.eval
    parts = os.path.normpath(config.model.path).split(os.sep)
    name = "/".join(parts[-2:]) if parts[-1] == "hf_model" and len(parts) > 1 else parts[-1]
    table = format_table({name: result})
    os.makedirs(config.run_dir, exist_ok=True)
    with open(os.path.join(config.run_dir, "eval.json"), "w") as handle:
        json.dump({"model": config.model.path, "data": settings.data, **result.as_dict(),
                   "generate_calls": generate_calls}, handle, indent=2)
    with open(os.path.join(config.run_dir, "eval.md"), "w") as handle:
        handle.write(f"# {name} on {os.path.basename(settings.data)}\n\n{table}\n")
    plot = plot_accuracy_vs_budget({name: result}, os.path.join(config.run_dir, "accuracy_vs_budget.png"))
    if result.unscored_problems:
        print(f"{result.unscored_problems} problems left out: their gold answer cannot be parsed by math-verify",
              flush=True)
    print(table, flush=True)
    print(f"written: {config.run_dir}/eval.json, eval.md{', accuracy_vs_budget.png' if plot else ''} "
          f"({generate_calls} generate calls)", flush=True)


class HeldOutDuringTraining:
    """eval.every_steps > 0: the policy being trained, sampled on eval.data every that many steps.

    Each rank samples an equal share of the problems (padded with repeats, so that every rank makes
    the same FSDP-collective generate calls), keyed by problem index as the eval stage keys them;
    every rank scores the merged completions, so the metrics need no broadcast.
    """

    def __init__(self, config, tokenizer, rank, world_size):
        from .grpo_rollouts import load_prompts

        settings = config.eval
        self.every, self.tokenizer, self.seed = settings.every_steps, tokenizer, config.train.seed
        self.rank, self.world_size = rank, world_size
        problems = load_prompts(config, tokenizer, files=[settings.data], answer_field=settings.answer_field,
                                split=settings.split, what="eval.data")[: settings.max_problems]
        self.prompts, self.answers = [p for p, _ in problems], [a for _, a in problems]
        self.budgets, self.sampling = sorted(set(settings.budgets)), eval_sampling(settings)
        self.max_batch_tokens, self.stop_at_think_end = settings.max_batch_tokens, settings.stop_at_think_end
        self.timeout_s = settings.reward_timeout_s

    @classmethod
    def for_stage(cls, config, tokenizer, rank, world_size):
        return cls(config, tokenizer, rank, world_size) if config.eval.every_steps else None

    def describe(self):
        return (f"eval: every {self.every} steps, {len(self.prompts)} problems x {self.sampling.n} samples at "
                f"temperature {self.sampling.temperature}, top-p {self.sampling.top_p}, up to "
                f"{self.sampling.max_new_tokens} tokens")

    def due(self, step, total_steps):
        """Whether to evaluate after `step` (1-based): every `every` steps and after the last."""
        return step % self.every == 0 or step == total_steps

    def __call__(self, root_module, device):
        """{eval_pass_at_1, eval_maj_at_k, eval_mean_tokens} of the policy now."""
        from .parallel import all_gather_objects

        count = len(self.prompts)
        share = list(range(self.rank, count, self.world_size))
        padded = share + [share[0] if share else 0] * (-(-count // self.world_size) - len(share))
        engine = HFRolloutEngine(root_module, self.tokenizer, device, max_batch_tokens=self.max_batch_tokens)
        keys = sequence_keys(self.seed, 0, padded, self.sampling.n)
        completions = [[] for _ in padded]
        for completion in engine.generate([self.prompts[i] for i in padded], self.sampling, row_keys=keys):
            completions[completion.prompt_index].append(completion)
        merged = {}
        for indices, part in all_gather_objects((share, completions[: len(share)])):
            merged.update(zip(indices, part))
        rows, _ = score_at_budgets([merged[i] for i in range(count)], self.answers, self.tokenizer, self.budgets,
                                   stop_at_think_end=self.stop_at_think_end, timeout_s=self.timeout_s)
        final = rows[-1]
        return {"eval_pass_at_1": final.pass_at_1, "eval_maj_at_k": final.maj_at_k,
                "eval_mean_tokens": final.mean_tokens}
