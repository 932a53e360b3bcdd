"""The torch.library registrations of the CUDA ops, checked without a GPU.

Each op runs on meta tensors and on fake CUDA tensors (FakeTensorMode), where its fake function
answers in place of the kernel. The outputs must have the shapes, dtypes and devices that the
schemas in csrc/fastmath.cpp document for the CUDA kernels; the expected values below are
written from that contract, not read from the fakes. The differentiable ops must have an
autograd registration whose backward gives the inputs' gradients their shapes. The kernels'
values, and torch.library.opcheck on real CUDA tensors, are checked under `gpu`.
"""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmath_kernels as fk

pytestmark = pytest.mark.skipif(not fk.HAS_CUDA_EXT, reason="the CUDA extension is not built here")

# meta: shapes only, device "meta". fake-cuda: FakeTensorMode's stand-ins for CUDA tensors,
# where the real ops run, so devices are checked as a compiled graph sees them. The autograd
# engine needs a real CUDA device to run a backward on fake CUDA tensors; backward checks use
# fake CPU tensors, which reach the same fake functions.
TENSOR_KINDS = ["meta", "fake-cuda"]
BACKWARD_TENSOR_KINDS = ["meta", "fake-cpu"]
DIFFERENTIABLE_OPS = ("token_logprobs_forward", "grpo_token_loss_forward")
CHECKED_OPS = ("group_advantages", "token_logprobs_forward", "token_logprobs_backward",
               "grpo_token_loss_forward", "grpo_token_loss_backward")


@contextlib.contextmanager
def tensor_kind(kind):
    """Yields the device that tensors made inside the block live on."""
    if kind == "meta":
        yield torch.device("meta")
    else:
        with FakeTensorMode():
            yield torch.device("cuda", 0) if kind == "fake-cuda" else torch.device("cpu")


def assert_tensor(tensor, shape, dtype, device, what):
    assert isinstance(tensor, torch.Tensor), f"{what}: got {type(tensor).__name__}"
    assert tuple(tensor.shape) == tuple(shape), f"{what}: shape {tuple(tensor.shape)}, expected {tuple(shape)}"
    assert tensor.dtype == dtype, f"{what}: dtype {tensor.dtype}, expected {dtype}"
    assert tensor.device == device, f"{what}: device {tensor.device}, expected {device}"


def test_every_registered_op_is_checked_here():
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastmath::")}
    assert registered == {f"fastmath::{name}" for name in CHECKED_OPS}


@pytest.mark.parametrize("name", CHECKED_OPS)
def test_every_op_has_a_cuda_kernel_and_a_fake(name):
    qualified = f"fastmath::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), f"{name} has no CUDA kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"), f"{name} has no fake (Meta) kernel"


@pytest.mark.parametrize("kind", TENSOR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rewards,group_size", [(12, 4), (7, 7), (0, 3)])
def test_group_advantages_output_follows_the_contract(kind, dtype, num_rewards, group_size):
    with tensor_kind(kind) as device:
        rewards = torch.empty(num_rewards, dtype=dtype, device=device)
        for scale_mode in (0, 1, 2):
            advantages = torch.ops.fastmath.group_advantages(rewards, group_size, scale_mode, 1e-4)
            # float32 advantages, one per reward, whatever the rewards' dtype.
            assert_tensor(advantages, (num_rewards,), torch.float32, device, f"advantages (scale_mode {scale_mode})")


@pytest.mark.parametrize("kind", TENSOR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows,vocab_size", [(5, 33), (1, 1), (0, 7)])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_token_logprobs_forward_output_follows_the_contract(kind, dtype, num_rows, vocab_size, with_entropy):
    with tensor_kind(kind) as device:
        logits = torch.empty(num_rows, vocab_size, dtype=dtype, device=device)
        targets = torch.empty(num_rows, dtype=torch.long, device=device)
        outputs = torch.ops.fastmath.token_logprobs_forward(logits, targets, 0.7, with_entropy)
        assert isinstance(outputs, tuple) and len(outputs) == 3
        logp, entropy, lse = outputs
        # float32 [N] statistics, the entropy [0] when it is not asked for; the lse is float64.
        assert_tensor(logp, (num_rows,), torch.float32, device, "logp")
        assert_tensor(entropy, (num_rows if with_entropy else 0,), torch.float32, device, "entropy")
        assert_tensor(lse, (num_rows,), torch.float64, device, "lse")


def test_token_logprobs_backward_schema_writes_only_grad_logits():
    schema = torch.ops.fastmath.token_logprobs_backward.default._schema
    written = [argument.name for argument in schema.arguments if argument.alias_info and argument.alias_info.is_write]
    assert written == ["grad_logits"]
    assert len(schema.returns) == 0


@pytest.mark.parametrize("kind", TENSOR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_token_logprobs_backward_follows_the_contract(kind, dtype, with_entropy):
    num_rows, vocab_size = 6, 41
    with tensor_kind(kind) as device:
        logits = torch.empty(num_rows, vocab_size, dtype=dtype, device=device)
        grad_logits = torch.empty_like(logits)
        rows = lambda: torch.empty(num_rows, dtype=torch.float32, device=device)  # noqa: E731
        targets = torch.empty(num_rows, dtype=torch.long, device=device)
        entropy, grad_entropy = (rows(), rows()) if with_entropy else (None, None)
        lse = torch.empty(num_rows, dtype=torch.float64, device=device)
        result = torch.ops.fastmath.token_logprobs_backward(
            grad_logits, logits, targets, lse, entropy, rows(), grad_entropy, 0.7
        )
        # Returns nothing: the gradient is written into grad_logits, which keeps its shape.
        assert result is None
        assert_tensor(grad_logits, (num_rows, vocab_size), dtype, device, "grad_logits")


@pytest.mark.parametrize("kind", TENSOR_KINDS)
@pytest.mark.parametrize("batch,tokens", [(3, 7), (1, 1), (0, 5)])
@pytest.mark.parametrize("with_ref", [True, False])
def test_grpo_token_loss_ops_follow_the_contract(kind, batch, tokens, with_ref):
    with tensor_kind(kind) as device:
        per_token = lambda: torch.empty(batch, tokens, dtype=torch.float32, device=device)  # noqa: E731
        logp, old_logp, grad_loss = per_token(), per_token(), per_token()
        advantages = torch.empty(batch, dtype=torch.float32, device=device)
        ref_logp, beta = (per_token(), 0.04) if with_ref else (None, 0.0)
        loss = torch.ops.fastmath.grpo_token_loss_forward(logp, old_logp, advantages, ref_logp, beta, 0.2, 0.28)
        assert_tensor(loss, (batch, tokens), torch.float32, device, "loss")
        grad_logp = torch.ops.fastmath.grpo_token_loss_backward(
            grad_loss, logp, old_logp, advantages, ref_logp, beta, 0.2, 0.28
        )
        assert_tensor(grad_logp, (batch, tokens), torch.float32, device, "grad_logp")


@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS)
def test_differentiable_ops_have_an_autograd_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmath::{name}", "Autograd")


# Without a registered backward, the autograd fallback still attaches a grad_fn, so the
# backward is run and the gradients' shapes checked.
@pytest.mark.parametrize("kind", BACKWARD_TENSOR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_token_logprobs_forward_backpropagates_to_the_logits(kind, dtype, with_entropy):
    with tensor_kind(kind) as device:
        logits = torch.empty(5, 33, dtype=dtype, device=device, requires_grad=True)
        targets = torch.empty(5, dtype=torch.long, device=device)
        logp, entropy, lse = torch.ops.fastmath.token_logprobs_forward(logits, targets, 0.7, with_entropy)
        assert logp.grad_fn is not None
        assert not lse.requires_grad, "lse is a statistic saved for backward, not a differentiable result"
        loss = logp.sum()
        if with_entropy:
            assert entropy.grad_fn is not None
            loss = loss + entropy.sum()
        loss.backward()
        assert_tensor(logits.grad, (5, 33), dtype, device, "logits.grad")


@pytest.mark.parametrize("kind", BACKWARD_TENSOR_KINDS)
@pytest.mark.parametrize("with_ref", [True, False])
def test_grpo_token_loss_forward_backpropagates_to_logp(kind, with_ref):
    with tensor_kind(kind) as device:
        logp = torch.empty(3, 7, device=device, requires_grad=True)
        old_logp = torch.empty(3, 7, device=device)
        advantages = torch.empty(3, device=device)
        ref_logp, beta = (torch.empty(3, 7, device=device), 0.04) if with_ref else (None, 0.0)
        loss = torch.ops.fastmath.grpo_token_loss_forward(logp, old_logp, advantages, ref_logp, beta, 0.2, 0.28)
        assert loss.grad_fn is not None
        loss.sum().backward()
        assert_tensor(logp.grad, (3, 7), torch.float32, device, "logp.grad")
