"""Rollout engines: prompts in, sampled completions out, behind one small interface.

An engine has generate(prompt_ids, settings) -> list of Completion (n per prompt, prompts in
order) and load_weights(named_tensors) for engines that hold their own copy of the policy.
"""

import dataclasses


@dataclasses.dataclass
class SamplingSettings:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256


@dataclasses.dataclass
class Completion:
    prompt_index: int
    token_ids: list  # up to and including the end-of-sequence token when there is one
    text: str
    finish_reason: str  # "stop" (end-of-sequence) or "length"
    logprobs: list = None  # sampling log-probs of token_ids, under the sampling temperature


def make_engine(name, **kwargs):
    if name == "hf":
        from .hf import HFRolloutEngine

        return HFRolloutEngine(**kwargs)
    raise ValueError(f"grpo.rollout_engine: unknown engine {name!r}; available: hf")
