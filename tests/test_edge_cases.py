"""Corner cases that real training runs hit: masked vocabularies, eval passes, empty batches."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fp32_accurate, assert_views_of, record_row_kernel_inputs

import fastmath_kernels as fk
from fastmath_kernels.token_logprobs import row_blocks

CPU_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_vocabulary_gives_finite_entropy_and_gradients(backend):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=generator)
    logits[:, 7:] = float("-inf")  # tokens banned by a logits processor
    targets = torch.tensor([0, 3, 6, 2])
    leaf = logits.clone().requires_grad_()
    logp, entropy = fk.token_logprobs(leaf, targets, with_entropy=True, backend=backend)
    logp.sum().backward()  # entropy unused: its gradient must not poison the logits gradient
    reference = logits[:, :7].double().requires_grad_()
    log_probs = torch.log_softmax(reference, -1)
    log_probs.gather(-1, targets[:, None]).sum().backward()
    assert_fp32_accurate(logp, log_probs.gather(-1, targets[:, None]).squeeze(-1), "logp")
    assert_fp32_accurate(entropy, -(log_probs.exp() * log_probs).sum(-1), "entropy")
    assert torch.isfinite(leaf.grad).all()
    assert_fp32_accurate(leaf.grad[:, :7], reference.grad, "grad")
    assert leaf.grad[:, 7:].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shifted_logits_view_is_handled_without_reshaping(backend, monkeypatch):
    # logits[:, :-1] cannot be viewed as [B*T, V]: the op must read it as it is, not copy it.
    generator = torch.Generator().manual_seed(3)
    full = torch.randn(3, 6, 41, generator=generator)
    logits = full[:, :-1]
    targets = torch.randint(0, 41, (3, 5), generator=generator)
    blocks = row_blocks(logits)
    assert len(blocks) == 3, "split along the batch dim, one [T, V] view per sequence"
    assert_views_of(blocks, full, "row_blocks")
    assert torch.equal(torch.cat(blocks), logits.reshape(-1, 41))
    leaf = full.clone().requires_grad_()
    kernel_inputs = record_row_kernel_inputs(monkeypatch)
    logp = fk.token_logprobs(leaf[:, :-1], targets, backend=backend)
    (logp * torch.arange(15.0).view(3, 5)).sum().backward()
    assert len(kernel_inputs) == 6, "three blocks forward, three backward"
    assert_views_of(kernel_inputs, leaf, backend)
    reference = full.double().requires_grad_()
    expected = torch.log_softmax(reference[:, :-1], -1).gather(-1, targets[..., None]).squeeze(-1)
    (expected * torch.arange(15.0, dtype=torch.float64).view(3, 5)).sum().backward()
    assert logp.shape == (3, 5) and logits.shape == (3, 5, 41)
    assert_fp32_accurate(logp, expected, "logp")
    assert_fp32_accurate(leaf.grad, reference.grad, "grad")


def test_eval_pass_computes_no_gradients(monkeypatch):
    module = importlib.import_module("fastmath_kernels.linear_cross_entropy")

    def forbidden(weight):
        raise AssertionError("a gradient buffer was allocated under no_grad")

    monkeypatch.setattr(module, "weight_grad_buffer", forbidden)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (8,))
    with torch.no_grad():
        loss = fk.linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    assert_fp32_accurate(loss, F.cross_entropy(hidden.double() @ weight.double().T, targets), "loss")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_gradients_stay_in_range(backend):
    # Summing 256 per-token gradients of ~480 (about 1.2e5) before dividing by the count
    # overflows fp16; the small weight keeps the logits O(1). Few tokens: Triton is interpreted.
    hidden = torch.full((256, 8), 480.0, dtype=torch.float16, requires_grad=True)
    weight = (0.000625 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))).half().requires_grad_()
    targets = torch.zeros(256, dtype=torch.long)
    fk.linear_cross_entropy(hidden, weight, targets, backend=backend).backward()
    reference = weight.detach().double().requires_grad_()
    F.cross_entropy(hidden.detach().double() @ reference.T, targets).backward()
    assert torch.isfinite(weight.grad).all()
    torch.testing.assert_close(weight.grad.double(), reference.grad, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_scale_is_not_rounded_to_bf16(backend):
    hidden = torch.randn(3, 8).bfloat16().requires_grad_()
    weight = torch.randn(20, 8).bfloat16().requires_grad_()
    targets = torch.tensor([1, 2, 3])
    fk.linear_cross_entropy(hidden, weight, targets, backend=backend).backward()
    reference = weight.detach().double().requires_grad_()
    F.cross_entropy(hidden.detach().double() @ reference.T, targets).backward()
    # One bf16 rounding of each element: relative error under 2^-8 everywhere.
    relative = (weight.grad.double() - reference.grad).abs() / reference.grad.abs().clamp_min(1e-6)
    assert relative.max() <= 2**-8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_grpo_batch(backend):
    empty = torch.empty(0, 7)
    loss = fk.grpo_token_loss(empty, empty, torch.empty(0), backend=backend)
    assert loss.shape == (0, 7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_eps_with_equal_rewards_gives_zero(backend):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    for scale in ("group", "batch"):
        advantages = fk.group_advantages(rewards, 4, scale=scale, eps=0.0, backend=backend)
        assert torch.isfinite(advantages).all()
        assert advantages[:4].abs().max() == 0


def test_environment_preference_falls_back_where_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks CPU tensors on a machine without a GPU")
    monkeypatch.setenv("FASTMATH_BACKEND", "cuda")
    rewards = torch.randn(8)
    expected = fk.group_advantages(rewards, 4, backend="torch")
    torch.testing.assert_close(fk.group_advantages(rewards, 4), expected)


def test_second_order_gradients_are_refused_loudly():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = fk.linear_cross_entropy(hidden, weight, torch.randint(0, 10, (4,)))
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_hidden.sum().backward()


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0, 1e-9])
def test_unusable_temperatures_are_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fk.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)
