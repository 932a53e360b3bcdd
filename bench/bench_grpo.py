"""GRPO step time and peak memory: this project's trainer against TRL's GRPOTrainer, on CPU.

Same model (Llama architecture, 32,768-token vocabulary so that the logits matter), same
prompts (the toy word problems), same group size, prompts per step, completion length,
sampling temperature, learning rate and loss settings (DAPO token-mean aggregation, clip 0.2,
no KL, one update per rollout), and the same reward: minus the completion's character length
over 100, a cheap function, so the time measured is the trainer's. The untrained model almost
never ends a completion early, so both sides generate max_new_tokens per completion. Each
trainer runs in a fresh subprocess; the figures are the median wall time of a step after the
first, and the peak resident set above the resident set before the model loads.

    python -m bench.bench_grpo [--steps 6] [--out bench/results/cpu]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

from .bench_sft import _reset_peak, prepare
from .common import RESULTS_DIR, run_module_for_json, write_results
from .memory import _read_status_kib

PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, LEARNING_RATE = 4, 8, 64, 1e-5
COLUMNS = ["trainer", "steps", "completions_per_step", "completion_tokens", "step_s", "peak_extra_MB",
           "step_time_vs_trl", "memory_vs_trl", "mean_reward"]


def length_reward(completion, gold=None, num_tokens=None):
    """The benchmark's reward: -len(completion) / 100, in this project's reward signature."""
    return -len(completion) / 100.0


def run_fastmath(model, data, steps, workdir):
    from trainer.config import load_config
    from trainer.grpo import run_grpo
    from trainer.metrics import read_metrics

    config = load_config(None, [
        "stage=grpo", f"run_dir={workdir}/fastmath_run", f"model.path={model}", f"data.train_files={data}",
        f"optim.lr={LEARNING_RATE}", "optim.warmup_ratio=0.0", "optim.beta2=0.999", f"train.max_steps={steps}",
        f"grpo.prompts_per_step={PROMPTS_PER_STEP}", f"grpo.group_size={GROUP_SIZE}",
        f"grpo.sampling.max_new_tokens={MAX_NEW_TOKENS}", "grpo.sampling.temperature=1.0", "grpo.sampling.top_p=1.0",
        "grpo.sampling.min_p=0.0",
        "grpo.loss.aggregation=dapo", "grpo.loss.beta=0.0", "grpo.loss.eps_low=0.2", "grpo.loss.eps_high=0.2",
        "grpo.rewards.weights={bench.bench_grpo.length_reward: 1.0}", "checkpoint.export_hf=false",
        "checkpoint.every_steps=0",
    ])
    before = _reset_peak()
    started = time.perf_counter()
    run_grpo(config)
    elapsed = time.perf_counter() - started
    records = read_metrics(config.run_dir)
    return {"train_s": elapsed, "peak_bytes": 1024 * (_read_status_kib("VmHWM") - before),
            "step_s": [r["step_s"] for r in records], "tokens": [r["completion_tokens"] for r in records],
            "reward": [r["reward"] for r in records]}


def run_trl(model, data, steps, workdir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(data)]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}]} for r in rows])

    def reward(completions, **kwargs):
        return [length_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)

    arguments = GRPOConfig(
        output_dir=f"{workdir}/trl_run", per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0, adam_beta2=0.999,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        num_iterations=1, steps_per_generation=1, max_steps=steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    # Both sides are measured from before the model loads to the end of training.
    before = _reset_peak()
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=reward, args=arguments,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"train_s": elapsed, "peak_bytes": 1024 * (_read_status_kib("VmHWM") - before), "step_s": step_times,
            "tokens": [entry.get("completions/mean_length", float("nan")) for entry in logs],
            "reward": [entry["reward"] for entry in logs]}


def measure(which, model, data, steps, workdir):
    return run_module_for_json(["bench.bench_grpo", "--run", which, model, data, str(steps), workdir],
                               f"{which} run", env={"TOKENIZERS_PARALLELISM": "false"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--run", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        which, model, data, steps, workdir = args.run
        runner = run_fastmath if which == "fastmath" else run_trl
        print(json.dumps(runner(model, data, int(steps), workdir)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        model, data = prepare(workdir)
        results = {name: measure(name, model, data, args.steps, workdir) for name in ("fastmath", "trl")}
    # The first step pays one-off costs (allocator growth, lazy imports); the median of the rest is the step time.
    step_time = {name: statistics.median(result["step_s"][1:]) for name, result in results.items()}
    rows = []
    for name, label in (("fastmath", "fastmath trainer"), ("trl", "TRL GRPOTrainer")):
        result = results[name]
        rows.append({
            "trainer": label, "steps": args.steps, "completions_per_step": PROMPTS_PER_STEP * GROUP_SIZE,
            "completion_tokens": statistics.median(result["tokens"]), "step_s": step_time[name],
            "peak_extra_MB": result["peak_bytes"] / 2**20,
            "step_time_vs_trl": step_time[name] / step_time["trl"],
            "memory_vs_trl": result["peak_bytes"] / max(results["trl"]["peak_bytes"], 1),
            "mean_reward": sum(result["reward"]) / len(result["reward"]),
        })
    print(write_results("grpo_vs_trl", rows, COLUMNS, "cpu", args.out))


if __name__ == "__main__":
    main()
