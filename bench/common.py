"""Timing, machine description and result files shared by the per-op benchmarks."""

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, warmup=3, repeats=15, calls_per_repeat=1):
    """Median and spread (min, max) in milliseconds per call, over warm repeats."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_repeat):
            fn()
        synchronize(device)
        samples.append(1e3 * (time.perf_counter() - start) / calls_per_repeat)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_model():
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."): floating-point sums differ by CPU."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header_line(device):
    return (
        f"device: {device_description(device)} | date: {datetime.date.today().isoformat()} | "
        f"commit: {git_commit()} | torch {torch.__version__}"
    )


def write_results(name, rows, columns, device, out_dir, note=None):
    """Writes <name>.csv and <name>.md under out_dir; returns the Markdown text. note: how the rows were run."""
    os.makedirs(out_dir, exist_ok=True)
    header = header_line(device) + (f"\n\n{note}" if note else "")
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as handle:
        handle.writelines(f"# {line}\n" for line in header.splitlines() if line)
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"## {name}", "", header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[c]) for c in columns) + " |")
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as handle:
        handle.write(markdown)
    return markdown


def format_cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_module_for_json(arguments, what, env=None):
    """`python -m ARGUMENTS` in a fresh process (memory figures need one); the JSON of its last line.

    env: variables added to this process's environment.
    """
    completed = subprocess.run([sys.executable, "-m", *arguments], capture_output=True, text=True,
                               env=dict(os.environ, **(env or {})))
    if completed.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
