"""The embedded default: the two-stage recipe at toy scale, on CPU, in minutes (configs/toy.yaml).

1. Build a tiny Llama-architecture model with a word-level vocabulary, and word problems whose
   training traces re-check their steps most of the time.
2. Evaluate the untrained model, then stage 1 (SFT for many epochs), evaluate, then stage 2
   (GRPO with the recipe's rewards), evaluate. Evaluation is sampled, as the recipe reports it:
   pass@1 averaged over k samples, maj@k and mean output tokens, at several token budgets.
3. Write report.json, report.md and the plots to run_dir.
"""

import dataclasses
import json
import os
import shutil
import time

from ..config import load_config, read_yaml
from ..errors import ConfigError
from ..metrics import pyplot, read_metrics, save_figure
from .model_dir import build_model_dir
from .task import WORDS, Arithmetic, write_problems, write_traces

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy.yaml"))
PLACEHOLDER = "(made by the recipe)"


def is_toy_config(path):
    try:
        return read_yaml(path, "config file").get("recipe") == "toy"
    except ConfigError:
        return False


@dataclasses.dataclass
class Recipe:
    """The recipe's shared settings (its eval stage's config) and a RunConfig per training stage."""

    config_path: str
    overrides: list
    shared: object  # RunConfig of the eval stage: run_dir, seed, toy and eval settings
    stages: dict  # {"sft": RunConfig, "grpo": RunConfig}

    @property
    def run_dir(self):
        return self.shared.run_dir

    def paths(self):
        return {"traces_file": os.path.join(self.run_dir, "traces.jsonl"),
                "train_file": os.path.join(self.run_dir, "train.jsonl"),
                "eval_file": os.path.join(self.run_dir, "eval.jsonl"),
                "base_model": os.path.join(self.run_dir, "base_model")}

    def stage_config(self, stage, run_dir, model_path, extra=()):
        """The stage's config from the file, the user's overrides, then the recipe's paths."""
        # recipe=null: the stage's saved config.yaml reruns that stage alone, not the whole recipe.
        paths = self.paths()
        overrides = [*self.overrides, f"stage={stage}", f"run_dir={run_dir}", f"model.path={model_path}",
                     f"data.train_files=[{paths['train_file']}]", f"eval.data={paths['eval_file']}", "recipe=null",
                     *extra]
        try:
            return load_config(self.config_path, overrides)
        except ConfigError as error:
            raise ConfigError(f"{stage}: {error}") from None


def load_recipe(path=None, overrides=()):
    """The recipe's settings and both stages' configs, all checked before any work."""
    path, overrides = path or DEFAULT_CONFIG, list(overrides)
    shared = load_config(path, [*overrides, "stage=eval", f"model.path={PLACEHOLDER}", f"eval.data={PLACEHOLDER}"])
    if shared.recipe != "toy":
        raise ConfigError(f"{path}: not a toy recipe (recipe: toy); run its stages with --stage")
    recipe = Recipe(path, overrides, shared, {})
    run_dir = shared.run_dir
    recipe.stages["sft"] = recipe.stage_config("sft", os.path.join(run_dir, "sft"), recipe.paths()["base_model"])
    recipe.stages["grpo"] = recipe.stage_config("grpo", os.path.join(run_dir, "grpo"),
                                                os.path.join(run_dir, "sft", "hf_model"))
    return recipe


def evaluate_dir(model_dir, problems, settings, seed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import evaluate

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p["problem"]}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    return evaluate(model, tokenizer, prompts, [p["answer"] for p in problems], samples=settings.samples,
                    temperature=settings.temperature, top_p=settings.top_p, min_p=settings.min_p,
                    budgets=settings.budgets, batch_prompts=settings.batch_prompts,
                    stop_at_think_end=settings.stop_at_think_end, seed=seed)


def _prepare(recipe):
    """Writes the task's traces, curates them into the SFT data, writes the held-out problems and
    the base model; returns (held-out problems, curation counts)."""
    import torch
    from transformers import AutoTokenizer

    from ..curate import CurationOptions, curate

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    os.makedirs(recipe.run_dir, exist_ok=True)
    task, seed, paths = recipe.shared.toy.task, recipe.shared.train.seed, recipe.paths()
    arithmetic = Arithmetic(task.max_operand, tuple(sorted(set(task.factors))), task.carries)
    write_traces(paths["traces_file"], task.train_problems, seed, task.detour_probability, task.traces_per_problem,
                 task.wrong_trace_probability, arithmetic)
    write_problems(paths["eval_file"], task.eval_problems, seed + 1, arithmetic=arithmetic)  # solutions never read
    build_model_dir(paths["base_model"], WORDS, seed=seed, **dataclasses.asdict(recipe.shared.toy.model))
    # The paper's stage-1 data construction: the shortest correct trace of each problem.
    _, counts = curate([paths["traces_file"]], AutoTokenizer.from_pretrained(paths["base_model"]),
                       paths["train_file"], CurationOptions(problem_field="problem", trace_field="generation"))
    print(f"curation of {paths['traces_file']}:\n{counts.table()}", flush=True)
    with open(paths["eval_file"]) as handle:
        return [json.loads(line) for line in handle], counts


def _start_stage_afresh(config, recipe_dir):
    """The recipe owns its stage directories: a rerun starts them afresh, not over the last run's
    checkpoints. Only a directory strictly inside the recipe's run_dir is removed, and a stage
    set to resume keeps its own."""
    stage_dir, recipe_dir = os.path.realpath(config.run_dir), os.path.realpath(recipe_dir)
    inside = stage_dir != recipe_dir and os.path.commonpath([stage_dir, recipe_dir]) == recipe_dir
    if inside and config.checkpoint.resume != "auto":
        shutil.rmtree(stage_dir, ignore_errors=True)


ACCURACY_MARK = 0.9  # where the report places SFT's accuracy jump


@dataclasses.dataclass
class HeldOutCurve:
    """A stage's periodic held-out pass@1 (eval.every_steps) and where it first reached ACCURACY_MARK."""

    steps: list
    pass_at_1: list
    total_steps: int

    @classmethod
    def read(cls, stage_dir):
        records = read_metrics(stage_dir)
        points = [(r["step"], r["eval_pass_at_1"]) for r in records if "eval_pass_at_1" in r]
        return cls([s for s, _ in points], [a for _, a in points], records[-1]["step"] if records else 0)

    @property
    def first_step_at_mark(self):
        return next((step for step, value in zip(self.steps, self.pass_at_1) if value >= ACCURACY_MARK), None)

    def summary(self):
        if not self.steps:
            return "no held-out evaluation during SFT (stages.sft.eval.every_steps is 0)"
        first = self.first_step_at_mark
        if first is None:
            return (f"held-out pass@1 during SFT never reached {ACCURACY_MARK:.0%} in {self.total_steps} steps "
                    f"(best {max(self.pass_at_1):.1%})")
        return (f"held-out pass@1 during SFT first reached {ACCURACY_MARK:.0%} at step {first} of "
                f"{self.total_steps} ({first / self.total_steps:.0%} of the schedule)")

    def as_dict(self):
        return {"steps": self.steps, "pass_at_1": self.pass_at_1, "total_steps": self.total_steps,
                "mark": ACCURACY_MARK, "first_step_at_mark": self.first_step_at_mark}


def _summary_line(name, result):
    row = result.final
    return (f"{name}: pass@1 {row.pass_at_1:.1%}, maj@{result.samples_per_problem} {row.maj_at_k:.1%}, "
            f"{row.mean_tokens:.1f} tokens")


def run_toy_recipe(config_path=None, overrides=()):
    from ..grpo import run_grpo
    from ..sft import run_sft

    started = time.perf_counter()
    recipe = load_recipe(config_path, overrides)  # every stage's settings checked before any work
    settings, seed, run_dir = recipe.shared.eval, recipe.shared.train.seed, recipe.run_dir
    held_out, curation = _prepare(recipe)
    sampling = f"sampled at T={settings.temperature}, top-p {settings.top_p}, k={settings.samples}"
    results, seconds = {}, {}

    print(f"== base model ({len(held_out)} held-out problems, {sampling})", flush=True)
    results["base"] = evaluate_dir(recipe.paths()["base_model"], held_out, settings, seed)
    print(_summary_line("base", results["base"]), flush=True)
    sft, grpo = recipe.stages["sft"], recipe.stages["grpo"]
    stages = [("SFT", f"stage 1: SFT, {sft.train.epochs} epochs", sft, run_sft),
              ("SFT+GRPO", f"stage 2: GRPO, {grpo.train.max_steps} steps", grpo, run_grpo)]
    for name, title, config, run in stages:
        print(f"== {title}", flush=True)
        stage_start = time.perf_counter()
        _start_stage_afresh(config, run_dir)
        run(config)
        seconds[config.stage] = time.perf_counter() - stage_start
        results[name] = evaluate_dir(os.path.join(config.run_dir, "hf_model"), held_out, settings, seed)
        print(_summary_line(name, results[name]), flush=True)
    curve = HeldOutCurve.read(sft.run_dir)
    print(curve.summary(), flush=True)
    return _write_report(results, run_dir, len(held_out), sampling, seconds, started, curation, curve)


def _write_report(results, run_dir, num_problems, sampling, seconds, started, curation, curve):
    """report.json, report.md and the plots in run_dir; prints the main table."""
    from ..evaluate import format_table, plot_accuracy_vs_budget

    plots = {
        "sft_loss.png": os.path.join(run_dir, "sft", "loss.png"),
        "grpo_reward.png": os.path.join(run_dir, "grpo", "reward.png"),
        "grpo_length.png": os.path.join(run_dir, "grpo", "completion_tokens.png"),
        "sft_held_out.png": os.path.join(run_dir, "sft", "eval_pass_at_1.png"),
    }
    for name, source in plots.items():
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(run_dir, name))
    plot_accuracy_vs_budget(results, os.path.join(run_dir, "accuracy_vs_budget.png"))

    sft, grpo = results["SFT"].final, results["SFT+GRPO"].final
    report = {
        "stages": {name: result.as_dict() for name, result in results.items()},
        "length_ratio": grpo.mean_tokens / sft.mean_tokens,
        "accuracy_change_points": 100 * (grpo.pass_at_1 - sft.pass_at_1),
        "sampling": sampling, "stage_seconds": seconds, "wall_s": time.perf_counter() - started,
        "curation": dataclasses.asdict(curation), "sft_held_out": curve.as_dict(),
    }
    main_table = _main_table(results)
    with open(os.path.join(run_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(run_dir, "report.md"), "w") as handle:
        handle.write(
            f"# Toy recipe report\n\n{num_problems} held-out problems, {sampling}.\n\n{main_table}\n\n"
            f"GRPO length ratio {report['length_ratio']:.2f}x, accuracy change "
            f"{report['accuracy_change_points']:+.1f} points; wall time {report['wall_s']:.0f} s.\n\n"
            f"The accuracy jump: {curve.summary()}.\n\n"
            f"## By token budget\n\n{format_table(results)}\n\n"
            f"## SFT data curation (shortest correct trace per problem)\n\n```\n{curation.table()}\n```\n\n"
            "Plots: sft_loss.png, sft_held_out.png, grpo_reward.png, grpo_length.png, accuracy_vs_budget.png\n"
        )
    print(f"\n{main_table}\n\nGRPO length ratio {report['length_ratio']:.2f}x, accuracy change "
          f"{report['accuracy_change_points']:+.1f} points; whole recipe {report['wall_s']:.0f} s; "
          f"report in {run_dir}/report.md", flush=True)
    return report


def _main_table(results):
    k = next(iter(results.values())).samples_per_problem
    lines = [f"| model | pass@1 (mean of {k}) | maj@{k} | mean tokens |", "|---|---|---|---|"]
    for name, result in results.items():
        row = result.final
        lines.append(f"| {name} | {row.pass_at_1:.1%} | {row.maj_at_k:.1%} | {row.mean_tokens:.1f} |")
    return "\n".join(lines)


def run_epoch_ablation(config_path=None, overrides=()):
    """SFT for each epoch count in toy.epoch_ablation and for the configured count, each evaluated.

    The configured count reuses the main recipe's SFT model in run_dir when there is one.
    """
    from ..sft import run_sft

    recipe = load_recipe(config_path, overrides)
    settings, seed, run_dir = recipe.shared.eval, recipe.shared.train.seed, recipe.run_dir
    configured = recipe.stages["sft"].train.epochs
    epoch_counts = sorted(set(recipe.shared.toy.epoch_ablation) | {configured})
    held_out, _ = _prepare(recipe)
    rows = []
    for epochs in epoch_counts:
        stage_dir = os.path.join(run_dir, f"sft_{epochs}_epochs")
        main_run = os.path.join(run_dir, "sft", "hf_model")
        if epochs == configured and os.path.isdir(main_run):
            print(f"== SFT for {epochs} epoch(s): the main recipe's model in {main_run}", flush=True)
            stage_dir = os.path.join(run_dir, "sft")
        else:
            config = recipe.stage_config("sft", stage_dir, recipe.paths()["base_model"], [f"train.epochs={epochs}"])
            print(f"== SFT for {epochs} epoch(s)", flush=True)
            _start_stage_afresh(config, run_dir)
            run_sft(config)
        result = evaluate_dir(os.path.join(stage_dir, "hf_model"), held_out, settings, seed)
        print(_summary_line(f"{epochs} epoch(s)", result), flush=True)
        rows.append({"epochs": epochs, "pass_at_1": result.accuracy, "maj_at_k": result.final.maj_at_k,
                     "mean_tokens": result.mean_tokens})
    table = ["| SFT epochs | pass@1 | maj@k | mean tokens |", "|---|---|---|---|"]
    table += [f"| {r['epochs']} | {r['pass_at_1']:.1%} | {r['maj_at_k']:.1%} | {r['mean_tokens']:.1f} |" for r in rows]
    with open(os.path.join(run_dir, "epoch_ablation.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    with open(os.path.join(run_dir, "epoch_ablation.md"), "w") as handle:
        handle.write("# Extended SFT: accuracy against epochs\n\n" + "\n".join(table) + "\n")
    _plot_epochs(rows, os.path.join(run_dir, "epoch_ablation.png"))
    print("\n" + "\n".join(table), flush=True)
    return rows


def _plot_epochs(rows, path):
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["epochs"] for r in rows], [100 * r["pass_at_1"] for r in rows], marker="o", label="pass@1")
    axis.plot([r["epochs"] for r in rows], [100 * r["maj_at_k"] for r in rows], marker="s", label="maj@k")
    axis.legend()
    return save_figure(figure, axis, path, "SFT epochs", "held-out accuracy (%)", "extended SFT")
