"""Sampled evaluation: pass@1 averaged over k samples per problem, and completion length.

Length is measured on sampled completions, as the recipe reports it: greedy decoding can hide
how long a model's typical answer is.
"""

import dataclasses
import math

import torch

from .rewards import accuracy_reward
from .rollout import SamplingSettings
from .rollout.hf import HFRolloutEngine


@dataclasses.dataclass
class EvalResult:
    problems: int
    samples_per_problem: int
    accuracy: float  # pass@1, averaged over samples
    mean_tokens: float
    truncated_fraction: float


class _PlainRoot(torch.nn.Module):
    """The rollout engine's view of an unwrapped model."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm


def evaluate(causal_lm, tokenizer, prompts, answers, *, samples=1, temperature=1.0, top_p=1.0,
             max_new_tokens=128, batch_prompts=64, device=None):
    device = device or next(causal_lm.parameters()).device
    engine = HFRolloutEngine(_PlainRoot(causal_lm), tokenizer, device)
    settings = SamplingSettings(n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    correct = tokens = truncated = total = 0
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        for completion in engine.generate(chunk, settings):
            gold = answers[start + completion.prompt_index]
            score = accuracy_reward(completion.text, gold)
            correct += 0.0 if math.isnan(score) else score
            tokens += len(completion.token_ids)
            truncated += completion.finish_reason == "length"
            total += 1
    return EvalResult(len(prompts), samples, correct / total, tokens / total, truncated / total)
