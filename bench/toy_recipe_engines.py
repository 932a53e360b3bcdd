"""The embedded recipe with its GRPO rollouts through each engine: Hugging Face generate and vLLM.

Runs where vllm imports: on CPU, in the real-vLLM tier's environment (vLLM's CPU build),

    env_dir=$(bash .ci/vllm_env.sh | tail -1) && "$env_dir/bin/python" -m bench.toy_recipe_engines

Both recipes run in this environment with the same seed and threads, so their SFT models are the
same and the engines alone differ; they run side by side, one torch thread each. The table holds
each run's SFT and SFT+GRPO accuracy, length ratio and GRPO time (bench/results/cpu/).
"""

import argparse
import json
import os
import subprocess
import sys

from .common import RESULTS_DIR, write_results

COLUMNS = ["grpo_engine", "seed", "sft_pass_at_1", "grpo_pass_at_1", "change_points", "length_ratio", "grpo_s",
           "recipe_s", "largest_sync_logprob_gap"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(engine, seed, run_dir, threads):
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    arguments = [sys.executable, "-m", "trainer.run", "--config", os.path.join(REPO, "configs", "toy.yaml"),
                 f"run_dir={run_dir}", f"train.seed={seed}",
                 f"stages.grpo.grpo.rollout_engine={engine}", "tracking.tensorboard=false"]
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    log = open(os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.log"), "w")
    return subprocess.Popen(arguments, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)


def row(engine, seed, run_dir):
    from trainer.metrics import read_metrics

    with open(os.path.join(run_dir, "report.json")) as handle:
        report = json.load(handle)
    gaps = [r["sync_logprob_gap"] for r in read_metrics(os.path.join(run_dir, "grpo")) if "sync_logprob_gap" in r]
    return {"grpo_engine": engine, "seed": seed, "sft_pass_at_1": round(report["stages"]["SFT"]["accuracy"], 4),
            "grpo_pass_at_1": round(report["stages"]["SFT+GRPO"]["accuracy"], 4),
            "change_points": round(report["accuracy_change_points"], 1),
            "length_ratio": round(report["length_ratio"], 3), "grpo_s": round(report["stage_seconds"]["grpo"]),
            "recipe_s": round(report["wall_s"]), "largest_sync_logprob_gap": max(gaps) if gaps else "-"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.toy_recipe_engines", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", default=os.path.join(REPO, "runs", "toy_engines"))
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--reuse-finished", action="store_true",
                        help="read runs that already wrote report.json instead of running them again")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        runs = {engine: os.path.join(args.runs, f"{engine}_seed{seed}") for engine in ("hf", "vllm")}
        finished = {engine for engine, run_dir in runs.items()
                    if args.reuse_finished and os.path.exists(os.path.join(run_dir, "report.json"))}
        processes = {engine: start(engine, seed, run_dir, threads=1) for engine, run_dir in runs.items()
                     if engine not in finished}
        for engine, process in processes.items():
            if process.wait() != 0:
                raise SystemExit(f"the recipe with grpo.rollout_engine={engine} failed: see {runs[engine]}.log")
        rows += [row(engine, seed, run_dir) for engine, run_dir in runs.items()]
    note = ("Each recipe ran with 1 torch thread, the two engines' recipes side by side; grpo_s and recipe_s "
            "are indicative (bench.bench_rollout measures speed).")
    print(write_results("toy_recipe_engines", rows, COLUMNS, "cpu", args.out, note=note))


if __name__ == "__main__":
    main()
