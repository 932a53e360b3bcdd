"""Token log-probs of `hidden @ weight.T` computed a chunk of tokens at a time.

The full [tokens, vocab] logits never exist. On GPU backends each chunk of tokens' fp32 logits
goes through the row kernels of token_logprobs and is dropped; the backward pass recomputes
each chunk's logits (the upstream per-token gradient is unknown during the forward) and
accumulates the weight gradient in fp32. The torch path slices the vocabulary instead
(linear_vocab_chunks), which suits CPU matmuls better; chunk_size then sets the slice so that
one slice holds as many logits as chunk_size tokens' rows.

A backend of this op (the registry's "linear_token_logprobs" table) is a strategy with
  forward(rows [N, H], weight [V, H], targets [N], with_entropy, settings)
      -> (float32 logp [N], float32 entropy [N] or None, float64 lse [N])
  backward(rows, weight, targets, lse, entropy, grad_logp, grad_entropy, settings, need_hidden, need_weight)
      -> (grad_hidden [N, H] or None, grad_weight [V, H] or None), in the inputs' dtypes
where settings is a LinearSettings.
"""

from typing import NamedTuple

import torch

from ._checks import check_targets, check_temperature
from ._dispatch import resolve_backend
from ._registry import implementation, register_backend
from .chunked_linear import (
    ChunkedLinear,
    check_linear_arguments,
    check_low_memory,
    chunk_bounds,
    finish_weight_grad,
    grad_logits_target,
    logprob_slice_backward,
    resolve_chunk_size,
    vocab_slice_size,
    weight_grad_buffer,
    weight_grad_by_vocab_slices,
)
from .linear_vocab_chunks import vocab_chunked_backward, vocab_chunked_forward
from .token_logprobs import Workspace, logprob_rows_backward, logprob_rows_forward

OP = "linear_token_logprobs"


class LinearSettings(NamedTuple):
    temperature: float
    chunk_size: int
    low_memory: bool


class VocabSlicedLogprobs:
    """The torch path: every token against one slice of the vocabulary at a time."""

    @staticmethod
    def forward(rows, weight, targets, with_entropy, settings):
        slice_size = vocab_slice_size(settings.chunk_size, rows.shape[0], weight.shape[0])
        return vocab_chunked_forward(rows, weight, targets, settings.temperature, with_entropy, slice_size)

    @staticmethod
    def backward(rows, weight, targets, lse, entropy, grad_logp, grad_entropy, settings, need_hidden, need_weight):
        slice_size = vocab_slice_size(settings.chunk_size, rows.shape[0], weight.shape[0])
        return vocab_chunked_backward(
            rows, weight, targets, lse, entropy, grad_logp, grad_entropy, settings.temperature, slice_size,
            need_hidden, need_weight,
        )


class TokenChunkedLogprobs:
    """The GPU path: chunks of tokens through row_backend's token_logprobs row kernels."""

    def __init__(self, row_backend):
        self.row_backend = row_backend

    def forward(self, rows, weight, targets, with_entropy, settings):
        num_tokens = rows.shape[0]
        projection = ChunkedLinear(rows, weight)
        logp = torch.empty(num_tokens, dtype=torch.float32, device=rows.device)
        lse = torch.empty(num_tokens, dtype=torch.float64, device=rows.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        buffer = projection.logits_buffer(settings.chunk_size)
        workspace = Workspace(weight.shape[0], rows.device, logits_are_scratch=True)
        for start, end in chunk_bounds(num_tokens, settings.chunk_size):
            chunk_logp, chunk_entropy, chunk_lse = logprob_rows_forward(
                projection.logits(start, end, buffer), targets[start:end], settings.temperature, with_entropy,
                self.row_backend, workspace,
            )
            logp[start:end], lse[start:end] = chunk_logp, chunk_lse
            if with_entropy:
                entropy[start:end] = chunk_entropy
        return logp, entropy, lse

    def backward(
        self, rows, weight, targets, lse, entropy, grad_logp, grad_entropy, settings, need_hidden, need_weight
    ):
        # low_memory: the weight gradient comes from a second pass over vocabulary slices.
        weight_by_slices = need_weight and settings.low_memory
        grad_hidden = torch.empty_like(rows) if need_hidden else None
        grad_weight = weight_grad_buffer(weight) if need_weight and not weight_by_slices else None
        projection = ChunkedLinear(rows, weight)
        upstream = (lse, entropy, grad_logp, grad_entropy)
        if need_hidden or grad_weight is not None:
            # Its chunk buffers are freed on return, before the weight gradient is rounded: the
            # peak holds one or the other.
            self._grads_by_token_chunks(projection, targets, upstream, settings, grad_hidden, grad_weight)
        if weight_by_slices:
            def slice_grad(grad_logits, logits, start):
                logprob_slice_backward(grad_logits, logits, targets, start, *upstream, settings.temperature,
                                       self.row_backend)

            slice_size = vocab_slice_size(settings.chunk_size, rows.shape[0], weight.shape[0])
            grad_weight = weight_grad_by_vocab_slices(projection, slice_size, slice_grad)
        elif need_weight:
            grad_weight = finish_weight_grad(grad_weight, weight)
        return grad_hidden, grad_weight

    def _grads_by_token_chunks(self, projection, targets, upstream, settings, grad_hidden, grad_weight_fp32):
        """Fills grad_hidden and adds into grad_weight_fp32 (either may be None), a chunk at a time."""
        lse, entropy, grad_logp, grad_entropy = upstream
        buffer = projection.logits_buffer(settings.chunk_size)
        workspace = Workspace(projection.weight.shape[0], buffer.device)
        grad_buffer = projection.grad_logits_buffer(projection.chunk_elements(settings.chunk_size))
        for start, end in chunk_bounds(projection.hidden.shape[0], settings.chunk_size):
            logits = projection.logits(start, end, buffer)
            grad_logits = grad_logits_target(grad_buffer, logits)
            logprob_rows_backward(
                grad_logits, logits, targets[start:end], lse[start:end],
                None if entropy is None else entropy[start:end], grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end], settings.temperature, self.row_backend,
                workspace,
            )
            projection.accumulate_grads(grad_logits, start, end, grad_hidden, grad_weight_fp32, scratch=buffer)


register_backend(OP, "cuda", TokenChunkedLogprobs("cuda"))
register_backend(OP, "triton", TokenChunkedLogprobs("triton"))
register_backend(OP, "torch", VocabSlicedLogprobs())


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
