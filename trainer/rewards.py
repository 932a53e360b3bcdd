"""The recipe's rewards: format, cosine-scaled length, Kimi-1.5 length, and math-verify accuracy.

A sample reward is a plain function (completion text, gold answer, token count) -> float; the
Kimi length reward also sees the completion's group. A reward that raises or times out gives
0 for that sample and is counted, never stopping the run. An unparseable gold answer gives NaN
accuracy by default, which group_advantages turns into advantage 0: no learning signal from a
problem whose answer cannot be checked (counted too).
"""

import collections
import dataclasses
import functools
import importlib
import math
import re
import signal
import threading

from .config import ConfigError

_BOXED = re.compile(r"\\boxed\s*\{")
THINK_END = "</think>"


def last_boxed(text):
    """Content of the last \\boxed{...} in text (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, index = 1, start
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            return text[start : index - 1].strip()
    return None


def format_reward(completion, gold=None, num_tokens=None):
    """1 if a \\boxed{...} answer appears before </think>, else 0."""
    end = completion.find(THINK_END)
    return float(end >= 0 and last_boxed(completion[:end]) is not None)


def format_reward_no_think(completion, gold=None, num_tokens=None):
    """For models without think tags: 1 if the completion holds a \\boxed{...} answer."""
    return float(last_boxed(completion) is not None)


class UnparseableGold(ValueError):
    pass


class RewardTimeout(Exception):
    pass


def _with_time_limit(fn, seconds, *args):
    """fn(*args), interrupted after `seconds` when called from the main thread.

    Built-in rewards are not wrapped: math-verify keeps its own SIGALRM time limits, and
    an outer alarm would be cancelled by them.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)

    def expire(signum, frame):
        raise RewardTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=65536)
def _verify(answer, gold, timeout_s):
    """True/False from math-verify; UnparseableGold when the gold answer yields nothing."""
    from math_verify import parse, verify

    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout_s)
    if not parsed_gold:
        parsed_gold = parse(gold, parsing_timeout=timeout_s)
    if not parsed_gold:
        raise UnparseableGold(gold)
    parsed_answer = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    return bool(parsed_answer) and verify(parsed_gold, parsed_answer, timeout_seconds=timeout_s)


def verify_answer(answer, gold, timeout_s=5):
    """Whether an extracted answer equals the gold one by math-verify; UnparseableGold if gold cannot be parsed."""
    return _verify(answer, str(gold), timeout_s)


def accuracy_reward(completion, gold, num_tokens=None, timeout_s=5):
    """1.0 if the last boxed answer equals the gold answer by math-verify, else 0.0.

    Raises UnparseableGold when the gold answer cannot be parsed.
    """
    answer = last_boxed(completion)
    if answer is None:
        return 0.0
    return float(_verify(answer, str(gold), timeout_s))


def cosine_scaled(progress, low, high):
    """low + 0.5 (high - low) (1 + cos(pi * progress)): high at length 0, low at max length."""
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * progress))


def cosine_length_reward(completion, gold, num_tokens=None, max_len=30000, correct=None, timeout_s=5):
    """Character-length reward: correct answers 1.0 -> 0.1, wrong ones -1.0 -> -0.1 over max_len."""
    if correct is None:
        correct = accuracy_reward(completion, gold, timeout_s=timeout_s) == 1.0
    progress = min(1.0, len(completion) / max_len)
    return cosine_scaled(progress, 0.1, 1.0) if correct else cosine_scaled(progress, -0.1, -1.0)


def kimi_length_rewards(lengths, correct):
    """Kimi 1.5 length reward for one group: lam = 0.5 - (len - min) / (max - min).

    Correct answers get lam, wrong ones min(0, lam); a group of equal lengths gets 0.
    """
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(lengths)
    rewards = []
    for length, is_correct in zip(lengths, correct):
        lam = 0.5 - (length - shortest) / (longest - shortest)
        rewards.append(lam if is_correct else min(0.0, lam))
    return rewards


def load_reward(path):
    """A user's reward function from 'package.module:function' or 'package.module.function'."""
    module_name, _, name = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"grpo.reward_weights: reward {path!r} cannot be imported ({error})") from None


BUILTIN = {"format", "format_no_think", "cosine_length", "length", "accuracy"}


@dataclasses.dataclass
class RewardSettings:
    weights: dict = dataclasses.field(default_factory=lambda: {"format": 1.0, "cosine_length": 1.0, "length": 1.0})
    cosine_max_len: int = 30000
    timeout_s: int = 5
    unparseable_gold: str = "no_signal"  # or "reward_one", the reference recipe's behaviour


class RewardComputer:
    """Weighted sum of the configured rewards for each group of completions, with failure counts."""

    def __init__(self, settings):
        self.settings = settings
        self.custom = {name: load_reward(name) for name in settings.weights if name not in BUILTIN}
        self.counts = collections.Counter()

    def _safe(self, name, fn, *args, **kwargs):
        try:
            value = float(fn(*args, **kwargs))
            if math.isfinite(value):
                return value
            self.counts[f"{name}_non_finite"] += 1
        except UnparseableGold:
            raise
        except RewardTimeout:
            self.counts[f"{name}_timed_out"] += 1
        except Exception as error:  # a reward that breaks gives 0 for this sample, counted
            self.counts[f"{name}_failed_{type(error).__name__}"] += 1
        return 0.0

    def _custom(self, name, fn, *args):
        """A user's reward under a wall-clock limit of timeout_s (main thread only, via SIGALRM)."""
        return self._safe(name, _with_time_limit, fn, self.settings.timeout_s, *args)

    def correctness(self, completion, gold):
        """1.0, 0.0, or NaN for an unparseable gold answer under the no-signal policy."""
        if not self.gold_is_checkable(gold):
            self.counts["unparseable_gold"] += 1
            return float("nan") if self.settings.unparseable_gold == "no_signal" else 1.0
        return self._safe("accuracy", accuracy_reward, completion, gold, timeout_s=self.settings.timeout_s)

    def gold_is_checkable(self, gold):
        """Whether math-verify can parse the gold answer: decided once per problem, whatever the samples say."""
        try:
            verify_answer("0", gold, self.settings.timeout_s)
            return True
        except UnparseableGold:
            return False
        except Exception as error:  # math-verify failing on the gold answer itself: counted, unscored
            self.counts[f"gold_check_failed_{type(error).__name__}"] += 1
            return False

    def group(self, completions, gold, num_tokens):
        """(total rewards, {reward name: values}) for the completions of one prompt."""
        weights = self.settings.weights
        accuracy = [self.correctness(c, gold) for c in completions]
        correct = [a == 1.0 for a in accuracy]
        parts = {"accuracy": accuracy}
        if "format" in weights:
            parts["format"] = [self._safe("format", format_reward, c) for c in completions]
        if "format_no_think" in weights:
            parts["format_no_think"] = [self._safe("format_no_think", format_reward_no_think, c) for c in completions]
        if "cosine_length" in weights:
            parts["cosine_length"] = [
                cosine_length_reward(c, gold, max_len=self.settings.cosine_max_len, correct=ok)
                for c, ok in zip(completions, correct)
            ]
        if "length" in weights:
            parts["length"] = kimi_length_rewards(num_tokens, correct)
        for name, fn in self.custom.items():
            parts[name] = [self._custom(name, fn, c, gold, n) for c, n in zip(completions, num_tokens)]
        totals = []
        for index, acc in enumerate(accuracy):
            if math.isnan(acc):
                totals.append(float("nan"))  # no learning signal from an uncheckable problem
                continue
            totals.append(sum(weight * parts[name][index] for name, weight in weights.items()))
        return totals, parts
