"""Planning on fake tensors: resolve every op as if its CPU tensors lived on a CUDA device.

A memory planner runs the model under FakeTensorMode on CPU tensors (fake CUDA tensors cannot
run a backward on a machine without a GPU). Under `planning_as_gpu()` the ops choose their GPU
backends and GPU chunk sizes, so the fake implementations of the CUDA kernels allocate what a
GPU run would, and no check reads tensor data (fake tensors have none).
"""

import contextlib

_planning_as_gpu = False


@contextlib.contextmanager
def planning_as_gpu():
    global _planning_as_gpu
    previous, _planning_as_gpu = _planning_as_gpu, True
    try:
        yield
    finally:
        _planning_as_gpu = previous


def is_planning():
    return _planning_as_gpu


def device_type(device):
    """device.type, or "cuda" while planning."""
    return "cuda" if _planning_as_gpu else device.type
