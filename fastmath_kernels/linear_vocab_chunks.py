"""The torch path of linear_token_logprobs: chunks over the vocabulary, not over tokens.

Each step multiplies all tokens by one slice of the weight, so the matmuls keep every token
(M = N) and the weight gradient of a slice is one full reduction over tokens, written once;
token chunks would instead re-read the whole weight per chunk and accumulate a [V, H] fp32
buffer chunk after chunk. The forward merges the slices with an online log-sum-exp per
token; the backward needs only the forward's per-token lse (and entropy) to rebuild each
slice's probabilities.
"""

import torch

from .chunked_linear import targets_in_slice, vocab_slices
from .token_logprobs import LOG_PROB_FLOOR, lse_parts, row_lse


class VocabSlices:
    """fp32 views of the inputs and reusable buffers for one pass over vocabulary slices."""

    def __init__(self, hidden, weight, slice_size, buffers):
        self.hidden = hidden.float()
        self.weight = weight  # converted a slice at a time: no fp32 copy of a low-precision weight
        self.slice_size = slice_size
        size = hidden.shape[0] * min(slice_size, weight.shape[0])
        self.flat_buffers = [torch.empty(size, dtype=torch.float32, device=hidden.device) for _ in range(buffers)]

    def buffer(self, index, columns):
        return self.flat_buffers[index][: self.hidden.shape[0] * columns].view(-1, columns)

    def weight_slice(self, start, end):
        return self.weight[start:end].float()

    def logits(self, start, end):
        out = self.buffer(0, end - start)
        return torch.mm(self.hidden, self.weight_slice(start, end).T, out=out)


def vocab_chunked_forward(hidden, weight, targets, temperature, with_entropy, slice_size):
    """(logp [N], entropy [N] or None) in float32 and float64 lse [N] of log_softmax(hidden @ weight.T / T).

    lse is T * logsumexp(logits / T), in the logits' units (token_logprobs.lse_parts).
    """
    num_tokens, device = hidden.shape[0], hidden.device
    slices = VocabSlices(hidden, weight, slice_size, buffers=2)
    running_max = torch.full((num_tokens,), float("-inf"), device=device)
    sum_exp = torch.zeros(num_tokens, device=device)
    weighted = torch.zeros(num_tokens, device=device)  # sum exp(z - m) * (z - m)
    target_logit = torch.zeros(num_tokens, device=device)
    for start, end in vocab_slices(weight.shape[0], slice_size):
        z = slices.logits(start, end)  # unscaled: maxima and differences before dividing by T
        column, inside = targets_in_slice(targets, start, end)
        target_logit = torch.where(inside, z.gather(1, column).squeeze(1), target_logit)
        new_max = torch.maximum(running_max, z.amax(dim=1))
        safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)
        rescale = torch.exp((running_max - safe_max) / temperature)
        z.sub_(safe_max[:, None])
        if temperature != 1.0:
            z.div_(temperature)
        z.clamp_(min=LOG_PROB_FLOOR)  # -inf logits: exp 0, 0 * floor = 0
        exps = torch.exp(z, out=slices.buffer(1, end - start))
        slice_sum = exps.sum(dim=1)
        if with_entropy:
            shift = torch.where(sum_exp > 0, (running_max - safe_max) / temperature, 0.0)
            weighted = rescale * (weighted + sum_exp * shift) + exps.mul_(z).sum(dim=1)
        sum_exp = sum_exp * rescale + slice_sum
        running_max = new_max
    log_sum = sum_exp.log()
    entropy = log_sum - weighted / sum_exp if with_entropy else None
    # Relative to the max, with no lse ~ 1e4 in between: small log-probs keep full precision.
    logp = (target_logit - running_max) / temperature - log_sum
    return logp, entropy, row_lse(running_max, log_sum, temperature)


def vocab_chunked_backward(
    hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, temperature, slice_size, need_hidden, need_weight
):
    """Gradients (hidden [N, H] or None, weight [V, H] or None) in the inputs' dtypes.

    d/dz = (g * onehot - p * (g + g_entropy * (log p + H))) / T for each slice of the vocabulary.
    """
    use_entropy = grad_entropy is not None and entropy is not None
    slices = VocabSlices(hidden, weight, slice_size, buffers=2 if use_entropy else 1)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    target_grad = grad_logp / temperature
    lse_hi, lse_lo = lse_parts(lse)
    for start, end in vocab_slices(weight.shape[0], slice_size):
        log_probs = slices.logits(start, end).sub_(lse_hi[:, None]).sub_(lse_lo[:, None])
        if temperature != 1.0:
            log_probs.div_(temperature)
        log_probs.clamp_(min=LOG_PROB_FLOOR)
        if use_entropy:
            probs = torch.exp(log_probs, out=slices.buffer(1, end - start))
            weight_term = log_probs.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
            grad_logits = weight_term.mul_(probs).mul_(-1.0 / temperature)
        else:
            grad_logits = log_probs.exp_().mul_(-target_grad[:, None])
        column, inside = targets_in_slice(targets, start, end)
        grad_logits.scatter_add_(1, column, torch.where(inside, target_grad, 0.0)[:, None])
        if need_weight:
            if grad_weight.dtype == torch.float32:
                torch.mm(grad_logits.T, slices.hidden, out=grad_weight[start:end])
            else:
                grad_weight[start:end] = grad_logits.T @ slices.hidden
        if need_hidden:
            grad_hidden.addmm_(grad_logits, slices.weight_slice(start, end))
    if need_hidden and hidden.dtype != torch.float32:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight
