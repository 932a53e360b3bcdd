"""`python -m trainer.run`: the main job.

With --config (and optional section.key=value overrides) it runs that stage. Without
arguments it will run the whole recipe on the embedded toy task; until that lands it runs
the group_advantages kernel on every backend here and checks that they agree.
"""

import argparse
import sys
import time

import torch

import fastmath_kernels as fk

from .config import ConfigError, load_config
from .data import DataError
from .engine import TrainingError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run configuration (see configs/)")
    parser.add_argument("--resume", choices=["auto", "none"], help="auto: continue from the latest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=2e-5")
    return parser.parse_args(argv)


def kernel_demo():
    print("fastmath: no --config given and the embedded recipe is not built yet; running group_advantages instead.")
    generator = torch.Generator().manual_seed(0)
    prompts, group_size = 64, 8
    count = prompts * group_size
    # Recipe-shaped rewards: correctness (0/1) plus a continuous length term; 2% failed (NaN).
    rewards = torch.randint(0, 2, (count,), generator=generator).float()
    rewards += 0.3 * torch.rand(count, generator=generator)
    rewards[torch.rand(count, generator=generator) < 0.02] = float("nan")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rewards = rewards.to(device)
    print(f"backends here: {', '.join(fk.available_backends())} (CUDA extension loaded: {fk.HAS_CUDA_EXT})")
    print(f"{prompts} prompts x {group_size} samples on {device}, {int(rewards.isnan().sum())} NaN rewards")
    results = {}
    for backend in fk.available_backends():
        start = time.perf_counter()
        results[backend] = fk.group_advantages(rewards, group_size, backend=backend).cpu()
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        print(f"  {backend:>6}: first call {elapsed_ms:8.2f} ms, mean |A| {results[backend].abs().mean():.4f}")
    worst = max((r - results["torch"]).abs().max().item() for r in results.values())
    print(f"largest difference between backends: {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("backends disagree")


def main(argv=None):
    args = parse_args(argv)
    if args.config is None and not args.overrides:
        kernel_demo()
        return
    try:
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        config = load_config(args.config, overrides)
        if config.stage == "grpo":
            from .grpo import run_grpo

            run_grpo(config)
        else:
            from .sft import run_sft

            run_sft(config)
    except (ConfigError, DataError) as error:
        # Bad input is a one-line message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
