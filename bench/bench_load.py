"""Host memory of loading a model for FSDP: every rank loading the whole model, against shard by shard.

A random Qwen2-architecture model of about 1B parameters is saved as bf16 safetensors (as a
trained model is exported), then loaded by 2 ranks (gloo, CPU) with fp32 weights (the training
dtype), once each way, in fresh processes:

- full copy: `load_causal_lm` (from_pretrained on every rank) then `apply_fsdp`;
- sharded: `load_sharded_model`, which builds the model without weights, shards it, and has each
  rank read only its own rows of the safetensors files.

Each rank reports its resident set just before loading and its peak resident set (ru_maxrss)
after it. The goal: the ranks' summed peak for the sharded load at most 0.6x the full copy's.

    python -m bench.bench_load [--layers 20]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from .common import RESULTS_DIR, write_results

RANKS = 2
MODES = {"full copy": "full", "sharded": "sharded"}
COLUMNS = ["load", "rank", "local_params_M", "rss_before_MB", "peak_rss_MB", "peak_extra_MB", "load_s"]
RESULT_PREFIX = "load result: "

# The paper's model (DeepSeek-R1-Distill-Qwen-14B): 14.8B parameters trained as fp32 master weights
# and stored as bf16, 8 ranks a node; its largest weight is an embedding of 152064 x 5120.
PAPER_PARAMETERS, PAPER_RANKS, PAPER_LARGEST_WEIGHT = 14.8e9, 8, 152064 * 5120


def build_model_dir(path, layers):
    """Saves a random ~1B-parameter Qwen2-shaped causal LM (untied embeddings) as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)  # any values: both loads must read the same ones
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def resident_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS")


def load_on_this_rank(mode, model_dir):
    """Under torchrun: loads the model one way and prints this rank's memory figures as one JSON line."""
    import torch

    from trainer.config import load_config
    from trainer.model import CausalLMLoss, load_causal_lm
    from trainer.parallel import apply_fsdp, init_distributed, shutdown
    from trainer.training import load_sharded_model

    rank, _, device = init_distributed()
    config = load_config(None, [f"model.path={model_dir}", "data.train_files=[unused.jsonl]"])
    import torch.distributed.fsdp  # noqa: F401  (imported before the baseline: not part of either load)

    before = resident_mb()
    start = time.perf_counter()
    if mode == "full":
        root = apply_fsdp(CausalLMLoss(load_causal_lm(config.model, device, trainable=True)), device, config.parallel)
    else:
        root = load_sharded_model(config, device, trainable=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    local = [p.to_local() for p in root.parameters()]
    checksum = sum(t.double().sum().item() for t in local)  # the same rows either way
    print(RESULT_PREFIX + json.dumps({
        "rank": rank, "local_parameters": sum(t.numel() for t in local), "rss_before_MB": before,
        "peak_rss_MB": peak, "load_s": seconds, "checksum": checksum,
    }), flush=True)
    del root, local
    shutdown()


def launch(mode, model_dir, port):
    """Both ranks of one load, in fresh processes; their result lines, in rank order."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port", str(port),
         "-m", "bench.bench_load", "--rank-run", mode, model_dir],
        capture_output=True, text=True, cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} load failed:\n{completed.stderr[-3000:]}")
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in completed.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    return sorted(results, key=lambda result: result["rank"])


def paper_scale_note():
    """The measured pattern carried to the paper's scale, per node.

    Measured here: the full copy's peak is the fp32 model plus the whole bf16 file mapped; the
    sharded load's is the fp32 shard plus, for one weight at a time, its rows' file pages and their
    bf16 copy.
    """
    fp32_gb, bf16_gb = 4 * PAPER_PARAMETERS / 1e9, 2 * PAPER_PARAMETERS / 1e9
    full_gb = fp32_gb + bf16_gb
    shard_gb, rows_gb = fp32_gb / PAPER_RANKS, 2 * 2 * PAPER_LARGEST_WEIGHT / PAPER_RANKS / 1e9
    return (
        f"At the paper's scale ({PAPER_PARAMETERS / 1e9:.1f}B parameters, fp32 master weights, bf16 files, "
        f"{PAPER_RANKS} ranks a node): the full copy holds the whole fp32 model on every rank, {PAPER_RANKS} x "
        f"{fp32_gb:.0f} GB = {PAPER_RANKS * fp32_gb:.0f} GB a node, {PAPER_RANKS} x {full_gb:.0f} GB = "
        f"{PAPER_RANKS * full_gb:.0f} GB with the file pages each rank maps; sharded, each rank holds its fp32 "
        f"shard, {fp32_gb:.1f} / {PAPER_RANKS} = {shard_gb:.1f} GB, plus at most the largest weight's rows "
        f"(file pages and their bf16 copy, {rows_gb:.2f} GB): about {shard_gb + rows_gb:.1f} GB a rank, "
        f"{PAPER_RANKS * (shard_gb + rows_gb):.0f} GB a node."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--rank-run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_run:
        load_on_this_rank(*args.rank_run)
        return
    rows, summed, checksums = [], {}, {}
    with tempfile.TemporaryDirectory() as model_dir:
        parameters = build_model_dir(model_dir, args.layers)
        print(f"{parameters / 1e6:.0f}M parameters saved as bf16 in {model_dir}", flush=True)
        for label, mode in MODES.items():
            results = launch(mode, model_dir, args.port)
            summed[label] = sum(result["peak_rss_MB"] for result in results)
            checksums[label] = [result["checksum"] for result in results]
            for result in results:
                rows.append({"load": label, "rank": result["rank"], "local_params_M": result["local_parameters"] / 1e6,
                             "rss_before_MB": result["rss_before_MB"], "peak_rss_MB": result["peak_rss_MB"],
                             "peak_extra_MB": result["peak_rss_MB"] - result["rss_before_MB"],
                             "load_s": result["load_s"]})
            rows.append({"load": label, "rank": "sum",
                         "local_params_M": sum(r["local_parameters"] for r in results) / 1e6,
                         "rss_before_MB": sum(r["rss_before_MB"] for r in results), "peak_rss_MB": summed[label],
                         "peak_extra_MB": sum(r["peak_rss_MB"] - r["rss_before_MB"] for r in results),
                         "load_s": max(r["load_s"] for r in results)})
    if checksums["sharded"] != checksums["full copy"]:
        raise RuntimeError(f"the two loads hold different weights: {checksums}")
    ratio = summed["sharded"] / summed["full copy"]
    markdown = write_results("load_memory", rows, COLUMNS, "cpu", args.out)
    summary = (
        f"\n{parameters / 1e6:.0f}M parameters (bf16 files of {2 * parameters / 2**20:.0f} MB, fp32 weights of "
        f"{4 * parameters / 2**20:.0f} MB), {RANKS} ranks. Summed peak RSS, sharded / full copy: {ratio:.3f} "
        f"(goal: at most 0.6). Both loads hold the same weights on each rank (equal checksums).\n\n"
        f"{paper_scale_note()}\n"
    )
    with open(os.path.join(args.out, "load_memory.md"), "a") as handle:
        handle.write(summary)
    print(markdown + summary)


if __name__ == "__main__":
    main()
