"""A backend added with one register_backend call runs through the public ops, and leaves no trace.

The new backends here are float64 kernels written from plain torch ops: one for token_logprobs
as a forward/backward pair (so the op's autograd.Function pairs them), one for grpo_token_loss
as a differentiable forward (so autograd records it directly). Each is checked against float64
autograd through torch's own log_softmax or the GRPO formula, on random data and odd shapes.
Declared with a priority above torch's on CPU tensors, the token_logprobs one is also the
automatic choice there; the priority rule and the contract checks are tested on their own too.
"""

import pytest
import torch
from helpers import assert_fp32_accurate

import fastmath_kernels as fk
from fastmath_kernels import _dispatch, _registry, planning_as_gpu
from fastmath_kernels._dispatch import resolve_backend
from fastmath_kernels._registry import Kernels

NEW = "float64_reference"
OPS = ("token_logprobs", "grpo_token_loss", "group_advantages", "linear_token_logprobs", "linear_cross_entropy")
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
def prioritized_backend():
    """NEW declared to run on CPU tensors above torch's priority: chosen without being named."""
    CALLS.clear()
    _registry.declare_backend(NEW, priority=_registry.priority("token_logprobs", "torch") + 1, automatic_on=("cpu",))
    _registry.register_backend("token_logprobs", NEW, Kernels(rows_forward_float64, rows_backward_float64))
    yield None  # backend=None: the automatic choice
    _registry.unregister_backend("token_logprobs", NEW)
    assert_forgotten(NEW)
    assert resolve_backend(None, torch.zeros(2, 3), op="token_logprobs") == "torch"


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
@pytest.mark.parametrize("registered", ["token_logprobs_backend", "prioritized_backend"])
def test_new_backend_runs_through_token_logprobs(registered, shape, dtype, temperature, request):
    token_logprobs_backend = request.getfixturevalue(registered)  # a name, or None for the automatic choice
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


def counting(name, calls):
    def advantages(rewards, group_size, scale, eps):
        calls.append(name)
        return torch.zeros_like(rewards, dtype=torch.float32)

    return advantages


@pytest.fixture
def declared():
    """Declares backends for a test and removes every registration of them afterwards."""
    names = []

    def declare(name, priority, automatic_on=("cpu",)):
        _registry.declare_backend(name, priority=priority, automatic_on=automatic_on)
        names.append(name)
        return name

    yield declare
    for name in names:
        for op in [op for op in OPS if _registry.is_registered(op, name)]:
            _registry.unregister_backend(op, name)
    assert fk.BACKENDS == ("cuda", "triton", "torch")


def test_the_highest_priority_wins_and_unregistering_restores_the_previous_choice(declared):
    rewards, calls = torch.randn(6), []
    low, high = declared("low", priority=5), declared("high", priority=7)
    _registry.register_backend("group_advantages", low, counting(low, calls))
    assert resolve_backend(None, rewards, op="group_advantages") == low
    _registry.register_backend("group_advantages", high, counting(high, calls))
    fk.group_advantages(rewards, 3)
    assert calls == [high]
    assert fk.BACKENDS == ("cuda", "triton", "high", "low", "torch")  # listed by declared priority
    _registry.unregister_backend("group_advantages", high)
    fk.group_advantages(rewards, 3)
    assert calls == [high, low]
    _registry.unregister_backend("group_advantages", low)
    assert resolve_backend(None, rewards, op="group_advantages") == "torch"
    assert resolve_backend(None, rewards, op="token_logprobs") == "torch"  # never had either


def test_an_op_priority_overrides_the_declared_one_for_that_op_only(declared):
    rewards, logits, calls = torch.randn(6), torch.randn(2, 5), []
    low, high = declared("low", priority=5), declared("high", priority=7)
    for op in ("group_advantages", "token_logprobs"):
        _registry.register_backend(op, low, counting(low, calls) if op == "group_advantages" else
                                   Kernels(rows_forward_float64, rows_backward_float64))
    _registry.register_backend("group_advantages", high, counting(high, calls))
    _registry.register_backend("token_logprobs", high, Kernels(rows_forward_float64, rows_backward_float64),
                               priority=3)
    assert resolve_backend(None, rewards, op="group_advantages") == high
    assert resolve_backend(None, logits, op="token_logprobs") == low
    assert resolve_backend(None, logits) == high  # no op: the declared priorities
    assert resolve_backend(high, logits, op="token_logprobs") == high  # backend= still reaches it


def test_a_backend_is_chosen_only_on_the_device_types_it_is_declared_for(declared):
    rewards = torch.randn(6)
    gpu_only = declared("gpu_only", priority=100, automatic_on=("cuda",))
    _registry.register_backend("group_advantages", gpu_only, counting(gpu_only, []))
    assert resolve_backend(None, rewards, op="group_advantages") == "torch"
    with planning_as_gpu():  # CPU tensors resolved as CUDA ones
        assert resolve_backend(None, rewards, op="group_advantages") == gpu_only
        assert resolve_backend(None, rewards, op="grpo_token_loss") == ("cuda" if fk.HAS_CUDA_EXT else "torch")


def test_measured_gpu_orders_are_kept():
    for op in OPS[:-1]:
        assert _registry.priority(op, "cuda") > _registry.priority(op, "triton") > _registry.priority(op, "torch")
    op = "linear_cross_entropy"
    assert _registry.priority(op, "triton") > _registry.priority(op, "cuda") > _registry.priority(op, "torch")


def test_a_declared_name_is_declared_once(declared):
    declared("once", priority=1)
    with pytest.raises(ValueError, match="'once' is already declared"):
        _registry.declare_backend("once", priority=2)
    _registry.register_backend("group_advantages", "once", counting("once", []))


@pytest.mark.parametrize(
    ("op", "implementation", "missing"),
    [
        ("token_logprobs", Kernels(rows_forward_float64, differentiable=True), r"no callable backward\(grad_logits"),
        ("token_logprobs", Kernels(lambda logits: None, rows_backward_float64), r"cannot be called as forward\("),
        ("grpo_token_loss", object(), "no attribute 'differentiable'"),
        ("group_advantages", "not a function", r"not callable as __call__\(rewards, group_size, scale, eps\)"),
        ("linear_cross_entropy", Kernels(rows_forward_float64, rows_backward_float64), "no attribute 'grads_in_place'"),
        ("linear_token_logprobs", Kernels(rows_forward_float64, rows_backward_float64), r"cannot be called as"),
    ],
)
def test_an_implementation_that_breaks_its_op_contract_is_refused(op, implementation, missing):
    with pytest.raises(TypeError, match=f"{op}: the 'broken' backend does not satisfy .*{missing}"):
        _registry.register_backend(op, "broken", implementation)
    assert "broken" not in fk.BACKENDS and not _registry.is_registered(op, "broken")


def test_a_differentiable_forward_needs_no_backward_where_the_contract_says_so(grpo_backend):
    assert _registry.implementation("grpo_token_loss", NEW).backward is None
