"""The SFT loss, F.cross_entropy(hidden @ weight.T, targets), one chunk of tokens at a time.

With reduction "mean" or "sum" the upstream gradient is a scalar, so the forward pass also
computes the gradients chunk by chunk (one logits computation per chunk in all) and the
backward pass only scales them. Peak extra memory: one chunk of fp32 logits (and, on GPU,
its gradient in the weight's dtype) plus the gradients themselves, the weight's accumulated in
an fp32 [V, H] buffer. That buffer is 2x a bf16 weight gradient; accumulating in bf16 instead
would round once per chunk (bench/weight_grad_accumulation.py measures what that costs).
"""

import torch

from ._checks import check_targets
from ._dispatch import resolve_backend
from .linear_token_logprobs import (
    ChunkedLinear,
    check_linear_arguments,
    check_low_memory,
    chunk_bounds,
    finish_weight_grad,
    grad_logits_target,
    linear_token_logprobs,
    logprob_slice_backward,
    resolve_chunk_size,
    vocab_slice_size,
    weight_grad_buffer,
    weight_grad_by_vocab_slices,
)
from .linear_vocab_chunks import targets_in_slice
from .token_logprobs import (
    Workspace,
    logprob_rows_backward,
    logprob_rows_forward,
    lse_parts,
    row_lse,
)

REDUCTIONS = ("mean", "sum", "none")
# Fastest first, as measured on an H200 at N=16384, H=4096, V=151936 in bf16, forward and
# backward (bench/results/h200-2026-12-04): Triton's row kernels 98.8 ms, CUDA's 110.2 ms.
GPU_PREFERENCE = ("triton", "cuda")
# Rows per pass of the torch path: about 2 MB of fp32 logits, which stay in cache across the passes.
_CACHE_RESIDENT_ELEMENTS = 1 << 19


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


def cross_entropy_slice_grad(grad_logits, logits, targets, start, lse, row_grad, backend):
    """Writes row_grad * (onehot - p) for the vocabulary slice whose first column is `start`.

    logits [N, w] are that slice's fp32 logits; lse [N] (float64) is over the whole vocabulary.
    """
    if backend != "torch":
        logprob_slice_backward(grad_logits, logits, targets, start, lse, None, row_grad, None, 1.0, backend)
        return
    column, inside = targets_in_slice(targets, start, start + logits.shape[1])
    lse_hi, lse_lo = lse_parts(lse)
    logits.sub_(lse_hi[:, None]).sub_(lse_lo[:, None]).exp_().mul_(-row_grad[:, None])
    logits.scatter_add_(1, column, torch.where(inside, row_grad, 0.0)[:, None])
    if grad_logits.data_ptr() != logits.data_ptr():
        grad_logits.copy_(logits)


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
        chunk_grads = need_hidden or grad_weight is not None
        lse = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device) if weight_by_slices else None
        projection = ChunkedLinear(rows, weight)
        loss_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        buffer, workspace = projection.logits_buffer(chunk_size), Workspace(weight.shape[0], rows.device)
        grad_buffer = None
        if backend != "torch" and chunk_grads:
            grad_buffer = projection.grad_logits_buffer(projection.chunk_elements(chunk_size))
        for start, end in chunk_bounds(rows.shape[0], chunk_size):
            logits = projection.logits(start, end, buffer)
            if backend == "torch":
                logp, chunk_lse = cross_entropy_rows_torch(
                    logits, safe_targets[start:end], row_grad[start:end], chunk_grads
                )
                grad_logits = logits
            else:
                logp, _, chunk_lse = logprob_rows_forward(
                    logits, safe_targets[start:end], 1.0, False, backend, workspace
                )
                if chunk_grads:
                    grad_logits = grad_logits_target(grad_buffer, logits)
                    logprob_rows_backward(
                        grad_logits, logits, safe_targets[start:end], chunk_lse, None, row_grad[start:end], None,
                        1.0, backend, workspace,
                    )
            loss_sum += torch.dot(logp, row_grad[start:end])  # already divided by divisor
            if lse is not None:
                lse[start:end] = chunk_lse
            if chunk_grads:
                projection.accumulate_grads(grad_logits, start, end, grad_hidden, grad_weight, scratch=buffer)
        # The chunk buffers go before the weight gradient is rounded: the peak holds one or the other.
        buffer = grad_buffer = logits = grad_logits = None
        if weight_by_slices:
            def slice_grad(grad_logits, logits, start):
                cross_entropy_slice_grad(grad_logits, logits, safe_targets, start, lse, row_grad, backend)

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
            raise RuntimeError("linear_cross_entropy: its gradients are scaled in place, so only one backward per forward")
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
    backend = resolve_backend(backend, hidden, GPU_PREFERENCE)
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
