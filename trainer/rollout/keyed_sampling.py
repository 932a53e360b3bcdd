"""Sampling whose randomness is keyed by (seed, prompt key, sample index, position).

Each sequence draws each token by inverse-CDF sampling from softmax(logits / T) (after top-p
and min-p), with the uniform taken from a counter-based hash of its key and position instead
of a stateful generator. A completion therefore depends only on its own key, never on which
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


def keyed_uniform(row_keys, position):
    """One uniform in (0, 1) per row, a pure function of (row key, position)."""
    bits = _mix(_mix(row_keys * _GOLDEN + position) * _GOLDEN + 1) & _MASK_53
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


class KeyedSampler:
    """A transformers logits processor: greedy decoding over it samples, keyed per sequence.

    It leaves only the sampled token finite, so generate()'s argmax returns it.
    """

    def __init__(self, row_keys, prompt_length, temperature, top_p=1.0, min_p=0.0):
        self.row_keys, self.prompt_length = row_keys, prompt_length
        self.temperature, self.top_p, self.min_p = temperature, top_p, min_p
        self.logprobs = []  # per step: [rows] log-prob of the sampled token under the filtered softmax(logits / T)

    def sampled_logprobs(self):
        """[rows, steps] log-probs of the sampled tokens under the distribution sampled: temperature, then
        top-p and min-p, renormalised (the trainer's own log-probs are before the filters)."""
        if not self.logprobs:
            return torch.zeros(len(self.row_keys), 0)
        return torch.stack(self.logprobs, dim=1).cpu()

    def sample(self, scores, position):
        """Token ids [rows] drawn from softmax(filtered scores / T) with the keyed uniforms."""
        scaled = filter_logits(scores.double() / self.temperature, self.top_p, self.min_p)
        cumulative = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        uniform = keyed_uniform(self.row_keys.to(scores.device), position)[:, None] * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, uniform).clamp_max(scores.shape[-1] - 1)
        # A rounding step in the running sum could land on a filtered token; take the nearest kept one below.
        kept = torch.isfinite(scaled)
        fallback = torch.where(kept, torch.arange(scores.shape[-1], device=scores.device), -1).cummax(dim=-1).values
        return torch.where(kept.gather(-1, chosen), chosen, fallback.gather(-1, chosen).clamp_min(0)).squeeze(-1)

    def __call__(self, input_ids, scores):
        chosen = self.sample(scores, input_ids.shape[1] - self.prompt_length)
        # The distribution the token was drawn from (after top-p and min-p), as vLLM's processed_logprobs.
        sampling = torch.log_softmax(filter_logits(scores.double() / self.temperature, self.top_p, self.min_p), dim=-1)
        self.logprobs.append(sampling.gather(-1, chosen[:, None]).squeeze(-1).float())
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter_(-1, chosen[:, None], 0.0)
