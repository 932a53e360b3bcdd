"""The clipped GRPO (PPO-style) per-token loss with an optional k3 KL penalty to a reference."""

import math

import torch

from ._checks import check_tensor
from ._dispatch import has_cuda_op, resolve_backend


def grpo_token_loss_reference(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    """Torch path on float32 [B, T] log-probs and [B] advantages (autograd through torch ops)."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if ref_logp is not None and beta != 0.0:
        log_ratio_ref = ref_logp - logp
        loss = loss + beta * (torch.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    return loss


class _GrpoTokenLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        from .triton.grpo_token_loss import grpo_token_loss_forward_triton

        ctx.save_for_backward(logp, old_logp, advantages, ref_logp)
        ctx.coefficients = (beta, eps_low, eps_high)
        return grpo_token_loss_forward_triton(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        from .triton.grpo_token_loss import grpo_token_loss_backward_triton

        logp, old_logp, advantages, ref_logp = ctx.saved_tensors
        grad_logp = grpo_token_loss_backward_triton(
            grad_loss.contiguous(), logp, old_logp, advantages, ref_logp, *ctx.coefficients
        )
        return grad_logp, None, None, None, None, None, None


def _check_arguments(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    check_tensor(logp, "logp", floating=True)
    if logp.dim() < 1:
        raise ValueError("logp must be [B, ...] per-token log-probs, got a 0-d tensor")
    check_tensor(old_logp, "old_logp", floating=True)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp has shape {tuple(old_logp.shape)}, logp has {tuple(logp.shape)}")
    check_tensor(advantages, "advantages", floating=True)
    if tuple(advantages.shape) != tuple(logp.shape[:1]):
        raise ValueError(
            f"advantages must be [B] = {tuple(logp.shape[:1])} (one per sequence), got {tuple(advantages.shape)}"
        )
    if ref_logp is not None:
        check_tensor(ref_logp, "ref_logp", floating=True)
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)}, logp has {tuple(logp.shape)}")
    for name, tensor in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if tensor is not None and tensor.device != logp.device:
            raise ValueError(f"{name} is on {tensor.device} but logp is on {logp.device}")
    for name, value in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp, the reference model's log-probs")


def grpo_token_loss(logp, old_logp, advantages, *, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=None, backend=None):
    """Per-token loss -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + beta*k3(ref, logp).

    logp, old_logp, ref_logp: [B, ...] per-token log-probs; advantages: [B], broadcast over
    tokens. r = exp(logp - old_logp); k3 = exp(ref - logp) - (ref - logp) - 1. eps_high
    defaults to eps_low. Returns float32 [B, ...]; differentiable w.r.t. logp only (old_logp,
    advantages and ref_logp are constants of the step). Masking and aggregation are the caller's.
    """
    eps_high = eps_low if eps_high is None else eps_high
    _check_arguments(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)
    backend = resolve_backend(backend, logp)
    shape = logp.shape
    tokens_per_row = math.prod(shape[1:])  # explicit, so that an empty batch reshapes too
    rows = lambda t: None if t is None else t.detach().float().reshape(shape[0], tokens_per_row).contiguous()  # noqa: E731
    flat_logp = logp.float().reshape(shape[0], tokens_per_row).contiguous()
    old_rows, ref_rows, advantages = rows(old_logp), rows(ref_logp if beta != 0 else None), advantages.detach().float().contiguous()
    coefficients = (float(beta), float(eps_low), float(eps_high))
    if backend == "torch":
        loss = grpo_token_loss_reference(flat_logp, old_rows, advantages, ref_rows, *coefficients)
    elif backend == "triton":
        loss = _GrpoTokenLossTriton.apply(flat_logp, old_rows, advantages, ref_rows, *coefficients)
    else:
        loss = torch.ops.fastmath.grpo_token_loss_forward(flat_logp, old_rows, advantages, ref_rows, *coefficients)
    return loss.view(shape)


if has_cuda_op("grpo_token_loss_forward"):

    @torch.library.register_fake("fastmath::grpo_token_loss_forward")
    def _grpo_token_loss_forward_fake(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        return torch.empty_like(logp, dtype=torch.float32)

    @torch.library.register_fake("fastmath::grpo_token_loss_backward")
    def _grpo_token_loss_backward_fake(grad_loss, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        return torch.empty_like(logp, dtype=torch.float32)

    def _grpo_setup_context(ctx, inputs, output):
        logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high = inputs
        ctx.save_for_backward(logp, old_logp, advantages, ref_logp)
        ctx.coefficients = (beta, eps_low, eps_high)

    def _grpo_autograd_backward(ctx, grad_loss):
        logp, old_logp, advantages, ref_logp = ctx.saved_tensors
        grad_logp = torch.ops.fastmath.grpo_token_loss_backward(
            grad_loss.float().contiguous(), logp, old_logp, advantages, ref_logp, *ctx.coefficients
        )
        return grad_logp, None, None, None, None, None, None

    torch.library.register_autograd(
        "fastmath::grpo_token_loss_forward", _grpo_autograd_backward, setup_context=_grpo_setup_context
    )
