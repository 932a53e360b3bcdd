"""`python -m trainer.run`: the main job.

The SFT and GRPO stages are not built yet. Until they are, this entry point runs the first
real kernel, group_advantages, on a sampled GRPO reward batch through every backend this
machine has, and checks that they agree.
"""

import argparse
import time

import torch

import fastmath_kernels as fk


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per GRPO batch")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print("fastmath: the SFT and GRPO trainer is not built yet; running the group_advantages kernel instead.")
    generator = torch.Generator().manual_seed(args.seed)
    count = args.prompts * args.group_size
    # Recipe-shaped rewards: correctness (0/1) plus a continuous length term; 2% failed (NaN).
    rewards = torch.randint(0, 2, (count,), generator=generator).float()
    rewards += 0.3 * torch.rand(count, generator=generator)
    rewards[torch.rand(count, generator=generator) < 0.02] = float("nan")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rewards = rewards.to(device)

    print(f"backends here: {', '.join(fk.available_backends())} (CUDA extension loaded: {fk.HAS_CUDA_EXT})")
    print(f"{args.prompts} prompts x {args.group_size} samples on {device}, {int(rewards.isnan().sum())} NaN rewards")
    results = {}
    for backend in fk.available_backends():
        start = time.perf_counter()
        results[backend] = fk.group_advantages(rewards, args.group_size, backend=backend).cpu()
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        advantages = results[backend]
        print(
            f"  {backend:>6}: first call {elapsed_ms:8.2f} ms, mean |A| {advantages.abs().mean():.4f}, "
            f"zeros {int((advantages == 0).sum())}"
        )
    reference = results["torch"]
    worst = max((r - reference).abs().max().item() for r in results.values())
    print(f"largest difference between backends: {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("backends disagree")


if __name__ == "__main__":
    main()
