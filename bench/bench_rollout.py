"""Rollout throughput of the two engines on the same model and prompts: Hugging Face generate (the
trainer's own model, keyed sampling) against vLLM, plus the time of one weight sync into vLLM.

Runs where vllm imports: on CPU, in the real-vLLM tier's environment (vLLM's CPU build),

    env_dir=$(bash .ci/vllm_env.sh | tail -1) && "$env_dir/bin/python" -m bench.bench_rollout

A step is what the toy recipe's GRPO samples (16 prompts x 8 samples, up to 112 new tokens, temperature
1) on random-weight Llama models of two sizes, so that every completion runs to the token limit and
both engines generate the same number of tokens. Medians of warm repeats, taken in turn in one process.
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .common import RESULTS_DIR, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["model", "parameters_M", "engine", "rollout_s", "tokens", "tokens_per_s", "vs_hf", "weight_sync_ms"]
# (name, hidden, layers, heads, kv heads): the toy recipe's model, and one 40x its size.
MODELS = [("toy", 128, 4, 4, 2), ("small", 512, 8, 8, 4)]
PROMPTS, SAMPLES, NEW_TOKENS = 16, 8, 112


def build(directory, hidden, layers, heads, kv_heads):
    from trainer.toy.model_dir import build_model_dir
    from trainer.toy.task import WORDS

    return build_model_dir(directory, WORDS, hidden_size=hidden, layers=layers, heads=heads, kv_heads=kv_heads)


def step_prompts(tokenizer):
    import random

    from trainer.toy.task import make_problem

    rng = random.Random(0)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": make_problem(rng)["problem"]}],
                                           tokenize=False, add_generation_prompt=True) for _ in range(PROMPTS)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def timed_rollouts(engine, prompts, settings, repeats):
    from trainer.rollout.keyed_sampling import sequence_keys

    times, tokens = [], 0
    for repeat in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        completions = engine.generate(prompts, settings, row_keys=sequence_keys(0, repeat, range(len(prompts)),
                                                                                settings.n))
        if repeat:
            times.append(time.perf_counter() - started)
            tokens = sum(len(c.token_ids) for c in completions)
    return statistics.median(times), tokens


def measure(name, path, repeats):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import CausalLMLoss
    from trainer.rollout import SamplingSettings, sync_weights
    from trainer.rollout.hf import HFRolloutEngine
    from trainer.rollout.vllm import VLLMRolloutEngine

    tokenizer = AutoTokenizer.from_pretrained(path)
    root = CausalLMLoss(AutoModelForCausalLM.from_pretrained(path))
    parameters = sum(p.numel() for p in root.parameters()) / 1e6
    prompts = step_prompts(tokenizer)
    settings = SamplingSettings(n=SAMPLES, temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS)
    root.causal_lm.generation_config.eos_token_id = None
    hf = HFRolloutEngine(root, _WithoutEOS(tokenizer), torch.device("cpu"))
    hf_s, hf_tokens = timed_rollouts(hf, prompts, settings, repeats)
    engine = VLLMRolloutEngine(path, tokenizer, seed=0, max_model_len=512)
    syncs = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        sync_weights(root, engine)
        syncs.append(time.perf_counter() - started)
    with vllm_ignoring_eos():
        vllm_s, vllm_tokens = timed_rollouts(engine, prompts, settings, repeats)
    rows = []
    for engine_name, seconds, tokens, sync in (("hf generate", hf_s, hf_tokens, None),
                                               ("vllm", vllm_s, vllm_tokens, statistics.median(syncs[1:]))):
        rows.append({"model": name, "parameters_M": round(parameters, 2), "engine": engine_name,
                     "rollout_s": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                     "vs_hf": round((tokens / seconds) / (hf_tokens / hf_s), 2),
                     "weight_sync_ms": "-" if sync is None else round(1e3 * sync, 1)})
    return rows


# A random model ends its samples at random points, and the two engines draw differently: both run
# every sample to NEW_TOKENS instead, so that they generate the same tokens' worth of work.
class _WithoutEOS:
    """A tokenizer with no end-of-sequence token, for HF generate."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@contextlib.contextmanager
def vllm_ignoring_eos():
    """vLLM's requests with ignore_eos while inside."""
    import vllm

    original = vllm.SamplingParams
    vllm.SamplingParams = functools.partial(original, ignore_eos=True)
    try:
        yield
    finally:
        vllm.SamplingParams = original


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_rollout", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--model", choices=[m[0] for m in MODELS], help="measure this model only")
    parser.add_argument("--rows-file", help="with --model: write its rows there as JSON")
    args = parser.parse_args(argv)
    if args.model and not args.rows_file:
        parser.error("--model needs --rows-file")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.model:
        name, *shape = next(m for m in MODELS if m[0] == args.model)
        with tempfile.TemporaryDirectory() as directory:
            rows = measure(name, build(os.path.join(directory, name), *shape), args.repeats)
        with open(args.rows_file, "w") as handle:
            json.dump(rows, handle)
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, *_ in MODELS:  # a process per model: one vLLM engine per process, as the trainer runs it
            rows_file = os.path.join(directory, f"{name}.json")
            command = [sys.executable, "-m", "bench.bench_rollout", "--model", name, "--repeats", str(args.repeats),
                       "--rows-file", rows_file]
            if subprocess.run(command, cwd=REPO).returncode != 0:
                raise SystemExit(f"bench_rollout: measuring {name} failed")
            with open(rows_file) as handle:
                rows += json.load(handle)
    print(write_results("rollout_engines", rows, COLUMNS, "cpu", args.out))


if __name__ == "__main__":
    main()
