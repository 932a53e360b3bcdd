"""The recipe's rewards: format, cosine-scaled length, Kimi-1.5 length, and math-verify accuracy.

A built-in reward is one function decorated with @builtin_reward(name, default_weight=...): it
receives a RewardGroup (one prompt's completions, gold answer, token counts and correctness) and
returns one value per completion. Settings of its own are declared in the same decorator
(settings={"scale": 1.0}), set under grpo.rewards.options.<name>.<setting> and read with
group.setting("scale"). A user's reward given as a dotted import path is a plain
function (completion text, gold answer, token count) -> float, called under a time limit. A
per-completion reward that raises, times out or returns a non-finite value gives 0 for that
sample and is counted, never stopping the run. An unparseable gold answer gives NaN accuracy by
default, which group_advantages turns into advantage 0: no learning signal from a problem whose
answer cannot be checked (counted too).

Correctness comes from answers.py: the last boxed answer, or the reference recipe's first_match
reading. The Kimi length reward measures tokens or characters, its min and max taken over one
group or over every group a rank scores together (score_batch, length_scope "rank_batch").
"""

import collections
import dataclasses
import importlib
import math
import signal
import threading

from .answers import ANSWER_EXTRACTIONS, CORRECT, gold_is_parseable, judge, last_boxed
from .answers import verify_answer as verify_answer  # part of this module's interface (evaluation uses it)
from .errors import ConfigError, UnparseableGold

THINK_END = "</think>"


def format_reward(completion, gold=None, num_tokens=None):
    """1 if a \\boxed{...} answer appears before </think>, else 0."""
    end = completion.find(THINK_END)
    return float(end >= 0 and last_boxed(completion[:end]) is not None)


def format_reward_no_think(completion, gold=None, num_tokens=None):
    """For models without think tags: 1 if the completion holds a \\boxed{...} answer."""
    return float(last_boxed(completion) is not None)


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


def accuracy_reward(completion, gold, num_tokens=None, timeout_s=5, extraction="last_boxed"):
    """1.0 if the completion's answer equals the gold answer by math-verify, else 0.0.

    Raises UnparseableGold when the gold answer cannot be parsed.
    """
    return float(judge(completion, gold, extraction, timeout_s) == CORRECT)


def cosine_scaled(progress, low, high):
    """low + 0.5 (high - low) (1 + cos(pi * progress)): high at length 0, low at max length."""
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * progress))


def cosine_length_reward(completion, gold, num_tokens=None, max_len=30000, correct=None, timeout_s=5):
    """Character-length reward: correct answers 1.0 -> 0.1, wrong ones -1.0 -> -0.1 over max_len."""
    if correct is None:
        correct = accuracy_reward(completion, gold, timeout_s=timeout_s) == 1.0
    progress = min(1.0, len(completion) / max_len)
    return cosine_scaled(progress, 0.1, 1.0) if correct else cosine_scaled(progress, -0.1, -1.0)


def kimi_length_rewards(lengths, correct, bounds=None):
    """Kimi 1.5 length reward: lam = 0.5 - (len - min) / (max - min).

    Correct answers get lam, wrong ones min(0, lam); equal min and max give 0. bounds is (min, max),
    by default over `lengths`; a wider scope (every completion a rank scores in a round) passes its own.
    """
    shortest, longest = bounds if bounds is not None else (min(lengths), max(lengths))
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
        raise ConfigError(f"grpo.rewards.weights: reward {path!r} cannot be imported ({error})") from None


def _safe(counts, name, fn, *args, **kwargs):
    """float(fn(*args)), or 0.0 counted under name when it raises, times out or is not finite."""
    try:
        value = float(fn(*args, **kwargs))
        if math.isfinite(value):
            return value
        counts[f"{name}_non_finite"] += 1
    except UnparseableGold:
        raise
    except RewardTimeout:
        counts[f"{name}_timed_out"] += 1
    except Exception as error:  # a reward that breaks gives 0 for this sample, counted
        counts[f"{name}_failed_{type(error).__name__}"] += 1
    return 0.0


@dataclasses.dataclass(frozen=True)
class RewardGroup:
    """What a reward sees of one prompt's group of completions."""

    name: str  # the reward being computed: its failures are counted under this name
    completions: list
    gold: object
    num_tokens: list
    accuracy: list  # 1.0, 0.0, or NaN when the gold answer cannot be checked
    correct: list  # accuracy == 1.0
    settings: "RewardSettings"
    counts: collections.Counter
    # (min, max) of the lengths the Kimi length reward compares against; None: this group's own.
    length_bounds: tuple = None

    def each_completion(self, fn):
        """[fn(completion) for each completion], a sample whose call fails or is not finite giving 0, counted."""
        return [_safe(self.counts, self.name, fn, completion) for completion in self.completions]

    def setting(self, key):
        """This reward's own setting `key`: grpo.rewards.options.<reward>.<key>, else its registered default."""
        return self.settings.options.get(self.name, {}).get(key, _REGISTRY[self.name].settings[key])

    def measured_lengths(self):
        """Each completion's length in settings.length_unit: its tokens or its characters."""
        if self.settings.length_unit == "chars":
            return [len(completion) for completion in self.completions]
        return list(self.num_tokens)


@dataclasses.dataclass(frozen=True)
class _Registered:
    compute: object  # RewardGroup -> one value per completion
    default_weight: object  # float, or None: used only when configured
    settings: dict  # the reward's own settings and their defaults (grpo.rewards.options.<name>)


_REGISTRY = {}


def builtin_reward(name, default_weight=None, settings=None):
    """Register the decorated fn(group: RewardGroup) -> values as the reward `name` of grpo.rewards.weights.

    A default_weight puts it in the default weights; without one it is computed only when configured.
    settings: {setting: default} of the reward's own, set under grpo.rewards.options.<name>.
    """
    if "." in name or ":" in name:
        raise ValueError(f"reward name {name!r} holds '.' or ':', which grpo.rewards.weights reads as an import path")

    def register(compute):
        if name in _REGISTRY:
            holder = _REGISTRY[name].compute
            raise ValueError(f"reward {name!r} is already registered (by {holder.__module__}.{holder.__qualname__})")
        _REGISTRY[name] = _Registered(compute, default_weight, dict(settings or {}))
        return compute

    return register


def builtin_reward_names():
    """Names of the built-in rewards, in registration order."""
    return tuple(_REGISTRY)


def is_known_reward(name):
    """Whether `name` is a built-in reward (anything else must be an import path)."""
    return name in _REGISTRY


def check_reward_options(options):
    """Raises ConfigError naming the first grpo.rewards.options entry that is not a registered
    reward's setting, or whose value is not of its default's type."""
    if not isinstance(options, dict):
        raise ConfigError(f"grpo.rewards.options: expected a mapping of reward name to settings, got {options!r}")
    for reward, values in options.items():
        declared = _REGISTRY[reward].settings if reward in _REGISTRY else {}
        if not declared:
            with_settings = [name for name, entry in _REGISTRY.items() if entry.settings]
            raise ConfigError(f"grpo.rewards.options.{reward}: no registered reward of that name has settings "
                              f"(rewards with settings: {', '.join(with_settings) or 'none'})")
        if not isinstance(values, dict):
            raise ConfigError(f"grpo.rewards.options.{reward}: expected a mapping of setting to value, got {values!r}")
        for key, value in values.items():
            if key not in declared:
                raise ConfigError(f"grpo.rewards.options.{reward}.{key}: unknown setting; "
                                  f"{reward} has {', '.join(declared)}")
            if not _same_kind(value, declared[key]):
                raise ConfigError(f"grpo.rewards.options.{reward}.{key}: expected a value like {declared[key]!r}, "
                                  f"got {value!r}")


def _same_kind(value, default):
    numbers = (int, float)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, numbers):
        return isinstance(value, numbers)
    return isinstance(value, type(default))


def default_reward_weights():
    """{name: weight} of the built-in rewards that have a default weight, in registration order (a new dict)."""
    return {name: entry.default_weight for name, entry in _REGISTRY.items() if entry.default_weight is not None}


@builtin_reward("format", default_weight=1.0)
def _format_of_group(group):
    return group.each_completion(format_reward)


@builtin_reward("format_no_think")
def _format_no_think_of_group(group):
    return group.each_completion(format_reward_no_think)


@builtin_reward("cosine_length", default_weight=1.0)
def _cosine_length_of_group(group):
    max_len = group.settings.cosine_max_len
    return [
        cosine_length_reward(completion, group.gold, max_len=max_len, correct=correct)
        for completion, correct in zip(group.completions, group.correct)
    ]


@builtin_reward("length", default_weight=1.0)
def _length_of_group(group):
    return kimi_length_rewards(group.measured_lengths(), group.correct, group.length_bounds)


@builtin_reward("accuracy")
def _accuracy_of_group(group):
    return group.accuracy  # computed for every group, weighted or not


def _under_time_limit(fn):
    """A user's fn(completion, gold, num_tokens) as a group reward, each call limited to settings.timeout_s."""

    def compute(group):
        limit = group.settings.timeout_s
        return [
            _safe(group.counts, group.name, _with_time_limit, fn, limit, completion, group.gold, tokens)
            for completion, tokens in zip(group.completions, group.num_tokens)
        ]

    return compute


REWARD_SETTING_CHOICES = {
    "unparseable_gold": ("no_signal", "reward_one"),
    "length_unit": ("tokens", "chars"),
    "length_scope": ("group", "rank_batch"),
    "answer_extraction": ANSWER_EXTRACTIONS,
}


@dataclasses.dataclass
class RewardSettings:
    """The grpo.rewards section of a run configuration."""

    # Reward name (or module:function) -> weight, summed.
    weights: dict = dataclasses.field(default_factory=default_reward_weights)
    cosine_max_len: int = 30000  # length at which the cosine length reward reaches its end value
    timeout_s: int = 5  # seconds a reward may take per completion (math-verify included)
    unparseable_gold: str = "no_signal"  # or "reward_one", the reference recipe's behaviour
    length_unit: str = "tokens"  # what the Kimi length reward measures; the recipe: "chars"
    length_scope: str = "group"  # its min and max over one group, or over a "rank_batch" (the recipe)
    answer_extraction: str = "last_boxed"  # or "first_match", the recipe's (see answers.py)
    # Reward name -> {setting: value} for rewards registered with settings of their own.
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in REWARD_SETTING_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"RewardSettings.{name} must be one of {', '.join(allowed)}, got {value!r}")


class RewardComputer:
    """Weighted sum of the configured rewards for each group of completions, with failure counts."""

    def __init__(self, settings):
        self.settings = settings
        self.rewards = {
            name: _REGISTRY[name].compute if name in _REGISTRY else _under_time_limit(load_reward(name))
            for name in settings.weights
        }
        self.counts = collections.Counter()

    def correctness(self, completion, gold):
        """1.0, 0.0, or NaN for an unparseable gold answer under the no-signal policy."""
        if not self.gold_is_checkable(gold):
            self.counts["unparseable_gold"] += 1
            return float("nan") if self.settings.unparseable_gold == "no_signal" else 1.0
        settings = self.settings
        return _safe(self.counts, "accuracy", accuracy_reward, completion, gold, timeout_s=settings.timeout_s,
                     extraction=settings.answer_extraction)

    def gold_is_checkable(self, gold):
        """Whether math-verify can parse the gold answer: decided once per problem, whatever the samples say."""
        try:
            return gold_is_parseable(gold, self.settings.answer_extraction, self.settings.timeout_s)
        except Exception as error:  # math-verify failing on the gold answer itself: counted, unscored
            self.counts[f"gold_check_failed_{type(error).__name__}"] += 1
            return False

    def group(self, completions, gold, num_tokens):
        """(total rewards, {reward name: values}) for the completions of one prompt; "accuracy" is always a part."""
        return self.score_batch([(completions, gold, num_tokens)])[0]

    def score_batch(self, groups):
        """[(totals, parts)] for each (completions, gold, num_tokens) of groups scored together.

        With length_scope "rank_batch" the Kimi length reward takes its min and max over every
        completion of every group here, across prompts; with "group", over each group's own.
        """
        contexts = [self._context(*group) for group in groups]
        lengths = [length for context in contexts for length in context.measured_lengths()]
        if self.settings.length_scope == "rank_batch" and lengths:
            bounds = (min(lengths), max(lengths))
            contexts = [dataclasses.replace(context, length_bounds=bounds) for context in contexts]
        return [self._score(context) for context in contexts]

    def _context(self, completions, gold, num_tokens):
        accuracy = [self.correctness(c, gold) for c in completions]
        return RewardGroup("", list(completions), gold, list(num_tokens), accuracy, [a == 1.0 for a in accuracy],
                           self.settings, self.counts)

    def _score(self, context):
        parts = {"accuracy": context.accuracy}
        for name, compute in self.rewards.items():
            values = list(compute(dataclasses.replace(context, name=name)))
            expected = len(context.completions)
            if len(values) != expected:
                raise ValueError(f"reward {name!r} gave {len(values)} values for {expected} completions")
            parts[name] = values
        totals = []
        for index, acc in enumerate(context.accuracy):
            if math.isnan(acc):
                totals.append(float("nan"))  # no learning signal from an uncheckable problem
                continue
            totals.append(sum(weight * parts[name][index] for name, weight in self.settings.weights.items()))
        return totals, parts
