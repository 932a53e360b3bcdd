"""The embedded default: the two-stage recipe at toy scale, on CPU, in minutes.

1. Build a tiny Llama-architecture model (about 0.8M parameters, a word-level vocabulary) and
   word problems whose traces re-check their steps 60% of the time.
2. Stage 1, SFT: many epochs on 3000 problems.
3. Stage 2, GRPO: the recipe's rewards (format, cosine length, Kimi length) on the SFT model.
4. Evaluate both on 1000 held-out problems with sampled decoding (T=1): pass@1 and mean length.
"""

import json
import os
import time

from ..config import load_config
from .model_dir import build_model_dir
from .task import WORDS, write_problems

TRAIN_PROBLEMS, EVAL_PROBLEMS = 3000, 1000
DETOUR_PROBABILITY = 0.6


def sft_overrides(run_dir, model, train_file):
    return [
        f"run_dir={run_dir}/sft", f"model.path={model}", f"data.train_files={train_file}",
        "data.max_seq_len=256", "data.pack=false", "optim.lr=3e-3", "optim.warmup_ratio=0.03",
        "optim.weight_decay=0.0", "train.epochs=15", "train.micro_batch_size=64", "checkpoint.every_steps=0",
    ]


def grpo_overrides(run_dir, model, train_file):
    return [
        "stage=grpo", f"run_dir={run_dir}/grpo", f"model.path={model}", f"data.train_files={train_file}",
        "optim.lr=1e-4", "optim.warmup_ratio=0.0", "optim.weight_decay=0.0", "train.max_steps=50",
        "grpo.prompts_per_step=16", "grpo.group_size=8", "grpo.max_new_tokens=112", "grpo.temperature=1.0",
        "grpo.top_p=1.0", "grpo.min_p=0.0", "grpo.cosine_max_len=300", "checkpoint.every_steps=25",
    ]


def evaluate_dir(model_dir, problems):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p["problem"]}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    return evaluate(model, tokenizer, prompts, [p["answer"] for p in problems], samples=1, max_new_tokens=112,
                    batch_prompts=128)


def run_toy_recipe(run_dir="runs/toy", extra_overrides=()):
    import torch

    from ..grpo import run_grpo
    from ..sft import run_sft

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    started = time.perf_counter()
    os.makedirs(run_dir, exist_ok=True)
    train_file = write_problems(os.path.join(run_dir, "train.jsonl"), TRAIN_PROBLEMS, 0, DETOUR_PROBABILITY)
    eval_file = write_problems(os.path.join(run_dir, "eval.jsonl"), EVAL_PROBLEMS, 1, DETOUR_PROBABILITY)
    model = build_model_dir(os.path.join(run_dir, "base_model"), WORDS, hidden_size=128, layers=4, heads=4, kv_heads=2)
    held_out = [json.loads(line) for line in open(eval_file)]

    print("== stage 1: SFT", flush=True)
    run_sft(load_config(None, sft_overrides(run_dir, model, train_file) + list(extra_overrides)))
    sft_model = os.path.join(run_dir, "sft", "hf_model")
    sft_eval = evaluate_dir(sft_model, held_out)
    print(f"SFT model: accuracy {sft_eval.accuracy:.1%}, {sft_eval.mean_tokens:.1f} tokens (sampled, T=1)", flush=True)

    print("== stage 2: GRPO", flush=True)
    run_grpo(load_config(None, grpo_overrides(run_dir, sft_model, train_file) + list(extra_overrides)))
    grpo_eval = evaluate_dir(os.path.join(run_dir, "grpo", "hf_model"), held_out)
    print(f"GRPO model: accuracy {grpo_eval.accuracy:.1%}, {grpo_eval.mean_tokens:.1f} tokens (sampled, T=1)", flush=True)

    report = {
        "sft": sft_eval.__dict__, "grpo": grpo_eval.__dict__,
        "length_ratio": grpo_eval.mean_tokens / sft_eval.mean_tokens,
        "wall_s": time.perf_counter() - started,
    }
    with open(os.path.join(run_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(
        f"\n| model | accuracy (pass@1, T=1) | mean tokens |\n|---|---|---|\n"
        f"| after SFT | {sft_eval.accuracy:.1%} | {sft_eval.mean_tokens:.1f} |\n"
        f"| after SFT + GRPO | {grpo_eval.accuracy:.1%} | {grpo_eval.mean_tokens:.1f} |\n"
        f"\nGRPO length ratio {report['length_ratio']:.2f}x; whole recipe {report['wall_s']:.0f} s; results in {run_dir}",
        flush=True,
    )
    return report
