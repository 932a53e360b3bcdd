"""Error measures and probes shared by the kernel tests."""

import importlib

import pytest


def max_relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected).abs().max() / scale).item()


def max_row_relative_error(actual, expected):
    """The largest over rows (slices along the last dim) of max |actual - expected| / max |expected|.

    Each row is held to its own scale, so small values next to large ones in the same batch
    still count. For one value per token (logp, entropy), pass x[..., None]: one row each.
    """
    expected = expected.detach().double()
    scale = expected.abs().amax(dim=-1).clamp_min(1e-30)
    return ((actual.detach().double() - expected).abs().amax(dim=-1) / scale).max().item()


def assert_fp32_accurate(actual, expected, what, tolerance=1e-5, per_row=False):
    """per_row: each row held to its own scale (max_row_relative_error), not the batch's."""
    error = (max_row_relative_error if per_row else max_relative_error)(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def assert_within_twice_plain_torch(actual, plain, expected, what, per_row=False):
    """A low-precision result may be at most 2x as far from the float64 truth as plain PyTorch's."""
    measure = max_row_relative_error if per_row else max_relative_error
    ours, baseline = measure(actual, expected), measure(plain, expected)
    assert ours <= 2 * baseline + 1e-7, f"{what}: error {ours:.3g} vs plain torch {baseline:.3g}"


# (backend, device) pairs: torch and Triton (interpreter) on CPU always; GPU pairs under `gpu`.
BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),
    pytest.param(("cuda", "cuda"), id="cuda-gpu", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
]


def record_row_kernel_inputs(monkeypatch):
    """Records the logits every call to token_logprobs' row kernels (forward and backward) reads.

    Returns the list the blocks are appended to; the kernels themselves still run.
    """
    module = importlib.import_module("fastmath_kernels.token_logprobs")
    blocks = []
    forward, backward = module.logprob_rows_forward, module.logprob_rows_backward

    def recording_forward(logits, *args, **kwargs):
        blocks.append(logits)
        return forward(logits, *args, **kwargs)

    def recording_backward(grad_logits, logits, *args, **kwargs):
        blocks.append(logits)
        return backward(grad_logits, logits, *args, **kwargs)

    monkeypatch.setattr(module, "logprob_rows_forward", recording_forward)
    monkeypatch.setattr(module, "logprob_rows_backward", recording_backward)
    return blocks


def assert_views_of(blocks, tensor, what):
    """Every block shares tensor's storage: it was read in place, not copied."""
    assert blocks, f"{what}: nothing was read"
    storage = tensor.untyped_storage().data_ptr()
    for block in blocks:
        assert block.untyped_storage().data_ptr() == storage, f"{what}: a {tuple(block.shape)} block is a copy"
