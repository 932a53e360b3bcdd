import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    assert_fp32_accurate,
    assert_views_of,
    assert_within_twice_plain_torch,
    record_row_kernel_inputs,
)

from fastmath_kernels import token_logprobs
from fastmath_kernels.token_logprobs import row_blocks

# Odd shapes: N=1, V=1, V not a multiple of any block, 3-D inputs, a V larger than one block.
SHAPES = [(1, 7), (4, 1), (17, 33), (3, 5, 1001), (2, 4099)]


def float64_reference(logits, targets, temperature, upstream_logp, upstream_entropy):
    """Plain float64 log_softmax, its entropy and the logits gradient of a random combination."""
    logits = logits.detach().double().requires_grad_()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    (logp * upstream_logp.double() + entropy * upstream_entropy.double()).sum().backward()
    return logp, entropy, logits.grad


def random_case(shape, dtype, device, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype).to(device)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=generator).to(device)
    upstream_logp = torch.randn(shape[:-1], generator=generator).to(device)
    upstream_entropy = torch.randn(shape[:-1], generator=generator).to(device)
    return logits, targets, upstream_logp, upstream_entropy


def run_op(logits, targets, temperature, upstream_logp, upstream_entropy, backend):
    logits = logits.detach().clone().requires_grad_()
    original = logits.detach().clone()
    logp, entropy = token_logprobs(logits, targets, temperature=temperature, with_entropy=True, backend=backend)
    (logp * upstream_logp + entropy * upstream_entropy).sum().backward()
    assert torch.equal(logits.detach(), original), "the op must not modify its input"
    return logp, entropy, logits.grad


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_float64(backend_device, shape, temperature):
    backend, device = backend_device
    case = random_case(shape, torch.float32, device, seed=sum(shape))
    logits, targets, upstream_logp, upstream_entropy = case
    logp, entropy, grad = run_op(logits, targets, temperature, upstream_logp, upstream_entropy, backend)
    ref_logp, ref_entropy, ref_grad = float64_reference(logits, targets, temperature, upstream_logp, upstream_entropy)
    assert logp.dtype == entropy.dtype == torch.float32 and grad.dtype == torch.float32
    assert logp.shape == targets.shape and grad.shape == logits.shape
    if shape[-1] > 1:
        assert_fp32_accurate(logp, ref_logp, "logp")
        assert_fp32_accurate(entropy, ref_entropy, "entropy")
        assert_fp32_accurate(grad, ref_grad, "grad")
    else:  # a single-token vocabulary: log-prob, entropy and gradient are 0 exactly
        assert logp.abs().max() < 1e-6 and entropy.abs().max() < 1e-6 and grad.abs().max() < 1e-6


def plain_torch(logits, targets, temperature, upstream_logp, upstream_entropy):
    """log_softmax, gather, entropy and backward all in the logits' dtype, as a user would write them."""
    dtype = logits.dtype
    logits = logits.detach().clone().requires_grad_()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    (logp * upstream_logp.to(dtype) + entropy * upstream_entropy.to(dtype)).sum().backward()
    return logp, entropy, logits.grad


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch(backend_device, dtype):
    backend, device = backend_device
    logits, targets, upstream_logp, upstream_entropy = random_case((6, 7, 333), dtype, device, seed=7)
    logp, entropy, grad = run_op(logits, targets, 0.7, upstream_logp, upstream_entropy, backend)
    assert grad.dtype == dtype
    ref_logp, ref_entropy, ref_grad = float64_reference(logits, targets, 0.7, upstream_logp, upstream_entropy)
    plain_logp, plain_entropy, plain_grad = plain_torch(logits, targets, 0.7, upstream_logp, upstream_entropy)
    assert_within_twice_plain_torch(logp, plain_logp, ref_logp, "logp")
    assert_within_twice_plain_torch(entropy, plain_entropy, ref_entropy, "entropy")
    assert_within_twice_plain_torch(grad, plain_grad, ref_grad, "grad")


def extreme_case(dtype, device, seed):
    """Rows of logits near +-1e4, each with its own scale of log-probs and entropy.

    0, 1: flat at +1e4 and -1e4 (logp = -log V). 2, 3: an O(1) spread around +1e4 and -1e4, a
    spread-out softmax far from 0. 4: one token at +1e4 above the rest near -1e4 (entropy 0,
    the target elsewhere: logp near -2e4). 5: tokens split between +1e4 and -1e4.
    All values stay inside the fp16 range, log-probs included.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab_size = 257
    noise = 3 * torch.randn(6, vocab_size, generator=generator, dtype=torch.float64)
    logits = torch.empty(6, vocab_size, dtype=torch.float64)
    logits[0], logits[1] = 1e4, -1e4
    logits[2], logits[3] = 1e4 + noise[2], -1e4 + noise[3]
    targets = torch.randint(0, vocab_size, (6,), generator=generator)
    logits[4] = -1e4 + noise[4]
    logits[4, (targets[4] + 1) % vocab_size] = 1e4
    signs = torch.randint(0, 2, (vocab_size,), generator=generator) * 2 - 1
    logits[5] = 1e4 * signs + noise[5]
    upstream_logp = torch.randn(6, generator=generator).to(device)
    upstream_entropy = torch.randn(6, generator=generator).to(device)
    return logits.to(dtype).to(device), targets.to(device), upstream_logp, upstream_entropy


def per_token(values):
    """[N] -> [N, 1]: each token's value becomes a row of its own for the row-wise error."""
    return values[..., None]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits(backend_device, temperature):
    """At T != 1 too: z / T rounded near 1e4 would already cost 3e-4 (plain PyTorch's error)."""
    backend, device = backend_device
    logits, targets, upstream_logp, upstream_entropy = extreme_case(torch.float32, device, seed=1)
    logp, entropy, grad = run_op(logits, targets, temperature, upstream_logp, upstream_entropy, backend)
    ref_logp, ref_entropy, ref_grad = float64_reference(logits, targets, temperature, upstream_logp, upstream_entropy)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    # Each row against its own value: one batch-wide scale (|logp| up to 2e4) would let a row
    # with logp = -5.5 be 3% off.
    assert_fp32_accurate(per_token(logp), per_token(ref_logp), "logp", per_row=True)
    assert_fp32_accurate(per_token(entropy), per_token(ref_entropy), "entropy", per_row=True)
    assert_fp32_accurate(grad, ref_grad, "grad", per_row=True)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits_low_precision_within_twice_plain_torch(backend_device, dtype, temperature):
    backend, device = backend_device
    logits, targets, upstream_logp, upstream_entropy = extreme_case(dtype, device, seed=3)
    logp, entropy, grad = run_op(logits, targets, temperature, upstream_logp, upstream_entropy, backend)
    assert grad.dtype == dtype
    ref_logp, ref_entropy, ref_grad = float64_reference(logits, targets, temperature, upstream_logp, upstream_entropy)
    plain_logp, plain_entropy, plain_grad = plain_torch(logits, targets, temperature, upstream_logp, upstream_entropy)
    assert torch.isfinite(plain_entropy).all(), "the case must stay inside the dtype's range"
    assert_within_twice_plain_torch(per_token(logp), per_token(plain_logp), per_token(ref_logp), "logp", per_row=True)
    assert_within_twice_plain_torch(
        per_token(entropy), per_token(plain_entropy), per_token(ref_entropy), "entropy", per_row=True)
    assert_within_twice_plain_torch(grad, plain_grad, ref_grad, "grad", per_row=True)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_logp_only_gradient(backend_device):
    backend, device = backend_device
    logits, targets, upstream_logp, _ = random_case((9, 70), torch.float32, device, seed=4)
    logits.requires_grad_()
    logp = token_logprobs(logits, targets, backend=backend)
    (logp * upstream_logp).sum().backward()
    _, _, ref_grad = float64_reference(logits, targets, 1.0, upstream_logp, torch.zeros_like(upstream_logp))
    assert_fp32_accurate(logits.grad, ref_grad, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_rows_are_read_in_place(backend, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(6, 50, generator=generator).requires_grad_()
    logits = base[:, :41]  # row stride 50, last dim contiguous
    targets = torch.randint(0, 41, (6,), generator=generator)
    upstream = torch.randn(6, generator=generator)
    blocks = row_blocks(logits.detach())
    assert_views_of(blocks, base, "row_blocks")
    assert torch.equal(torch.cat(blocks), logits.detach())
    kernel_inputs = record_row_kernel_inputs(monkeypatch)
    logp = token_logprobs(logits, targets, backend=backend)
    (logp * upstream).sum().backward()
    assert len(kernel_inputs) == 2, "one forward and one backward call over all rows"
    assert_views_of(kernel_inputs, base, backend)
    reference = base.detach().double().requires_grad_()
    expected = torch.log_softmax(reference[:, :41], -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * upstream.double()).sum().backward()
    assert_fp32_accurate(logp, expected, "logp")
    assert_fp32_accurate(base.grad, reference.grad, "grad")


@pytest.mark.parametrize(
    "logits,targets,kwargs,argument",
    [
        (torch.randn(3, 5), torch.zeros(3), {}, "targets"),  # float targets
        (torch.randn(3, 5), torch.zeros(4, dtype=torch.long), {}, "targets"),  # shape mismatch
        (torch.randn(3, 5), torch.tensor([0, 5, 1]), {}, "targets"),  # out of range high
        (torch.randn(3, 5), torch.tensor([0, -1, 1]), {}, "targets"),  # out of range low
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"backend": "tpu"}, "backend"),
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": 0.0}, "temperature"),
        (torch.arange(15).view(3, 5), torch.zeros(3, dtype=torch.long), {}, "logits"),
    ],
)
def test_bad_arguments_name_the_argument(logits, targets, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        token_logprobs(logits, targets, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_ops_pass_opcheck(dtype):
    logits, targets, upstream_logp, upstream_entropy = random_case((7, 1001), dtype, "cuda", seed=2)
    # Logits that require grad make opcheck check the autograd registration and its backward.
    logits.requires_grad_()
    for with_entropy in (False, True):
        torch.library.opcheck(torch.ops.fastmath.token_logprobs_forward.default, (logits, targets, 0.7, with_entropy))
    logits = logits.detach()
    _, entropy, lse = torch.ops.fastmath.token_logprobs_forward(logits, targets, 0.7, True)
    for entropy_arg, grad_entropy in ((entropy, upstream_entropy), (None, None)):
        grad_logits = torch.zeros_like(logits)
        torch.library.opcheck(
            torch.ops.fastmath.token_logprobs_backward.default,
            (grad_logits, logits, targets, lse, entropy_arg, upstream_logp, grad_entropy, 0.7),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_recipe_vocabulary(backend):
    # Qwen's vocabulary: 151,936 columns, bf16, with the vectorised paths exercised.
    logits, targets, upstream_logp, upstream_entropy = random_case((64, 151936), torch.bfloat16, "cuda", seed=9)
    logp, entropy, grad = run_op(logits, targets, 1.0, upstream_logp, upstream_entropy, backend)
    ref_logp, ref_entropy, ref_grad = float64_reference(logits, targets, 1.0, upstream_logp, upstream_entropy)
    assert_fp32_accurate(logp, ref_logp, "logp")
    assert_fp32_accurate(entropy, ref_entropy, "entropy")
    # The gradient is rounded to bf16 once on store.
    assert (grad.double() - ref_grad).abs().max() <= ref_grad.abs().max() * 2**-8
