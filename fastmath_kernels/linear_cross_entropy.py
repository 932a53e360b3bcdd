"""The SFT loss, F.cross_entropy(hidden @ weight.T, targets), one chunk of tokens at a time.

With reduction "mean" or "sum" the upstream gradient is a scalar, so the forward pass also
computes the gradients chunk by chunk (one logits computation per chunk in all) and the
backward pass only scales them. Peak extra memory: one chunk of fp32 logits (and, on GPU,
its gradient in the weight's dtype) plus the gradients themselves, the weight's accumulated in
an fp32 [V, H] buffer. That buffer is 2x a bf16 weight gradient; accumulating in bf16 instead
would round once per chunk (bench/weight_grad_accumulation.py measures what that costs).

A backend of this op (the registry's "linear_cross_entropy" table) is a CrossEntropyKernels.
"""

import dataclasses
import functools
from collections.abc import Callable

import torch

from ._checks import check_targets
from ._dispatch import resolve_backend
from ._registry import implementation, register_backend
from .chunked_linear import (
    ChunkedLinear,
    check_linear_arguments,
    check_low_memory,
    chunk_bounds,
    finish_weight_grad,
    grad_logits_target,
    logprob_slice_backward,
    resolve_chunk_size,
    targets_in_slice,
    vocab_slice_size,
    weight_grad_buffer,
    weight_grad_by_vocab_slices,
)
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import (
    Workspace,
    logprob_rows_backward,
    logprob_rows_forward,
    lse_parts,
    row_lse,
)

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Fastest first, as measured on an H200 at N=16384, H=4096, V=151936 in bf16, forward and
# backward (bench/results/h200-2026-12-04): Triton's row kernels 98.8 ms, CUDA's 110.2 ms.
GPU_PREFERENCE = ("triton", "cuda")
# Rows per pass of the torch path: about 2 MB of fp32 logits, which stay in cache across the passes.
_CACHE_RESIDENT_ELEMENTS = 1 << 19


@dataclasses.dataclass(frozen=True)
class CrossEntropyKernels:
    """One backend's cross-entropy on chunks of fp32 logits, whose d(loss)/d(logp) is row_grad.

    rows(logits [n, V], targets [n], row_grad [n], grad_logits, workspace)
        -> (float32 logp [n], float64 lse [n]); with grad_logits (not None) it also writes
        d(loss)/d(logits) = row_grad * (onehot - p) there.
    slice_grad(grad_logits, logits [N, w], targets [N], start, lse [N], row_grad [N]) writes
        the same gradient for the vocabulary slice whose first column is id `start`.
    grads_in_place: rows writes the gradient over the logits, so grad_logits is the logits.
    """

    rows: Callable
    slice_grad: Callable
    grads_in_place: bool = False


def cross_entropy_rows_torch(logits, targets, row_grad, want_grad):
    """Torch path, in place on fp32 scratch logits [n, V]: returns (float32 logp [n], float64 lse [n]).

    With want_grad the logits are left holding d(loss)/d(logits) = row_grad * (onehot - p),
    computed from the same exponentials as the forward (no second pass over lse).
    """
    num_rows, vocab_size = logits.shape
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float64, device=logits.device)
    step = max(2, _CACHE_RESIDENT_ELEMENTS // vocab_size)
    for start in range(0, num_rows, step):
        end = min(start + step, num_rows)
        z, rows_targets = logits[start:end], targets[start:end, None]
        row_max = z.amax(dim=1, keepdim=True)
        z.sub_(row_max)
        target_shifted = z.gather(1, rows_targets)
        sum_exp = z.exp_().sum(dim=1, keepdim=True)
        log_sum = sum_exp.log()
        logp[start:end] = (target_shifted - log_sum).squeeze(1)
        lse[start:end] = row_lse(row_max, log_sum, 1.0).squeeze(1)
        if want_grad:
            rows_grad = row_grad[start:end, None]
            z.mul_(-rows_grad / sum_exp).scatter_add_(1, rows_targets, rows_grad)
    return logp, lse


def _torch_rows(logits, targets, row_grad, grad_logits, workspace):
    # grads_in_place: grad_logits, when given, is the logits themselves.
    return cross_entropy_rows_torch(logits, targets, row_grad, want_grad=grad_logits is not None)


def _torch_slice_grad(grad_logits, logits, targets, start, lse, row_grad):
    """The torch path's slice gradient: it masks targets outside the slice itself."""
    column, inside = targets_in_slice(targets, start, start + logits.shape[1])
    lse_hi, lse_lo = lse_parts(lse)
    logits.sub_(lse_hi[:, None]).sub_(lse_lo[:, None]).exp_().mul_(-row_grad[:, None])
    logits.scatter_add_(1, column, torch.where(inside, row_grad, 0.0)[:, None])
    if grad_logits.data_ptr() != logits.data_ptr():
        grad_logits.copy_(logits)


def _row_kernel_rows(logits, targets, row_grad, grad_logits, workspace, *, backend):
    logp, _, lse = logprob_rows_forward(logits, targets, 1.0, False, backend, workspace)
    if grad_logits is not None:
        logprob_rows_backward(grad_logits, logits, targets, lse, None, row_grad, None, 1.0, backend, workspace)
    return logp, lse


def _row_kernel_slice_grad(grad_logits, logits, targets, start, lse, row_grad, *, backend):
    logprob_slice_backward(grad_logits, logits, targets, start, lse, None, row_grad, None, 1.0, backend)


def row_kernel_cross_entropy(backend):
    """Cross-entropy from a GPU backend's token_logprobs row kernels (forward, then backward)."""
    return CrossEntropyKernels(
        functools.partial(_row_kernel_rows, backend=backend), functools.partial(_row_kernel_slice_grad, backend=backend)
    )


register_backend(OP, "cuda", row_kernel_cross_entropy("cuda"))
register_backend(OP, "triton", row_kernel_cross_entropy("triton"))
register_backend(OP, "torch", CrossEntropyKernels(_torch_rows, _torch_slice_grad, grads_in_place=True))


def _loss_by_token_chunks(kernels, projection, targets, row_grad, chunk_size, grad_hidden, grad_weight_fp32, keep_lse):
    """(sum of logp * row_grad, float64 lse [N] if keep_lse else None), one chunk of tokens at a time.

    On the way it fills grad_hidden and adds into grad_weight_fp32, where they are not None.
    """
    num_tokens, device = projection.hidden.shape[0], projection.hidden.device
    chunk_grads = grad_hidden is not None or grad_weight_fp32 is not None
    lse = torch.empty(num_tokens, dtype=torch.float64, device=device) if keep_lse else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    buffer, workspace = projection.logits_buffer(chunk_size), Workspace(projection.weight.shape[0], device)
    grad_buffer = None
    if chunk_grads and not kernels.grads_in_place:
        grad_buffer = projection.grad_logits_buffer(projection.chunk_elements(chunk_size))
    for start, end in chunk_bounds(num_tokens, chunk_size):
        logits = projection.logits(start, end, buffer)
        grad_logits = grad_logits_target(grad_buffer, logits) if chunk_grads else None
        logp, chunk_lse = kernels.rows(logits, targets[start:end], row_grad[start:end], grad_logits, workspace)
        loss_sum += torch.dot(logp, row_grad[start:end])  # already divided by divisor
        if lse is not None:
            lse[start:end] = chunk_lse
        if chunk_grads:
            projection.accumulate_grads(grad_logits, start, end, grad_hidden, grad_weight_fp32, scratch=buffer)
    return loss_sum, lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, backend, compute_grads, low_memory):
        rows = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        valid = flat_targets != ignore_index
        safe_targets = torch.where(valid, flat_targets, 0)
        count = valid.sum()
        divisor = count.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=rows.device)
        # d(loss)/d(logp) per row: -1/divisor on counted tokens, 0 on ignored ones. Folding the
        # mean in here keeps low-precision gradients in range and rounds them only once.
        row_grad = -valid.float() / divisor
        # Grad mode is off inside forward, so the caller says whether gradients are wanted.
        need_hidden = compute_grads and ctx.needs_input_grad[0]
        need_weight = compute_grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(rows) if need_hidden else None
        # low_memory: the weight gradient comes from a second pass over vocabulary slices.
        weight_by_slices = need_weight and low_memory
        grad_weight = weight_grad_buffer(weight) if need_weight and not weight_by_slices else None
        kernels, projection = implementation(OP, backend), ChunkedLinear(rows, weight)
        # Its chunk buffers are freed on return, before the weight gradient is rounded: the peak
        # holds one or the other.
        loss_sum, lse = _loss_by_token_chunks(
            kernels, projection, safe_targets, row_grad, chunk_size, grad_hidden, grad_weight, weight_by_slices
        )
        if weight_by_slices:
            def slice_grad(grad_logits, logits, start):
                kernels.slice_grad(grad_logits, logits, safe_targets, start, lse, row_grad)

            slice_size = vocab_slice_size(chunk_size, rows.shape[0], weight.shape[0])
            grad_weight = weight_grad_by_vocab_slices(projection, slice_size, slice_grad)
        elif need_weight:
            grad_weight = finish_weight_grad(grad_weight, weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_shape, ctx.backward_done = hidden.shape, False
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError(
                "linear_cross_entropy: its gradients are scaled in place, so only one backward per forward"
            )
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place (no second copy of the weight gradient); an fp32 0-d factor is applied
        # in fp32 arithmetic, so the scale itself is not rounded to the gradients' dtype.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.float()).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.float())
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=None, backend=None,
    low_memory=False,
):
    """Cross-entropy of `hidden @ weight.T` against targets, without the full logits.

    hidden: [..., H]; weight: [V, H] of the same dtype; targets: [...] int64 in [0, V) or
    ignore_index. reduction "mean" averages over counted tokens (a batch with none gives 0 and
    zero gradients), "sum" adds them, "none" returns float32 [...] with 0 at ignored tokens.

    low_memory: no fp32 [V, H] weight-gradient buffer. The weight gradient is computed one
    vocabulary slice at a time over every token, and the default chunks shrink so that the
    work buffers stay near 15% of the gradients returned. It costs a second logits matmul:
    8*N*H*V flops instead of 6 for "mean" and "sum".
    An out-of-range target raises ValueError on CPU tensors; on GPU tensors it is checked
    without a host sync and fails at the next sync (FASTMATH_CHECK_TARGETS=1: a ValueError here).
    """
    check_linear_arguments(hidden, weight, chunk_size)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index=ignore_index)
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    check_low_memory(low_memory)
    backend = resolve_backend(backend, hidden, GPU_PREFERENCE, op=OP)
    chunk_size = resolve_chunk_size(chunk_size, targets.numel(), weight, low_memory)
    if reduction == "none":
        valid = targets != ignore_index
        logp = linear_token_logprobs(
            hidden, weight, torch.where(valid, targets, 0), chunk_size=chunk_size, backend=backend,
            low_memory=low_memory,
        )
        return torch.where(valid, -logp, 0.0)
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, reduction, chunk_size, backend, compute_grads, low_memory
    )
