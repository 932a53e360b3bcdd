"""`python -m trainer.plan`: every stage's per-GPU memory at the configured shapes, before any GPU.

    python -m trainer.plan --config configs/fast_math_r1_14b.yaml --gpus 8 --gpu-memory-gb 80

The model's config.json is all it reads: no weights. Each training stage runs one real step on
fake tensors (trainer.plan_stages, trainer.plan_measure) with a fake process group of --gpus
ranks: FSDP2 as the trainer wraps it, activation checkpointing, the fused kernels' fake
implementations, the frozen reference model and the optimizer. What a step cannot run on fake
tensors (sampling thousands of tokens) is counted from the shapes: the rollouts' KV cache,
vLLM's share of the GPU.

It prints, per stage, one rank's GPU memory by category in each phase of a step, the host
memory per node, and the FLOPs; it exits 1 naming the stage and its largest item when a stage
needs more than 90% of the GPU. The figures are tensor bytes: the CUDA context, NCCL's buffers
and the allocator's fragmentation come on top (a few GiB), which that 10% is left for. GB means
GiB (2**30 bytes) throughout: an "80 GB" GPU holds 80 GiB. Host memory is that of the ranks of
one node, with --gpus ranks on it.
"""

import argparse
import os
import sys
import time

from .config import load_config, read_yaml
from .errors import ConfigError, DataError
from .plan_stages import GIB, gib, plan_stage

FIT_FRACTION = 0.9  # a stage fits when its peak is at most this share of the GPU
STAGES = ("sft", "grpo", "eval")
# Where a config names a Hub model whose files are not here: architectures shipped with the repo.
SHIPPED_ARCHITECTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
ROWS = ("parameters", "gradients", "optimizer states", "activations", "temporaries", "communication buffers",
        "reference model", "KV cache", "vLLM weights (bf16, awake)", "the parameter being gathered (bf16)",
        "reserved for vLLM")


# ---------------------------------------------------------------------------------------------
# The model's architecture


def architecture_path(model_path):
    """A config.json for model.path: its own directory, the Hub cache, or the repo's configs/models/."""
    candidates = [os.path.join(model_path, "config.json")]
    if "/" in model_path and not os.path.exists(model_path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
            if isinstance(cached, str):
                candidates.append(cached)
        except Exception:  # a malformed name is simply not in the cache
            pass
        candidates.append(os.path.join(SHIPPED_ARCHITECTURES, model_path.rstrip("/").split("/")[-1].lower(),
                                       "config.json"))
    found = next((path for path in candidates if os.path.isfile(path)), None)
    if found and os.path.abspath(found).startswith(os.getcwd() + os.sep):
        found = os.path.relpath(found)  # shorter in the report, and the same on every checkout
    return found


def read_architecture(path, trust_remote_code=False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a usable model config ({str(error).splitlines()[0][:160]})") from None


def stage_architectures(configs, model_config_path=None):
    """{stage: (transformers config, where it came from)}.

    A stage whose model does not exist yet (GRPO starts from SFT's export) takes the architecture
    of another stage of the same file that has one: training does not change it.
    """
    found = {}
    for stage, config in configs.items():
        path = model_config_path or architecture_path(config.model.path)
        if path:
            found[stage] = (read_architecture(path, config.model.trust_remote_code), path)
    if not found:
        names = ", ".join(sorted({config.model.path for config in configs.values()}))
        raise DataError(f"no config.json for model.path ({names}): not a local directory, not in the Hugging Face "
                        f"cache, not under configs/models/; pass --model-config PATH/config.json")
    first = next(iter(found.values()))
    return {stage: found.get(stage, (first[0], f"{first[1]} (model.path {configs[stage].model.path} does not "
                                              f"exist yet)")) for stage in configs}


# ---------------------------------------------------------------------------------------------
# Running and printing


def defined_stages(config_path):
    """The stages a `stages:` file defines, in recipe order (none for a one-stage file or no file)."""
    if config_path is None:
        return []
    values = read_yaml(config_path, "config file")
    stages = (values.get("stages") or {}) if isinstance(values, dict) else {}
    return [stage for stage in STAGES if stage in stages]


def stage_configs(config_path, overrides, stages=None):
    """({stage: RunConfig} to plan, {stage: RunConfig} of the file's other stages).

    The stages to plan take the command line's overrides; the others are read as the file has
    them (their models lend an architecture to a stage whose model does not exist yet), and one
    that does not load is left out.
    """
    defined = defined_stages(config_path)
    if not defined:
        config = load_config(config_path, list(overrides) + ([f"stage={stages[0]}"] if stages else []))
        return {config.stage: config}, {}
    chosen = stages or defined
    missing = [stage for stage in chosen if stage not in defined]
    if missing:
        raise ConfigError(f"{config_path}: no {', '.join(missing)} stage; it defines {', '.join(defined)}")
    planned = {stage: load_config(config_path, list(overrides) + [f"stage={stage}"]) for stage in chosen}
    others = {}
    for stage in defined:
        if stage not in planned:
            try:
                others[stage] = load_config(config_path, [f"stage={stage}"])
            except ConfigError:
                pass
    return planned, others


def format_table(plan, gpu_bytes):
    named = {name for phase in plan.phases for name in phase.items}
    rows = [row for row in ROWS if any(phase.items.get(row, 0) for phase in plan.phases)]
    rows += sorted(named - set(ROWS))  # every item has a row: the columns add up to their totals
    headers = ["GiB per GPU"] + [phase.name for phase in plan.phases]
    body = [[row] + [gib(phase.items.get(row, 0)) for phase in plan.phases] for row in rows]
    body.append(["**total**"] + [f"**{gib(phase.total)}**" for phase in plan.phases])
    body.append(["share of the GPU"] + [f"{phase.total / gpu_bytes:.0%}" for phase in plan.phases])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def format_plan(plan, gpu_bytes):
    peak = plan.peak_phase
    verdict = "fits" if peak.total <= FIT_FRACTION * gpu_bytes else "DOES NOT FIT"
    out = [f"## {plan.stage}: peak {gib(peak.total)} GiB per GPU in \"{peak.name}\" "
           f"({peak.total / gpu_bytes:.0%} of {gib(gpu_bytes)} GiB): {verdict}", "", format_table(plan, gpu_bytes), ""]
    out += [f"- {note}" for note in plan.notes]
    out += [f"- host RAM of the ranks on one node, {what}: {gib(size)} GiB ({how})" for what, size, how in plan.host]
    out += [f"- FLOPs {what}: {flops / 1e12:,.1f} TFLOP" for what, flops in plan.flops]
    if plan.flops:
        out.append("- (FLOPs as torch's FLOP counter counts them: attention as if unmasked, about twice what "
                   "causal flash attention computes)")
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="plan this stage (repeatable); default: every stage the file defines")
    parser.add_argument("--gpus", type=int, default=8, help="ranks the stage runs on (default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--model-config", help="a config.json to plan with instead of model.path's")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as trainer.run takes them")
    return parser.parse_args(argv)


def run_plan(config_path, overrides=(), stages=None, gpus=8, gpu_memory_gb=80.0, model_config=None, log=print):
    """Plans the stages; returns (plans, report text, failures as 'stage: reason' lines)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if not gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
    gpu_bytes = gpu_memory_gb * GIB
    configs, others = stage_configs(config_path, overrides, stages)
    # From any stage of the file: GRPO's model is SFT's export, with SFT's architecture.
    architectures = stage_architectures({**configs, **others}, model_config)
    plans, failures = [], []
    report = [f"# Memory plan: {config_path or 'command-line settings'}, {gpus} GPUs of {gpu_memory_gb:g} GiB", "",
              provenance(), ""]
    for stage, config in configs.items():
        architecture, source = architectures[stage]
        started = time.perf_counter()
        log(f"planning {stage} ({architecture.num_hidden_layers} layers, from {source}) ...")
        plan = plan_stage(stage, config, architecture, gpus, gpu_bytes)
        plan.notes.insert(0, f"model: {source}; planned in {time.perf_counter() - started:.0f} s")
        plans.append(plan)
        text = format_plan(plan, gpu_bytes)
        report.append(text)
        log(text)
        if plan.peak_phase.total > FIT_FRACTION * gpu_bytes:
            item, size = plan.largest_item()
            failures.append(f"{stage}: needs {gib(plan.peak_phase.total)} GiB per GPU in \"{plan.peak_phase.name}\", "
                            f"more than {FIT_FRACTION:.0%} of {gpu_memory_gb:g} GiB; the largest item is {item} "
                            f"({gib(size)} GiB)")
    return plans, "\n".join(report), failures


def provenance():
    """The date, commit and versions a plan ran with, for the report's header."""
    import platform
    import subprocess

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"{time.strftime('%Y-%m-%d')} | commit {commit} | torch {torch.__version__} | transformers "
            f"{transformers.__version__} | planned on {platform.machine()} CPU, {os.cpu_count()} cores, fake tensors")


def preflight(config_path, overrides, stage, log=print):
    """`trainer.run --plan`: plans the stage about to run, for this launch's ranks and GPUs, before any
    weights load; raises SystemExit(1) when it does not fit.

    Rank 0 plans; the other ranks go on to start-up, where they wait for rank 0 to join them.
    """
    import torch

    if int(os.environ.get("RANK", "0")) != 0:
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        gpu_memory_gb = 80.0
        log("plan: no GPU visible; planning for GPUs of 80 GiB")
    _, _, failures = run_plan(config_path, overrides, [stage], gpus, gpu_memory_gb, log=log)
    if failures:
        for failure in failures:
            print(f"does not fit: {failure}", file=sys.stderr)
        raise SystemExit(1)
    log(f"plan: {stage} fits {gpus} GPU(s) of {gpu_memory_gb:.0f} GiB; starting")


def main(argv=None):
    args = parse_args(argv)
    try:
        _, report, failures = run_plan(args.config, args.overrides, args.stage, args.gpus, args.gpu_memory_gb,
                                       args.model_config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report + ("\n" + "\n".join(f"- {line}" for line in failures) + "\n" if failures else ""))
    for failure in failures:
        print(f"does not fit: {failure}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
