"""torch.distributed set-up and FSDP2: fully_shard per decoder layer, then the root."""

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes=30):
    """(rank, world_size, device); a process group only when launched by torchrun with several ranks.

    timeout_minutes bounds every collective, barriers included: long enough for the slowest
    rank to finish writing and checksumming its share of a checkpoint (parallel.timeout_minutes).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def all_gather_objects(value):
    """Every rank's picklable value, in rank order."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_concat(tensor):
    """Every rank's tensor of the same shape, concatenated in rank order along dim 0."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor):
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value):
    """The largest of every rank's integer."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_named(values, device, op="sum"):
    """{name: number} reduced over every rank in one collective (float32), as plain numbers."""
    tensor = torch.tensor([float(value) for value in values.values()], dtype=torch.float32, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(values, tensor.tolist()))


def shutdown():
    if is_distributed():
        dist.barrier()  # every rank reaches teardown before the group goes away
        dist.destroy_process_group()


def apply_fsdp(root, device, parallel_config, mesh=None):
    """Shards each decoder layer, then the root; a single process keeps the plain module.

    Either way a GPU computes in bf16: FSDP casts the parameters, a single process with fp32
    weights runs its forward under autocast (CausalLMLoss.autocast_dtype). mesh: the device mesh
    to shard over (default: every rank of the process group).
    """
    causal_lm = root.causal_lm
    if parallel_config.activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2; transformers >= 5.x renamed the method.
        if hasattr(causal_lm, "activation_checkpointing_enable"):
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not is_distributed():
        if device.type == "cuda" and causal_lm.dtype == torch.float32:
            root.autocast_dtype = torch.bfloat16  # fp32 master weights, bf16 compute, as under FSDP
        return root
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {} if mesh is None else {"mesh": mesh}
    if device.type == "cuda":
        # bf16 compute, fp32 gradient reduction across ranks.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if parallel_config.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in causal_lm.model.layers:
        fully_shard(layer, **options)
    fully_shard(root, **options)
    # FSDP picks its root at the first forward. Rollouts call the inner model's generate()
    # first, which would make each layer a root of its own; settle the root now.
    fully_shard.state(root)._lazy_init()
    return root
