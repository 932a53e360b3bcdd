"""Padding-free training on CPU: memory that follows tokens, and GRPO's training phase packed vs padded.

Memory (each case in a fresh process; peak resident set above the resident set after the model
loaded, the Llama-architecture toy-size model of bench_sft with its 32,768-token vocabulary):
- SFT, one optimizer step on one packed row of 2k, 8k and 32k tokens (documents of 1/8 of it);
- GRPO's training phase (the policy's forward, backward and optimizer step over packed rows) for
  8, 32 and 128 completions of 200 tokens at a fixed budget of 1024 tokens per micro-batch.
glibc's mmap threshold is fixed in those processes (MALLOC_MMAP_THRESHOLD_): left dynamic, freed
large buffers stay in a fragmented heap and the resident set grows with the number of passes
(measured: 686 MB at 32 completions and 965 MB at 128; 568 and 618 MB with the threshold fixed).

Speed: one GRPO training phase on 32 fixed completions whose lengths are drawn between 16 and
512 tokens, beta 0, DAPO aggregation: packed rows (the trainer's pack_step and update_policy)
against the right-padded batch the trainer used before (a [B, L_max] batch with a padding mask
through SDPA, the same loss head), both from the same weights; median of repeats taken in turn.

    python -m bench.bench_packing [--out bench/results/cpu] [--repeats 5]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from .bench_sft import _reset_peak, prepare
from .common import RESULTS_DIR, run_module_for_json, write_results
from .memory import _read_status_kib

# The memory cases' budget holds 4 completions of 200 tokens (plus prompts): every case, 8
# completions too, accumulates gradients over several rows, which holds one more weight gradient.
GRPO_BUDGET, MEMORY_BUDGET, GRPO_COMPLETION, PROMPT_TOKENS = 4096, 1024, 200, 24
MEMORY_COLUMNS = ["stage", "case", "tokens", "micro_batches", "peak_extra_MB", "ratio_to_first", "tokens_ratio"]
SPEED_COLUMNS = ["layout", "completions", "tokens_computed", "pad_fraction", "micro_batches", "train_s",
                 "speedup_vs_padded", "loss"]


def grpo_config(model, run_dir, budget):
    from trainer.config import load_config

    return load_config(None, [
        "stage=grpo", f"run_dir={run_dir}", f"model.path={model}", "data.train_files=[unused.jsonl]",
        "grpo.loss.aggregation=dapo", "grpo.loss.beta=0", "grpo.group_size=8", "grpo.sampling.max_new_tokens=512",
        "grpo.sampling.temperature=1.0", f"train.max_tokens_per_micro_batch={budget}", "optim.lr=1e-5",
    ])


def fixed_rollouts(completions, lengths, vocab_size, seed=0):
    from trainer.rollout import Completion

    generator = torch.Generator().manual_seed(seed)
    prompts = [(torch.randint(30, vocab_size, (PROMPT_TOKENS,), generator=generator).tolist(), "0")
               for _ in range(completions // 8)]
    rollouts = [Completion(index // 8, torch.randint(30, vocab_size, (length,), generator=generator).tolist(), "",
                           "stop") for index, length in enumerate(lengths)]
    return prompts, rollouts, torch.randn(completions, generator=generator)


def packed_training(trainer, prompts, rollouts, advantages, config):
    from trainer.grpo_batch import pack_step
    from trainer.grpo_loss import update_policy

    packed = pack_step(prompts, rollouts, advantages, config, trainer.tokenizer.pad_token_id, trainer.device, 1)
    loss, _, _, _ = update_policy(trainer, None, packed, config.grpo, low_memory=False)
    return loss, packed.computed_tokens, packed.pad_tokens, len(packed.rows)


def padded_training(trainer, prompts, rollouts, advantages, config):
    """The right-padded formulation: one [B, L_max] batch, a padding mask, the same token loss and aggregation."""
    from fastmath_kernels import grpo_token_loss, linear_token_logprobs

    grpo = config.grpo
    sequences = [prompts[c.prompt_index][0] + c.token_ids for c in rollouts]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), trainer.tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    completion = torch.zeros(len(sequences), length)
    for row, (sequence, rollout) in enumerate(zip(sequences, rollouts)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        completion[row, len(sequence) - len(rollout.token_ids) : len(sequence)] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    targets, mask = input_ids[:, 1:], completion[:, 1:]

    def head(hidden, weight):
        logp = linear_token_logprobs(hidden[:, :-1], weight, targets, temperature=grpo.sampling.temperature)
        per_token = grpo_token_loss(logp, logp.detach(), advantages, eps_low=grpo.loss.eps_low,
                                    eps_high=grpo.loss.eps_high)
        return (per_token * mask).sum() / mask.sum()

    loss = trainer.module(input_ids, position_ids, attention_mask, head=head)
    loss.backward()
    loss_value, _, _ = trainer.optimizer_step(loss)
    return loss_value, input_ids.numel(), int(input_ids.numel() - attention_mask.sum()), 1


def speed(model, vocab_size, repeats):
    from trainer.training import Trainer

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 513, (32,), generator=generator).tolist()
    prompts, rollouts, advantages = fixed_rollouts(32, lengths, vocab_size)
    runs = {}
    with tempfile.TemporaryDirectory() as workdir:
        for layout, train in (("padded [B, L_max]", padded_training), ("packed rows", packed_training)):
            config = grpo_config(model, os.path.join(workdir, layout[:6]), GRPO_BUDGET)
            trainer = Trainer(config)
            trainer.set_schedule(repeats + 1)
            runs[layout] = (trainer, config, train)
        samples = {layout: [] for layout in runs}
        first = {}
        for repeat in range(repeats + 1):  # the first round warms up; its loss is compared
            for layout, (trainer, config, train) in runs.items():
                started = time.perf_counter()
                result = train(trainer, prompts, rollouts, advantages, config)
                elapsed = time.perf_counter() - started
                if repeat == 0:
                    first[layout] = result
                else:
                    samples[layout].append(elapsed)
    padded_s = statistics.median(samples["padded [B, L_max]"])
    rows = []
    for layout, times in samples.items():
        loss, computed, pads, micro_batches = first[layout]
        rows.append({"layout": layout, "completions": 32, "tokens_computed": computed,
                     "pad_fraction": pads / computed, "micro_batches": micro_batches,
                     "train_s": statistics.median(times), "speedup_vs_padded": padded_s / statistics.median(times),
                     "loss": loss})
    return rows, lengths


def memory_case(stage, size, model, workdir):
    """Peak extra resident memory (bytes) of one case, in this process (run it in a fresh one)."""
    from trainer.training import Trainer

    if stage == "sft":
        from trainer.config import load_config
        from trainer.data import Pack, collate

        config = load_config(None, [f"run_dir={workdir}/sft", f"model.path={model}", "data.train_files=[unused]",
                                    f"data.max_seq_len={size}"])
        trainer = Trainer(config)
        trainer.set_schedule(1)
        document = size // 8
        ids = torch.randint(30, trainer.module.causal_lm.config.vocab_size, (size,)).tolist()
        pack = Pack(ids, ids[1:] + [-100], [i % document for i in range(size)], [document] * 8)
        batch = collate([pack], trainer.tokenizer.pad_token_id)
        before = _reset_peak()
        trainer.train_step([batch])
        return 1024 * (_read_status_kib("VmHWM") - before), size, 1
    config = grpo_config(model, f"{workdir}/grpo", MEMORY_BUDGET)
    trainer = Trainer(config)
    trainer.set_schedule(1)
    prompts, rollouts, advantages = fixed_rollouts(size, [GRPO_COMPLETION] * size,
                                                   trainer.module.causal_lm.config.vocab_size)
    before = _reset_peak()
    _, computed, _, micro_batches = packed_training(trainer, prompts, rollouts, advantages, config)
    return 1024 * (_read_status_kib("VmHWM") - before), computed, micro_batches


def measure_memory(stage, size, model, workdir):
    return run_module_for_json(["bench.bench_packing", "--memory-case", stage, str(size), model, workdir],
                               f"{stage} {size}", env={"MALLOC_MMAP_THRESHOLD_": "131072"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        stage, size, model, workdir = args.memory_case
        print(json.dumps(memory_case(stage, int(size), model, workdir)))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model, _ = prepare(workdir)
        rows = []
        for stage, label, sizes in (("sft", "packed row of {} tokens", (2048, 8192, 32768)),
                                    ("grpo", f"{{}} completions, budget {MEMORY_BUDGET}", (8, 32, 128))):
            first = None
            for size in sizes:
                peak, tokens, micro_batches = measure_memory(stage, size, model, workdir)
                first = first or (peak, tokens)
                rows.append({"stage": stage, "case": label.format(size), "tokens": tokens,
                             "micro_batches": micro_batches, "peak_extra_MB": peak / 2**20,
                             "ratio_to_first": peak / first[0], "tokens_ratio": tokens / first[1]})
        print(write_results("packing_memory", rows, MEMORY_COLUMNS, "cpu", args.out))
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model).vocab_size
        speed_rows, lengths = speed(model, vocab_size, args.repeats)
    print(f"completion lengths: {sorted(lengths)}")
    print(write_results("grpo_packing_speed", speed_rows, SPEED_COLUMNS, "cpu", args.out))


if __name__ == "__main__":
    main()
