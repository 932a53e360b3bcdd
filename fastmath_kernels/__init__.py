"""Fused kernels for training math-reasoning models with SFT and GRPO.

Every op takes backend=None|"cuda"|"triton"|"torch" (or a name added with
_registry.register_backend); see _dispatch for how the choice is made. Each op's file holds its
public function, its autograd.Function and the contract its backends satisfy; backends/ holds
one module per backend, each registering its implementations when imported (as here).
The compiled extension is optional: without it, HAS_CUDA_EXT is False and the Triton and
torch backends still work.
"""

from . import backends  # noqa: F401  (importing it registers the built-in backends)
from ._dispatch import HAS_CUDA_EXT, HAS_TRITON, available_backends, preferred_backend
from ._planning import device_type as planned_device_type
from ._planning import is_planning, planning_as_gpu
from ._registry import backend_names
from .group_advantages import group_advantages
from .grpo_token_loss import grpo_token_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = [
    "BACKENDS",
    "HAS_CUDA_EXT",
    "HAS_TRITON",
    "available_backends",
    "group_advantages",
    "grpo_token_loss",
    "is_planning",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "planned_device_type",
    "planning_as_gpu",
    "preferred_backend",
    "token_logprobs",
]


def __getattr__(name):
    # BACKENDS is read from the registry at each access, so later registrations are listed.
    if name == "BACKENDS":
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
