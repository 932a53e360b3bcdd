"""The embedded recipe with its GRPO rollouts through each engine: Hugging Face generate and vLLM.

Runs where vllm imports: on CPU, in the real-vLLM tier's environment (vLLM's CPU build),

    env_dir=$(bash .ci/vllm_env.sh | tail -1) && "$env_dir/bin/python" -m bench.toy_recipe_engines

Both recipes run in this environment with the same seed and threads, so their SFT models are the
same and the engines alone differ; they run side by side, one torch thread each. The table holds
each run's SFT and SFT+GRPO accuracy, length ratio and GRPO time (bench/results/cpu/).
"""

import argparse
import os

from .common import RESULTS_DIR, write_results
from .toy_runs import REPO, is_finished, outcome, read_report, start_recipe, wait_all

COLUMNS = ["grpo_engine", "seed", "sft_pass_at_1", "grpo_pass_at_1", "change_points", "length_ratio", "grpo_s",
           "recipe_s", "largest_sync_logprob_gap"]


def row(engine, seed, run_dir):
    from trainer.metrics import read_metrics

    gaps = [r["sync_logprob_gap"] for r in read_metrics(os.path.join(run_dir, "grpo")) if "sync_logprob_gap" in r]
    return {"grpo_engine": engine, "seed": seed, **outcome(read_report(run_dir)),
            "largest_sync_logprob_gap": max(gaps) if gaps else "-"}


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
        wait_all({run_dir: start_recipe(run_dir, 1, [f"train.seed={seed}", f"stages.grpo.grpo.engine.name={engine}"])
                  for engine, run_dir in runs.items() if not (args.reuse_finished and is_finished(run_dir))})
        rows += [row(engine, seed, run_dir) for engine, run_dir in runs.items()]
    note = ("Each recipe ran with 1 torch thread, the two engines' recipes side by side; grpo_s and recipe_s "
            "are indicative (bench.bench_rollout measures speed).")
    print(write_results("toy_recipe_engines", rows, COLUMNS, "cpu", args.out, note=note))


if __name__ == "__main__":
    main()
