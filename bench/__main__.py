"""`python -m bench --device cpu|cuda`: every kernel benchmark, tables under bench/results/."""

import argparse
import os

import torch

from . import (
    bench_group_advantages,
    bench_grpo_loss,
    bench_linear_cross_entropy,
    bench_linear_token_logprobs,
    bench_token_logprobs,
)
from .common import RESULTS_DIR, header_line
from .harness import run_benchmark

BENCHMARKS = {
    "linear_cross_entropy": bench_linear_cross_entropy,
    "linear_token_logprobs": bench_linear_token_logprobs,
    "grpo_loss": bench_grpo_loss,
    "token_logprobs": bench_token_logprobs,
    "group_advantages": bench_group_advantages,
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these ops")
    parser.add_argument("--without", nargs="*", default=[], metavar="TEXT",
                        help="leave out implementations whose name contains TEXT (e.g. torch.compile)")
    parser.add_argument("--tokens", nargs="*", type=int, metavar="N",
                        help="fused-linear ops: only the cases with these token counts")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    out_dir = args.out or os.path.join(RESULTS_DIR, args.device)
    print(header_line(args.device))
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name} ===")
        module = BENCHMARKS[name]
        if hasattr(module, "run"):
            module.run(args.device, out_dir)
        else:
            run_benchmark(module, args.device, out_dir, without=args.without, tokens=args.tokens)
    print(f"results written to {out_dir}")


if __name__ == "__main__":
    main()
