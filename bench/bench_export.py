"""Host memory of the Hugging Face export: the streamed export against the whole-state-dict one.

A random Llama-architecture model of about 1B parameters (fp32, as trained) is exported as bf16
by one process on CPU; the figure is the peak resident set above the resident set just before
the export, in a fresh subprocess per implementation. `--baseline DIR` also measures the export
of another checkout of this repository (for example the commit before the streamed export), run
from that directory's `trainer` package.

    python -m bench.bench_export [--layers 18] [--baseline /path/to/older/checkout]
"""

import argparse
import json
import os
import sys
import tempfile

from .common import RESULTS_DIR, run_module_for_json, write_results

COLUMNS = ["export", "parameters_M", "bf16_size_MB", "peak_extra_MB", "peak_vs_bf16_size", "shards"]


def build_model(layers):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)  # any values: the export copies bytes
    return model


def run_export(source_root, layers, out_dir):
    """In a subprocess: builds the model, then measures one bf16 export from source_root's trainer."""
    sys.path.insert(0, source_root)
    import torch

    from bench.memory import measure_extra_bytes
    from trainer.model import CausalLMLoss
    from trainer.toy.model_dir import build_tokenizer
    from trainer.toy.task import WORDS

    # A checkout from before the streamed export has it in trainer/checkpoint.py. (An import
    # fallback would not do: the installed package would supply a module the checkout lacks.)
    if os.path.exists(os.path.join(source_root, "trainer", "export.py")):
        from trainer.export import export_hf
    else:
        from trainer.checkpoint import export_hf
    print(f"export from {sys.modules[export_hf.__module__].__file__}", file=sys.stderr)
    model = build_model(layers)
    root, tokenizer = CausalLMLoss(model), build_tokenizer(WORDS)
    directory = os.path.join(out_dir, "hf_model")
    peak = measure_extra_bytes(lambda: export_hf(root, tokenizer, directory, 0, dtype=torch.bfloat16), "cpu")
    shards = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
    return {"parameters": sum(p.numel() for p in model.parameters()), "peak_bytes": peak, "shards": len(shards)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--baseline", help="another checkout of this repository, measured the same way")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        source_root, layers, out_dir = args.run
        print(json.dumps(run_export(source_root, int(layers), out_dir)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = {"streamed (this checkout)": here}
    if args.baseline:
        sources["whole state dict (baseline)"] = os.path.abspath(args.baseline)
    rows = []
    for label, source in sources.items():
        with tempfile.TemporaryDirectory() as out_dir:
            result = run_module_for_json(["bench.bench_export", "--run", source, str(args.layers), out_dir],
                                         f"{label} export")
        bf16_bytes = 2 * result["parameters"]
        rows.append({"export": label, "parameters_M": result["parameters"] / 1e6, "bf16_size_MB": bf16_bytes / 2**20,
                     "peak_extra_MB": result["peak_bytes"] / 2**20,
                     "peak_vs_bf16_size": result["peak_bytes"] / bf16_bytes, "shards": result["shards"]})
    print(write_results("export_memory", rows, COLUMNS, "cpu", args.out))


if __name__ == "__main__":
    main()
