"""Run configuration: typed dataclasses, read from YAML, with `section.key=value` overrides.

Every key is checked before anything heavy happens: an unknown key is rejected with the
closest known one suggested, and a value of the wrong type names its key.
"""

import dataclasses
import difflib
import importlib.util
import os
import typing
import warnings
from typing import Optional

import yaml

from fastmath_kernels import backend_names

from .errors import ConfigError
from .grpo_loss import AGGREGATIONS, LossSettings
from .packing import PACKINGS
from .rewards import (
    REWARD_SETTING_CHOICES,
    RewardSettings,
    builtin_reward_names,
    check_reward_options,
    is_known_reward,
)
from .rollout import ENGINES


@dataclasses.dataclass
class ModelConfig:
    path: str = ""  # a local Hugging Face model directory (config, safetensors, tokenizer)
    trust_remote_code: bool = False  # run the model directory's own modelling code
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    chat_template: Optional[str] = None  # a Jinja template replacing the tokenizer's own
    system_prompt: Optional[str] = None  # prepended to every conversation as the system message
    # document_masked: packed rows without an [L, L] mask (varlen flash kernels on CUDA)
    attn_implementation: str = "document_masked"


@dataclasses.dataclass
class DataConfig:
    train_files: list = dataclasses.field(default_factory=list)  # jsonl, json or parquet
    problem_field: str = "problem"  # the prompt's field in each row
    solution_field: str = "solution"  # the completion's field in each row (SFT)
    messages_field: Optional[str] = None  # chat data: a list of {role, content} per row
    max_seq_len: int = 2048  # tokens per packed row (SFT); longer examples follow data.overlong
    overlong: str = "truncate"  # or "drop": what happens to an example longer than max_seq_len
    pack: bool = True  # several documents per row, kept apart by document-masked attention
    packing: str = "first_fit_decreasing"  # or "data_order": a new row wherever the next document does not fit
    loss_on: str = "completion"  # or "all": every token of each document carries the loss
    split: str = "train"  # the split read from a Hugging Face Hub dataset name


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    warmup_ratio: float = 0.03  # share of the steps with linear warmup
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # largest global gradient norm


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 1  # passes over the training data
    max_steps: Optional[int] = None  # stops earlier than the epochs when set
    micro_batch_size: int = 1  # packed sequences per forward pass and rank
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    seed: int = 0  # data order, initialisation and every keyed sample
    # Fused-linear loss (SFT) and log-probs (GRPO) without the fp32 [vocab, hidden]
    # weight-gradient buffer, for one more logits matmul.
    low_memory_loss: bool = False
    # Tokens per packed micro-batch: GRPO packs each step's sequences into rows of at most this
    # many (never splitting one) and accumulates gradients over them; SFT packs to it. None:
    # GRPO trains each step's rollouts in one packed row.
    max_tokens_per_micro_batch: Optional[int] = None


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep: int = 2  # checkpoints kept; older ones are deleted
    resume: str = "none"  # "auto": continue from the latest complete checkpoint in run_dir
    export_hf: bool = True  # a Hugging Face model directory in run_dir/hf_model at the end
    save_final: bool = True  # false: no checkpoint at the end (smoke runs and benchmarks)


@dataclasses.dataclass
class TrackingConfig:
    tensorboard: bool = True  # run_dir/tensorboard
    wandb: bool = False  # Weights & Biases (pip install wandb); WANDB_MODE=offline writes locally
    wandb_project: str = "fastmath"  # Weights & Biases project
    wandb_run_name: Optional[str] = None  # default: the run_dir's name


@dataclasses.dataclass
class ParallelConfig:
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    cpu_offload: bool = False  # FSDP2 keeps parameters, gradients and optimizer states in host memory
    # Bounds every collective: covers each rank writing and checksumming its share of a 14B
    # model's 177 GB checkpoint over 8 ranks at 50 MB/s.
    timeout_minutes: int = 30


@dataclasses.dataclass
class KernelsConfig:
    # The kernels' backend wherever it can run (cuda, triton, torch, or a registered one), in place of
    # the automatic choice; None: FASTMATH_BACKEND, else automatic. An op's backend= still wins.
    backend: Optional[str] = None


@dataclasses.dataclass
class GRPOSamplingConfig:
    temperature: float = 1.0  # sampling temperature
    top_p: float = 0.9  # nucleus filter
    min_p: float = 0.05  # tokens below min_p x the most likely token's probability are never sampled
    max_new_tokens: int = 16384  # tokens per completion at most
    stop_strings: list = dataclasses.field(default_factory=list)  # a completion ends after the first it produces


@dataclasses.dataclass
class GRPOEngineConfig:
    name: str = "hf"  # or vllm, the engine at 14B (hf gathers the FSDP weights for every token)
    # hf: KV-cache tokens per generate call at most (rows x (longest prompt + max_new_tokens));
    # more rows are sampled in several calls. 131072 is 24 GiB of a 14B Qwen2's bf16 KV cache.
    max_batch_tokens: Optional[int] = 131072
    vllm_gpu_memory_utilization: float = 0.3  # vLLM's share of each GPU (weights, its own, KV cache)
    vllm_tensor_parallel_size: int = 1  # > 1: each engine spans this many GPUs of a node
    vllm_enforce_eager: bool = False  # true: no CUDA graphs (less memory, slower decoding); always so on CPU
    # The weight-sync check (trainer/grpo_sync_check.py): every this many syncs, and the first of a run,
    # the engine's log-probs of tokens it sampled against the trainer's; 0: never.
    sync_check_every: int = 1
    # The largest gap (nats) the check accepts; None: 1e-3 for a float32 engine, 1.0 for bf16 or fp16.
    sync_check_max_gap: Optional[float] = None


@dataclasses.dataclass
class GRPOConfig:
    prompts_per_step: int = 16  # per rank
    group_size: int = 8  # samples per prompt
    num_iterations: int = 1  # optimizer steps per rollout batch
    dynamic_sampling: bool = False  # replace groups whose rewards are all equal (DAPO)
    max_sampling_rounds: int = 3  # rollout rounds per step at most, with dynamic sampling
    answer_field: str = "answer"  # the gold answer's field in each row
    max_prompt_tokens: Optional[int] = None  # longer prompts keep their last this many tokens (counted)
    sampling: GRPOSamplingConfig = dataclasses.field(default_factory=GRPOSamplingConfig)
    engine: GRPOEngineConfig = dataclasses.field(default_factory=GRPOEngineConfig)
    rewards: RewardSettings = dataclasses.field(default_factory=RewardSettings)  # declared in rewards.py
    loss: LossSettings = dataclasses.field(default_factory=LossSettings)  # declared in grpo_loss.py


# Keys that moved when the GRPO settings were split into sections. The old names still work, with
# a warning, until the next release.
RENAMED_KEYS = {
    **{f"grpo.{name}": f"grpo.sampling.{name}" for name in ("temperature", "top_p", "min_p", "max_new_tokens",
                                                             "stop_strings")},
    "grpo.rollout_engine": "grpo.engine.name",
    **{f"grpo.{name}": f"grpo.engine.{name}" for name in (
        "max_batch_tokens", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_enforce_eager",
        "sync_check_every", "sync_check_max_gap")},
    "grpo.reward_weights": "grpo.rewards.weights", "grpo.reward_timeout_s": "grpo.rewards.timeout_s",
    "grpo.length_reward_unit": "grpo.rewards.length_unit", "grpo.length_reward_scope": "grpo.rewards.length_scope",
    **{f"grpo.{name}": f"grpo.rewards.{name}" for name in ("cosine_max_len", "unparseable_gold", "answer_extraction")},
    "grpo.loss_aggregation": "grpo.loss.aggregation",
    **{f"grpo.{name}": f"grpo.loss.{name}" for name in ("scale_rewards", "advantage_eps", "eps_low", "eps_high",
                                                         "beta", "mask_truncated", "tis_cap")},
}


@dataclasses.dataclass
class EvalConfig:
    data: str = ""  # jsonl (or json/parquet) with the problem and gold-answer fields
    answer_field: str = "answer"  # the gold answer's field in each row
    samples: int = 4  # k: pass@1 is averaged over k samples, maj@k votes among them
    budgets: list = dataclasses.field(default_factory=lambda: [32768])  # output-token budgets
    temperature: float = 0.6  # sampling temperature
    top_p: float = 0.95  # nucleus filter
    min_p: float = 0.0  # tokens below min_p x the most likely token's probability are never sampled
    stop_at_think_end: bool = False  # extract the answer only from the text before </think>
    batch_prompts: int = 32  # prompts sampled together (each with k samples)
    # KV-cache tokens per generate call at most (rows x (prompt + largest budget)); None: no bound.
    # 131072 is 4 rows of 32k tokens: 24 GiB of a 14B Qwen2's bf16 KV cache.
    max_batch_tokens: Optional[int] = 131072
    max_problems: Optional[int] = None  # the first N problems only
    reward_timeout_s: int = 5  # seconds math-verify may take per answer
    engine: str = "hf"  # or vllm (CUDA): each rank samples its share of the problems
    split: str = "test"  # the split read from a Hugging Face Hub dataset name
    # > 0: a training stage samples the policy on eval.data (its first eval.max_problems) every
    # this many steps and at its last, logging eval_pass_at_1 and eval_mean_tokens.
    every_steps: int = 0


@dataclasses.dataclass
class ToyTaskConfig:
    train_problems: int = 3300  # problems generated for SFT and GRPO
    eval_problems: int = 500  # held out: generated from a different seed
    detour_probability: float = 0.6  # share of training traces that re-check some of their steps
    traces_per_problem: int = 1  # sampled traces per training problem; curation keeps the shortest correct
    wrong_trace_probability: float = 0.0  # share of traces that slip on one step (a wrong answer)
    max_operand: int = 9  # "gets N more" / "gives away N": N in 1..max_operand
    factors: list = dataclasses.field(default_factory=lambda: [2, 3])  # "doubles them", "triples them"; [] for none
    carries: bool = False  # whether a step may carry or borrow ("37 + 5 = 42")


@dataclasses.dataclass
class ToyModelConfig:
    hidden_size: int = 128  # model width
    layers: int = 4  # decoder layers
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key-value heads (grouped-query attention)


@dataclasses.dataclass
class ToyConfig:
    """The embedded recipe's task and model (used with recipe: toy)."""

    task: ToyTaskConfig = dataclasses.field(default_factory=ToyTaskConfig)
    model: ToyModelConfig = dataclasses.field(default_factory=ToyModelConfig)
    epoch_ablation: list = dataclasses.field(default_factory=lambda: [1, 3])  # SFT epoch counts compared


@dataclasses.dataclass
class RunConfig:
    stage: str = "sft"  # sft, grpo or eval: what this run does
    run_dir: str = "runs/sft"  # checkpoints, metrics, plots, the export and config.yaml go here
    recipe: Optional[str] = None  # "toy": the file describes the embedded recipe, whose stages run in turn
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    kernels: KernelsConfig = dataclasses.field(default_factory=KernelsConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    toy: ToyConfig = dataclasses.field(default_factory=ToyConfig)


RECIPES = ("toy",)

CHOICES = {
    "stage": ("sft", "grpo", "eval"),
    "grpo.engine.name": ENGINES,  # the registry itself: an engine registered later is a choice too
    "eval.engine": ENGINES,
    "grpo.loss.scale_rewards": ("group", "batch", "none"),
    "grpo.loss.aggregation": AGGREGATIONS,
    **{f"grpo.rewards.{name}": allowed for name, allowed in REWARD_SETTING_CHOICES.items()},
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.overlong": ("truncate", "drop"),
    "data.loss_on": ("completion", "all"),
    "data.packing": tuple(PACKINGS),
    "checkpoint.resume": ("none", "auto"),
    "model.attn_implementation": ("document_masked", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
}

# Implementations that keep packed documents apart from restarting position ids alone.
PACKING_ATTENTION = ("document_masked", "flash_attention_2", "flash_attention_3")


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(value, annotation, key):
    """value checked (and, for strings from the command line, parsed) against annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    elif annotation is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [part for part in value.split(",") if part]
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _apply(target, values, prefix=""):
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}{_suggest(name, list(fields))}")
        if dataclasses.is_dataclass(getattr(target, name)):
            _apply(getattr(target, name), value, prefix=f"{key}.")
        else:
            setattr(target, name, _convert(value, hints[name], key))


def _set_dotted(values, dotted, raw):
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = raw


def validate(config):
    """Checks every value of config (choices, ranges, how keys combine); returns it."""
    for key, allowed in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(allowed)}{_suggest(str(value), list(allowed))}"
            )
    backend, known = config.kernels.backend, backend_names()
    if backend is not None and backend not in known:
        raise ConfigError(f"kernels.backend: {backend!r} is not one of {', '.join(known)}{_suggest(backend, known)}")
    _validate_ranges(config)
    if not config.model.path:
        raise ConfigError("model.path: no model directory given")
    _validate_token_budget(config)
    packs = (config.stage == "sft" and config.data.pack) or config.stage == "grpo"  # GRPO always packs rollouts
    if packs and config.model.attn_implementation not in PACKING_ATTENTION:
        escape = ", or data.pack=false" if config.stage == "sft" else ""
        raise ConfigError(
            f"model.attn_implementation={config.model.attn_implementation} would let packed documents attend to "
            f"each other ({'data.pack=true' if config.stage == 'sft' else 'GRPO packs its rollouts'}); use one of "
            f"{', '.join(PACKING_ATTENTION)}{escape}"
        )
    if config.tracking.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracking.wandb=true needs the wandb package (pip install wandb)")
    if config.recipe is not None:
        _validate_recipe(config)
    if config.stage == "grpo":
        _validate_grpo(config.grpo)
    if config.stage == "eval" or config.eval.every_steps:
        _validate_eval(config.eval)
    if config.stage != "eval" and not config.data.train_files:
        raise ConfigError("data.train_files: no training data given")
    return config


def _validate_ranges(config):
    positive = {
        "data.max_seq_len": config.data.max_seq_len, "train.epochs": config.train.epochs,
        "train.micro_batch_size": config.train.micro_batch_size, "train.grad_accum": config.train.grad_accum,
        "checkpoint.keep": config.checkpoint.keep, "parallel.timeout_minutes": config.parallel.timeout_minutes,
        "grpo.prompts_per_step": config.grpo.prompts_per_step,
        "grpo.sampling.max_new_tokens": config.grpo.sampling.max_new_tokens,
        "grpo.num_iterations": config.grpo.num_iterations, "grpo.max_sampling_rounds": config.grpo.max_sampling_rounds,
    }
    if config.grpo.loss.beta < 0:
        raise ConfigError(f"grpo.loss.beta must be >= 0, got {config.grpo.loss.beta}")
    if config.grpo.group_size < 2:
        raise ConfigError(
            f"grpo.group_size must be at least 2 (advantages compare samples), got {config.grpo.group_size}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1 or unset, got {config.train.max_steps}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if not 0 <= config.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {config.optim.warmup_ratio}")
    if config.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be >= 0, got {config.checkpoint.every_steps}")


def _validate_token_budget(config):
    budget = config.train.max_tokens_per_micro_batch
    if budget is not None and budget < 1:
        raise ConfigError(f"train.max_tokens_per_micro_batch must be at least 1 or unset, got {budget}")
    if budget is not None and config.stage == "sft":
        if budget < config.data.max_seq_len:
            raise ConfigError(
                f"train.max_tokens_per_micro_batch={budget} is below data.max_seq_len={config.data.max_seq_len}: "
                "a document of that length would not fit one micro-batch"
            )
        if config.train.micro_batch_size != 1:
            raise ConfigError(
                f"train.max_tokens_per_micro_batch packs each micro-batch as one row; set train.micro_batch_size=1 "
                f"(got {config.train.micro_batch_size}) and use train.grad_accum for more rows per step"
            )


def _validate_recipe(config):
    if config.recipe not in RECIPES:
        raise ConfigError(f"recipe: {config.recipe!r} is not one of {', '.join(RECIPES)}"
                          f"{_suggest(str(config.recipe), list(RECIPES))}")
    task, model = config.toy.task, config.toy.model
    counts = {"toy.task.train_problems": task.train_problems, "toy.task.eval_problems": task.eval_problems,
              "toy.task.traces_per_problem": task.traces_per_problem,
              **{f"toy.model.{f.name}": getattr(model, f.name) for f in dataclasses.fields(model)}}
    for key, value in counts.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key in ("detour_probability", "wrong_trace_probability"):
        if not 0 <= getattr(task, key) <= 1:
            raise ConfigError(f"toy.task.{key} must be in [0, 1], got {getattr(task, key)}")
    if isinstance(task.max_operand, bool) or task.max_operand not in range(1, 10):
        raise ConfigError(f"toy.task.max_operand must be an integer in 1..9, got {task.max_operand!r}")
    if not isinstance(task.factors, list) or not set(task.factors) <= {2, 3} or any(
            isinstance(f, bool) for f in task.factors):
        raise ConfigError(f"toy.task.factors: expected a list of 2 and/or 3 (or []), got {task.factors!r}")
    ablation = config.toy.epoch_ablation
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in ablation):
        raise ConfigError(f"toy.epoch_ablation: expected a list of epoch counts >= 1, got {ablation!r}")


def _validate_sampling(section, settings):
    """temperature, top_p and min_p of a section that samples (grpo.sampling, eval)."""
    if settings.temperature <= 0:
        raise ConfigError(f"{section}.temperature must be positive, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise ConfigError(f"{section}.top_p must be in (0, 1], got {settings.top_p}")
    if not 0 <= settings.min_p < 1:
        raise ConfigError(f"{section}.min_p must be in [0, 1), got {settings.min_p}")


def _validate_grpo(grpo):
    sampling, engine, rewards, loss = grpo.sampling, grpo.engine, grpo.rewards, grpo.loss
    _validate_sampling("grpo.sampling", sampling)
    if not all(isinstance(stop, str) and stop for stop in sampling.stop_strings):
        raise ConfigError(f"grpo.sampling.stop_strings: expected a list of non-empty strings, got "
                          f"{sampling.stop_strings!r}")
    if not 0 < loss.eps_low < 1 or loss.eps_high <= 0:
        raise ConfigError(f"grpo.loss.eps_low must be in (0, 1) and grpo.loss.eps_high positive, got {loss.eps_low}, "
                          f"{loss.eps_high}")
    if loss.advantage_eps < 0:
        raise ConfigError(f"grpo.loss.advantage_eps must be >= 0, got {loss.advantage_eps}")
    if loss.tis_cap < 0:
        raise ConfigError(f"grpo.loss.tis_cap must be >= 0 (0 turns it off), got {loss.tis_cap}")
    if grpo.max_prompt_tokens is not None and grpo.max_prompt_tokens < 1:
        raise ConfigError(f"grpo.max_prompt_tokens must be at least 1 or unset, got {grpo.max_prompt_tokens}")
    if engine.max_batch_tokens is not None and engine.max_batch_tokens < 1:
        raise ConfigError(f"grpo.engine.max_batch_tokens must be at least 1 or unset, got {engine.max_batch_tokens}")
    if engine.sync_check_every < 0:
        raise ConfigError(f"grpo.engine.sync_check_every must be >= 0 (0 turns the check off), got "
                          f"{engine.sync_check_every}")
    if engine.sync_check_max_gap is not None and engine.sync_check_max_gap <= 0:
        raise ConfigError(f"grpo.engine.sync_check_max_gap must be positive or unset, got {engine.sync_check_max_gap}")
    _validate_rewards(rewards)


def _validate_rewards(rewards):
    if rewards.cosine_max_len < 1 or rewards.timeout_s < 1:
        raise ConfigError("grpo.rewards.cosine_max_len and grpo.rewards.timeout_s must be at least 1")
    if not rewards.weights:
        raise ConfigError("grpo.rewards.weights: no rewards, so every advantage would be 0")
    for name, weight in rewards.weights.items():
        if not is_known_reward(name) and "." not in name and ":" not in name:
            known = builtin_reward_names()
            raise ConfigError(
                f"grpo.rewards.weights: unknown reward {name!r}{_suggest(name, list(known))}; "
                f"built in: {', '.join(known)}, or an import path to your function (module:function)"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"grpo.rewards.weights.{name}: expected a number, got {weight!r}")
    check_reward_options(rewards.options)


def _validate_eval(settings):
    # From the command line "8192,16384" arrives as strings.
    settings.budgets = [int(b) if isinstance(b, str) and b.strip().isdigit() else b for b in settings.budgets]
    if settings.every_steps < 0:
        raise ConfigError(f"eval.every_steps must be >= 0, got {settings.every_steps}")
    if not settings.data:
        during = f" (eval.every_steps={settings.every_steps} evaluates during training)" if settings.every_steps else ""
        raise ConfigError(f"eval.data: no benchmark file given{during}")
    if not settings.budgets:
        raise ConfigError("eval.budgets: give at least one token budget")
    for budget in settings.budgets:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ConfigError(f"eval.budgets: every budget must be a positive integer, got {budget!r}")
    for key in ("samples", "batch_prompts"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"eval.{key} must be at least 1, got {getattr(settings, key)}")
    if settings.max_batch_tokens is not None and settings.max_batch_tokens < 1:
        raise ConfigError(f"eval.max_batch_tokens must be at least 1 or unset, got {settings.max_batch_tokens}")
    if settings.max_problems is not None and settings.max_problems < 1:
        raise ConfigError(f"eval.max_problems must be at least 1 or unset, got {settings.max_problems}")
    _validate_sampling("eval", settings)


def _current_name(dotted, where):
    """The key `dotted` names today; an old name (RENAMED_KEYS, or a key below one) gives a FutureWarning."""
    for old, new in RENAMED_KEYS.items():
        if dotted == old or dotted.startswith(f"{old}."):
            current = new + dotted[len(old):]
            warnings.warn(f"{where}: {dotted} is now {current}; the old name works until the next release",
                          FutureWarning, stacklevel=4)
            return current
    return dotted


def _with_current_names(values, where):
    """A file's mapping with every GRPO key of an earlier release moved to its section."""
    grpo = values.get("grpo") if isinstance(values, dict) else None
    if isinstance(grpo, dict):
        for name in [name for name in grpo if f"grpo.{name}" in RENAMED_KEYS]:
            _set_dotted(values, _current_name(f"grpo.{name}", where), grpo.pop(name))
    return values


def _merge(base, extra):
    merged = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged


def _select_stage(values, overrides, path):
    """A file with a `stages` section: its shared keys merged with the chosen stage's.

    Every stage's keys are checked, not only the chosen one's, so a typo in any stage fails at
    once. `stages.<stage>.key=value` overrides change a stage's value before the merge.
    """
    if "stages" not in values:
        if any(o.split("=", 1)[0].strip().startswith("stages.") for o in overrides):
            raise ConfigError(f"{path} has no stages section for the stages.* override")
        return values
    stages = values.pop("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: stages must map stage names to settings")
    for name, settings in stages.items():
        _with_current_names(settings, f"{path}: stages.{name}")
    for override in overrides:
        dotted, _, raw = override.partition("=")
        if dotted.strip().startswith("stages."):
            stage, _, key = dotted.strip()[len("stages."):].partition(".")
            key = _current_name(key, f"override {dotted.strip()}")
            _set_dotted(stages, f"{stage}.{key}", yaml.safe_load(raw) if raw.strip() else "")
    for name, settings in stages.items():
        if name not in CHOICES["stage"]:
            raise ConfigError(f"{path}: stages.{name}: not a stage; stages are {', '.join(CHOICES['stage'])}")
        _apply(RunConfig(), _merge(values, settings or {}), prefix=f"stages.{name}.")
    chosen = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "stage"]
    stage = chosen[-1] if chosen else values.get("stage")
    if stage is None:
        raise ConfigError(f"{path} defines stages {', '.join(stages)}: choose one with --stage")
    if stage not in stages:
        raise ConfigError(f"{path}: no stage {stage!r}; it defines {', '.join(stages)}")
    return _merge(values, {**(stages[stage] or {}), "stage": stage})


def read_yaml(path, what):
    """The mapping in a YAML file, or a one-line ConfigError naming the file."""
    if not os.path.exists(path):
        raise ConfigError(f"{what} not found: {path}")
    with open(path) as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return values


def load_config(path=None, overrides=(), base=None):
    """RunConfig from an optional YAML file, then `section.key=value` overrides, validated.

    With a `stages` file, `stages.<stage>.key=value` overrides reach one stage's settings and
    `key=value` overrides apply whichever stage runs.
    """
    config = base if base is not None else RunConfig()
    if path is not None:
        values = _select_stage(_with_current_names(read_yaml(path, "config file"), path), overrides, path)
        _apply(config, values)
    override_values = {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        dotted, raw = override.split("=", 1)
        if dotted.strip().startswith("stages."):
            if path is None:
                raise ConfigError(f"override {override!r}: stages.* needs a config file with a stages section")
            continue
        key = _current_name(dotted.strip(), "override")
        _set_dotted(override_values, key, yaml.safe_load(raw) if raw.strip() else "")
    _apply(config, override_values)
    return validate(config)


def config_as_dict(config):
    """The resolved configuration as plain YAML-ready values; load_config of its dump gives it back."""
    return dataclasses.asdict(config)


def save_config(config, path):
    """Writes the resolved configuration (every key, defaults included) as YAML."""
    with open(path, "w") as handle:
        yaml.safe_dump(config_as_dict(config), handle, sort_keys=False)
