"""Token log-probs (and entropy) of logits at target ids, without an fp32 copy of the logits.

The row machinery here, `logprob_rows_forward` and `logprob_rows_backward`, is shared with the
fused-linear ops, which feed it one chunk of logits at a time.
"""

import torch

from ._checks import check_targets, check_temperature, check_tensor
from ._dispatch import has_cuda_op, resolve_backend

# Rows per chunk of the torch path: a chunk's fp32 temporaries stay near 16 MB.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


def _reference_chunks(num_rows, vocab_size):
    rows = max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, num_rows, rows):
        yield start, min(start + rows, num_rows)


def logprob_rows_forward_reference(logits, targets, temperature, with_entropy):
    """Torch path: logits [N, V] -> float32 (logp [N], entropy [N] or None, lse [N]), chunked."""
    num_rows = logits.shape[0]
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    for start, end in _reference_chunks(num_rows, logits.shape[1]):
        # Work relative to the row max: at logits near 1e4, z - lse would lose ~1e-3 to rounding.
        shifted = (logits[start:end].float() / temperature)
        row_max = shifted.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        shifted.sub_(row_max)
        log_sum = shifted.exp().sum(dim=-1, keepdim=True).log_()
        lse[start:end] = (row_max + log_sum).squeeze(1)
        logp[start:end] = (shifted.gather(1, targets[start:end, None]) - log_sum).squeeze(1)
        if with_entropy:
            log_probs = shifted.sub_(log_sum)
            entropy[start:end] = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy, lse


def logprob_rows_backward_reference(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
    """Torch path: writes d(loss)/d(logits) into grad_logits (which may be logits itself).

    grad = (g * (onehot - p) - g_entropy * p * (log p + H)) / T, computed in fp32.
    """
    use_entropy = grad_entropy is not None and entropy is not None
    for start, end in _reference_chunks(logits.shape[0], logits.shape[1]):
        log_probs = (logits[start:end].float() / temperature).sub_(lse[start:end, None])
        probs = log_probs.exp()
        grad = probs * (-grad_logp[start:end, None])
        grad.scatter_add_(1, targets[start:end, None], grad_logp[start:end, None])
        if use_entropy:
            log_probs.add_(entropy[start:end, None]).mul_(probs).mul_(grad_entropy[start:end, None])
            grad.sub_(log_probs)
        grad_logits[start:end].copy_(grad.div_(temperature))


def logprob_rows_forward(logits, targets, temperature, with_entropy, backend):
    """(logp, entropy or None, lse), all float32 [N], for logits [N, V] with a contiguous last dim."""
    if backend == "torch":
        return logprob_rows_forward_reference(logits, targets, temperature, with_entropy)
    if backend == "triton":
        from .triton.token_logprobs import logprob_rows_forward_triton

        return logprob_rows_forward_triton(logits, targets, temperature, with_entropy)
    logp, entropy, lse = torch.ops.fastmath.token_logprobs_forward(logits, targets, float(temperature), with_entropy)
    return logp, (entropy if with_entropy else None), lse


def logprob_rows_backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    """Writes the logits gradient into grad_logits ([N, V], any float dtype; may alias logits)."""
    grad_logp = grad_logp.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
    if backend == "torch":
        logprob_rows_backward_reference(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature)
    elif backend == "triton":
        from .triton.token_logprobs import logprob_rows_backward_triton

        logprob_rows_backward_triton(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature)
    else:
        torch.ops.fastmath.token_logprobs_backward(
            grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature)
        )


def _as_rows(logits):
    """[..., V] -> [N, V] whose last dim is contiguous (a view whenever possible)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, backend):
        rows = _as_rows(logits)
        flat_targets = targets.reshape(-1)
        logp, entropy, lse = logprob_rows_forward(rows, flat_targets, temperature, with_entropy, backend)
        ctx.save_for_backward(rows, flat_targets, lse, entropy)
        ctx.temperature, ctx.backend, ctx.logits_shape = temperature, backend, logits.shape
        if entropy is None:
            return logp.view(targets.shape), None
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        rows, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logits = torch.empty_like(rows)
        logprob_rows_backward(
            grad_logits, rows, targets, lse, entropy, grad_logp.reshape(-1),
            None if grad_entropy is None else grad_entropy.reshape(-1), ctx.temperature, ctx.backend,
        )
        return grad_logits.view(ctx.logits_shape), None, None, None, None


def token_logprobs(logits, targets, *, temperature=1.0, with_entropy=False, backend=None):
    """log_softmax(logits / temperature) gathered at targets, optionally with the entropy.

    logits: [..., V], any float dtype; targets: [...] int64 in [0, V).
    Returns float32 logp [...] or (logp, entropy) when with_entropy. Differentiable w.r.t.
    logits; the gradient comes back in the logits' dtype and no fp32 [..., V] copy is made.
    """
    check_tensor(logits, "logits", floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[:-1], logits.shape[-1])
    check_temperature(temperature)
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    backend = resolve_backend(backend, logits)
    if backend == "cuda" and logits.dtype == torch.float64:
        backend = "triton" if logits.is_cuda else "torch"  # the CUDA kernels cover 16/32-bit floats
    temperature = float(temperature)
    if backend == "cuda":
        rows = _as_rows(logits)
        logp, entropy, _ = torch.ops.fastmath.token_logprobs_forward(rows, targets.reshape(-1), temperature, with_entropy)
        logp = logp.view(targets.shape)
        return (logp, entropy.view(targets.shape)) if with_entropy else logp
    logp, entropy = _TokenLogprobs.apply(logits, targets, temperature, with_entropy, backend)
    return (logp, entropy) if with_entropy else logp


if has_cuda_op("token_logprobs_forward"):

    @torch.library.register_fake("fastmath::token_logprobs_forward")
    def _token_logprobs_forward_fake(logits, targets, temperature, with_entropy):
        num_rows = logits.shape[0]
        entropy_rows = num_rows if with_entropy else 0
        return (
            logits.new_empty(num_rows, dtype=torch.float32),
            logits.new_empty(entropy_rows, dtype=torch.float32),
            logits.new_empty(num_rows, dtype=torch.float32),
        )

    @torch.library.register_fake("fastmath::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
        return None

    def _token_logprobs_setup_context(ctx, inputs, output):
        logits, targets, temperature, with_entropy = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
        ctx.mark_non_differentiable(lse)  # a statistic saved for backward, not a result
        ctx.temperature = temperature

    def _token_logprobs_autograd_backward(ctx, grad_logp, grad_entropy, grad_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if entropy is None:
            grad_entropy = None
        grad_logits = torch.empty_like(logits)
        torch.ops.fastmath.token_logprobs_backward(
            grad_logits, logits, targets, lse, entropy, grad_logp.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(), ctx.temperature,
        )
        return grad_logits, None, None, None

    torch.library.register_autograd(
        "fastmath::token_logprobs_forward", _token_logprobs_autograd_backward, setup_context=_token_logprobs_setup_context
    )
