"""The embedded recipe over seeds and torch thread counts: how far its result moves between runs.

    python -m bench.toy_recipe_seeds                      # seeds 0 1 2, 1 and 2 threads: 6 recipes

Floating-point sums differ between thread counts (and CPUs), so each run trains a different
model; the recipe's claims must hold for all of them. Two-thread runs run alone; one-thread runs
run two at a time, one per core (an odd one out alone), so their recipe_s is a little
pessimistic. Each row has the SFT and SFT+GRPO accuracy, the length ratio, the step at which
held-out pass@1 during SFT first reached 90% and its fraction of the schedule, and the whole
recipe's wall time (bench/results/cpu/toy_recipe_seeds.md).
"""

import argparse
import os
import statistics

from .common import RESULTS_DIR, write_results
from .toy_runs import REPO, is_finished, outcome, read_report, start_recipe, wait_all

COLUMNS = ["seed", "threads", "sft_pass_at_1", "grpo_pass_at_1", "change_points", "length_ratio",
           "sft_steps", "step_at_90", "fraction_at_90", "grpo_s", "recipe_s"]


def row(seed, threads, run_dir):
    report = read_report(run_dir)
    curve = report["sft_held_out"]
    first = curve["first_step_at_mark"]
    return {"seed": seed, "threads": threads, **outcome(report), "sft_steps": curve["total_steps"],
            "step_at_90": first if first is not None else "never",
            "fraction_at_90": round(first / curve["total_steps"], 3) if first is not None else "-"}


def spread(rows):
    """One paragraph: each figure's range over the runs and the median wall time."""
    def span(column, scale=1, unit=""):
        values = [r[column] * scale for r in rows]
        return f"{min(values):.4g}{unit} to {max(values):.4g}{unit}"

    fractions = [r["fraction_at_90"] for r in rows]
    reached = [f for f in fractions if f != "-"]
    jump = (f"{max(reached):.0%} of the schedule at the latest" if len(reached) == len(rows)
            else f"not reached in {len(rows) - len(reached)} of {len(rows)} runs")
    return (f"Over {len(rows)} runs: SFT pass@1 {span('sft_pass_at_1', 100, '%')}, SFT+GRPO "
            f"{span('grpo_pass_at_1', 100, '%')}, change {span('change_points')} points, length ratio "
            f"{span('length_ratio', unit='x')}; held-out pass@1 during SFT reached 90% by {jump}; "
            f"recipe wall time median {statistics.median(r['recipe_s'] for r in rows):.0f} s "
            f"({span('recipe_s', unit=' s')}).")


def describe(runs):
    return ", ".join(f"seed {seed} with {threads} thread(s)" for seed, threads in runs)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.toy_recipe_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", default=os.path.join(REPO, "runs", "toy_seeds"))
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu"))
    parser.add_argument("--reuse-finished", action="store_true",
                        help="read runs that already wrote report.json instead of running them again")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: tabulate the runs that finished and name the ones that did not")
    args = parser.parse_args(argv)
    runs = {(seed, threads): os.path.join(args.runs, f"seed{seed}_threads{threads}")
            for threads in args.threads for seed in args.seeds}
    reuse = args.reuse_finished or args.table_only
    unfinished = [key for key, run_dir in runs.items() if not (reuse and is_finished(run_dir))]
    missing, pending = (unfinished, []) if args.table_only else ([], unfinished)
    alone = [key for key in pending if key[1] > 1]
    paired = [key for key in pending if key[1] == 1]
    batches = [[key] for key in alone] + [paired[i:i + 2] for i in range(0, len(paired), 2)]
    for batch in batches:
        print(f"running {describe(batch)}", flush=True)
        wait_all({runs[key]: start_recipe(runs[key], key[1], [f"train.seed={key[0]}"]) for key in batch})
    rows = [row(*key, run_dir) for key, run_dir in runs.items() if key not in missing]
    if not rows:
        raise SystemExit(f"no finished runs in {args.runs} to tabulate (not yet run: {describe(missing)})")
    not_run = f" Not yet run: {describe(missing)}." if missing else ""
    note = ("Each run's torch threads are in its threads column (the header's count is this script's). Two-thread "
            "recipes ran alone; one-thread recipes ran two at a time, one per core (an odd one out alone)."
            + not_run + "\n\n" + spread(rows))
    print(write_results("toy_recipe_seeds", rows, COLUMNS, "cpu", args.out, note=note))


if __name__ == "__main__":
    main()
