"""Token log-probs of `hidden @ weight.T` computed a chunk of tokens at a time.

The full [tokens, vocab] logits never exist. On GPU backends each chunk of tokens' fp32 logits
goes through the row kernels of token_logprobs and is dropped; the backward pass recomputes
each chunk's logits (the upstream per-token gradient is unknown during the forward) and
accumulates the weight gradient in fp32. The torch path slices the vocabulary instead
(linear_vocab_chunks), which suits CPU matmuls better; chunk_size then sets the slice so that
one slice holds as many logits as chunk_size tokens' rows.

This file holds the public function, its autograd.Function and the contract of its backends
(LinearTokenLogprobsBackend); the implementations live in fastmath_kernels/backends/.
"""

from typing import NamedTuple, Protocol

import torch

from ._checks import check_targets, check_temperature
from ._dispatch import resolve_backend
from ._registry import define_op, implementation
from .chunked_linear import check_linear_arguments, check_low_memory, resolve_chunk_size

OP = "linear_token_logprobs"


class LinearSettings(NamedTuple):
    temperature: float
    chunk_size: int
    low_memory: bool


class LinearTokenLogprobsBackend(Protocol):
    """A strategy over rows [N, H], weight [V, H], targets [N]; settings is a LinearSettings."""

    def forward(self, rows, weight, targets, with_entropy, settings):
        """-> (float32 logp [N], float32 entropy [N] or None, float64 lse [N])."""

    def backward(self, rows, weight, targets, lse, entropy, grad_logp, grad_entropy, settings, need_hidden,
                 need_weight):
        """-> (grad_hidden [N, H] or None, grad_weight [V, H] or None), in the inputs' dtypes."""


define_op(OP, LinearTokenLogprobsBackend)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Runs a backend's strategy forward and backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size, backend, low_memory):
        rows = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        ctx.set_materialize_grads(False)
        settings = LinearSettings(temperature, chunk_size, low_memory)
        logp, entropy, lse = implementation(OP, backend).forward(rows, weight, flat_targets, with_entropy, settings)
        ctx.save_for_backward(rows, weight, flat_targets, lse, entropy)
        ctx.settings, ctx.backend, ctx.hidden_shape = settings, backend, hidden.shape
        return logp.view(targets.shape), (entropy.view(targets.shape) if with_entropy else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        rows, weight, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = lse.new_zeros(lse.shape, dtype=torch.float32)
        grad_logp = grad_logp.reshape(-1).float()
        grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float()
        grad_hidden, grad_weight = implementation(OP, ctx.backend).backward(
            rows, weight, targets, lse, entropy, grad_logp, grad_entropy, ctx.settings,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_token_logprobs(
    hidden, weight, targets, *, temperature=1.0, with_entropy=False, chunk_size=None, backend=None,
    low_memory=False,
):
    """log_softmax((hidden @ weight.T) / temperature) at targets, never holding the full logits.

    hidden: [..., H]; weight: [V, H] of the same dtype; targets: [...] int64 in [0, V).
    chunk_size: tokens per chunk (default: a chunk of fp32 logits near 32 MB on CPU, 1 GB on GPU).
    Returns float32 logp [...] or (logp, entropy). Gradients flow to hidden and weight.
    low_memory: no fp32 [V, H] weight-gradient buffer on GPU backends (the weight gradient is
    computed one vocabulary slice at a time, at the cost of one more logits matmul), and default
    chunks sized near 15% of the gradients returned.
    An out-of-range target raises ValueError on CPU tensors; on GPU tensors it is checked
    without a host sync and fails at the next sync (FASTMATH_CHECK_TARGETS=1: a ValueError here).
    """
    check_linear_arguments(hidden, weight, chunk_size)
    check_targets(targets, hidden.shape[:-1], weight.shape[0])
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    check_temperature(temperature)
    check_low_memory(low_memory)
    backend = resolve_backend(backend, hidden, op=OP)
    chunk_size = resolve_chunk_size(chunk_size, targets.numel(), weight, low_memory)
    logp, entropy = _LinearTokenLogprobs.apply(
        hidden, weight, targets, float(temperature), with_entropy, chunk_size, backend, low_memory
    )
    return (logp, entropy) if with_entropy else logp
