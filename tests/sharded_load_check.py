"""Loads models for FSDP on two gloo ranks, shard by shard (load_sharded_model) and the old way (every
rank loads the whole model, then apply_fsdp), and writes what each rank holds. Run by
tests/test_sharded_load.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_load_check.py OUT MEMORY_MODEL MODEL...

Each MODEL directory is loaded both ways and compared; then the peak host memory of loading
MEMORY_MODEL is measured each way (imports already warm). Rank r writes OUT/rank<r>.json.
"""

import ctypes
import gc
import glob
import json
import os
import sys

import torch


def stored_weights(path):
    """Every weight of a model directory, read whole, independently of the loader under test."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    weights = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def rows_of_rank(tensor, rank, world_size):
    """This rank's rows of a whole tensor as FSDP shards dim 0 (torch.chunk sizes, trailing ranks may get none)."""
    per_rank = -(-tensor.shape[0] // world_size)
    return tensor[min(rank * per_rank, tensor.shape[0]):(rank + 1) * per_rank]


def names_that_differ(first, second):
    return sorted(name for name in first if not torch.equal(first[name], second[name]))


def local_parts(root):
    return {name: tensor.to_local().detach() for name, tensor in root.causal_lm.state_dict(keep_vars=True).items()}


def forward_loss(root, rank):
    generator = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(5, root.causal_lm.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        return root(input_ids, torch.arange(16).expand(2, 16), targets=torch.roll(input_ids, -1, dims=1)).item()


def compare(path, rank, world_size, device):
    """What this rank holds after loading path shard by shard, against the files and the old way."""
    from torch.distributed.tensor import DTensor, Shard

    from trainer.config import load_config
    from trainer.model import CausalLMLoss, load_causal_lm
    from trainer.parallel import apply_fsdp
    from trainer.training import load_sharded_model

    config = load_config(None, [f"model.path={path}", "data.train_files=[unused.jsonl]"])
    sharded = load_sharded_model(config, device, trainable=True)
    whole = apply_fsdp(CausalLMLoss(load_causal_lm(config.model, device, trainable=True)), device, config.parallel)
    frozen = load_sharded_model(config, device, trainable=False)
    causal_lm, parameters = sharded.causal_lm, dict(sharded.named_parameters())
    stored = stored_weights(path)
    local = local_parts(sharded)
    # A tied weight is stored once, under either of its names.
    tied_name = {"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"}
    expected = {name: rows_of_rank(stored[name if name in stored else tied_name[name]], rank, world_size)
                .to(local[name].dtype) for name in local}
    return {
        "all_dim0_dtensor_shards": all(isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),)
                                       for p in parameters.values()),
        "differ_from_files": names_that_differ(local, expected),
        "differ_from_whole_load": names_that_differ(local, local_parts(whole)),
        "dtypes": sorted({str(p.dtype) for p in parameters.values()} | {str(p.dtype) for p in whole.parameters()}),
        "differ_buffers": names_that_differ(dict(whole.named_buffers()), dict(sharded.named_buffers())),
        "buffers": sorted(name for name, _ in sharded.named_buffers()),
        "tied_in_config": causal_lm.config.tie_word_embeddings,
        "tied": causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight,
        "tied_whole_load": whole.causal_lm.lm_head.weight is whole.causal_lm.model.embed_tokens.weight,
        "local_elements": sum(p.to_local().numel() for p in parameters.values()),
        "model_elements": sum(p.numel() for p in parameters.values()),
        "loss": forward_loss(sharded, rank),
        "loss_whole_load": forward_loss(whole, rank),
        "frozen_requires_grad": any(p.requires_grad for p in frozen.parameters()),
        "frozen_training": any(module.training for module in frozen.causal_lm.modules()),
        "frozen_differ": names_that_differ(local, local_parts(frozen)),
        "training_flag": causal_lm.training == whole.causal_lm.training,
    }


def resident_mb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mb(load):
    """Peak resident memory that load() adds, in MB: freed memory handed back first, the peak reset (Linux)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM back to the current resident set
    before = resident_mb("VmRSS")
    root = load()
    extra = resident_mb("VmHWM") - before
    del root
    return extra


def measure(path, device):
    from trainer.config import load_config
    from trainer.model import CausalLMLoss, load_causal_lm
    from trainer.parallel import apply_fsdp
    from trainer.training import load_sharded_model

    config = load_config(None, [f"model.path={path}", "data.train_files=[unused.jsonl]"])
    sharded = peak_extra_mb(lambda: load_sharded_model(config, device, trainable=True))
    whole = peak_extra_mb(lambda: apply_fsdp(
        CausalLMLoss(load_causal_lm(config.model, device, trainable=True)), device, config.parallel))
    return {"sharded_extra_MB": sharded, "whole_extra_MB": whole}


def main(out, memory_model, *models):
    from trainer.parallel import init_distributed, shutdown

    rank, world_size, device = init_distributed()
    findings = {path: compare(path, rank, world_size, device) for path in models}
    findings["memory"] = measure(memory_model, device)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(findings, handle)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
