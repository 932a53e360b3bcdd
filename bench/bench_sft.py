"""SFT throughput and peak memory: this project's trainer against TRL's SFTTrainer, on CPU.

Same model (Llama architecture, 32,768-token vocabulary so that the logits matter), same data
(the toy word problems as prompt/completion chats, loss on completions only), same sequence
limit, batch, learning rate and number of steps, one process each, no packing on either side,
no checkpoints. Each trainer runs in a fresh subprocess; the figures are the training loop's
wall time and the peak resident set above the resident set just before training.

    python -m bench.bench_sft [--steps 30] [--out bench/results/cpu]
"""

import argparse
import json
import os
import tempfile
import time

from .common import RESULTS_DIR, run_module_for_json, write_results
from .memory import _read_status_kib, release_freed_memory

VOCAB_SIZE = 32768
HIDDEN, LAYERS = 256, 4
EXAMPLES, BATCH, MAX_LENGTH, LEARNING_RATE, WARMUP_STEPS = 512, 8, 256, 1e-4, 1
COLUMNS = ["trainer", "steps", "examples", "train_s", "examples_per_s", "tokens_per_s", "peak_extra_MB",
           "speedup_vs_trl", "memory_vs_trl", "first_loss", "last_loss"]


def prepare(workdir):
    from trainer.toy.model_dir import build_model_dir
    from trainer.toy.task import WORDS, write_problems

    filler = [f"w{i}" for i in range(VOCAB_SIZE)]  # unused words bring the vocabulary to ~32k
    words = WORDS + filler[: VOCAB_SIZE - len(WORDS) - 20]
    model = build_model_dir(os.path.join(workdir, "model"), words, hidden_size=HIDDEN, layers=LAYERS)
    data = write_problems(os.path.join(workdir, "train.jsonl"), EXAMPLES, seed=0)
    return model, data


def _reset_peak():
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _read_status_kib("VmRSS")


def run_fastmath(model, data, steps, workdir):
    from trainer.config import load_config
    from trainer.sft import SFTData
    from trainer.training import Trainer

    config = load_config(None, [
        f"run_dir={workdir}/fastmath_run", f"model.path={model}", f"data.train_files={data}",
        f"data.max_seq_len={MAX_LENGTH}", "data.pack=false", f"optim.lr={LEARNING_RATE}",
        f"optim.warmup_ratio={WARMUP_STEPS / steps}",
        f"train.micro_batch_size={BATCH}", f"train.max_steps={steps}",
    ])
    trainer = Trainer(config)
    sft_data = SFTData(config, trainer.tokenizer, 1, lambda *_: None)
    trainer.set_schedule(steps)
    before = _reset_peak()
    started = time.perf_counter()
    losses = [trainer.train_step(sft_data.micro_batches(step, 0))["loss"] for step in range(steps)]
    return time.perf_counter() - started, 1024 * (_read_status_kib("VmHWM") - before), losses


def run_trl(model, data, steps, workdir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(data)]
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["problem"]}],
         "completion": [{"role": "assistant", "content": r["solution"]}]} for r in rows
    ])
    tokenizer = AutoTokenizer.from_pretrained(model)
    arguments = SFTConfig(
        output_dir=f"{workdir}/trl_run", max_length=MAX_LENGTH, packing=False, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
        warmup_steps=WARMUP_STEPS, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model), args=arguments, train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = _reset_peak()
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return elapsed, 1024 * (_read_status_kib("VmHWM") - before), losses


def mean_example_tokens(model, data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for line in open(data):
        row = json.loads(line)
        chat = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return sum(lengths) / len(lengths)


def measure(which, model, data, steps, workdir):
    return run_module_for_json(["bench.bench_sft", "--run", which, model, data, str(steps), workdir],
                               f"{which} run")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--run", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        which, model, data, steps, workdir = args.run
        runner = run_fastmath if which == "fastmath" else run_trl
        elapsed, peak, losses = runner(model, data, int(steps), workdir)
        print(json.dumps({"train_s": elapsed, "peak_bytes": peak, "losses": losses}))
        return
    with tempfile.TemporaryDirectory() as workdir:
        model, data = prepare(workdir)
        tokens_per_example = mean_example_tokens(model, data)
        results = {name: measure(name, model, data, args.steps, workdir) for name in ("fastmath", "trl")}
    trl = results["trl"]
    rows = []
    for name, label in (("fastmath", "fastmath trainer"), ("trl", "TRL SFTTrainer")):
        result = results[name]
        examples = args.steps * BATCH
        rows.append({
            "trainer": label, "steps": args.steps, "examples": examples, "train_s": result["train_s"],
            "examples_per_s": examples / result["train_s"],
            "tokens_per_s": examples * tokens_per_example / result["train_s"],
            "peak_extra_MB": result["peak_bytes"] / 2**20,
            "speedup_vs_trl": trl["train_s"] / result["train_s"],
            "memory_vs_trl": result["peak_bytes"] / max(trl["peak_bytes"], 1),
            "first_loss": result["losses"][0], "last_loss": result["losses"][-1],
        })
    print(write_results("sft_vs_trl", rows, COLUMNS, "cpu", args.out))


if __name__ == "__main__":
    main()
