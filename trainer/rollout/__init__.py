"""Rollout engines: prompts in, sampled completions out, behind one small interface.

An engine has generate(prompt_ids, settings, row_keys=None) -> list of Completion (n per prompt,
prompts in order) and holds_weights. An engine that holds its own copy of the policy (vLLM)
also has load_weights(named_tensors), which sync_weights calls after every optimizer step.
"""

import dataclasses


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
    logprobs: list = None  # sampling log-probs of token_ids, under the sampling temperature


def _hf_engine(trainer, config):
    from .hf import HFRolloutEngine

    return HFRolloutEngine(trainer.module, trainer.tokenizer, trainer.device)


def _vllm_engine(trainer, config):
    from .vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(config.model.path, trainer.tokenizer,
                             gpu_memory_utilization=config.grpo.vllm_gpu_memory_utilization, seed=config.train.seed)


# grpo.rollout_engine name -> builder(trainer engine, run config); adding an engine is one entry.
ROLLOUT_ENGINES = {"hf": _hf_engine, "vllm": _vllm_engine}


def make_engine(trainer, config):
    """The rollout engine grpo.rollout_engine names, sampling from the trainer's policy."""
    name = config.grpo.rollout_engine
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"grpo.rollout_engine: unknown engine {name!r}; available: {', '.join(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[name](trainer, config)


def sync_weights(root_module, engine, bucket_bytes):
    """Sends the policy's full weights to an engine that holds its own copy; returns the bytes sent.

    Under FSDP each parameter is gathered from its shards (a collective, in the same order on
    every rank) and sent in buckets of about bucket_bytes, so the full model never has to exist
    twice on one GPU.
    """
    if not getattr(engine, "holds_weights", False):
        return 0
    # The trainer keeps fp32 master weights; the engine computes in its own (lower) precision.
    engine_dtype = getattr(engine, "weight_dtype", None)
    bucket, bucket_size, sent = [], 0, 0
    for name, tensor in root_module.causal_lm.state_dict().items():
        full = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()
        if engine_dtype is not None and full.is_floating_point():
            full = full.to(engine_dtype)
        bucket.append((name, full))
        bucket_size += full.numel() * full.element_size()
        if bucket_size >= bucket_bytes:
            engine.load_weights(bucket)
            sent += bucket_size
            bucket, bucket_size = [], 0
    if bucket:
        engine.load_weights(bucket)
        sent += bucket_size
    return sent
