"""Exports a model sharded by FSDP2 over the ranks, in several safetensors shards; rank 0 then
compares every reloaded weight with the bf16-rounded original. Run by tests/test_model_precision.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/export_check.py MODEL OUT
"""

import sys

import torch


def main(model_dir, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import ParallelConfig
    from trainer.export import export_hf
    from trainer.model import CausalLMLoss
    from trainer.parallel import apply_fsdp, init_distributed, shutdown

    rank, _, device = init_distributed()
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = {name: p.detach().to(torch.bfloat16).clone() for name, p in original.named_parameters()}
    root = apply_fsdp(CausalLMLoss(original), device, ParallelConfig())
    largest = max(t.numel() for t in expected.values()) * 2
    export_hf(root, AutoTokenizer.from_pretrained(model_dir), out_dir, rank, dtype=torch.bfloat16,
              max_shard_bytes=largest)
    if rank == 0:
        exported = dict(AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto").named_parameters())
        assert set(exported) == set(expected), sorted(set(exported) ^ set(expected))
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), name
        print("export matches")
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
