"""GRPO group advantages: rewards of G samples per prompt, normalised within each group.

The public function and the contract of its backends (GroupAdvantagesBackend); the
implementations live in fastmath_kernels/backends/.
"""

from typing import Protocol

import torch

from ._dispatch import resolve_backend
from ._registry import define_op, implementation
from .backends.torch_reference import group_advantages_reference  # noqa: F401  (its importers' old address)

OP = "group_advantages"
SCALES = ("group", "batch", "none")


class GroupAdvantagesBackend(Protocol):
    """A function: rewards [N] (any float dtype), group_size, scale (one of SCALES), eps -> float32 [N]."""

    def __call__(self, rewards, group_size, scale, eps):
        """-> float32 advantages of rewards' shape."""


define_op(OP, GroupAdvantagesBackend)


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

