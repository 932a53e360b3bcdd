"""A backend added with one register_backend call runs through the public ops, and leaves no trace.

The new backends here are float64 kernels written from plain torch ops: one for token_logprobs
as a forward/backward pair (so the op's autograd.Function pairs them), one for grpo_token_loss
as a differentiable forward (so autograd records it directly). Each is checked against float64
autograd through torch's own log_softmax or the GRPO formula, on random data and odd shapes.
"""

import pytest
import torch
from helpers import assert_fp32_accurate

import fastmath_kernels as fk
from fastmath_kernels import _dispatch, _registry
from fastmath_kernels._dispatch import resolve_backend
from fastmath_kernels._registry import Kernels

NEW = "float64_reference"
CALLS = []  # one entry per call of a test kernel, so a test sees that its backend really ran


def rows_forward_float64(logits, targets, temperature, with_entropy, workspace=None):
    CALLS.append("forward")
    scaled = logits.double() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1) if with_entropy else None
    lse = temperature * torch.logsumexp(scaled, dim=-1)  # in the logits' units, as the row kernels give it
    return logp.float(), (entropy.float() if with_entropy else None), lse


def rows_backward_float64(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                          workspace=None):
    CALLS.append("backward")
    log_probs = (logits.double() - lse[:, None]) / temperature
    probs = log_probs.exp()
    # d logp / dz = (onehot - p) / T; d entropy / dz = -p (log p + H) / T.
    grad = -probs * grad_logp.double()[:, None]
    if grad_entropy is not None and entropy is not None:
        grad -= probs * grad_entropy.double()[:, None] * (log_probs + entropy.double()[:, None])
    grad.scatter_add_(1, targets[:, None], grad_logp.double()[:, None])
    grad_logits.copy_(grad / temperature)


def grpo_loss_float64(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    CALLS.append("grpo")
    logp64 = logp.double()
    ratio = torch.exp(logp64 - old_logp.double())
    advantage = advantages.double()[:, None]
    loss = -torch.minimum(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage)
    if ref_logp is not None:
        log_ratio = ref_logp.double() - logp64
        loss = loss + beta * (log_ratio.exp() - log_ratio - 1)
    return loss.float()


@pytest.fixture
def token_logprobs_backend():
    CALLS.clear()
    _registry.register_backend("token_logprobs", NEW, Kernels(rows_forward_float64, rows_backward_float64))
    yield NEW
    _registry.unregister_backend("token_logprobs", NEW)
    assert_forgotten(NEW)


@pytest.fixture
def grpo_backend():
    CALLS.clear()
    _registry.register_backend("grpo_token_loss", NEW, Kernels(grpo_loss_float64, differentiable=True))
    yield NEW
    _registry.unregister_backend("grpo_token_loss", NEW)
    assert_forgotten(NEW)


def assert_forgotten(name):
    assert name not in fk.BACKENDS and name not in _dispatch.BACKENDS
    assert name not in fk.available_backends()
    with pytest.raises(ValueError, match=name):
        fk.token_logprobs(torch.randn(2, 5), torch.tensor([1, 4]), backend=name)


def random_logits(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=generator) + 0.5).to(dtype)


def float64_token_logprobs(logits, targets, temperature, upstream_logp, upstream_entropy):
    reference = logits.detach().double().requires_grad_()
    log_probs = torch.log_softmax(reference / temperature, dim=-1)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    ((logp * upstream_logp.double()).sum() + (entropy * upstream_entropy.double()).sum()).backward()
    return logp, entropy, reference.grad


def test_no_test_backend_is_left_registered():
    assert fk.BACKENDS == ("cuda", "triton", "torch")
    assert NEW not in fk.available_backends()


@pytest.mark.parametrize("shape", [(3, 47, 31), (5, 123), (1, 2, 7, 61)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_new_backend_runs_through_token_logprobs(token_logprobs_backend, shape, dtype, temperature):
    # A view with a gap in its rows: the op splits it into blocks, each a row-kernel call.
    full = random_logits((*shape[:-1], shape[-1] + 3), dtype, seed=sum(shape))
    logits = full[..., :-3].detach().requires_grad_()
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    upstream_logp, upstream_entropy = torch.randn(shape[:-1], generator=generator), torch.randn(shape[:-1])
    logp, entropy = fk.token_logprobs(
        logits, targets, temperature=temperature, with_entropy=True, backend=token_logprobs_backend
    )
    ((logp * upstream_logp).sum() + (entropy * upstream_entropy).sum()).backward()
    assert "forward" in CALLS and "backward" in CALLS, "the new backend's kernels did not run"
    expected_logp, expected_entropy, expected_grad = float64_token_logprobs(
        logits, targets, temperature, upstream_logp, upstream_entropy
    )
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_fp32_accurate(logp[..., None], expected_logp[..., None], "logp", per_row=True)
    assert_fp32_accurate(entropy[..., None], expected_entropy[..., None], "entropy", per_row=True)
    # The gradient is rounded once to the logits' dtype.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    assert logits.grad.dtype == dtype
    assert_fp32_accurate(logits.grad, expected_grad, "grad", tolerance=tolerance, per_row=True)


@pytest.mark.parametrize("shape", [(3, 17), (5,), (2, 3, 11)])
def test_new_backend_runs_through_grpo_token_loss(grpo_backend, shape):
    generator = torch.Generator().manual_seed(len(shape))
    logp = (-1.5 + 0.3 * torch.randn(shape, generator=generator)).requires_grad_()
    old_logp = logp.detach() + 0.2 * torch.randn(shape, generator=generator)  # ratios on both sides of the clip
    ref_logp = logp.detach() + 0.1 * torch.randn(shape, generator=generator)
    advantages = torch.randn(shape[0], generator=generator)
    upstream = torch.randn(shape, generator=generator)
    loss = fk.grpo_token_loss(logp, old_logp, advantages, ref_logp=ref_logp, beta=0.04, eps_low=0.2, eps_high=0.28,
                              backend=grpo_backend)
    (loss * upstream).sum().backward()
    assert CALLS == ["grpo"], "the new backend did not run"
    reference = logp.detach().double().requires_grad_()
    ratio = torch.exp(reference - old_logp.double())
    advantage = advantages.double().view(-1, *[1] * (len(shape) - 1))
    expected = -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.28) * advantage)
    log_ratio = ref_logp.double() - reference
    expected = expected + 0.04 * (log_ratio.exp() - log_ratio - 1)
    (expected * upstream.double()).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == shape
    assert_fp32_accurate(loss, expected, "loss")
    assert_fp32_accurate(logp.grad, reference.grad, "grad")


def test_new_backend_is_listed_while_registered(token_logprobs_backend):
    assert fk.BACKENDS == ("cuda", "triton", "torch", NEW)
    assert _dispatch.BACKENDS == fk.BACKENDS
    assert fk.available_backends()[-1] == NEW  # runs anywhere, listed after the built-ins
    assert _registry.op_backend_names("token_logprobs")[-1] == NEW
    assert NEW not in _registry.op_backend_names("grpo_token_loss")


def test_environment_variable_names_the_new_backend(token_logprobs_backend, monkeypatch):
    monkeypatch.setenv("FASTMATH_BACKEND", NEW)
    logits, targets = random_logits((4, 9), torch.float32, seed=3), torch.tensor([0, 8, 3, 5])
    logp = fk.token_logprobs(logits, targets)
    assert CALLS == ["forward"]
    assert_fp32_accurate(logp, torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1), "logp")
    # An op without that backend keeps its automatic choice: the variable is a process-wide preference.
    assert resolve_backend(None, logits, op="group_advantages") == "torch"


def test_op_without_the_new_backend_refuses_it_by_name(token_logprobs_backend):
    with pytest.raises(ValueError, match=f"backend.*group_advantages has no '{NEW}'"):
        fk.group_advantages(torch.randn(6), 3, backend=NEW)


@pytest.mark.parametrize("name", ["tpu", "Torch", "cuda "])
def test_unknown_backend_is_a_value_error_naming_it(name):
    rewards, logits, targets = torch.randn(4), torch.randn(2, 5), torch.tensor([1, 4])
    hidden, weight = torch.randn(2, 3), torch.randn(5, 3)
    calls = [
        lambda: fk.token_logprobs(logits, targets, backend=name),
        lambda: fk.linear_token_logprobs(hidden, weight, targets, backend=name),
        lambda: fk.linear_cross_entropy(hidden, weight, targets, backend=name),
        lambda: fk.group_advantages(rewards, 2, backend=name),
        lambda: fk.grpo_token_loss(logits, logits, torch.randn(2), backend=name),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"backend: unknown backend '{name}'"):
            call()


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTMATH_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTMATH_BACKEND: unknown backend 'tpu'"):
        fk.token_logprobs(torch.randn(2, 5), torch.tensor([1, 4]))


def test_a_backend_is_not_replaced_by_accident():
    with pytest.raises(ValueError, match="already has a 'torch' backend"):
        _registry.register_backend("token_logprobs", "torch", Kernels(rows_forward_float64, rows_backward_float64))
    with pytest.raises(ValueError, match="device rule"):
        _registry.register_backend("linear_token_logprobs", "triton", object(), cannot_run_on=lambda device: None)
    assert fk.BACKENDS == ("cuda", "triton", "torch")


def test_dtype_a_backend_does_not_take_falls_back_to_the_automatic_choice():
    _registry.register_backend("token_logprobs", NEW, Kernels(rows_forward_float64, rows_backward_float64),
                               dtypes=(torch.float32,))
    try:
        assert resolve_backend(NEW, torch.randn(3, 4), op="token_logprobs") == NEW
        assert resolve_backend(NEW, torch.randn(3, 4, dtype=torch.float64), op="token_logprobs") == "torch"
        logits, targets = random_logits((3, 7), torch.float64, seed=4), torch.tensor([6, 0, 2])
        CALLS.clear()
        logp = fk.token_logprobs(logits, targets, backend=NEW)
        assert CALLS == [], "float64 logits went to a backend that takes only float32"
        torch.testing.assert_close(logp.double(), torch.log_softmax(logits, -1)[torch.arange(3), targets])
    finally:
        _registry.unregister_backend("token_logprobs", NEW)
    assert_forgotten(NEW)
