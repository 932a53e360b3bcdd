"""The SFT loss, F.cross_entropy(hidden @ weight.T, targets), one chunk of tokens at a time.

With reduction "mean" or "sum" the upstream gradient is a scalar, so the forward pass also
computes the gradients chunk by chunk (one logits computation per chunk in all) and the
backward pass only scales them. Peak extra memory: one chunk of fp32 logits (and, on GPU,
its gradient in the weight's dtype) plus the gradients themselves, the weight's accumulated in
an fp32 [V, H] buffer. That buffer is 2x a bf16 weight gradient; accumulating in bf16 instead
would round once per chunk (bench/weight_grad_accumulation.py measures what that costs).

The public function, its autograd.Function and the contract of its backends
(CrossEntropyBackend); the implementations live in fastmath_kernels/backends/.
"""

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch

from ._checks import check_targets
from ._dispatch import resolve_backend
from ._registry import define_op, implementation
from .chunked_linear import (
    ChunkedLinear,
    check_linear_arguments,
    check_low_memory,
    chunk_bounds,
    finish_weight_grad,
    grad_logits_target,
    resolve_chunk_size,
    vocab_slice_size,
    weight_grad_buffer,
    weight_grad_by_vocab_slices,
)
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import Workspace

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyBackend(Protocol):
    """One backend's cross-entropy on chunks of fp32 logits, whose d(loss)/d(logp) is row_grad.

    grads_in_place: rows writes the gradient over the logits, so grad_logits is the logits.
    """

    grads_in_place: bool

    def rows(self, logits, targets, row_grad, grad_logits, workspace):
        """logits [n, V], targets [n], row_grad [n] -> (float32 logp [n], float64 lse [n]); with
        grad_logits (not None) it also writes d(loss)/d(logits) = row_grad * (onehot - p) there."""

    def slice_grad(self, grad_logits, logits, targets, start, lse, row_grad):
        """Writes the same gradient for logits [N, w], the vocabulary slice whose first column is id `start`."""


define_op(OP, CrossEntropyBackend)


@dataclasses.dataclass(frozen=True)
class CrossEntropyKernels:
    """A CrossEntropyBackend made of two functions."""

    rows: Callable
    slice_grad: Callable
    grads_in_place: bool = False


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
    backend = resolve_backend(backend, hidden, op=OP)
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
