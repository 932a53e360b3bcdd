import math
import statistics

import pytest
import torch

import fastmath_kernels as fk
from fastmath_kernels import group_advantages


def reference_float64(rewards, group_size, scale, eps):
    """Plain-Python float64 oracle, independent of every implementation under test."""
    values = [float(v) for v in rewards.double().tolist()]
    valid_values = [v for v in values if math.isfinite(v)]
    batch_std = statistics.stdev(valid_values) if len(valid_values) >= 2 else 0.0
    out = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        finite = [v for v in group if math.isfinite(v)]
        if len(finite) < 2:
            out.extend([0.0] * len(group))
            continue
        mean = statistics.fmean(finite)
        if scale == "group":
            denominator = statistics.stdev(finite) + eps
        elif scale == "batch":
            denominator = batch_std + eps
        else:
            denominator = 1.0
        out.extend((v - mean) / denominator if math.isfinite(v) else 0.0 for v in group)
    return torch.tensor(out, dtype=torch.float64)


CPU_BACKENDS = ["torch", "triton"]
SHAPES = [(1, 2), (3, 7), (16, 8), (5, 1), (37, 13), (2, 65)]  # (num_groups, group_size)


def random_rewards(num_groups, group_size, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    # Mixed scales: binary correctness plus continuous length rewards, as in the recipe.
    rewards = torch.randint(0, 2, (num_groups * group_size,), generator=generator).double()
    rewards += 0.7 * torch.randn(num_groups * group_size, generator=generator, dtype=torch.float64)
    return rewards.to(dtype=dtype, device=device)


def assert_close_to_reference(result, rewards, group_size, scale, eps, atol, rtol):
    assert result.dtype == torch.float32
    assert result.shape == rewards.shape
    expected = reference_float64(rewards.cpu(), group_size, scale, eps)
    torch.testing.assert_close(result.cpu().double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_groups,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(backend, scale, num_groups, group_size, dtype):
    rewards = random_rewards(num_groups, group_size, dtype, seed=num_groups * 100 + group_size)
    result = group_advantages(rewards, group_size, scale=scale, backend=backend)
    # bf16 inputs are converted exactly to fp32, so both dtypes meet fp32 accuracy.
    assert_close_to_reference(result, rewards, group_size, scale, 1e-4, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_non_finite_rewards_are_left_out(backend, scale):
    rewards = random_rewards(6, 5, torch.float32, seed=3)
    rewards[0] = float("nan")  # one missing in group 0
    rewards[5:9] = float("nan")  # group 1 keeps a single valid reward -> all zero
    rewards[10:15] = float("nan")  # group 2 entirely missing
    rewards[17] = float("inf")
    rewards[23] = float("-inf")
    result = group_advantages(rewards, 5, scale=scale, backend=backend)
    assert torch.isfinite(result).all()
    assert result[0] == 0 and result[5:15].abs().sum() == 0
    assert result[17] == 0 and result[23] == 0
    assert result[1:5].abs().sum() > 0, "valid members of a partly missing group still learn"
    assert_close_to_reference(result, rewards, 5, scale, 1e-4, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identical_rewards_give_zero_and_eps_is_used(backend):
    rewards = torch.tensor([0.5] * 4 + [1.0, 0.0, 1.0, 0.0])
    result = group_advantages(rewards, 4, eps=0.25, backend=backend)
    assert result[:4].abs().max() == 0
    group_std = statistics.stdev([1.0, 0.0, 1.0, 0.0])
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (group_std + 0.25)
    torch.testing.assert_close(result[4:], expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_batch_crosses_tiles(backend):
    # More rewards than one Triton tile (4096) holds, so the loop over tiles is exercised.
    rewards = random_rewards(700, 8, torch.float32, seed=11)
    for scale in ("group", "batch"):
        result = group_advantages(rewards, 8, scale=scale, backend=backend)
        assert_close_to_reference(result, rewards, 8, scale, 1e-4, atol=2e-6, rtol=1e-5)


def test_empty_batch():
    assert group_advantages(torch.empty(0), 4).shape == (0,)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(rewards=torch.randn(10), group_size=3), "group_size"),
        (dict(rewards=torch.randn(10), group_size=0), "group_size"),
        (dict(rewards=torch.randn(10), group_size=2.0), "group_size"),
        (dict(rewards=torch.randn(2, 5), group_size=5), "rewards"),
        (dict(rewards=torch.arange(10), group_size=5), "rewards"),
        (dict(rewards=torch.randn(10), group_size=5, scale="std"), "scale"),
        (dict(rewards=torch.randn(10), group_size=5, eps=-1.0), "eps"),
        (dict(rewards=torch.randn(10), group_size=5, backend="cuda"), "backend"),
        (dict(rewards=torch.randn(10), group_size=5, backend="numpy"), "backend"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        group_advantages(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_groups,group_size", SHAPES + [(512, 16), (1, 3000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_backends_match_float64_reference(backend, scale, num_groups, group_size, dtype):
    if backend not in fk.available_backends():
        pytest.fail(f"{backend} backend is not available on this GPU machine")
    rewards = random_rewards(num_groups, group_size, dtype, seed=group_size, device="cuda")
    rewards[::7] = float("nan")
    result = group_advantages(rewards, group_size, scale=scale, backend=backend)
    assert result.is_cuda
    assert_close_to_reference(result, rewards, group_size, scale, 1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_op_passes_opcheck():
    if not fk.HAS_CUDA_EXT:
        pytest.fail("the CUDA extension did not load on a GPU machine")
    # Advantages are constants of the GRPO step: the op has no autograd registration, so the
    # rewards do not require grad here.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rewards = random_rewards(8, 4, dtype, seed=0, device="cuda")
        for scale_mode in (0, 1, 2):
            torch.library.opcheck(torch.ops.fastmath.group_advantages.default, (rewards, 4, scale_mode, 1e-4))


@pytest.mark.gpu
def test_cuda_op_is_captured_in_a_cuda_graph():
    rewards = random_rewards(64, 8, torch.float32, seed=5, device="cuda")
    expected = group_advantages(rewards, 8, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        group_advantages(rewards, 8, backend="cuda")  # warm up outside capture
        with torch.cuda.graph(graph):
            captured = group_advantages(rewards, 8, backend="cuda")
    rewards.copy_(random_rewards(64, 8, torch.float32, seed=6, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(captured, expected), "replay must read the new rewards"
    assert_close_to_reference(captured, rewards, 8, "group", 1e-4, atol=1e-5, rtol=1e-5)
