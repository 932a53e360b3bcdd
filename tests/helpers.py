"""Error measures shared by the kernel tests."""



def max_relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected).abs().max() / scale).item()


def assert_fp32_accurate(actual, expected, what, tolerance=1e-5):
    error = max_relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def assert_within_twice_plain_torch(actual, plain, expected, what):
    """A low-precision result may be at most 2x as far from the float64 truth as plain PyTorch's."""
    ours = max_relative_error(actual, expected)
    baseline = max_relative_error(plain, expected)
    assert ours <= 2 * baseline + 1e-7, f"{what}: error {ours:.3g} vs plain torch {baseline:.3g}"


import pytest  # noqa: E402

# (backend, device) pairs: torch and Triton (interpreter) on CPU always; GPU pairs under `gpu`.
BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),
    pytest.param(("cuda", "cuda"), id="cuda-gpu", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
]
