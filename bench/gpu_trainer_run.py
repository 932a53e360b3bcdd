"""The trainer on one GPU at the paper model's shapes: packed SFT rows and GRPO steps with HF rollouts.

The model has DeepSeek-R1-Distill-Qwen-14B's shapes (configs/models/: vocabulary, hidden size,
grouped-query heads, MLP, rope, q/k/v biases) cut to a few decoder layers and randomly
initialised. It is saved as a Llama-architecture directory (the same layers; Llama's bias
option adds one to o_proj too, 5120 numbers a layer) because AutoTokenizer maps the qwen2
model type to a byte-level BPE class, which would replace the word-level tokenizer written here. It trains
with fp32 master weights and bf16 compute, activation checkpointing and the document-masked
attention, through the trainer's own Trainer, data packing and GRPO loop. Reported per stage:
tokens per second, model FLOPs utilisation (model FLOPs only: no recomputation, no pads)
against the bf16 matmul rate measured in the same run, and peak GPU memory.

    python -m bench.gpu_trainer_run --out DIR [--layers 4] [--seq-len 16384] [--sft-steps 5]
    python -m bench.gpu_trainer_run --tiny --out DIR   # the same path on CPU in seconds
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch

from .common import write_results

ARCHITECTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "models", "deepseek-r1-distill-qwen-14b", "config.json")
COLUMNS = ["stage", "layers", "tokens_per_step", "step_s", "tokens_per_s", "model_TFLOP_per_step",
           "achieved_TFLOP_per_s", "mfu_vs_measured_matmul", "peak_allocated_GB", "peak_reserved_GB", "planned_peak_GB",
           "notes"]


def model_config(layers, tiny):
    from transformers import LlamaConfig

    with open(ARCHITECTURE) as handle:
        qwen2 = json.load(handle)
    shapes = {key: qwen2[key] for key in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "hidden_act")}
    if tiny:
        shapes.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=4096)
    return LlamaConfig(**shapes, num_hidden_layers=layers, attention_bias=True, bos_token_id=None,
                       eos_token_id=None)


def build_model_dir(path, config, device):
    """A Hugging Face directory holding the randomly initialised model (bf16) and a word-level tokenizer."""
    from transformers import LlamaForCausalLM

    from trainer.toy.model_dir import build_tokenizer
    from trainer.toy.task import WORDS

    specials = 32
    filler = [f"w{i}" for i in range(config.vocab_size)]
    tokenizer = build_tokenizer(WORDS + filler[: config.vocab_size - len(WORDS) - specials])
    config.pad_token_id, config.eos_token_id, config.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                                     None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return tokenizer


def write_sft_data(path, documents, shortest, longest, seed=0):
    """Chats whose assistant turns are random words: documents of shortest..longest tokens."""
    from trainer.toy.task import WORDS

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(documents):
            words = rng.choices(WORDS, k=rng.randint(shortest, longest))
            handle.write(json.dumps({"problem": "what is 3 + 4 ?", "solution": " ".join(words)}) + "\n")
    return path


def write_prompts(path, count):
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(json.dumps({"problem": f"tom has {index} apples and gets 5 more . how many ?",
                                     "answer": str(index + 5)}) + "\n")
    return path


def matmul_tflops(device):
    """Measured dense bf16 matmul rate (TFLOP/s), the ceiling the utilisation is quoted against."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def matmul_parameters(config):
    """Parameters that take part in a matmul per token: every decoder projection and the lm_head."""
    hidden, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * hidden


def training_flops(config, document_lengths):
    """6 x matmul parameters per token, plus causal attention: 6 * L_d^2 * hidden per layer and document."""
    tokens = sum(document_lengths)
    attention = 6 * config.hidden_size * config.num_hidden_layers * sum(length**2 for length in document_lengths)
    return 6 * matmul_parameters(config) * tokens + attention


def memory_gb(device):
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def reset_memory(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def planned_peak_gb(run, workdir, device, overrides=()):
    """What `python -m trainer.plan` predicts for this run's peak on this GPU, in GiB."""
    from trainer.config import save_config
    from trainer.plan import GIB, run_plan

    path = os.path.join(workdir, f"{run.stage}_plan.yaml")
    save_config(run, path)
    memory = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 80.0
    plans, _, _ = run_plan(path, list(overrides), gpus=1, gpu_memory_gb=memory, log=lambda *_: None)
    return plans[0].peak_phase.total / GIB


def run_sft(model_path, data_path, workdir, args, config, device, ceiling):
    """Trainer + SFTData, as `python -m trainer.run` drives them; the first step is warm-up."""
    from trainer.config import load_config
    from trainer.sft import SFTData
    from trainer.training import Trainer

    steps = args.sft_steps + 1
    run = load_config(None, [
        f"run_dir={workdir}/sft", f"model.path={model_path}", f"data.train_files=[{data_path}]",
        f"data.max_seq_len={args.seq_len}", "train.micro_batch_size=1", "train.grad_accum=1",
        f"train.max_steps={steps}", "optim.lr=1e-5", "parallel.activation_checkpointing=true",
        "checkpoint.export_hf=false", "checkpoint.save_final=false",
    ])
    planned = planned_peak_gb(run, workdir, device)
    reset_memory(device)
    trainer = Trainer(run)
    data = SFTData(run, trainer.tokenizer, 1, print)
    trainer.set_schedule(steps)
    times, flops, tokens = [], [], []
    for step in range(steps):
        batches = data.micro_batches(step, 0)
        bounds = [b["document_boundaries"].tolist() for b in batches]
        lengths = [end - start for b in bounds for start, end in zip(b, b[1:])]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        values = trainer.train_step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"sft step {step}: {time.perf_counter() - started:.3f} s, loss {values['loss']:.4f}, "
              f"{sum(lengths)} tokens in {len(lengths)} documents", flush=True)
        if step > 0:
            times.append(time.perf_counter() - started)
            flops.append(training_flops(config, lengths))
            tokens.append(sum(lengths))
    peak, reserved = memory_gb(device)
    del trainer
    return summarise("sft", config, times, flops, tokens, peak, reserved, ceiling, planned,
                     f"{args.seq_len}-token packed rows, micro-batch 1, fp32 master weights, bf16 compute, "
                     "activation checkpointing, document-masked attention")


def run_grpo_steps(model_path, prompts_path, workdir, args, config, device, ceiling):
    """The trainer's GRPO loop (HF rollouts, beta > 0 so the reference model is loaded too)."""
    from trainer.config import load_config
    from trainer.grpo import run_grpo
    from trainer.metrics import read_metrics

    run_dir = f"{workdir}/grpo"
    run = load_config(None, [
        "stage=grpo", f"run_dir={run_dir}", f"model.path={model_path}", f"data.train_files=[{prompts_path}]",
        f"train.max_steps={args.grpo_steps + 1}", "optim.lr=4e-6", "parallel.activation_checkpointing=true",
        "grpo.prompts_per_step=2", "grpo.group_size=4", f"grpo.sampling.max_new_tokens={args.max_new_tokens}",
        "grpo.loss.beta=0.04", "grpo.sampling.top_p=1.0", "grpo.sampling.min_p=0.0", "checkpoint.export_hf=false",
        "checkpoint.save_final=false", f"train.max_tokens_per_micro_batch={args.grpo_budget}",
    ])
    planned = planned_peak_gb(run, workdir, device, [f"grpo.max_prompt_tokens={args.prompt_tokens}"])
    reset_memory(device)
    run_grpo(run)
    everything = read_metrics(run_dir)
    records = everything[1:]  # the first step is warm-up
    times = [r["train_s"] for r in records]
    # The policy's forward and backward over prompt + completion tokens (pads are not model FLOPs).
    lengths = [[args.prompt_tokens + round(r["completion_tokens"])] * 8 for r in records]
    flops = [training_flops(config, step_lengths) for step_lengths in lengths]
    tokens = [sum(step_lengths) for step_lengths in lengths]
    peak = max((r.get("peak_memory_GB") or 0.0) for r in everything)
    rollout = statistics.median(r["rollout_s"] for r in records)
    step = statistics.median(r["step_s"] for r in records)
    return summarise("grpo (training phase)", config, times, flops, tokens, peak if device.type == "cuda" else None,
                     memory_gb(device)[1], ceiling, planned,
                     f"8 completions of {args.max_new_tokens} new tokens packed in rows of at most "
                     f"{args.grpo_budget} tokens, HF rollouts {rollout:.1f} s and whole step {step:.1f} s (medians), "
                     "beta 0.04 with the reference model loaded")


def summarise(stage, config, times, flops, tokens, peak, reserved, ceiling, planned, notes):
    step_s = statistics.median(times)
    flop = statistics.median(flops)
    achieved = flop / step_s / 1e12
    return {
        "stage": stage, "layers": config.num_hidden_layers, "tokens_per_step": statistics.median(tokens),
        "step_s": step_s, "tokens_per_s": statistics.median(tokens) / step_s, "model_TFLOP_per_step": flop / 1e12,
        "achieved_TFLOP_per_s": achieved, "mfu_vs_measured_matmul": achieved / ceiling if ceiling else None,
        "peak_allocated_GB": peak, "peak_reserved_GB": reserved, "planned_peak_GB": planned, "notes": notes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--sft-steps", type=int, default=5, help="measured steps after one warm-up step")
    parser.add_argument("--grpo-steps", type=int, default=2, help="measured steps after one warm-up step")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--grpo-budget", type=int, default=None,
                        help="GRPO tokens per packed micro-batch (default: two sequences' worth)")
    parser.add_argument("--stages", default="sft,grpo")
    parser.add_argument("--tiny", action="store_true", help="a small model and short rows: the same path on CPU")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.max_new_tokens = 512, 16
    args.grpo_budget = args.grpo_budget or 2 * (args.max_new_tokens + 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.layers, args.tiny)
    ceiling = matmul_tflops(device)
    print(f"device {device}, {matmul_parameters(config) / 1e9:.2f}B matmul parameters, "
          f"measured bf16 matmul {ceiling or 0:.0f} TFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("FASTMATH_SCRATCH")) as workdir:
        model_path = os.path.join(workdir, "model")
        started = time.perf_counter()
        tokenizer = build_model_dir(model_path, model_config(args.layers, args.tiny), device)
        print(f"model directory written in {time.perf_counter() - started:.1f} s", flush=True)
        if "sft" in args.stages:
            data = write_sft_data(os.path.join(workdir, "sft.jsonl"), 12 * (args.sft_steps + 1),
                                  args.seq_len // 12, args.seq_len // 3)
            rows.append(run_sft(model_path, data, workdir, args, config, device, ceiling))
        if "grpo" in args.stages:
            prompts = write_prompts(os.path.join(workdir, "prompts.jsonl"), 64)
            chat = [{"role": "user", "content": "tom has 0 apples and gets 5 more . how many ?"}]
            prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            args.prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            rows.append(run_grpo_steps(model_path, prompts, workdir, args, config, device, ceiling))
    print(write_results("trainer_gpu_run", rows, COLUMNS, device.type, args.out))


if __name__ == "__main__":
    main()
