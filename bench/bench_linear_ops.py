"""linear_cross_entropy and linear_token_logprobs, forward + backward, against naive PyTorch.

Naive means what a training script writes: logits = hidden @ weight.T materialised, then
F.cross_entropy, or log_softmax(...).gather(...). Times are medians of warm repeats taken
round-robin over the implementations in one process; peak extra memory is measured once per
implementation in a fresh subprocess.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import fastmath_kernels as fk

from .common import RESULTS_DIR, synchronize, write_results
from .memory import measure_extra_bytes, measure_in_subprocess

OPS = ("linear_cross_entropy", "linear_token_logprobs")
# (tokens N, hidden H, vocab V, dtype)
CPU_CASES = [(1024, 256, 32768, "float32"), (4096, 256, 32768, "float32")]
GPU_CASES = [(4096, 4096, 151936, "bfloat16"), (16384, 4096, 151936, "bfloat16"), (16384, 1536, 151936, "bfloat16")]
COLUMNS = [
    "op", "N", "H", "V", "dtype", "implementation", "median_s", "min_s", "max_s",
    "peak_extra_MB", "speedup_vs_naive", "memory_vs_naive", "matmul_fraction",
]


def implementations(device):
    if device == "cuda":
        return ("naive torch", "fastmath cuda", "fastmath triton")
    return ("naive torch", "fastmath torch")


def make_inputs(case, device, seed=0):
    tokens, hidden_size, vocab_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    targets = torch.randint(0, vocab_size, (tokens,), generator=generator).to(device)
    upstream = torch.randn(tokens, generator=generator).to(device)
    return hidden, weight.requires_grad_(), targets, upstream


def forward_backward(op, implementation, inputs):
    hidden, weight, targets, upstream = inputs
    hidden.grad = weight.grad = None
    backend = implementation.removeprefix("fastmath ")
    if op == "linear_cross_entropy":
        if implementation == "naive torch":
            loss = F.cross_entropy(hidden @ weight.T, targets)
        else:
            loss = fk.linear_cross_entropy(hidden, weight, targets, backend=backend)
        loss.backward()
        return
    if implementation == "naive torch":
        logits = (hidden @ weight.T).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        logp = fk.linear_token_logprobs(hidden, weight, targets, backend=backend)
    (logp * upstream).sum().backward()


def time_round_robin(op, inputs, device, repeats):
    samples = {name: [] for name in implementations(device)}
    for name in samples:  # warm-up
        forward_backward(op, name, inputs)
    for _ in range(repeats):
        for name in samples:
            synchronize(device)
            start = time.perf_counter()
            forward_backward(op, name, inputs)
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def measure_memory_here(arguments):
    """Subprocess side: one fresh process, one implementation, one call."""
    device = arguments["device"]
    inputs = make_inputs(tuple(arguments["case"]), device)
    if device == "cuda":
        # Warm-up is safe on CUDA (the peak counts allocated bytes, not cached ones); on CPU the
        # freed warm-up memory would stay resident and hide part of the measured call's peak.
        forward_backward(arguments["op"], arguments["implementation"], inputs)
        inputs[0].grad = inputs[1].grad = None
    return measure_extra_bytes(lambda: forward_backward(arguments["op"], arguments["implementation"], inputs), device)


def measure_memory(device, case, op, implementation):
    """CUDA counts allocated bytes, so one process serves; CPU peak RSS needs a fresh one per case."""
    arguments = {"device": device, "case": list(case), "op": op, "implementation": implementation}
    if device == "cuda":
        return measure_memory_here(arguments)
    return measure_in_subprocess("bench.bench_linear_ops", arguments)


def run(device, out_dir, repeats=None):
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    repeats = repeats or (10 if device == "cuda" else 5)
    matmul_rate = None
    if device == "cuda":
        from .roofline import matmul_flops_per_s

        matmul_rate = matmul_flops_per_s()
        print(f"measured bf16 matmul rate: {matmul_rate / 1e12:.0f} TFLOP/s")
    rows = []
    for op in OPS:
        for case in cases:
            inputs = make_inputs(case, device)
            samples = time_round_robin(op, inputs, device, repeats)
            del inputs
            memory = {name: measure_memory(device, case, op, name) for name in implementations(device)}
            naive_time = statistics.median(samples["naive torch"])
            for name in implementations(device):
                median = statistics.median(samples[name])
                # Forward + backward of a linear layer and its loss: 6 N H V flops.
                flops = 6 * case[0] * case[1] * case[2]
                rows.append({
                    "op": op, "N": case[0], "H": case[1], "V": case[2], "dtype": case[3],
                    "implementation": name, "median_s": median,
                    "min_s": min(samples[name]), "max_s": max(samples[name]),
                    "peak_extra_MB": memory[name] / 2**20,
                    "speedup_vs_naive": naive_time / median,
                    "memory_vs_naive": memory[name] / max(memory["naive torch"], 1),
                    "matmul_fraction": flops / median / matmul_rate if matmul_rate else "",
                })
            print(f"{op} {case}: " + ", ".join(
                f"{r['implementation']} {r['median_s']:.3f} s {r['peak_extra_MB']:.0f} MB"
                for r in rows[-len(samples):]
            ), flush=True)
    markdown = write_results("linear_ops", rows, COLUMNS, device, out_dir)
    print(markdown)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(measure_memory_here(json.loads(args.measure_memory)))
        return
    run(args.device, args.out or f"{RESULTS_DIR}/{args.device}", args.repeats)


if __name__ == "__main__":
    main()
