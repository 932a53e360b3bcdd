"""Argument checks shared by the ops. Each raises ValueError naming the argument, before any launch.

The one exception, target ids on a GPU, is explained in check_targets.
"""

import math
import os

import torch

from ._planning import is_planning

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(value, name, *, floating=False):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


# "1": target ids on a GPU are range-checked on the host too, a synchronous ValueError per call.
TARGET_CHECK_ENV = "FASTMATH_CHECK_TARGETS"


def check_targets(targets, expected_shape, vocab_size, *, ignore_index=None):
    """targets: int64 of expected_shape, each in [0, vocab_size) or equal to ignore_index.

    The range depends on the data, so it is checked on every call, never once per shape. On
    CPU tensors the host reads the bounds (no device to wait for) and a bad id is a ValueError.
    On other devices that read would stall the stream each step, so the check is queued as a
    torch._assert_async instead: no host sync, and a bad id fails at the next sync as a
    device-side assertion rather than as an out-of-bounds read inside a kernel.
    FASTMATH_CHECK_TARGETS=1 brings back the host check and its ValueError there too.
    """
    check_tensor(targets, "targets")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(expected_shape)}")
    if targets.numel() == 0:
        return
    if is_planning():
        return  # fake tensors: no ids to check
    allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    if targets.is_cpu or os.environ.get(TARGET_CHECK_ENV) == "1":
        _check_targets_on_host(targets, vocab_size, ignore_index, allowed)
        return
    in_range = (targets >= 0) & (targets < vocab_size)
    if ignore_index is not None:
        in_range |= targets == ignore_index
    torch._assert_async(in_range.all(), f"targets holds a token id outside {allowed}")


def _check_targets_on_host(targets, vocab_size, ignore_index, allowed):
    if ignore_index is None:
        low, high = torch.aminmax(targets)
    else:
        ignored = targets == ignore_index
        low = torch.where(ignored, 0, targets).min()
        high = torch.where(ignored, 0, targets).max()
    low, high = torch.stack([low, high]).tolist()  # one read for both bounds
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"targets holds token id {bad}, outside {allowed}")


def check_temperature(temperature):
    valid = not isinstance(temperature, bool) and isinstance(temperature, (int, float))
    if not valid or not math.isfinite(temperature) or not temperature >= 1e-4:
        raise ValueError(f"temperature must be a finite number >= 1e-4, got {temperature!r}")


def check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_same_device(name, tensor, reference_name, reference):
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
