"""Token log-probs (and entropy) of logits at target ids, without an fp32 copy of the logits.

The public function, its autograd.Function and the contract of the op's backends: row kernels
(TokenLogprobsBackend) that the op runs block by block, and that the fused-linear ops feed one
chunk of logits at a time through logprob_rows_forward and logprob_rows_backward. lse is
T * logsumexp(logits / T), in the logits' units (see lse_parts); workspace is the torch path's
reusable buffers (Workspace), which other kernels ignore. The implementations live in
fastmath_kernels/backends/.
"""

from typing import Protocol

import torch

from ._checks import check_targets, check_temperature, check_tensor
from ._dispatch import resolve_backend
from ._registry import define_op, implementation

OP = "token_logprobs"


class TokenLogprobsBackend(Protocol):
    """Row kernels on logits [N, V] with a contiguous last dim.

    differentiable: forward records its own gradient (a custom op with an autograd registration),
    so token_logprobs calls it directly; otherwise _TokenLogprobs pairs forward with backward.
    backward is needed either way: the fused-linear ops call it on each chunk.
    """

    differentiable: bool

    def forward(self, logits, targets, temperature, with_entropy, workspace):
        """-> (float32 logp [N], float32 entropy [N] or None, float64 lse [N])."""

    def backward(self, grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, workspace):
        """Writes d(loss)/d(logits) into grad_logits ([N, V], any float dtype; may alias logits)."""


define_op(OP, TokenLogprobsBackend)

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


def logprob_rows_forward(logits, targets, temperature, with_entropy, backend, workspace=None):
    """(logp, entropy or None, lse) [N] for logits [N, V] with a contiguous last dim, by `backend`'s kernels."""
    return implementation(OP, backend).forward(logits, targets, temperature, with_entropy, workspace)


def logprob_rows_backward(
    grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, backend, workspace=None
):
    """Writes the logits gradient into grad_logits ([N, V], any float dtype; may alias logits)."""
    implementation(OP, backend).backward(
        grad_logits, logits, targets, lse, entropy, fp32_rows(grad_logp), fp32_rows(grad_entropy), temperature,
        workspace,
    )


def fp32_rows(grad):
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


def upstream_grads(lse, entropy, grad_logp, grad_entropy):
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
        upstream = upstream_grads(lse, entropy, *flat)
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

