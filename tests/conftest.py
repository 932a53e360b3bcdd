import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any
# fastmath_kernels.triton module is imported: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A FASTMATH_BACKEND left in the shell would silently change what every test exercises.
    monkeypatch.delenv("FASTMATH_BACKEND", raising=False)
