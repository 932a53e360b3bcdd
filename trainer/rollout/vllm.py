"""Rollouts and evaluation through vLLM 0.33 (`pip install -e .[vllm]`), one colocated engine per rank.

Lifecycle of a colocated engine (GRPO), each rank holding its own in its own process:
- start: `LLM(distributed_executor_backend="external_launcher")` binds the engine to this
  rank's GPU (LOCAL_RANK) and keeps it in the training process, then `sleep(level=2)` frees
  all its GPU memory; the weights it loaded from model.path are discarded.
- weight sync (`receiving_weights`, driven by sync_weights): one `wake_up(tags=["weights"])`,
  the buckets loaded in place through `llm.apply_model` (the public route into the worker's
  model), a check that every parameter was written, then `reset_prefix_cache()`. Before the
  first rollout of a run (fresh or resumed) the engine holds no policy weights: `needs_weights`
  says so and the stage syncs in full.
- rollout (`generating`): `wake_up(tags=["kv_cache"])`, one or more `generate` calls, then
  `sleep(level=2)`, which gives training the memory back and discards the weights again.
  The training allocator's cache is emptied before every wake.

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

With grpo.vllm_tensor_parallel_size = T > 1, each group of T consecutive ranks of one node
runs one engine: its ranks pool their prompts, generate them together and keep their own.
"""

import contextlib
import dataclasses
import functools
import math
import os
import socket
from typing import Optional

import torch

from ..config import ConfigError
from . import Completion, SamplingSettings, sample_problems

SUPPORTED_SERIES = "0.33"  # the release this adapter is written and contract-tested against
LOGPROBS_MODE = "processed_logprobs"
GIB = 2**30
RESERVED_BYTES = 2 * GIB  # CUDA context, NCCL buffers and allocator slack beside training and vLLM
EVAL_GPU_MEMORY_UTILIZATION = 0.9  # evaluation has the GPU to itself
_SEED_MASK = (1 << 63) - 1


def import_vllm(key="grpo.rollout_engine"):
    """The vllm module, or a ConfigError when it is missing or not of the supported series."""
    try:
        import vllm
    except Exception as error:  # a broken install can fail with more than ImportError
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{key}=vllm needs vllm {SUPPORTED_SERIES}.x (pip install -e .[vllm]); "
                          f"it cannot be imported: {reason}") from None
    version = getattr(vllm, "__version__", "unknown")
    if version.split(".")[:2] != SUPPORTED_SERIES.split("."):
        raise ConfigError(f"{key}=vllm: vllm {version} is installed, but this adapter is written and tested against "
                          f"vLLM {SUPPORTED_SERIES} (pip install 'vllm=={SUPPORTED_SERIES}.*')")
    return vllm


@dataclasses.dataclass
class ModelShape:
    """What the memory split depends on, read from a model's config without loading weights."""

    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: Optional[int]

    def kv_bytes_per_token(self, tensor_parallel_size, dtype_bytes=2):
        heads_per_gpu = max(1, self.kv_heads // tensor_parallel_size)  # vLLM replicates KV heads beyond their count
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes


def read_model_shape(model_path, trust_remote_code=False):
    """The ModelShape of a model directory: parameters counted on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()), layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_positions=getattr(text, "max_position_embeddings", None),
    )


def training_state_bytes(parameters, config, world_size):
    """(bytes, description): what one rank's training keeps on its GPU while vLLM generates.

    Master weights and AdamW's two moments, sharded over the ranks, plus the frozen reference
    model when grpo.beta > 0; gradients are freed after each optimizer step. Nothing with
    parallel.cpu_offload.
    """
    from ..model import resolve_dtype

    if config.parallel.cpu_offload:
        return 0, "offloaded to the CPU"
    cuda = torch.device("cuda")
    master = resolve_dtype(config.model.dtype, cuda, trainable=True)
    size = 3 * parameters * master.itemsize / world_size
    detail = f"{_dtype_name(master)} master weights and 2 AdamW moments of {parameters / 1e9:.2f}B parameters"
    if config.grpo.beta > 0:
        reference = resolve_dtype(config.model.dtype, cuda, trainable=world_size == 1)
        size += parameters * reference.itemsize / world_size
        detail += f", a {_dtype_name(reference)} reference model"
    return size, detail + (f", over {world_size} ranks" if world_size > 1 else "")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _gib(size):
    return f"{size / GIB:.1f} GiB"


def check_memory_split(*, gpu_bytes, utilization, shape, tensor_parallel_size, max_model_len, training_bytes=0,
                       training_detail="", key="grpo.vllm_gpu_memory_utilization"):
    """Raises a ConfigError naming the numbers when vLLM's share of the GPU cannot hold its bf16
    weights plus one full-length sequence's KV cache, or leaves too little for training."""
    share, gpu = utilization * gpu_bytes, _gib(gpu_bytes)
    weights = shape.parameters * 2 / tensor_parallel_size
    tokens = max_model_len or shape.max_positions or 0
    kv_cache = shape.kv_bytes_per_token(tensor_parallel_size) * tokens
    lowest = (weights + kv_cache) / gpu_bytes
    highest = (gpu_bytes - training_bytes - RESERVED_BYTES) / gpu_bytes
    problems = []
    if share < weights + kv_cache:
        problems.append(
            f"vLLM's share of the {gpu} GPU, {_gib(share)}, is less than its bf16 weights ({_gib(weights)} per GPU "
            f"at tensor parallel {tensor_parallel_size}) plus the KV cache of one {tokens}-token sequence "
            f"({_gib(kv_cache)}); it needs at least {math.ceil(lowest * 100) / 100:g}")
    if training_bytes and gpu_bytes - share < training_bytes + RESERVED_BYTES:
        problems.append(
            f"it leaves {_gib(gpu_bytes - share)} of the {gpu} GPU beside vLLM, less than this rank's training "
            f"state ({training_detail}: {_gib(training_bytes)}) plus {_gib(RESERVED_BYTES)} for the CUDA context "
            f"and communication; at most {math.floor(highest * 100) / 100:g} leaves room")
    if problems:
        advice = ""
        if training_bytes and lowest > highest:
            advice = ("; no value fits: raise grpo.vllm_tensor_parallel_size, train on more GPUs or set "
                      "parallel.cpu_offload")
        raise ConfigError(f"{key}={utilization:g}: " + "; ".join(problems) + advice)


def check_tensor_parallel(size, world_size, local_world_size):
    if size < 1 or world_size % size or local_world_size % size:
        raise ConfigError(f"grpo.vllm_tensor_parallel_size={size}: it must divide the ranks of every node "
                          f"({local_world_size} of {world_size}); each {size} consecutive ranks share an engine")


def check_startup(config, world_size, *, key, utilization, max_model_len, training=True):
    """Before any model loads: vllm imports and is 0.33, the tensor-parallel layout fits the ranks,
    and the memory split leaves room for the engine and, beside it, for training."""
    import_vllm(key)
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}=vllm needs a CUDA GPU; none is visible")
    tensor_parallel_size = config.grpo.vllm_tensor_parallel_size
    check_tensor_parallel(tensor_parallel_size, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    shape = read_model_shape(config.model.path, config.model.trust_remote_code)
    training_bytes, detail = training_state_bytes(shape.parameters, config, world_size) if training else (0, "")
    gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    check_memory_split(gpu_bytes=gpu_bytes, utilization=utilization, shape=shape,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       training_bytes=training_bytes, training_detail=detail,
                       key="grpo.vllm_gpu_memory_utilization" if training else f"{key}=vllm, GPU memory utilization")


def rollout_max_model_len(config):
    """The longest sequence a GRPO rollout makes, which sizes vLLM's KV cache; None: the model's own limit."""
    grpo = config.grpo
    if grpo.max_prompt_tokens is not None:
        return grpo.max_prompt_tokens + grpo.max_new_tokens
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
            raise ConfigError(f"grpo.vllm_tensor_parallel_size={size} needs torchrun with a multiple of {size} ranks")
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

    The engine core must run in this process (V1 multiprocessing off): weights load by direct copy.
    """
    for name, value in (("RANK", "0"), ("LOCAL_RANK", str(device_index)), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _load_into(weights, model):
    """Runs in vLLM's worker on the unwrapped model: copies (Hugging Face name, tensor) pairs in place."""
    loaded = model.load_weights(weights)
    return None if loaded is None else sorted(loaded)


def _unloaded_parameters(loaded, model):
    """Runs in vLLM's worker: names of the model's parameters no load wrote."""
    return [name for name, _ in model.named_parameters() if name not in loaded]


def sampled_logprobs(token_ids, positions):
    """The sampled tokens' log-probs from vLLM's per-position {token id: Logprob} dicts."""
    if positions is None or len(positions) != len(token_ids):
        raise RuntimeError(f"vLLM returned log-probs for {0 if positions is None else len(positions)} of "
                           f"{len(token_ids)} sampled tokens")
    return [position[token].logprob for token, position in zip(token_ids, positions)]


def prompt_token_logprobs(token_ids, positions, start):
    """Log-probs of token_ids[start:] from vLLM's prompt_logprobs (whose first entry is None)."""
    return [positions[index][token_ids[index]].logprob for index in range(start, len(token_ids))]


class VLLMRolloutEngine:
    """A vllm.LLM behind the rollout-engine interface; colocated=False keeps it awake (evaluation)."""

    holds_weights = True

    def __init__(self, model_path, tokenizer, *, gpu_memory_utilization=0.3, tensor_parallel_size=1,
                 dtype="bfloat16", seed=0, max_model_len=None, colocated=True, trust_remote_code=False,
                 enforce_eager=False, key="grpo.rollout_engine"):
        vllm = import_vllm(key)
        self.tokenizer, self.colocated = tokenizer, colocated
        self.weight_dtype = getattr(torch, dtype)  # what sync_weights gathers
        device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self.weight_device = torch.device("cuda", device_index) if torch.cuda.is_available() else None
        self.peers = TensorParallelPeers(tensor_parallel_size)
        _set_launcher_environment(device_index)
        self.llm = vllm.LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=engine_seed(seed, self.peers.index),
            tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, enable_prefix_caching=True,
            enable_sleep_mode=colocated, logprobs_mode=LOGPROBS_MODE, trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager,
        )
        self.weights_resident = self.weights_current = True  # model.path's weights, loaded by LLM()
        self._generating = self._receiving = False
        self._loaded = None
        if colocated:
            self._sleep()

    @property
    def needs_weights(self):
        """True while the engine holds no complete copy of the policy (after a level-2 sleep)."""
        return not self.weights_current

    def _sleep(self):
        self.llm.sleep(level=2)
        self.weights_resident = self.weights_current = False

    def _wake(self, tag):
        torch.cuda.empty_cache()  # blocks training's allocator keeps cached are what vLLM wakes into
        self.llm.wake_up(tags=[tag])
        if tag == "weights":
            self.weights_resident = True

    @contextlib.contextmanager
    def receiving_weights(self):
        """One full weight sync: one weights wake, then load_weights per bucket, then the prefix-cache reset."""
        if self._receiving or self._generating:
            raise RuntimeError("a weight sync cannot start inside another sync or a rollout")
        if not self.weights_resident:
            self._wake("weights")
        self._receiving, self._loaded, self.weights_current = True, set(), False
        try:
            yield self
            self._check_every_parameter_loaded()
        finally:
            self._receiving = False
        # Cached KV was computed with the old weights; False means some blocks are still held.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after the weight sync: a request holds blocks")
        self.weights_current = True

    def load_weights(self, named_tensors):
        """Copies (Hugging Face name, full tensor) pairs into the engine's model, inside receiving_weights."""
        if not self._receiving:
            raise RuntimeError("load_weights belongs inside `with engine.receiving_weights():` (see sync_weights)")
        loaded = self.llm.apply_model(functools.partial(_load_into, list(named_tensors)))[0]
        if loaded is None or self._loaded is None:
            self._loaded = None  # this model's loader does not report names: nothing to check
        else:
            self._loaded.update(loaded)

    def _check_every_parameter_loaded(self):
        if self._loaded is None:
            return
        missing = self.llm.apply_model(functools.partial(_unloaded_parameters, frozenset(self._loaded)))[0]
        if missing:
            raise RuntimeError(f"the weight sync wrote {len(self._loaded)} parameters but not {len(missing)} others "
                               f"({', '.join(missing[:3])}); after a level-2 sleep those hold garbage")

    @contextlib.contextmanager
    def generating(self):
        """Keeps the KV cache awake across the generate calls inside (a step's sampling rounds), then
        sleeps at level 2 so that training gets the memory back."""
        if self._generating or not self.colocated:
            yield
            return
        if not self.weights_current:
            raise RuntimeError("the engine released its weights after the last rollout (sleep level 2) and has not "
                               "been synced since; sync_weights (or ensure_engine_weights) comes first")
        self._wake("kv_cache")
        self._generating = True
        try:
            yield
        finally:
            self._generating = False
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
        with self.generating():
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

    def completion_logprobs(self, pairs):
        """Per (prompt ids, completion ids): the completion's token log-probs, log_softmax(logits) at
        temperature 1, from vLLM's prompt log-probs (teacher forcing, nothing sampled that counts)."""
        everyone, mine = self.peers.gather([(list(prompt), list(completion)) for prompt, completion in pairs])
        if not everyone:
            return []
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=0)
        with self.generating():
            outputs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in everyone], params, use_tqdm=False)
        return [prompt_token_logprobs(p + c, output.prompt_logprobs, len(p))
                for (p, c), output in zip(everyone[mine], outputs[mine])]


def evaluation_engine(config, tokenizer, max_model_len):
    """An engine on model.path alone (no trainer beside it), awake until it is dropped."""
    return VLLMRolloutEngine(
        config.model.path, tokenizer, gpu_memory_utilization=EVAL_GPU_MEMORY_UTILIZATION,
        tensor_parallel_size=config.grpo.vllm_tensor_parallel_size, seed=config.train.seed,
        max_model_len=max_model_len, colocated=False, trust_remote_code=config.model.trust_remote_code,
        key="eval.engine",
    )


def sample_benchmark_with_vllm(config, problems, tokenizer, rank, world_size):
    """eval.engine=vllm: (every problem's completions on rank 0, None elsewhere; generate calls made).

    The counterpart of evaluate.sample_benchmark: each rank samples problems rank, rank + N, ...
    keyed by their index in the benchmark, with one generate call (vLLM schedules the batch).
    """
    settings = config.eval
    prompts = [prompt for prompt, _ in problems]
    sampling = SamplingSettings(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=max(settings.budgets))
    max_model_len = max((len(p) for p in prompts), default=0) + sampling.max_new_tokens
    check_startup(config, world_size, key="eval.engine", utilization=EVAL_GPU_MEMORY_UTILIZATION,
                  max_model_len=max_model_len, training=False)
    engine = evaluation_engine(config, tokenizer, max_model_len)
    per_prompt = sample_problems(engine, prompts, sampling, config.train.seed, rank, world_size)
    return (per_prompt if rank == 0 else None), world_size
