import pytest
import torch
from helpers import BACKEND_DEVICES, assert_fp32_accurate, assert_within_twice_plain_torch

from fastmath_kernels import grpo_token_loss


def float64_reference(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high, upstream):
    """The loss written out elementwise in float64, with its gradient by autograd."""
    logp = logp.detach().double().requires_grad_()
    ratio = (logp - old_logp.double()).exp()
    advantage = advantages.double().view(-1, *([1] * (logp.dim() - 1)))
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantage
    loss = -torch.where(unclipped <= clipped, unclipped, clipped)
    if beta:
        delta = ref_logp.double() - logp
        loss = loss + beta * (delta.exp() - delta - 1)
    (loss * upstream.double()).sum().backward()
    return loss, logp.grad


def random_inputs(shape, device, seed):
    generator = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(shape, generator=generator)
    # Ratios from about 0.5 to 2 so that both clip bounds and the unclipped middle all occur.
    old_logp = logp + 0.35 * torch.randn(shape, generator=generator)
    ref_logp = logp + 0.2 * torch.randn(shape, generator=generator)
    advantages = torch.randn(shape[0], generator=generator)
    upstream = torch.randn(shape, generator=generator)
    return [t.to(device) for t in (logp, old_logp, advantages, ref_logp, upstream)]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (8, 129), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("beta,eps_low,eps_high", [(0.0, 0.2, None), (0.04, 0.2, 0.28)])
def test_matches_float64(backend_device, shape, beta, eps_low, eps_high):
    backend, device = backend_device
    logp, old_logp, advantages, ref_logp, upstream = random_inputs(shape, device, seed=shape[-1])
    leaf = logp.clone().requires_grad_()
    loss = grpo_token_loss(
        leaf, old_logp, advantages, ref_logp=ref_logp if beta else None, beta=beta,
        eps_low=eps_low, eps_high=eps_high, backend=backend,
    )
    (loss * upstream).sum().backward()
    high = eps_low if eps_high is None else eps_high
    ref_loss, ref_grad = float64_reference(logp, old_logp, advantages, ref_logp, beta, eps_low, high, upstream)
    assert loss.dtype == torch.float32 and loss.shape == logp.shape
    assert_fp32_accurate(loss, ref_loss, "loss")
    assert_fp32_accurate(leaf.grad, ref_grad, "grad")


def plain_torch_loss(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high, upstream):
    """The loss as a user would write it, every op in the inputs' dtype, with its gradient."""
    logp = logp.detach().clone().requires_grad_()
    ratio = torch.exp(logp - old_logp)
    advantage = advantages.view(-1, *([1] * (logp.dim() - 1)))
    loss = -torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantage)
    if beta:
        delta = ref_logp - logp
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    (loss * upstream.to(logp.dtype)).sum().backward()
    return loss, logp.grad


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 17), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("beta,eps_low,eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_low_precision_within_twice_plain_torch(backend_device, dtype, shape, beta, eps_low, eps_high):
    backend, device = backend_device
    inputs = [t.to(dtype) for t in random_inputs(shape, device, seed=shape[-1] + 100)]
    logp, old_logp, advantages, ref_logp, upstream = inputs
    leaf = logp.clone().requires_grad_()
    loss = grpo_token_loss(
        leaf, old_logp, advantages, ref_logp=ref_logp if beta else None, beta=beta,
        eps_low=eps_low, eps_high=eps_high, backend=backend,
    )
    (loss * upstream.float()).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == logp.shape
    assert leaf.grad.dtype == dtype and leaf.grad.shape == logp.shape
    ref_loss, ref_grad = float64_reference(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high, upstream)
    plain_loss, plain_grad = plain_torch_loss(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high, upstream)
    assert_within_twice_plain_torch(loss, plain_loss, ref_loss, "loss")
    assert_within_twice_plain_torch(leaf.grad, plain_grad, ref_grad, "grad")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_clipped_tokens_get_no_policy_gradient(backend_device):
    backend, device = backend_device
    old_logp = torch.zeros(2, 3, device=device)
    # ratios 1.5 (above 1+eps), 1.0 (inside), 0.5 (below 1-eps); A > 0 for row 0, A < 0 for row 1.
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]], device=device)).requires_grad_()
    advantages = torch.tensor([2.0, -2.0], device=device)
    loss = grpo_token_loss(logp, old_logp, advantages, eps_low=0.2, backend=backend)
    loss.sum().backward()
    expected_loss = torch.tensor([[-2.4, -2.0, -1.0], [3.0, 2.0, 1.6]], device=device)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    # Gradient -A*r where the unclipped term is the minimum, 0 where the clip is active.
    expected_grad = torch.tensor([[0.0, -2.0, -1.0], [3.0, 2.0, 0.0]], device=device)
    torch.testing.assert_close(logp.grad, expected_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(old_logp=torch.randn(4, 6)), "old_logp"),
        (dict(advantages=torch.randn(4, 5)), "advantages"),
        (dict(advantages=torch.randn(3)), "advantages"),
        (dict(ref_logp=torch.randn(4, 6), beta=0.1), "ref_logp"),
        (dict(beta=0.1), "ref_logp"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(beta=-1.0, ref_logp=torch.randn(4, 5)), "beta"),
        (dict(backend="mps"), "backend"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    arguments = dict(logp=torch.randn(4, 5), old_logp=torch.randn(4, 5), advantages=torch.randn(4)) | kwargs
    with pytest.raises(ValueError, match=argument):
        grpo_token_loss(**arguments)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    logp, old_logp, advantages, ref_logp, upstream = random_inputs((5, 33), "cuda", seed=0)
    # logp requires grad so that opcheck also checks the autograd registration and its backward.
    logp.requires_grad_()
    for ref, beta, eps_high in ((ref_logp, 0.04, 0.28), (None, 0.0, 0.2)):
        torch.library.opcheck(
            torch.ops.fastmath.grpo_token_loss_forward.default, (logp, old_logp, advantages, ref, beta, 0.2, eps_high)
        )
        torch.library.opcheck(
            torch.ops.fastmath.grpo_token_loss_backward.default,
            (upstream, logp.detach(), old_logp, advantages, ref, beta, 0.2, eps_high),
        )
