"""The Hugging Face export, streamed: one gathered parameter in host memory at a time.

Every shard's safetensors header is planned from the parameters' global shapes before anything
is gathered, so each parameter can be gathered from its FSDP shards, cast to the export dtype
on its own device, and written straight to its place in the file. Shards hold at most
max_shard_bytes and an index json maps each weight to its shard, as Hugging Face writes them.
The directory is written under a .tmp name and renamed when complete.
"""

import json
import os
import shutil
import struct

import torch

from .parallel import barrier

MAX_SHARD_BYTES = 5 * 2**30
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def unique_weights(causal_lm):
    """(name, tensor) of the state dict, each shared tensor (tied embeddings) once under its first name."""
    # keep_vars: the parameter objects themselves, so a tied pair is one object on every rank.
    seen, weights = set(), []
    for name, tensor in causal_lm.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            weights.append((name, tensor))
    return weights


def export_dtype(tensor, dtype):
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def plan_shards(weights, dtype, max_shard_bytes):
    """[[(name, shape, dtype, byte size)], ...]: consecutive weights, each shard at most max_shard_bytes
    (a weight larger than that gets a shard of its own)."""
    shards, current, current_bytes = [], [], 0
    for name, tensor in weights:
        out_dtype = export_dtype(tensor, dtype)
        size = tensor.numel() * torch.empty((), dtype=out_dtype).element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, tuple(tensor.shape), out_dtype, size))
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def safetensors_header(entries):
    """The header bytes (length prefix included) of a safetensors file holding entries in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, size in entries:
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def gathered(tensor, dtype):
    """Collective: the full tensor in the export dtype, cast on the shard's device before it reaches the host."""
    if hasattr(tensor, "full_tensor"):
        if tensor.to_local().device.type == "cpu" and torch.cuda.is_available():
            tensor = tensor.to("cuda")  # CPU-offloaded shards: NCCL gathers only GPU memory
        tensor = tensor.full_tensor()
    return tensor.detach().to(export_dtype(tensor, dtype)).cpu().contiguous()


def shard_names(count):
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def write_weights(weights, directory, rank, dtype, max_shard_bytes):
    """Collective: every rank gathers each weight in turn; rank 0 writes the shards and their index."""
    shards = plan_shards(weights, dtype, max_shard_bytes)
    names = shard_names(len(shards))
    tensors = dict(weights)
    for shard_name, entries in zip(names, shards):
        handle = open(os.path.join(directory, shard_name), "wb") if rank == 0 else None
        try:
            if handle is not None:
                handle.write(safetensors_header(entries))
            for name, _, _, _ in entries:
                full = gathered(tensors[name], dtype)
                if handle is not None:
                    handle.write(memoryview(full.view(-1).view(torch.uint8).numpy()))  # no copy of the bytes
                del full
        finally:
            if handle is not None:
                handle.close()
    if rank == 0 and len(shards) > 1:
        index = {"metadata": {"total_size": sum(size for entries in shards for *_, size in entries)},
                 "weight_map": {name: shard for shard, entries in zip(names, shards) for name, *_ in entries}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)


def _set_config_dtype(path, dtype):
    """The saved config names the weights' dtype, not the fp32 of the live master weights."""
    with open(path) as handle:
        config = json.load(handle)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = str(dtype).removeprefix("torch.")
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def export_hf(root_module, tokenizer, directory, rank, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
    """Collective: writes a Hugging Face directory (safetensors shards, config, tokenizer), atomically.

    dtype: the floating-point weights' dtype on disk (default: as trained), e.g. bf16 for a
    model trained as fp32 master weights with bf16 compute.
    """
    causal_lm = root_module.causal_lm
    temporary = directory.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    weights = unique_weights(causal_lm)
    write_weights(weights, temporary, rank, dtype, max_shard_bytes)
    if rank == 0:
        causal_lm.config.save_pretrained(temporary)
        if getattr(causal_lm, "generation_config", None) is not None and causal_lm.can_generate():
            causal_lm.generation_config.save_pretrained(temporary)
        _set_config_dtype(os.path.join(temporary, "config.json"),
                          dtype or next(t for _, t in weights if t.is_floating_point()).dtype)
        tokenizer.save_pretrained(temporary)
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(temporary, directory)
    barrier()
    return directory
