"""GRPO group advantages: rewards of G samples per prompt, normalised within each group."""

import torch

from ._dispatch import has_cuda_op, resolve_backend
from ._registry import implementation, register_backend

OP = "group_advantages"
SCALES = ("group", "batch", "none")
_CUDA_SCALE_MODE = {"group": 0, "batch": 1, "none": 2}


def _check_arguments(rewards, group_size, scale, eps):
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rewards ({rewards.numel()})"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _scaled(deviation, denominator):
    """deviation / denominator, with 0 where the denominator is 0 (eps=0 and equal rewards)."""
    return torch.where(denominator > 0, deviation / denominator, 0.0)


def group_advantages_reference(rewards, group_size, scale="group", eps=1e-4):
    """The torch implementation: fp32, vectorised over groups, no host sync."""
    grouped = rewards.float().view(-1, group_size)
    valid = torch.isfinite(grouped)
    count = valid.sum(dim=1, keepdim=True).float()
    mean = torch.where(valid, grouped, 0.0).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
    deviation = torch.where(valid, grouped - mean, 0.0)
    if scale == "group":
        variance = deviation.square().sum(dim=1, keepdim=True) / (count - 1.0).clamp_min(1.0)
        advantages = _scaled(deviation, variance.sqrt() + eps)
    elif scale == "batch":
        total = count.sum()
        batch_mean = torch.where(valid, grouped, 0.0).sum() / total.clamp_min(1.0)
        squares = torch.where(valid, grouped - batch_mean, 0.0).square().sum()
        batch_std = (squares / (total - 1.0).clamp_min(1.0)).sqrt()
        advantages = _scaled(deviation, batch_std + eps)
    else:
        advantages = deviation
    advantages = torch.where(valid & (count >= 2.0), advantages, 0.0)
    return advantages.view(rewards.shape)


def _group_advantages_triton(rewards, group_size, scale, eps):
    from .triton.group_advantages import group_advantages_triton

    return group_advantages_triton(rewards, group_size, scale, eps)


def _group_advantages_cuda(rewards, group_size, scale, eps):
    return torch.ops.fastmath.group_advantages(rewards, group_size, _CUDA_SCALE_MODE[scale], float(eps))


# A backend here is a function (rewards, group_size, scale, eps) -> float32 advantages.
register_backend(OP, "cuda", _group_advantages_cuda)
register_backend(OP, "triton", _group_advantages_triton)
register_backend(OP, "torch", group_advantages_reference)


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4, backend=None):
    """Advantages of GRPO samples: each reward minus its group's mean, scaled.

    rewards: [num_prompts * group_size], the group_size samples of a prompt contiguous.
    scale: "group" divides by the group's unbiased std + eps, "batch" by the whole batch's,
        "none" only subtracts the group mean (Dr. GRPO).
    Non-finite rewards (NaN from a failed reward function, +-inf) are left out of every
    statistic and get advantage 0, as does every member of a group with fewer than two
    finite rewards. Returns float32 of the same shape.
    """
    _check_arguments(rewards, group_size, scale, eps)
    backend = resolve_backend(backend, rewards, op=OP)
    return implementation(OP, backend)(rewards, group_size, scale, eps)


if has_cuda_op("group_advantages"):

    @torch.library.register_fake("fastmath::group_advantages")
    def _group_advantages_fake(rewards, group_size, scale_mode, eps):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)
