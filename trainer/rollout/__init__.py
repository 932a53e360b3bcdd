"""Rollout engines: prompts in, sampled completions out, behind one small interface.

An engine has generate(prompt_ids, settings, row_keys=None) -> list of Completion (n per prompt,
prompts in order) and holds_weights. An engine that holds its own copy of the policy (vLLM)
also has:
- load_weights(named_tensors): one full weight sync from an iterator of (name, whole tensor)
  pairs, every tensor of the state dict; sync_weights drives it after every optimizer step;
- needs_weights: True while its copy is not the policy's (before the first sync of a run,
  fresh or resumed), which ensure_engine_weights turns into a full sync;
- generating(): a context manager that keeps it awake across several generate calls (a step's
  sampling rounds) and frees its memory for training afterwards (rollout_phase);
- weight_dtype and weight_device: what sync_weights casts and moves each shard to before gathering.
"""

import contextlib
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
    logprobs: list = None  # sampling log-probs of token_ids; what they mean in each engine: vllm.py docstring


def _hf_engine(trainer, config):
    from .hf import HFRolloutEngine

    return HFRolloutEngine(trainer.module, trainer.tokenizer, trainer.device,
                           max_batch_tokens=config.grpo.max_batch_tokens)


def _vllm_engine(trainer, config):
    from .vllm import VLLMRolloutEngine, rollout_max_model_len

    grpo = config.grpo
    return VLLMRolloutEngine(
        config.model.path, trainer.tokenizer, gpu_memory_utilization=grpo.vllm_gpu_memory_utilization,
        tensor_parallel_size=grpo.vllm_tensor_parallel_size, seed=config.train.seed,
        max_model_len=rollout_max_model_len(config), trust_remote_code=config.model.trust_remote_code,
        enforce_eager=grpo.vllm_enforce_eager,
    )


# grpo.rollout_engine name -> builder(trainer engine, run config); adding an engine is one entry.
ROLLOUT_ENGINES = {"hf": _hf_engine, "vllm": _vllm_engine}


def make_engine(trainer, config):
    """The rollout engine grpo.rollout_engine names, sampling from the trainer's policy."""
    name = config.grpo.rollout_engine
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"grpo.rollout_engine: unknown engine {name!r}; available: {', '.join(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[name](trainer, config)


def check_rollout_startup(config, world_size):
    """Before the model loads: the configured engine can start here. For vLLM: it imports and is this
    platform's release, and on a GPU grpo.vllm_gpu_memory_utilization leaves room for it and for this
    rank's training."""
    if config.grpo.rollout_engine != "vllm":
        return
    from .vllm import check_startup, rollout_max_model_len

    check_startup(config, world_size, key="grpo.rollout_engine", utilization=config.grpo.vllm_gpu_memory_utilization,
                  max_model_len=rollout_max_model_len(config))


def _full_tensor(tensor, dtype, device):
    """A state-dict entry whole, in dtype, on device (None: where it is).

    A sharded (DTensor) entry is moved and cast shard by shard before the all-gather, so
    CPU-offloaded shards reach the GPU first and the gather carries the engine's bytes, not fp32.
    """
    tensor = tensor.detach()
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if not hasattr(tensor, "full_tensor"):
        return tensor.to(device=device or tensor.device, dtype=dtype)
    from torch.distributed.tensor import DTensor

    local = tensor.to_local().to(device=device or tensor.to_local().device, dtype=dtype)
    shard = DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                               shape=tensor.shape, stride=tensor.stride())
    return shard.full_tensor()


def sync_weights(root_module, engine):
    """Sends the policy's full weights to an engine that holds its own copy; returns the bytes sent.

    The engine reads one iterator over the whole state dict, the tied head included. Under FSDP
    each parameter is gathered from its shards as the engine reads it (a collective, in the same
    order on every rank), so the full model never has to exist twice on one GPU.
    """
    if not getattr(engine, "holds_weights", False):
        return 0
    # The trainer keeps fp32 master weights; the engine computes in its own (lower) precision.
    dtype, device = getattr(engine, "weight_dtype", None), getattr(engine, "weight_device", None)
    sent = 0

    def gathered():
        nonlocal sent
        for name, tensor in root_module.causal_lm.state_dict().items():
            full = _full_tensor(tensor, dtype, device)
            sent += full.numel() * full.element_size()
            yield name, full

    engine.load_weights(gathered())
    return sent


def ensure_engine_weights(root_module, engine):
    """A full sync when the engine's copy is not the policy's; returns the bytes sent (0 when none was due).

    Due before the first rollout of every run: a colocated vLLM engine frees the weights it
    loaded at start, and after a resume the policy is the checkpoint's, not model.path's.
    Every rank holds the same state, so every rank takes part in the same gathers.
    """
    if getattr(engine, "needs_weights", False):
        return sync_weights(root_module, engine)
    return 0


def rollout_phase(engine):
    """Context for a step's sampling rounds: the engine stays awake across them, and frees its
    memory for training when the last one is done (a no-op for engines without that cycle)."""
    phase = getattr(engine, "generating", None)
    return phase() if phase is not None else contextlib.nullcontext()


def rank_share(count, rank, world_size):
    """The items `rank` takes: rank, rank + N, ..., as the HF engine's data-parallel evaluation deals them."""
    return range(rank, count, world_size)


def merge_shares(shares, count):
    """The items of every rank's (indices, items) in index order; each index must come exactly once."""
    merged, seen = [None] * count, [False] * count
    for indices, items in shares:
        if len(indices) != len(items):
            raise ValueError(f"a share holds {len(items)} items for {len(indices)} indices")
        for index, item in zip(indices, items):
            if seen[index]:
                raise ValueError(f"item {index} came from two ranks")
            merged[index], seen[index] = item, True
    if not all(seen):
        raise ValueError(f"{seen.count(False)} of {count} items came from no rank")
    return merged


def gather_shares(indices, items, count):
    """Every rank's share merged (merge_shares), on every rank."""
    from ..parallel import all_gather_objects

    return merge_shares(all_gather_objects((list(indices), items)), count)


def sample_problems(engine, prompts, settings, seed, rank=0, world_size=1):
    """settings.n completions per prompt (a list per prompt, in order), sampled by every rank for its
    rank_share and gathered on every rank. Rows are keyed by (seed, 0, problem index, sample), as
    evaluate.sample_completions keys them, so the split across ranks changes no key."""
    from .keyed_sampling import sequence_keys

    share = rank_share(len(prompts), rank, world_size)
    per_prompt = [[] for _ in share]
    keys = sequence_keys(seed, 0, share, settings.n)
    for completion in engine.generate([prompts[index] for index in share], settings, row_keys=keys):
        problem = share[completion.prompt_index]
        per_prompt[completion.prompt_index].append(dataclasses.replace(completion, prompt_index=problem))
    return gather_shares(share, per_prompt, len(prompts))
