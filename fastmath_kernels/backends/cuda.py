"""The "cuda" backend: the compiled extension's torch.ops.fastmath.* kernels (csrc/).

Besides the calls themselves, the ops' fake implementations (what FakeTensor and the memory
planner see) and the autograd registrations of the differentiable forwards live here.
"""

import torch

from .._dispatch import CUDA_EXT_IMPORT_ERROR, HAS_CUDA_EXT, has_cuda_op
from .._planning import device_type
from .._registry import Kernels, declare_backend, register_backend
from ..grpo_token_loss import logp_grad, save_loss_inputs
from ..token_logprobs import fp32_rows, upstream_grads
from .row_kernels import TokenChunkedLogprobs, row_kernel_cross_entropy

NAME = "cuda"
PRIORITY = 20  # above triton's: faster on every op measured, except where an op says otherwise
# The CUDA kernels cover 16- and 32-bit floats; float64 logits go to the next backend.
_TOKEN_LOGPROBS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_SCALE_MODE = {"group": 0, "batch": 1, "none": 2}


def cuda_cannot_run_on(device):
    if not HAS_CUDA_EXT:
        return (
            f"backend='cuda' needs the compiled extension fastmath_kernels._C, which did "
            f"not load ({CUDA_EXT_IMPORT_ERROR}); reinstall with a CUDA build of torch and nvcc"
        )
    if device_type(device) != "cuda":
        return f"backend='cuda' needs CUDA tensors, got a tensor on {device}"
    return None


def _cuda_rows_forward(logits, targets, temperature, with_entropy, workspace=None):
    logp, entropy, lse = torch.ops.fastmath.token_logprobs_forward(logits, targets, float(temperature), with_entropy)
    return logp, (entropy if with_entropy else None), lse


def _cuda_rows_backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                        workspace=None):
    torch.ops.fastmath.token_logprobs_backward(
        grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature)
    )


def _cuda_grpo_forward(*arguments):
    return torch.ops.fastmath.grpo_token_loss_forward(*arguments)


def _cuda_grpo_backward(*arguments):
    return torch.ops.fastmath.grpo_token_loss_backward(*arguments)


def _group_advantages_cuda(rewards, group_size, scale, eps):
    return torch.ops.fastmath.group_advantages(rewards, group_size, _CUDA_SCALE_MODE[scale], float(eps))


declare_backend(NAME, cuda_cannot_run_on, priority=PRIORITY, automatic_on=("cuda",), builtin=True)
# The differentiable forwards are custom ops with their own autograd registrations (below), so the
# ops call them directly and torch.compile sees them.
register_backend("token_logprobs", NAME, Kernels(_cuda_rows_forward, _cuda_rows_backward, differentiable=True),
                 dtypes=_TOKEN_LOGPROBS_DTYPES)
register_backend("grpo_token_loss", NAME, Kernels(_cuda_grpo_forward, _cuda_grpo_backward, differentiable=True))
register_backend("group_advantages", NAME, _group_advantages_cuda)
register_backend("linear_token_logprobs", NAME, TokenChunkedLogprobs(NAME))
# Below triton's priority (10) for this op, above torch's (0): measured on an H200 at N=16384, H=4096, V=151936 in bf16,
# forward and backward (bench/results/h200-2026-12-04), Triton's row kernels take 98.8 ms, CUDA's 110.2 ms.
register_backend("linear_cross_entropy", NAME, row_kernel_cross_entropy(NAME), priority=5)


if has_cuda_op("token_logprobs_forward"):

    @torch.library.register_fake("fastmath::token_logprobs_forward")
    def _token_logprobs_forward_fake(logits, targets, temperature, with_entropy):
        num_rows = logits.shape[0]
        entropy_rows = num_rows if with_entropy else 0
        return (
            logits.new_empty(num_rows, dtype=torch.float32),
            logits.new_empty(entropy_rows, dtype=torch.float32),
            logits.new_empty(num_rows, dtype=torch.float64),
        )

    @torch.library.register_fake("fastmath::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
        return None

    def _token_logprobs_setup_context(ctx, inputs, output):
        logits, targets, temperature, with_entropy = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
        ctx.mark_non_differentiable(lse)  # a statistic saved for backward, not a result
        ctx.set_materialize_grads(False)
        ctx.temperature = temperature

    def _token_logprobs_autograd_backward(ctx, grad_logp, grad_entropy, grad_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        upstream = upstream_grads(lse, entropy, grad_logp, grad_entropy)
        if upstream is None:
            return None, None, None, None
        grad_logits = torch.empty_like(logits)
        grad_logp, grad_entropy = upstream
        _cuda_rows_backward(
            grad_logits, logits, targets, lse, entropy, fp32_rows(grad_logp), fp32_rows(grad_entropy), ctx.temperature
        )
        return grad_logits, None, None, None

    torch.library.register_autograd(
        "fastmath::token_logprobs_forward", _token_logprobs_autograd_backward,
        setup_context=_token_logprobs_setup_context,
    )


if has_cuda_op("grpo_token_loss_forward"):

    @torch.library.register_fake("fastmath::grpo_token_loss_forward")
    def _grpo_token_loss_forward_fake(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        return torch.empty_like(logp, dtype=torch.float32)

    @torch.library.register_fake("fastmath::grpo_token_loss_backward")
    def _grpo_token_loss_backward_fake(grad_loss, logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
        return torch.empty_like(logp, dtype=torch.float32)

    def _grpo_autograd_backward(ctx, grad_loss):
        return logp_grad(ctx, grad_loss, _cuda_grpo_backward), None, None, None, None, None, None

    torch.library.register_autograd(
        "fastmath::grpo_token_loss_forward", _grpo_autograd_backward, setup_context=save_loss_inputs
    )


if has_cuda_op("group_advantages"):

    @torch.library.register_fake("fastmath::group_advantages")
    def _group_advantages_fake(rewards, group_size, scale_mode, eps):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)
