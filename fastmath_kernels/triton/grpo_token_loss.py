"""Elementwise forward and backward of the clipped GRPO token loss on float32 [B, T]."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _ratio_terms(logp, old_logp, advantage, eps_low, eps_high):
    ratio = tl.exp(logp - old_logp)
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    unclipped_term = ratio * advantage
    clipped_term = clipped * advantage
    return ratio, unclipped_term, clipped_term


@triton.jit
def _grpo_forward_kernel(
    logp_ptr, old_logp_ptr, advantages_ptr, ref_logp_ptr, loss_ptr, numel, tokens_per_row,
    beta, eps_low, eps_high, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    logp = tl.load(logp_ptr + offsets, mask=mask, other=0.0)
    old_logp = tl.load(old_logp_ptr + offsets, mask=mask, other=0.0)
    advantage = tl.load(advantages_ptr + offsets // tokens_per_row, mask=mask, other=0.0)
    _, unclipped_term, clipped_term = _ratio_terms(logp, old_logp, advantage, eps_low, eps_high)
    loss = -tl.minimum(unclipped_term, clipped_term)
    if HAS_REF:
        log_ratio_ref = tl.load(ref_logp_ptr + offsets, mask=mask, other=0.0) - logp
        loss += beta * (tl.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    tl.store(loss_ptr + offsets, loss, mask=mask)


@triton.jit
def _grpo_backward_kernel(
    grad_loss_ptr, logp_ptr, old_logp_ptr, advantages_ptr, ref_logp_ptr, grad_logp_ptr, numel,
    tokens_per_row, beta, eps_low, eps_high, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    logp = tl.load(logp_ptr + offsets, mask=mask, other=0.0)
    old_logp = tl.load(old_logp_ptr + offsets, mask=mask, other=0.0)
    advantage = tl.load(advantages_ptr + offsets // tokens_per_row, mask=mask, other=0.0)
    ratio, unclipped_term, clipped_term = _ratio_terms(logp, old_logp, advantage, eps_low, eps_high)
    # The clipped branch is constant in logp; where both branches agree the unclipped one carries it.
    grad = tl.where(unclipped_term <= clipped_term, -advantage * ratio, 0.0)
    if HAS_REF:
        log_ratio_ref = tl.load(ref_logp_ptr + offsets, mask=mask, other=0.0) - logp
        grad += beta * (1.0 - tl.exp(log_ratio_ref))
    grad *= tl.load(grad_loss_ptr + offsets, mask=mask, other=0.0)
    tl.store(grad_logp_ptr + offsets, grad, mask=mask)


def _launch_shape(logp):
    numel = logp.numel()
    return numel, max(logp.shape[1], 1), (triton.cdiv(numel, _BLOCK),)


def grpo_token_loss_forward_triton(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    loss = torch.empty_like(logp)
    numel, tokens_per_row, grid = _launch_shape(logp)
    if numel:
        _grpo_forward_kernel[grid](
            logp, old_logp, advantages, logp if ref_logp is None else ref_logp, loss, numel, tokens_per_row,
            beta, eps_low, eps_high, HAS_REF=ref_logp is not None, BLOCK=_BLOCK,
        )
    return loss


def grpo_token_loss_backward_triton(grad_loss, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    grad_logp = torch.empty_like(logp)
    numel, tokens_per_row, grid = _launch_shape(logp)
    if numel:
        _grpo_backward_kernel[grid](
            grad_loss, logp, old_logp, advantages, logp if ref_logp is None else ref_logp, grad_logp, numel,
            tokens_per_row, beta, eps_low, eps_high, HAS_REF=ref_logp is not None, BLOCK=_BLOCK,
        )
    return grad_logp
