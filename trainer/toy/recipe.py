"""The embedded default: the two-stage recipe at toy scale, on CPU, in minutes (configs/toy.yaml).

1. Build a tiny Llama-architecture model with a word-level vocabulary, and word problems whose
   training traces re-check their steps most of the time.
2. Evaluate the untrained model, then stage 1 (SFT for many epochs), evaluate, then stage 2
   (GRPO with the recipe's rewards), evaluate. Evaluation is sampled, as the recipe reports it:
   pass@1 averaged over k samples, maj@k and mean output tokens, at several token budgets.
3. Write report.json, report.md and the plots to run_dir.
"""

import json
import os
import shutil
import time

import yaml

from ..config import ConfigError, EvalConfig, _apply, _validate_eval, load_config, read_yaml
from ..metrics import pyplot, save_figure
from .model_dir import build_model_dir
from .task import WORDS, write_problems

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy.yaml"))
SECTIONS = {
    "task": {"train_problems": int, "eval_problems": int, "detour_probability": float},
    "model": {"hidden_size": int, "layers": int, "heads": int, "kv_heads": int},
}
TOP_LEVEL = {"recipe", "run_dir", "seed", "task", "model", "sft", "grpo", "eval", "epoch_ablation"}


def is_toy_config(path):
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and values.get("recipe") == "toy"


def load_toy_config(path=None, overrides=()):
    """The toy recipe's settings from YAML plus `key=value` overrides, checked before any work."""
    path = path or DEFAULT_CONFIG
    toy = read_yaml(path, "toy recipe config")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        dotted, raw = override.split("=", 1)
        section, _, rest = dotted.strip().partition(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if rest:
            # sft.* and grpo.* keep the rest as one RunConfig key ("train.epochs"); others nest one level.
            toy.setdefault(section, {})[rest] = value
        else:
            toy[section] = value
    unknown = set(toy) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL)}")
    for section, fields in SECTIONS.items():
        values = toy.get(section) or {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{section}.{key}: unknown key; known: {sorted(fields)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or (fields[key] is int and not isinstance(value, int)):
                raise ConfigError(f"{section}.{key}: expected {fields[key].__name__}, got {value!r}")
    settings = EvalConfig(data="(generated)")
    _apply(settings, toy.get("eval") or {}, prefix="eval.")
    _validate_eval(settings)
    toy["eval_settings"] = settings
    ablation = toy.get("epoch_ablation") or []
    if not isinstance(ablation, list) or not all(isinstance(e, int) and e >= 1 for e in ablation):
        raise ConfigError(f"epoch_ablation: expected a list of epoch counts >= 1, got {ablation!r}")
    return toy


def _as_override(key, value):
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"


def stage_config(toy, stage, model_path, train_file, run_dir, extra=()):
    overrides = [f"run_dir={run_dir}", f"model.path={model_path}", f"data.train_files={train_file}",
                 f"train.seed={toy.get('seed', 0)}"]
    if stage == "grpo":
        overrides.insert(0, "stage=grpo")
    overrides += [_as_override(k, v) for k, v in (toy.get(stage) or {}).items()] + list(extra)
    try:
        return load_config(None, overrides)
    except ConfigError as error:
        raise ConfigError(f"{stage}: {error}") from None


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
                    temperature=settings.temperature, top_p=settings.top_p, budgets=settings.budgets,
                    batch_prompts=settings.batch_prompts, stop_at_think_end=settings.stop_at_think_end, seed=seed)


def _prepare(toy):
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    run_dir = toy.get("run_dir", "runs/toy")
    os.makedirs(run_dir, exist_ok=True)
    task, model = toy.get("task") or {}, toy.get("model") or {}
    seed = toy.get("seed", 0)
    detours = task.get("detour_probability", 0.6)
    train_file = write_problems(os.path.join(run_dir, "train.jsonl"), task.get("train_problems", 3000), seed, detours)
    eval_file = write_problems(os.path.join(run_dir, "eval.jsonl"), task.get("eval_problems", 500), seed + 1, detours)
    base_model = build_model_dir(os.path.join(run_dir, "base_model"), WORDS, seed=seed, **model)
    with open(eval_file) as handle:
        held_out = [json.loads(line) for line in handle]
    return run_dir, train_file, base_model, held_out


def _start_stage_afresh(config, recipe_dir):
    """The recipe owns its stage directories: a rerun starts them afresh, not over the last run's
    checkpoints. Only a directory strictly inside the recipe's run_dir is removed, and a stage
    set to resume keeps its own."""
    stage_dir, recipe_dir = os.path.realpath(config.run_dir), os.path.realpath(recipe_dir)
    inside = stage_dir != recipe_dir and os.path.commonpath([stage_dir, recipe_dir]) == recipe_dir
    if inside and config.checkpoint.resume != "auto":
        shutil.rmtree(stage_dir, ignore_errors=True)


def _summary_line(name, result):
    row = result.final
    return (f"{name}: pass@1 {row.pass_at_1:.1%}, maj@{result.samples_per_problem} {row.maj_at_k:.1%}, "
            f"{row.mean_tokens:.1f} tokens")


def run_toy_recipe(config_path=None, overrides=()):
    from ..evaluate import format_table, plot_accuracy_vs_budget
    from ..grpo import run_grpo
    from ..sft import run_sft

    started = time.perf_counter()
    toy = load_toy_config(config_path, overrides)
    settings, seed = toy["eval_settings"], toy.get("seed", 0)
    run_dir = toy.get("run_dir", "runs/toy")
    # Both stages' settings are checked before any work starts.
    sft_config = stage_config(toy, "sft", os.path.join(run_dir, "base_model"), os.path.join(run_dir, "train.jsonl"),
                              os.path.join(run_dir, "sft"))
    grpo_config = stage_config(toy, "grpo", os.path.join(run_dir, "sft", "hf_model"),
                               os.path.join(run_dir, "train.jsonl"), os.path.join(run_dir, "grpo"))
    run_dir, train_file, base_model, held_out = _prepare(toy)
    sampling = f"sampled at T={settings.temperature}, top-p {settings.top_p}, k={settings.samples}"
    results, seconds = {}, {}

    print(f"== base model ({len(held_out)} held-out problems, {sampling})", flush=True)
    results["base"] = evaluate_dir(base_model, held_out, settings, seed)
    print(_summary_line("base", results["base"]), flush=True)

    print(f"== stage 1: SFT, {sft_config.train.epochs} epochs", flush=True)
    stage_start = time.perf_counter()
    _start_stage_afresh(sft_config, run_dir)
    run_sft(sft_config)
    seconds["sft"] = time.perf_counter() - stage_start
    results["SFT"] = evaluate_dir(os.path.join(run_dir, "sft", "hf_model"), held_out, settings, seed)
    print(_summary_line("SFT", results["SFT"]), flush=True)

    print(f"== stage 2: GRPO, {grpo_config.train.max_steps} steps", flush=True)
    stage_start = time.perf_counter()
    _start_stage_afresh(grpo_config, run_dir)
    run_grpo(grpo_config)
    seconds["grpo"] = time.perf_counter() - stage_start
    results["SFT+GRPO"] = evaluate_dir(os.path.join(run_dir, "grpo", "hf_model"), held_out, settings, seed)
    print(_summary_line("SFT+GRPO", results["SFT+GRPO"]), flush=True)

    plots = {
        "sft_loss.png": os.path.join(run_dir, "sft", "loss.png"),
        "grpo_reward.png": os.path.join(run_dir, "grpo", "reward.png"),
        "grpo_length.png": os.path.join(run_dir, "grpo", "completion_tokens.png"),
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
    }
    main_table = _main_table(results)
    with open(os.path.join(run_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(run_dir, "report.md"), "w") as handle:
        handle.write(
            f"# Toy recipe report\n\n{len(held_out)} held-out problems, {sampling}.\n\n{main_table}\n\n"
            f"GRPO length ratio {report['length_ratio']:.2f}x, accuracy change "
            f"{report['accuracy_change_points']:+.1f} points; wall time {report['wall_s']:.0f} s.\n\n"
            f"## By token budget\n\n{format_table(results)}\n\n"
            "Plots: sft_loss.png, grpo_reward.png, grpo_length.png, accuracy_vs_budget.png\n"
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
    """SFT for each epoch count in epoch_ablation and for the configured count, each evaluated.

    The configured count reuses the main recipe's SFT model in run_dir when there is one.
    """
    from ..sft import run_sft

    toy = load_toy_config(config_path, overrides)
    settings, seed = toy["eval_settings"], toy.get("seed", 0)
    configured = (toy.get("sft") or {}).get("train.epochs", 1)
    epoch_counts = sorted(set(toy.get("epoch_ablation") or []) | {configured})
    run_dir, train_file, base_model, held_out = _prepare(toy)
    rows = []
    for epochs in epoch_counts:
        stage_dir = os.path.join(run_dir, f"sft_{epochs}_epochs")
        main_run = os.path.join(run_dir, "sft", "hf_model")
        if epochs == configured and os.path.isdir(main_run):
            print(f"== SFT for {epochs} epoch(s): the main recipe's model in {main_run}", flush=True)
            stage_dir = os.path.join(run_dir, "sft")
        else:
            config = stage_config(toy, "sft", base_model, train_file, stage_dir, [f"train.epochs={epochs}"])
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
