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
    chunk_bounds,
    default_chunk_size,
    finish_weight_grad,
    grad_logits_target,
    linear_token_logprobs,
    weight_grad_buffer,
)
from .token_logprobs import Workspace, logprob_rows_backward, logprob_rows_forward

REDUCTIONS = ("mean", "sum", "none")
# Rows per pass of the torch path: about 2 MB of fp32 logits, which stay in cache across the passes.
_CACHE_RESIDENT_ELEMENTS = 1 << 19


def cross_entropy_rows_torch(logits, targets, row_grad, want_grad):
    """Torch path, in place on fp32 scratch logits [n, V]: returns logp [n].

    With want_grad the logits are left holding d(loss)/d(logits) = row_grad * (onehot - p),
    computed from the same exponentials as the forward (no second pass over lse).
    """
    num_rows, vocab_size = logits.shape
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    step = max(2, _CACHE_RESIDENT_ELEMENTS // vocab_size)
    for start in range(0, num_rows, step):
        end = min(start + step, num_rows)
        z, rows_targets = logits[start:end], targets[start:end, None]
        z.sub_(z.amax(dim=1, keepdim=True))
        target_shifted = z.gather(1, rows_targets)
        sum_exp = z.exp_().sum(dim=1, keepdim=True)
        logp[start:end] = (target_shifted - sum_exp.log()).squeeze(1)
        if want_grad:
            rows_grad = row_grad[start:end, None]
            z.mul_(-rows_grad / sum_exp).scatter_add_(1, rows_targets, rows_grad)
    return logp


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, backend, compute_grads):
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
        grad_weight = weight_grad_buffer(weight) if need_weight else None
        projection = ChunkedLinear(rows, weight)
        loss_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        buffer, workspace = projection.logits_buffer(chunk_size), Workspace(weight.shape[0], rows.device)
        wants_grad_buffer = backend != "torch" and (need_hidden or need_weight)
        grad_buffer = projection.grad_logits_buffer(chunk_size) if wants_grad_buffer else None
        for start, end in chunk_bounds(rows.shape[0], chunk_size):
            logits = projection.logits(start, end, buffer)
            if backend == "torch":
                want_grad = need_hidden or need_weight
                logp = cross_entropy_rows_torch(logits, safe_targets[start:end], row_grad[start:end], want_grad)
                loss_sum += torch.dot(logp, row_grad[start:end])
                if want_grad:
                    projection.accumulate_grads(logits, start, end, grad_hidden, grad_weight)
                continue
            logp, _, lse = logprob_rows_forward(logits, safe_targets[start:end], 1.0, False, backend, workspace)
            loss_sum += torch.dot(logp, row_grad[start:end])  # already divided by divisor
            if need_hidden or need_weight:
                grad_logits = grad_logits_target(grad_buffer, logits)
                logprob_rows_backward(
                    grad_logits, logits, safe_targets[start:end], lse, None, row_grad[start:end], None, 1.0,
                    backend, workspace,
                )
                projection.accumulate_grads(grad_logits, start, end, grad_hidden, grad_weight)
        # The chunk buffers go before the weight gradient is rounded: the peak holds one or the other.
        buffer = grad_buffer = logits = grad_logits = None
        if need_weight:
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
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(
    hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=None, backend=None
):
    """Cross-entropy of `hidden @ weight.T` against targets, without the full logits.

    hidden: [..., H]; weight: [V, H] of the same dtype; targets: [...] int64 in [0, V) or
    ignore_index. reduction "mean" averages over counted tokens (a batch with none gives 0 and
    zero gradients), "sum" adds them, "none" returns float32 [...] with 0 at ignored tokens.
    """
    check_linear_arguments(hidden, weight, chunk_size)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index=ignore_index)
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    backend = resolve_backend(backend, hidden)
    chunk_size = chunk_size or default_chunk_size(targets.numel(), weight.shape[0], hidden.device)
    if reduction == "none":
        valid = targets != ignore_index
        logp = linear_token_logprobs(
            hidden, weight, torch.where(valid, targets, 0), chunk_size=chunk_size, backend=backend
        )
        return torch.where(valid, -logp, 0.0)
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, reduction, chunk_size, backend, compute_grads
    )
