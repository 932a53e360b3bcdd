"""Measuring one rank's memory and FLOPs on fake tensors: a fake process group of N ranks, the real
model code at the configured shapes, FSDP2 as the trainer applies it, and PyTorch's trackers.

Nothing here allocates real memory: parameters, activations and kernel outputs are FakeTensors
(CPU tensors without storage), and the fused kernels resolve as if on a GPU
(`fastmath_kernels.planning_as_gpu`), so their registered fake implementations allocate what
the CUDA kernels would. Byte counts of tensors do not depend on the device.
"""

import contextlib
import copy
import dataclasses

import torch
import torch.distributed as dist

from fastmath_kernels import planning_as_gpu

from .attention import DOCUMENT_MASKED, register_document_attention
from .model import CausalLMLoss, resolve_dtype
from .parallel import apply_fsdp

CUDA = torch.device("cuda")


@contextlib.contextmanager
def fake_world(world_size):
    """This process as rank 0 of a fake process group of world_size ranks, inside FakeTensorMode.

    Yields the CPU device mesh FSDP shards over (None for one rank: one process trains without
    FSDP, as the trainer does). The mesh is built before FakeTensorMode starts: inside it the
    default mesh would read rank data it does not have.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner needs its own fake process group; run it before torch.distributed starts")
    if world_size == 1:
        with FakeTensorMode(allow_non_fake_inputs=True), planning_as_gpu():
            yield None
        return
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        with FakeTensorMode(allow_non_fake_inputs=True), planning_as_gpu():
            yield mesh
    finally:
        dist.destroy_process_group()


def build_sharded_model(architecture, config, mesh, trainable):
    """The loss module around a randomly initialised causal LM of this architecture, sharded as
    the trainer shards it (dtype, attention, checkpointing, mixed precision on a GPU). Without a
    process group it stays whole, in fp32 under bf16 autocast, frozen copy included, as one
    training process holds it."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(config.model.dtype, CUDA, trainable=trainable or not dist.is_initialized())
    if config.model.attn_implementation == DOCUMENT_MASKED:
        register_document_attention()
    # from_config writes the attention choice into the config it is given: build from a copy.
    causal_lm = AutoModelForCausalLM.from_config(copy.deepcopy(architecture), dtype=dtype,
                                                 attn_implementation=config.model.attn_implementation)
    if not trainable:
        causal_lm.requires_grad_(False)
        causal_lm.eval()
    root = CausalLMLoss(causal_lm, low_memory_loss=config.train.low_memory_loss)
    return apply_fsdp(root, CUDA, config.parallel, mesh=mesh)


def local_bytes(tensors):
    """Bytes this rank holds of the given tensors (a DTensor's local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


@dataclasses.dataclass
class Measured:
    """One phase's peak by the tracker's categories (bytes), the activations at named moments, FLOPs."""

    peak: dict
    activations_at: dict
    flops: int


_CATEGORY_NAMES = {
    "Sharded Param": "sharded_params", "Unsharded Param": "gathered_params", "Buffer": "buffers",
    "Sharded Grad": "sharded_grads", "Unsharded Grad": "unsharded_grads", "Activation": "activations",
    "Temp": "temporaries", "All Gather": "all_gather", "Reduce Scatter": "reduce_scatter",
    "OptState": "optimizer_states", "Inputs": "inputs",
    # MemTracker's names, for a module FSDP does not wrap.
    "Parameter": "sharded_params", "Gradient": "sharded_grads", "Optstate": "optimizer_states", "Other": "temporaries",
}


def _by_name(snapshot):
    """{category: bytes} of one device's tracker snapshot, keyed by our names."""
    values = {}
    for device_values in snapshot.values():
        for key, size in device_values.items():
            name = _CATEGORY_NAMES.get(getattr(key, "value", key))
            if name:
                values[name] = values.get(name, 0) + size
    return values


def measure(root, work, repeats=1, checkpoints=()):
    """Runs work() `repeats` times under FSDP's memory tracker, then once more under torch's FLOP
    counter (which keeps tensors alive, so it cannot watch the tracked runs); returns a Measured
    with the highest peak of the tracked runs and the FLOPs of one run.

    checkpoints: (name, module, "start" or "end") triples; the tracked activations are recorded
    as "<name> <start or end>" when that module's forward starts or ends, the first time it runs.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule
    from torch.utils.flop_counter import FlopCounterMode

    frozen = []
    if isinstance(root, FSDPModule):
        tracker = FSDPMemTracker(root)
    else:
        tracker = MemTracker()
        tracker.track_external(root)
        # MemTracker hooks every parameter's gradient, which frozen parameters refuse. A frozen
        # model runs under no_grad, so the hooks cannot fire: it is unfrozen while it is tracked.
        frozen = [p for p in root.parameters() if not p.requires_grad]
    activations_at, hooks = {}, []

    def record(label):
        def hook(*_):
            activations_at.setdefault(label, _by_name(tracker.get_tracker_snapshot("current")).get("activations", 0))
        return hook

    for name, module, moment in checkpoints:
        register = module.register_forward_pre_hook if moment == "start" else module.register_forward_hook
        hooks.append(register(record(f"{name} {moment}")))
    peaks = []
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        with tracker:
            for _ in range(repeats):
                work()
                peaks.append(_by_name(tracker.get_tracker_snapshot("peak")))
                tracker.reset_mod_stats()  # the tracker follows one call of each module at a time
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)
        for hook in hooks:
            hook.remove()
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    peak = max(peaks, key=lambda values: sum(values.values()))
    return Measured(peak=peak, activations_at=activations_at, flops=counter.get_total_flops())


def measure_optimizer_step(parameters, optim):
    """(state bytes, peak temporary bytes) of AdamW stepping this rank's local shards.

    Measured on plain fake tensors shaped like the local shards, with the multi-tensor (foreach)
    implementation torch picks for CUDA tensors: the optimizer applies the same per-shard ops
    to the DTensors' local tensors, and the tracker then counts each tensor once.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
    shards = [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for p in locals_]
    optimizer = torch.optim.AdamW(shards, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                  weight_decay=optim.weight_decay, foreach=True)
    for shard in shards:
        shard.grad = torch.empty_like(shard)
    tracker = MemTracker()
    tracker.track_external(optimizer, *shards)
    with tracker:
        for _ in range(2):  # the first step creates the states; the second is a steady one
            optimizer.step()
    state_bytes = local_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    # The tracker files what the step allocates under optimizer states, its temporaries included.
    during_step = max(_by_name(tracker.get_tracker_snapshot("peak")).get("optimizer_states", 0), state_bytes)
    return state_bytes, max(0, during_step - state_bytes)
