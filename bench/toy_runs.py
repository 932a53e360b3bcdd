"""Starting the embedded recipe in its own process and reading its report, for the toy benches."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_recipe(run_dir, threads, overrides=()):
    """`python -m trainer.run` on configs/toy.yaml with `threads` torch threads; its log beside run_dir."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    arguments = [sys.executable, "-m", "trainer.run", "--config", os.path.join(REPO, "configs", "toy.yaml"),
                 f"run_dir={run_dir}", "tracking.tensorboard=false", *overrides]
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(arguments, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)


def wait_all(processes):
    """processes: {run_dir: Popen}; raises naming the first run that failed."""
    for run_dir, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"the recipe in {run_dir} failed: see {run_dir}.log")


def is_finished(run_dir):
    return os.path.exists(os.path.join(run_dir, "report.json"))


def read_report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as handle:
        return json.load(handle)


def outcome(report):
    """The recipe's headline numbers from its report.json."""
    return {"sft_pass_at_1": round(report["stages"]["SFT"]["accuracy"], 4),
            "grpo_pass_at_1": round(report["stages"]["SFT+GRPO"]["accuracy"], 4),
            "change_points": round(report["accuracy_change_points"], 2),
            "length_ratio": round(report["length_ratio"], 3), "grpo_s": round(report["stage_seconds"]["grpo"]),
            "recipe_s": round(report["wall_s"])}
