"""group_advantages: each backend against the usual eager PyTorch formulation.

The eager baseline is what GRPO trainers commonly write: view as [prompts, G], mean and std
per row, repeat_interleave back. It ignores NaN rewards, so it does less work than the op.
"""

import argparse

import torch

import fastmath_kernels as fk

from .common import RESULTS_DIR, time_call, write_results

SHAPES_GPU = [(64, 8), (512, 16), (4096, 64)]
SHAPES_CPU = [(64, 8), (512, 16), (4096, 64)]
COLUMNS = ["prompts", "group_size", "implementation", "median_ms", "min_ms", "max_ms", "vs_eager"]


def eager_group_advantages(rewards, group_size, eps=1e-4):
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return (rewards.float() - mean) / (std + eps)


def implementations(device):
    impls = {"eager torch": eager_group_advantages}
    for backend in fk.available_backends():
        if device == "cpu" and backend == "triton":
            continue  # the interpreter's speed says nothing about the kernel
        impls[f"fastmath {backend}"] = lambda r, g, b=backend: fk.group_advantages(r, g, backend=b)
    if device == "cuda":
        compiled = torch.compile(eager_group_advantages)
        impls["torch.compile eager"] = compiled
    return impls


def run(device, out_dir):
    shapes = SHAPES_GPU if device == "cuda" else SHAPES_CPU
    rows = []
    for prompts, group_size in shapes:
        rewards = torch.rand(prompts * group_size, device=device)
        timings = {}
        for name, fn in implementations(device).items():
            timings[name] = time_call(lambda fn=fn, rewards=rewards, size=group_size: fn(rewards, size), device,
                                      calls_per_repeat=20)
        for name, timing in timings.items():
            rows.append({
                "prompts": prompts, "group_size": group_size, "implementation": name, **timing,
                "vs_eager": timings["eager torch"]["median_ms"] / timing["median_ms"],
            })
    markdown = write_results("group_advantages", rows, COLUMNS, device, out_dir)
    print(markdown)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = parser.parse_args(argv)
    run(args.device, args.out or f"{RESULTS_DIR}/{args.device}")


if __name__ == "__main__":
    main()
