"""The clipped GRPO (PPO-style) per-token loss with an optional k3 KL penalty to a reference.

The public function, its autograd.Function and the contract of its backends (GrpoTokenLossBackend);
the implementations live in fastmath_kernels/backends/.
"""

import math
from typing import Protocol

import torch

from ._checks import check_tensor
from ._dispatch import resolve_backend
from ._registry import define_op, implementation, optional_when_differentiable

OP = "grpo_token_loss"


class GrpoTokenLossBackend(Protocol):
    """Kernels on float32 [B, T] rows; advantages [B], ref_logp None where beta is 0.

    differentiable: forward records its own gradient, so grpo_token_loss calls it directly and
    backward may be None; otherwise _GrpoTokenLoss pairs forward with backward.
    """

    differentiable: bool

    def forward(self, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        """-> float32 loss [B, T]."""

    @optional_when_differentiable
    def backward(self, grad_loss, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        """-> float32 d(loss)/d(logp) [B, T]."""


define_op(OP, GrpoTokenLossBackend)


def save_loss_inputs(ctx, inputs, output=None):
    """The setup_context shared by _GrpoTokenLoss and the CUDA op's autograd registration."""
    logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high = inputs
    ctx.save_for_backward(logp, old_logp, advantages, ref_logp)
    ctx.coefficients = (beta, eps_low, eps_high)


def logp_grad(ctx, grad_loss, backward_kernel):
    logp, old_logp, advantages, ref_logp = ctx.saved_tensors
    return backward_kernel(grad_loss.float().contiguous(), logp, old_logp, advantages, ref_logp, *ctx.coefficients)


class _GrpoTokenLoss(torch.autograd.Function):
    """Pairs a backend's forward kernel with its backward; differentiable w.r.t. logp only."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high, backend):
        inputs = (logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)
        save_loss_inputs(ctx, inputs)
        ctx.backend = backend
        return implementation(OP, backend).forward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_logp = logp_grad(ctx, grad_loss, implementation(OP, ctx.backend).backward)
        return grad_logp, None, None, None, None, None, None, None


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
    backend = resolve_backend(backend, logp, op=OP)
    shape = logp.shape
    tokens_per_row = math.prod(shape[1:])  # explicit, so that an empty batch reshapes too
    flat_logp = logp.float().reshape(shape[0], tokens_per_row).contiguous()

    def constant_rows(tensor):
        return None if tensor is None else tensor.detach().float().reshape(shape[0], tokens_per_row).contiguous()

    old_rows, ref_rows = constant_rows(old_logp), constant_rows(ref_logp if beta != 0 else None)
    advantages = advantages.detach().float().contiguous()
    inputs = (flat_logp, old_rows, advantages, ref_rows, float(beta), float(eps_low), float(eps_high))
    kernels = implementation(OP, backend)
    loss = kernels.forward(*inputs) if kernels.differentiable else _GrpoTokenLoss.apply(*inputs, backend)
    return loss.view(shape)

