"""The rollout-engine contract: what GRPO, evaluation and the planner ask of an engine.

An engine samples completions of token-id prompts. A class becomes an engine by subclassing
RolloutEngine and registering under a name with @register_engine("name"); grpo.engine.name
and eval.engine then accept that name. Every module in this package is imported with it, so a
new engine is one file here.

On an instance (GRPO's sampler):
- generate(prompt_ids, settings, row_keys=None) -> list of Completion: settings.n per prompt, in
  prompt order;
- holds_weights: whether the engine computes with its own copy of the policy (vLLM). Such an
  engine also has sync(named_tensors), one full weight sync from an iterator of (name, whole
  tensor) pairs, and needs_weights, True while its copy is not the policy's;
- weight_dtype and weight_device: what each shard is cast and moved to before it is gathered;
- phase(): a context manager around a step's sampling rounds (awake across them, memory freed
  for training afterwards).

On the class (before or instead of an instance):
- for_training(trainer, config): the engine GRPO samples the trainer's policy with;
- check_startup(config, world_size): before any model loads, a ConfigError when it cannot start;
- sample_benchmark(config, problems, tokenizer, device, rank, world_size): the eval stage;
- plan_rollout(...) and plan_evaluation(...): its GPU memory, for trainer.plan.
"""

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass
class SamplingSettings:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop: list = None  # stop strings; the completion ends after the first one it produces


@dataclasses.dataclass
class Completion:
    prompt_index: int
    token_ids: list  # up to and including the end-of-sequence token when there is one
    text: str
    finish_reason: str  # "stop" (end-of-sequence) or "length"
    logprobs: list = None  # sampling log-probs of token_ids; what they mean in each engine: vllm.py docstring


@dataclasses.dataclass
class RolloutShape:
    """One rank's rollouts in a GRPO step, as the planner sizes them."""

    prompt_tokens: int
    sequence_tokens: int  # prompt plus grpo.sampling.max_new_tokens
    sequences: int  # grpo.prompts_per_step x grpo.group_size


def eval_sampling(settings):
    """The SamplingSettings of an EvalConfig: its k samples, filters and largest budget."""
    return SamplingSettings(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                            min_p=settings.min_p, max_new_tokens=max(settings.budgets))


class RolloutEngine:
    """The base of every engine: the contract above, with the defaults of an engine that samples the
    policy's own parameters (no weight copy, no sleep cycle, nothing to check at start)."""

    name = None  # set by register_engine
    holds_weights = False
    needs_weights = False
    weight_dtype = None
    weight_device = None

    def generate(self, prompt_ids, settings: SamplingSettings, row_keys=None) -> list:
        raise NotImplementedError

    def sync(self, named_tensors: Iterator) -> None:
        raise NotImplementedError(f"rollout engine {self.name!r} samples the policy itself: it has no weights to sync")

    def phase(self):
        return contextlib.nullcontext()

    @classmethod
    def for_training(cls, trainer, config) -> "RolloutEngine":
        raise NotImplementedError

    @classmethod
    def check_startup(cls, config, world_size) -> None:
        """Before any model loads: raises ConfigError when this engine cannot start here."""

    @classmethod
    def sample_benchmark(cls, config, problems, tokenizer, device, rank, world_size):
        """(every problem's completions on rank 0 and None elsewhere, generate calls made)."""
        raise NotImplementedError

    @classmethod
    def plan_rollout(cls, config, architecture, policy, resident, gpu_bytes, shape: RolloutShape):
        """([(phase name, {row: bytes on one GPU})], notes): GPU memory while this engine samples a step."""
        raise NotImplementedError

    @classmethod
    def plan_evaluation(cls, config, architecture, gpu_bytes, parameters):
        """({row: bytes on one GPU}, note): GPU memory while this engine samples the eval stage."""
        raise NotImplementedError


# engine name -> RolloutEngine subclass; grpo.engine.name and eval.engine choose from it.
ENGINES = {}


def register_engine(name):
    """Class decorator: the engine answers to `name` in grpo.engine.name and eval.engine."""
    def register(engine_class):
        if name in ENGINES and ENGINES[name] is not engine_class:
            raise ValueError(f"rollout engine {name!r} is registered twice: {ENGINES[name].__qualname__} "
                             f"and {engine_class.__qualname__}")
        engine_class.name = name
        ENGINES[name] = engine_class
        return engine_class

    return register


def engine_class(name, key="grpo.engine.name"):
    """The engine registered as `name`; a ValueError naming `key` and the known engines otherwise."""
    if name not in ENGINES:
        raise ValueError(f"{key}: unknown engine {name!r}; available: {', '.join(ENGINES)}")
    return ENGINES[name]
