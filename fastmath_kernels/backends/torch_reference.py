"""The "torch" backend: every op in plain torch, the reference the other backends are tested against.

It runs on every device and is the automatic choice wherever no backend of higher priority is
declared for the tensors' device type (all CPU tensors, with the built-in backends).
"""

import torch

from .._dispatch import REFERENCE_BACKEND
from .._registry import Kernels, declare_backend, register_backend, runs_anywhere
from ..chunked_linear import targets_in_slice, vocab_slice_size
from ..linear_cross_entropy import CrossEntropyKernels
from ..linear_vocab_chunks import vocab_chunked_backward, vocab_chunked_forward
from ..token_logprobs import LOG_PROB_FLOOR, Workspace, lse_parts, row_lse

PRIORITY = 0  # the last resort: any backend declared for a device type comes first there
# Rows per pass of the cross-entropy path: about 2 MB of fp32 logits, which stay in cache across the passes.
_CACHE_RESIDENT_ELEMENTS = 1 << 19


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



def grpo_token_loss_reference(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    """Torch path on float32 [B, T] log-probs and [B] advantages (autograd through torch ops)."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if ref_logp is not None and beta != 0.0:
        log_ratio_ref = ref_logp - logp
        loss = loss + beta * (torch.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    return loss



def _scaled(deviation, denominator):
    """deviation / denominator, with 0 where the denominator is 0 (eps=0 and equal rewards)."""
    return torch.where(denominator > 0, deviation / denominator, 0.0)


def group_advantages_reference(rewards, group_size, scale="group", eps=1e-4):
    """The torch implementation: fp32, vectorised over groups, no host sync."""
    grouped = rewards.float().view(-1, group_size)
    valid = torch.isfinite(grouped)
    count = valid.sum(dim=1, keepdim=True).float()
    mean = torch.where(valid, grouped, 0.0).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
    deviation = torch.where(valid, grouped - mean, 0.0)
    if scale == "group":
        variance = deviation.square().sum(dim=1, keepdim=True) / (count - 1.0).clamp_min(1.0)
        advantages = _scaled(deviation, variance.sqrt() + eps)
    elif scale == "batch":
        total = count.sum()
        batch_mean = torch.where(valid, grouped, 0.0).sum() / total.clamp_min(1.0)
        squares = torch.where(valid, grouped - batch_mean, 0.0).square().sum()
        batch_std = (squares / (total - 1.0).clamp_min(1.0)).sqrt()
        advantages = _scaled(deviation, batch_std + eps)
    else:
        advantages = deviation
    advantages = torch.where(valid & (count >= 2.0), advantages, 0.0)
    return advantages.view(rewards.shape)



def cross_entropy_rows_torch(logits, targets, row_grad, want_grad):
    """Torch path, in place on fp32 scratch logits [n, V]: returns (float32 logp [n], float64 lse [n]).

    With want_grad the logits are left holding d(loss)/d(logits) = row_grad * (onehot - p),
    computed from the same exponentials as the forward (no second pass over lse).
    """
    num_rows, vocab_size = logits.shape
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float64, device=logits.device)
    step = max(2, _CACHE_RESIDENT_ELEMENTS // vocab_size)
    for start in range(0, num_rows, step):
        end = min(start + step, num_rows)
        z, rows_targets = logits[start:end], targets[start:end, None]
        row_max = z.amax(dim=1, keepdim=True)
        z.sub_(row_max)
        target_shifted = z.gather(1, rows_targets)
        sum_exp = z.exp_().sum(dim=1, keepdim=True)
        log_sum = sum_exp.log()
        logp[start:end] = (target_shifted - log_sum).squeeze(1)
        lse[start:end] = row_lse(row_max, log_sum, 1.0).squeeze(1)
        if want_grad:
            rows_grad = row_grad[start:end, None]
            z.mul_(-rows_grad / sum_exp).scatter_add_(1, rows_targets, rows_grad)
    return logp, lse


def _torch_rows(logits, targets, row_grad, grad_logits, workspace):
    # grads_in_place: grad_logits, when given, is the logits themselves.
    return cross_entropy_rows_torch(logits, targets, row_grad, want_grad=grad_logits is not None)


def _torch_slice_grad(grad_logits, logits, targets, start, lse, row_grad):
    """The torch path's slice gradient: it masks targets outside the slice itself."""
    column, inside = targets_in_slice(targets, start, start + logits.shape[1])
    lse_hi, lse_lo = lse_parts(lse)
    logits.sub_(lse_hi[:, None]).sub_(lse_lo[:, None]).exp_().mul_(-row_grad[:, None])
    logits.scatter_add_(1, column, torch.where(inside, row_grad, 0.0)[:, None])
    if grad_logits.data_ptr() != logits.data_ptr():
        grad_logits.copy_(logits)



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


declare_backend(REFERENCE_BACKEND, runs_anywhere, priority=PRIORITY, automatic_on=None, builtin=True)
# token_logprobs: _TokenLogprobs pairs the row kernels; grpo_token_loss: autograd through the reference's ops.
register_backend("token_logprobs", REFERENCE_BACKEND,
                 Kernels(logprob_rows_forward_reference, logprob_rows_backward_reference))
register_backend("grpo_token_loss", REFERENCE_BACKEND, Kernels(grpo_token_loss_reference, differentiable=True))
register_backend("group_advantages", REFERENCE_BACKEND, group_advantages_reference)
register_backend("linear_token_logprobs", REFERENCE_BACKEND, VocabSlicedLogprobs())
register_backend("linear_cross_entropy", REFERENCE_BACKEND,
                 CrossEntropyKernels(_torch_rows, _torch_slice_grad, grads_in_place=True))
