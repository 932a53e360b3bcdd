"""Sampling whose randomness is keyed by (seed, prompt key, sample index, position).

Each sequence draws its tokens with the Gumbel-max trick, argmax(logits / T + g), where the
Gumbel noise g comes from a counter-based hash of the key and the vocabulary index instead of
a stateful generator. A completion therefore depends only on its own key, never on which
other prompts share its batch or its rank: one process and N FSDP ranks sample the same
completions, and a resumed run samples what the uninterrupted one did.
"""

import torch

_MASK_53 = (1 << 53) - 1
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _mix(x):
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic; shifts kept to 64 bits)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX_1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX_2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_uniform(row_keys, position, vocab_size):
    """[rows, vocab] uniforms in (0, 1), a pure function of (row key, position, column)."""
    columns = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64)
    state = _mix(row_keys * _GOLDEN + position)
    bits = _mix(state[:, None] * _GOLDEN + columns[None, :]) & _MASK_53
    return (bits.to(torch.float64) + 0.5) / float(1 << 53)


def sequence_keys(seed, step, prompt_keys, samples_per_prompt):
    """One int64 key per generated row, rows ordered prompt-major as generate() expands them."""
    keys = []
    for prompt_key in prompt_keys:
        for sample in range(samples_per_prompt):
            keys.append(((seed * 1_000_003 + step) * 1_000_033 + prompt_key) * 4099 + sample)
    return torch.tensor([_wrap(k) for k in keys], dtype=torch.int64)


def _wrap(value):
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def filter_logits(scores, top_p, min_p):
    """scores with the tokens outside top-p and below min_p * max-probability set to -inf."""
    if min_p and min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first stays.
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class KeyedGumbelSampler:
    """A transformers logits processor: greedy decoding over it samples, keyed per sequence."""

    def __init__(self, row_keys, prompt_length, temperature, top_p=1.0, min_p=0.0):
        self.row_keys, self.prompt_length = row_keys, prompt_length
        self.temperature, self.top_p, self.min_p = temperature, top_p, min_p

    def __call__(self, input_ids, scores):
        position = input_ids.shape[1] - self.prompt_length
        scaled = filter_logits(scores.float() / self.temperature, self.top_p, self.min_p)
        uniform = keyed_uniform(self.row_keys.to(scores.device), position, scores.shape[-1])
        gumbel = -torch.log(-torch.log(uniform))
        return (scaled.double() + gumbel).to(scores.dtype)
