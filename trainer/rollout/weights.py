"""Weight syncs from the trainer's policy to an engine that computes with its own copy (vLLM)."""


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
    if not engine.holds_weights:
        return 0
    # The trainer keeps fp32 master weights; the engine computes in its own (lower) precision.
    dtype, device = engine.weight_dtype, engine.weight_device
    sent = 0

    def gathered():
        nonlocal sent
        for name, tensor in root_module.causal_lm.state_dict().items():
            full = _full_tensor(tensor, dtype, device)
            sent += full.numel() * full.element_size()
            yield name, full

    engine.sync(gathered())
    return sent


def ensure_engine_weights(root_module, engine):
    """A full sync when the engine's copy is not the policy's; returns the bytes sent (0 when none was due).

    Due before the first rollout of every run: a colocated vLLM engine frees the weights it
    loaded at start, and after a resume the policy is the checkpoint's, not model.path's.
    Every rank holds the same state, so every rank takes part in the same gathers.
    """
    if engine.needs_weights:
        return sync_weights(root_module, engine)
    return 0
