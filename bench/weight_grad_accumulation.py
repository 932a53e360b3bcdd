"""`python -m bench.weight_grad_accumulation`: what the fp32 weight-gradient buffer buys.

The fused-linear cross-entropy adds one chunk of tokens at a time into the weight gradient.
Adding into an fp32 [V, H] buffer costs 2x a bf16 weight gradient in memory; adding straight
into a bf16 gradient (one rounding per chunk) costs accuracy instead. This study measures the
error of each against a float64 reference, next to plain PyTorch in bf16, as the number of
chunks grows, and of low_memory=True, which has neither (each vocabulary slice is one fp32
reduction over all tokens). On CUDA it also runs Liger-Kernel's fused linear cross-entropy
when installed.
"""

import argparse
import os

import torch
import torch.nn.functional as F

from fastmath_kernels import linear_cross_entropy

from .common import RESULTS_DIR, header_line, write_results

COLUMNS = ["N", "H", "V", "chunks", "method", "grad_weight_error", "vs_plain_torch"]
SHAPES = {"cpu": (4096, 128, 2048), "cuda": (16384, 1024, 32768)}
CHUNK_COUNTS = (1, 4, 16, 64)


def max_relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def make_problem(num_tokens, hidden_size, vocab_size, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    return hidden.bfloat16().to(device), weight.bfloat16().to(device), targets.to(device)


def weight_grad(loss_fn, hidden, weight):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss_fn(hidden, weight).backward()
    return weight.grad


def bf16_accumulated_weight_grad(hidden, weight, targets, chunk_size):
    """Each chunk's gradient product in fp32, added into a bf16 weight gradient (rounded per chunk)."""
    grad_weight = torch.zeros_like(weight)
    weight_fp32 = weight.float()
    for start in range(0, hidden.shape[0], chunk_size):
        rows, chunk_targets = hidden[start : start + chunk_size].float(), targets[start : start + chunk_size]
        probs = torch.softmax(rows @ weight_fp32.T, dim=-1)
        probs[torch.arange(rows.shape[0], device=rows.device), chunk_targets] -= 1.0
        grad_logits = (probs / hidden.shape[0]).to(weight.dtype)
        grad_weight.copy_(grad_weight.float() + grad_logits.float().T @ rows)
    return grad_weight


def liger_weight_grad(hidden, weight, targets, **options):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(**options)
    return weight_grad(lambda h, w: loss(w, h, targets), hidden, weight)


def study(device, shape):
    num_tokens, hidden_size, vocab_size = shape
    hidden, weight, targets = make_problem(num_tokens, hidden_size, vocab_size, device)
    reference = weight_grad(lambda h, w: F.cross_entropy(h @ w.T, targets), hidden.double(), weight.double())
    plain = weight_grad(lambda h, w: F.cross_entropy(h @ w.T, targets), hidden, weight)
    plain_error = max_relative_error(plain, reference)
    rows = []

    def add(chunks, method, grad):
        error = max_relative_error(grad, reference)
        rows.append({
            "N": num_tokens, "H": hidden_size, "V": vocab_size, "chunks": chunks, "method": method,
            "grad_weight_error": error, "vs_plain_torch": error / plain_error,
        })
        print(f"  chunks {chunks!s:>4}  {method:<44} error {error:.3e}  ({error / plain_error:.2f}x plain torch)")

    add("-", "plain torch bf16", plain)
    low_memory = weight_grad(lambda h, w: linear_cross_entropy(h, w, targets, low_memory=True), hidden, weight)
    add("-", "fastmath low_memory (vocab slices)", low_memory)
    for chunks in CHUNK_COUNTS:
        chunk_size = -(-num_tokens // chunks)
        ours = weight_grad(lambda h, w, size=chunk_size: linear_cross_entropy(h, w, targets, chunk_size=size),
                           hidden, weight)
        add(chunks, "fastmath (fp32 buffer)", ours)
        add(chunks, "bf16 accumulation (fp32 products, bf16 sum)", bf16_accumulated_weight_grad(
            hidden, weight, targets, chunk_size))
    if device == "cuda":
        try:
            add("liger", "liger fused linear CE (default: bf16 sum)", liger_weight_grad(hidden, weight, targets))
            add("liger", "liger fused linear CE, accum_dtype=float32", liger_weight_grad(
                hidden, weight, targets, accum_dtype=torch.float32))
        except ImportError:
            print("  liger-kernel is not installed: its row is left out")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.weight_grad_accumulation", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", nargs=3, type=int, metavar=("N", "H", "V"), help="tokens, hidden size, vocabulary")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    shape = tuple(args.shape) if args.shape else SHAPES[args.device]
    print(header_line(args.device))
    print(f"weight-gradient error of cross-entropy at N, H, V = {shape}, bf16 inputs:")
    rows = study(args.device, shape)
    out_dir = args.out or os.path.join(RESULTS_DIR, args.device)
    print(write_results("weight_grad_accumulation", rows, COLUMNS, args.device, out_dir))


if __name__ == "__main__":
    main()
