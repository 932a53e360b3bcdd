"""The fused-linear ops on top of a backend's token_logprobs row kernels, shared by "cuda" and "triton".

Chunks of tokens' fp32 logits go through the named backend's row kernels and are dropped; the
backward recomputes each chunk's logits and accumulates the weight gradient in fp32.
"""

import functools

import torch

from ..chunked_linear import (
    ChunkedLinear,
    chunk_bounds,
    finish_weight_grad,
    grad_logits_target,
    logprob_slice_backward,
    vocab_slice_size,
    weight_grad_buffer,
    weight_grad_by_vocab_slices,
)
from ..linear_cross_entropy import CrossEntropyKernels
from ..token_logprobs import Workspace, logprob_rows_backward, logprob_rows_forward


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


def _row_kernel_rows(logits, targets, row_grad, grad_logits, workspace, *, backend):
    logp, _, lse = logprob_rows_forward(logits, targets, 1.0, False, backend, workspace)
    if grad_logits is not None:
        logprob_rows_backward(grad_logits, logits, targets, lse, None, row_grad, None, 1.0, backend, workspace)
    return logp, lse


def _row_kernel_slice_grad(grad_logits, logits, targets, start, lse, row_grad, *, backend):
    logprob_slice_backward(grad_logits, logits, targets, start, lse, None, row_grad, None, 1.0, backend)


def row_kernel_cross_entropy(backend):
    """Cross-entropy from a GPU backend's token_logprobs row kernels (forward, then backward)."""
    return CrossEntropyKernels(
        functools.partial(_row_kernel_rows, backend=backend), functools.partial(_row_kernel_slice_grad, backend=backend)
    )


