"""Token log-probs (and entropy) of logits at target ids, without an fp32 copy of the logits.

The op's backends are row kernels (a Kernels pair per backend in the registry's
"token_logprobs" table):
  forward(logits [N, V], targets [N], temperature, with_entropy, workspace)
      -> (float32 logp [N], float32 entropy [N] or None, float64 lse [N])
  backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, workspace)
      writes d(loss)/d(logits) into grad_logits ([N, V], any float dtype; may alias logits)
lse is T * logsumexp(logits / T), in the logits' units (see lse_parts). workspace is the torch
path's reusable buffers, or None; other kernels ignore it. The fused-linear ops feed the same
row kernels one chunk of logits at a time, through logprob_rows_forward and logprob_rows_backward.
"""

import torch

from ._checks import check_targets, check_temperature, check_tensor
from ._dispatch import has_cuda_op, resolve_backend
from ._registry import Kernels, implementation, register_backend

OP = "token_logprobs"
# The CUDA kernels cover 16- and 32-bit floats; float64 logits go to the next backend.
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Stand-in for log(0) in products with probabilities: exp() of it is 0 and 0 * it is 0,
# where -inf would give NaN. Small enough that no real log-probability reaches it.
LOG_PROB_FLOOR = -1e20

# Rows per sub-chunk of the torch path: each fp32 work buffer stays near 16 MB.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


class Workspace:
    """Reusable fp32 buffers of one sub-chunk for the torch path: chunk loops allocate nothing.

    Fresh multi-megabyte allocations cost page faults on every chunk, which on a CPU is
    slower than the arithmetic done in them. logits_are_scratch: the callers' fp32 logits are
    theirs to drop (they recompute them), so the forward may work on them in place.
    """

    def __init__(self, vocab_size, device, logits_are_scratch=False):
        self.rows = max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab_size, 1))
        self.vocab_size, self.device = vocab_size, device
        self.logits_are_scratch = logits_are_scratch
        self.buffers = {}

    def get(self, name, rows):
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.rows, self.vocab_size, dtype=torch.float32, device=self.device)
        return self.buffers[name][:rows]

    def chunks(self, num_rows):
        for start in range(0, num_rows, self.rows):
            yield start, min(start + self.rows, num_rows)


def row_lse(row_max, log_sum, temperature):
    """float64 T * logsumexp(z / T) from the raw row max and log sum exp((z - max) / T)."""
    return row_max.double() + temperature * log_sum.double()


def lse_parts(lse):
    """float32 (hi, lo) with hi + lo = the float64 lse [N].

    The lse of a row is T * logsumexp(z / T), in the logits' own units, so that
    log p = ((z - hi) - lo) / T: z - hi is exact where p matters (z near the lse), lo carries
    the rest, and nothing near 1e4 is rounded before the division. A single float32 lse, or
    z / T rounded before the subtraction, would be off by up to 5e-4 there.
    """
    hi = lse.float()
    lo = torch.where(torch.isfinite(lse), lse - hi.double(), 0.0).float()
    return hi, lo


def _is_same_fp32_tensor(a, b):
    return a.dtype == torch.float32 and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def logprob_rows_forward_reference(logits, targets, temperature, with_entropy, workspace=None):
    """Torch path: logits [N, V] -> (logp [N], entropy [N] or None) in float32, and float64 lse [N].

    With workspace.logits_are_scratch (fp32 logits the caller will recompute or drop) the work
    happens in place and the logits are overwritten.
    """
    num_rows, vocab_size = logits.shape
    workspace = workspace or Workspace(vocab_size, logits.device)
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float64, device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    in_place = workspace.logits_are_scratch and logits.dtype == torch.float32
    for start, end in workspace.chunks(num_rows):
        rows = end - start
        shifted = logits[start:end] if in_place else workspace.get("work", rows).copy_(logits[start:end])
        # Relative to the row max, then scaled: at logits near 1e4, z / T or z - lse would each
        # lose ~1e-3 to rounding, z - max loses nothing.
        row_max = shifted.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        shifted.sub_(row_max)
        if temperature != 1.0:
            shifted.div_(temperature)
        target_shifted = shifted.gather(1, targets[start:end, None])
        # -inf logits (masked tokens) become a finite floor: exp gives 0 and 0 * floor stays 0.
        shifted.clamp_(min=LOG_PROB_FLOOR)
        exps = torch.exp(shifted, out=workspace.get("exps", rows))
        sum_exp = exps.sum(dim=-1, keepdim=True)
        log_sum = sum_exp.log()
        lse[start:end] = row_lse(row_max, log_sum, temperature).squeeze(1)
        logp[start:end] = (target_shifted - log_sum).squeeze(1)
        if with_entropy:
            # H = log s - sum(e * (z - m)) / s with e = exp(z - m), s = sum e.
            entropy[start:end] = (log_sum - exps.mul_(shifted).sum(dim=-1, keepdim=True) / sum_exp).squeeze(1)
    return logp, entropy, lse


def logprob_rows_backward_reference(
    grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, workspace=None
):
    """Torch path: writes d(loss)/d(logits) into grad_logits (which may be logits itself).

    grad = (g * onehot - p * (g + g_entropy * (log p + H))) / T, computed in fp32.
    """
    num_rows, vocab_size = logits.shape
    workspace = workspace or Workspace(vocab_size, logits.device)
    use_entropy = grad_entropy is not None and entropy is not None
    in_place = _is_same_fp32_tensor(grad_logits, logits)
    target_grad = (grad_logp / temperature)[:, None]
    lse_hi, lse_lo = lse_parts(lse)
    for start, end in workspace.chunks(num_rows):
        rows = end - start
        work = logits[start:end] if in_place else workspace.get("work", rows).copy_(logits[start:end])
        log_probs = work.sub_(lse_hi[start:end, None]).sub_(lse_lo[start:end, None])
        if temperature != 1.0:
            log_probs.div_(temperature)
        log_probs.clamp_(min=LOG_PROB_FLOOR)
        if use_entropy:
            probs = torch.exp(log_probs, out=workspace.get("exps", rows))
            weight = log_probs.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None])
            work = weight.add_(grad_logp[start:end, None]).mul_(probs).mul_(-1.0 / temperature)
        else:
            work = log_probs.exp_().mul_(-target_grad[start:end])
        work.scatter_add_(1, targets[start:end, None], target_grad[start:end])
        if not in_place:
            grad_logits[start:end].copy_(work)


def _triton_rows_forward(logits, targets, temperature, with_entropy, workspace=None):
    from .triton.token_logprobs import logprob_rows_forward_triton

    return logprob_rows_forward_triton(logits, targets, temperature, with_entropy)


def _triton_rows_backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                          workspace=None):
    from .triton.token_logprobs import logprob_rows_backward_triton

    logprob_rows_backward_triton(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature)


def _cuda_rows_forward(logits, targets, temperature, with_entropy, workspace=None):
    logp, entropy, lse = torch.ops.fastmath.token_logprobs_forward(logits, targets, float(temperature), with_entropy)
    return logp, (entropy if with_entropy else None), lse


def _cuda_rows_backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                        workspace=None):
    torch.ops.fastmath.token_logprobs_backward(
        grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature)
    )


# The CUDA forward is a custom op with its own autograd registration (below), so token_logprobs
# calls it directly and torch.compile sees the op; the others go through _TokenLogprobs.
register_backend(
    OP, "cuda", Kernels(_cuda_rows_forward, _cuda_rows_backward, differentiable=True), dtypes=_CUDA_DTYPES
)
register_backend(OP, "triton", Kernels(_triton_rows_forward, _triton_rows_backward))
register_backend(OP, "torch", Kernels(logprob_rows_forward_reference, logprob_rows_backward_reference))


def logprob_rows_forward(logits, targets, temperature, with_entropy, backend, workspace=None):
    """(logp, entropy or None, lse) [N] for logits [N, V] with a contiguous last dim, by `backend`'s kernels."""
    return implementation(OP, backend).forward(logits, targets, temperature, with_entropy, workspace)


def logprob_rows_backward(
    grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, backend, workspace=None
):
    """Writes the logits gradient into grad_logits ([N, V], any float dtype; may alias logits)."""
    implementation(OP, backend).backward(
        grad_logits, logits, targets, lse, entropy, _fp32_rows(grad_logp), _fp32_rows(grad_entropy), temperature,
        workspace,
    )


def _fp32_rows(grad):
    """An upstream gradient as the row kernels read it: contiguous float32, or None."""
    return None if grad is None else grad.float().contiguous()


def row_blocks(logits):
    """2-D [rows, V] views of logits (last dim contiguous) covering its rows in order, no copy.

    A view such as logits[:, :-1] cannot merge its leading dims into one row stride; it is
    split along the first dim instead of being copied.
    """
    vocab_size = logits.shape[-1]
    if logits.stride(-1) != 1:
        return [logits.reshape(-1, vocab_size).contiguous()]
    try:
        return [logits.view(-1, vocab_size)]
    except RuntimeError:
        return [block for part in logits.unbind(0) for block in row_blocks(part)]


def _offsets(blocks):
    start = 0
    for block in blocks:
        yield block, start, start + block.shape[0]
        start += block.shape[0]


def _forward_by_blocks(logits, flat_targets, temperature, with_entropy, backend):
    """Flat (logp, entropy or None, lse) over every row of logits, one row-kernel call per block."""
    outputs = [
        logprob_rows_forward(block, flat_targets[start:end], temperature, with_entropy, backend)
        for block, start, end in _offsets(row_blocks(logits))
    ]
    logp, lse = (torch.cat([out[i] for out in outputs]) for i in (0, 2))
    entropy = torch.cat([out[1] for out in outputs]) if with_entropy else None
    return logp, entropy, lse


def _upstream_grads(lse, entropy, grad_logp, grad_entropy):
    """(grad_logp, grad_entropy or None), a missing logp gradient as zeros; None when neither came."""
    if grad_logp is None and grad_entropy is None:
        return None
    if grad_logp is None:
        grad_logp = lse.new_zeros(lse.shape, dtype=torch.float32)
    return grad_logp, (None if entropy is None else grad_entropy)


class _TokenLogprobs(torch.autograd.Function):
    """Pairs a backend's row-kernel forward with its backward, block by block (see row_blocks)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, backend):
        ctx.set_materialize_grads(False)
        flat_targets = targets.reshape(-1)
        logp, entropy, lse = _forward_by_blocks(logits, flat_targets, temperature, with_entropy, backend)
        ctx.save_for_backward(logits, flat_targets, lse, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        return logp.view(targets.shape), (entropy.view(targets.shape) if with_entropy else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        flat = [None if grad is None else grad.reshape(-1) for grad in (grad_logp, grad_entropy)]
        upstream = _upstream_grads(lse, entropy, *flat)
        if upstream is None:
            return None, None, None, None, None
        grad_logp, grad_entropy = upstream
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad_logits.view(-1, logits.shape[-1])
        for block, start, end in _offsets(row_blocks(logits)):
            logprob_rows_backward(
                grad_rows[start:end], block, targets[start:end], lse[start:end],
                None if entropy is None else entropy[start:end], grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end], ctx.temperature, ctx.backend,
            )
        return grad_logits, None, None, None, None


def token_logprobs(logits, targets, *, temperature=1.0, with_entropy=False, backend=None):
    """log_softmax(logits / temperature) gathered at targets, optionally with the entropy.

    logits: [..., V], any float dtype; targets: [...] int64 in [0, V).
    Returns float32 logp [...] or (logp, entropy) when with_entropy. Differentiable w.r.t.
    logits; the gradient comes back in the logits' dtype and no fp32 [..., V] copy is made.
    An out-of-range target raises ValueError on CPU tensors; on GPU tensors it is checked
    without a host sync and fails at the next sync (FASTMATH_CHECK_TARGETS=1: a ValueError here).
    """
    check_tensor(logits, "logits", floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[:-1], logits.shape[-1])
    check_temperature(temperature)
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    backend = resolve_backend(backend, logits, op=OP)
    temperature = float(temperature)
    if implementation(OP, backend).differentiable:
        logp, entropy, _ = _forward_by_blocks(logits, targets.reshape(-1), temperature, with_entropy, backend)
        logp, entropy = logp.view(targets.shape), (entropy.view(targets.shape) if with_entropy else None)
    else:
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
        upstream = _upstream_grads(lse, entropy, grad_logp, grad_entropy)
        if upstream is None:
            return None, None, None, None
        grad_logits = torch.empty_like(logits)
        grad_logp, grad_entropy = upstream
        _cuda_rows_backward(
            grad_logits, logits, targets, lse, entropy, _fp32_rows(grad_logp), _fp32_rows(grad_entropy), ctx.temperature
        )
        return grad_logits, None, None, None

    torch.library.register_autograd(
        "fastmath::token_logprobs_forward", _token_logprobs_autograd_backward,
        setup_context=_token_logprobs_setup_context,
    )
