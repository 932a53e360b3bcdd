"""Row-wise log-softmax statistics at target ids (forward) and the logits gradient (backward).

Forward: one program per row streams the row once with an online log-sum-exp, keeping
  m = running max of the raw logits x, s = sum exp(u), w = sum exp(u) * u, u = (x - m) / T
so that entropy = log(s) - w / s needs no subtraction of large numbers, and the float64
lse = m + T log(s) (the logits' units) is rounded nowhere near 1e4.
Backward: elementwise over [rows, column blocks]: log p = ((x - lse_hi) - lse_lo) / T.
"""

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
_LOG_PROB_FLOOR = tl.constexpr(-1e20)


@triton.jit
def _logprob_rows_forward_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    vocab_size,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    running_max = tl.full((), _NEG_INF, tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    sum_exp_shifted = tl.zeros((), tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab_size
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # A row (so far) of -inf logits keeps everything at zero instead of producing NaN.
        safe_max = tl.where(new_max == _NEG_INF, 0.0, new_max)
        rescale = tl.exp((running_max - safe_max) * inv_temperature)
        u = (x - safe_max) * inv_temperature
        exps = tl.where(in_row, tl.exp(u), 0.0)
        if WITH_ENTROPY:
            shift = tl.where(sum_exp > 0.0, (running_max - safe_max) * inv_temperature, 0.0)
            shifted = tl.where(exps > 0.0, u, 0.0)
            block_weighted = tl.sum(exps * shifted, axis=0)
            sum_exp_shifted = rescale * (sum_exp_shifted + sum_exp * shift) + block_weighted
        sum_exp = sum_exp * rescale + tl.sum(exps, axis=0)
        running_max = new_max
    log_sum = tl.log(sum_exp)
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    # Relative to the max, with no lse ~ 1e4 in between: small log-probs keep full precision.
    tl.store(logp_ptr + row, (target_logit - running_max) * inv_temperature - log_sum)
    # float64: near 1e4 a float32 lse would be off by up to 5e-4, and every p in the backward with it.
    lse = running_max.to(tl.float64) + log_sum.to(tl.float64) / inv_temperature
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_sum - sum_exp_shifted / sum_exp)


@triton.jit
def _logprob_rows_backward_kernel(
    grad_logits_ptr,
    grad_row_stride,
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    vocab_size,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < vocab_size
    z = tl.load(logits_ptr + row * logits_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    # The float64 lse as two float32 parts: z - lse_hi is exact where p matters (z near the
    # lse), and lse_lo carries the rest; only then is the difference divided by T.
    lse = tl.load(lse_ptr + row)
    lse_hi = lse.to(tl.float32)
    lse_lo = tl.where(lse == lse_hi.to(tl.float64), 0.0, (lse - lse_hi.to(tl.float64)).to(tl.float32))
    # log p <= 0 in exact arithmetic: the upper clamp keeps masked lanes from overflowing, the
    # lower one turns -inf logits into a finite floor so that 0 * log p stays 0, not NaN.
    log_probs = tl.minimum(tl.maximum(((z - lse_hi) - lse_lo) * inv_temperature, _LOG_PROB_FLOOR), 0.0)
    probs = tl.exp(log_probs)
    grad_logp = tl.load(grad_logp_ptr + row)
    target = tl.load(targets_ptr + row)
    grad = tl.where(cols == target, grad_logp, 0.0) - grad_logp * probs
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
        grad -= grad_entropy * probs * (log_probs + entropy)
    grad = grad * inv_temperature
    out_ptr = grad_logits_ptr + row * grad_row_stride + cols
    tl.store(out_ptr, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block_size(vocab_size, limit):
    return min(triton.next_power_of_2(vocab_size), limit)


def logprob_rows_forward_triton(logits, targets, temperature, with_entropy):
    num_rows, vocab_size = logits.shape
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float64, device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    if num_rows == 0:
        return logp, entropy, lse
    _logprob_rows_forward_kernel[(num_rows,)](
        logits, logits.stride(0), targets.contiguous(), logp, entropy if with_entropy else logp, lse,
        vocab_size, 1.0 / temperature,
        WITH_ENTROPY=with_entropy, BLOCK_V=_block_size(vocab_size, 4096),
    )
    return logp, entropy, lse


def logprob_rows_backward_triton(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    with_entropy = grad_entropy is not None and entropy is not None
    block_v = _block_size(vocab_size, 4096)
    grid = (num_rows, triton.cdiv(vocab_size, block_v))
    _logprob_rows_backward_kernel[grid](
        grad_logits, grad_logits.stride(0), logits, logits.stride(0), targets.contiguous(), lse,
        entropy if with_entropy else grad_logp, grad_logp, grad_entropy if with_entropy else grad_logp,
        vocab_size, 1.0 / temperature,
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v,
    )
