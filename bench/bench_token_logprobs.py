"""token_logprobs forward (and forward + backward) against naive log_softmax(...).gather(...).

On GPU the forward's fraction of the measured copy bandwidth is reported: the op reads the
logits once, so N * V * itemsize bytes over its time is its achieved bandwidth.
"""

import argparse
import statistics
import time

import torch

import fastmath_kernels as fk

from .common import RESULTS_DIR, synchronize, write_results
from .harness import PeerUnavailable
from .peers import import_peer

CPU_CASES = [(2048, 32768, "float32"), (512, 151936, "float32"), (1024, 32768, "bfloat16")]
GPU_CASES = [(4096, 151936, "bfloat16"), (16384, 151936, "bfloat16"), (16384, 32768, "bfloat16")]
COLUMNS = [
    "N", "V", "dtype", "pass", "implementation", "median_ms", "min_ms", "max_ms",
    "speedup_vs_naive", "bandwidth_GBps", "bandwidth_fraction",
]


def naive(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def implementations(device):
    impls = {"naive torch": naive, "torch.compile naive": torch.compile(naive, dynamic=True)}
    backends = [b for b in fk.available_backends() if not (device == "cpu" and b == "triton")]
    for backend in backends:
        impls[f"fastmath {backend}"] = lambda x, t, b=backend: fk.token_logprobs(x, t, backend=b)
    try:
        impls["trl selective_log_softmax"] = import_peer("trl.trainer.utils", "trl").selective_log_softmax
    except PeerUnavailable as reason:
        print(f"trl selective_log_softmax: {reason}")
    return impls


def time_ms(fn, device, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(1e3 * (time.perf_counter() - start))
    return samples


def run(device, out_dir, repeats=None):
    repeats = repeats or (20 if device == "cuda" else 5)
    copy_bandwidth = None
    if device == "cuda":
        from .roofline import copy_bandwidth_bytes_per_s

        copy_bandwidth = copy_bandwidth_bytes_per_s()
        print(f"measured copy bandwidth: {copy_bandwidth / 1e9:.0f} GB/s")
    rows = []
    for tokens, vocab, dtype_name in GPU_CASES if device == "cuda" else CPU_CASES:
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(tokens, vocab, generator=generator).to(device, getattr(torch, dtype_name))
        targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
        upstream = torch.randn(tokens, device=device)
        for pass_name in ("forward", "forward+backward"):
            timings = {}
            for name, fn in implementations(device).items():
                if pass_name == "forward":
                    with torch.no_grad():
                        timings[name] = time_ms(lambda fn=fn, x=logits, t=targets: fn(x, t), device, repeats)
                else:
                    leaf = logits.detach().requires_grad_()

                    def step(fn=fn, leaf=leaf, targets=targets, upstream=upstream):
                        leaf.grad = None
                        (fn(leaf, targets) * upstream).sum().backward()

                    timings[name] = time_ms(step, device, repeats)
            naive_median = statistics.median(timings["naive torch"])
            for name, samples in timings.items():
                median = statistics.median(samples)
                achieved = logits.numel() * logits.element_size() / (median / 1e3)
                rows.append({
                    "N": tokens, "V": vocab, "dtype": dtype_name, "pass": pass_name, "implementation": name,
                    "median_ms": median, "min_ms": min(samples), "max_ms": max(samples),
                    "speedup_vs_naive": naive_median / median,
                    "bandwidth_GBps": achieved / 1e9 if pass_name == "forward" else "",
                    "bandwidth_fraction": (achieved / copy_bandwidth
                                           if copy_bandwidth and pass_name == "forward" else ""),
                })
        logits = None  # freed before the next case allocates its own
    print(write_results("token_logprobs", rows, COLUMNS, device, out_dir))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    run(args.device, args.out or f"{RESULTS_DIR}/{args.device}", args.repeats)


if __name__ == "__main__":
    main()
