"""Runs one op's benchmark: every implementation on every case, side by side.

A benchmark module (bench_<op>.py) defines
  NAME                         the op, also the name of its result files
  cases(device)                list of dicts: the shape and dtype of each case (plus "group")
  make_inputs(case, device)    the inputs of one call
  implementations(device)      list of Implementation, peers included
and optionally work(case) -> {"flops": ...} or {"bytes": ...} for the GPU roofline columns.

Times: medians of warm repeats taken round-robin over the implementations in one process.
Peak extra memory: on CUDA max_memory_allocated in this process; on CPU the peak resident set
of a fresh subprocess per case, one implementation after another, each after a tiny warm-up
call (which also compiles torch.compile peers), with freed memory handed back to the OS and
the peak reset just before the measured call.
A peer that cannot run here keeps a row that says why.
"""

import argparse
import dataclasses
import importlib
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

from .common import synchronize, write_results
from .memory import measure_extra_bytes

REFERENCE = "fastmath"
COLUMNS = [
    "op", "group", "N", "H", "V", "dtype", "implementation", "status", "median_ms", "min_ms", "max_ms",
    "peak_extra_MB", "fastmath_speedup", "fastmath_memory_saving", "roofline_fraction",
]


@dataclasses.dataclass
class Implementation:
    """make() returns run(inputs), one call (forward + backward where the op has one).

    make is called only when the implementation is used, so a memory subprocess imports just
    the library it measures. It raises PeerUnavailable when the peer cannot run here.
    """

    name: str
    make: Optional[Callable] = None
    unavailable: Optional[str] = None


class PeerUnavailable(Exception):
    pass


def unavailable(name, reason):
    return Implementation(name, None, reason)


def ready(name, run):
    return Implementation(name, lambda: run)


def _build(implementations):
    """name -> run for those that can run here; name -> reason for the others."""
    runs, reasons = {}, {}
    for impl in implementations:
        if impl.make is None:
            reasons[impl.name] = impl.unavailable
            continue
        try:
            runs[impl.name] = impl.make()
        except PeerUnavailable as reason:
            reasons[impl.name] = str(reason)
    return runs, reasons


def _time_round_robin(runs, inputs, device, repeats):
    samples, failures = {name: [] for name in runs}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        try:
            run(inputs)  # warm-up (compiles torch.compile peers, fills caches)
            synchronize(device)
        except Exception as error:  # a peer that breaks on this case keeps a row saying so
            failures[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(repeats):
        for name, run in runs.items():
            if name in failures:
                continue
            synchronize(device)
            start = time.perf_counter()
            run(inputs)
            synchronize(device)
            samples[name].append(1e3 * (time.perf_counter() - start))
    return samples, failures


def _tiny(case):
    return dict(case, N=min(case["N"], 8))


def measure_memory(module_name, case, implementation_names, device, runs=None):
    """name -> peak extra bytes of one call, for each implementation on one case.

    On CUDA the peak allocator statistics isolate one call, so the already warmed-up runs are
    measured in this process (rebuilding them would recompile torch.compile peers). On CPU each
    case is measured in a fresh process, since resident memory never shrinks reliably.
    """
    if device == "cuda":
        if runs is None:
            return _measure_here(module_name, case, implementation_names, device)
        module = importlib.import_module(module_name)
        return {name: _peak_on_fresh_inputs(runs[name], module, case, device) for name in implementation_names}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.harness", "--memory-of", module_name, json.dumps(case),
         json.dumps(implementation_names)],
        capture_output=True, text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{completed.stderr[-1500:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _measure_here(module_name, case, implementation_names, device):
    module = importlib.import_module(module_name)
    by_name = {impl.name: impl for impl in module.implementations(device)}
    return {name: _peak_of(by_name[name], module, case, device) for name in implementation_names}


def _peak_of(implementation, module, case, device):
    run = implementation.make()
    run(module.make_inputs(_tiny(case), device))
    return _peak_on_fresh_inputs(run, module, case, device)


def _peak_on_fresh_inputs(run, module, case, device):
    # Fresh inputs for every implementation: gradients left on shared inputs by the one before
    # would be freed inside this call and hide as much of its peak.
    inputs = module.make_inputs(case, device)
    return measure_extra_bytes(lambda: run(inputs), device)


def run_benchmark(module, device, out_dir, repeats=None, without=(), tokens=None):
    """without: implementations whose name contains any of these are left out; tokens: only
    the cases with these N."""
    repeats = repeats or (5 if device == "cuda" else 3)
    ceiling = _roofline(module, device)
    rows = []
    impls = [impl for impl in module.implementations(device) if not any(part in impl.name for part in without)]
    runs, reasons = _build(impls)
    for case in module.cases(device):
        if tokens and case["N"] not in tokens:
            continue
        inputs = module.make_inputs(case, device)
        samples, failures = _time_round_robin(runs, inputs, device, repeats)
        del inputs
        memory = measure_memory(module.__name__, case, [n for n in runs if n not in failures], device, runs)
        case_rows = []
        for impl in impls:
            status = reasons.get(impl.name) or failures.get(impl.name, "ok")
            row = {"op": module.NAME, **{k: case.get(k, "") for k in ("group", "N", "H", "V", "dtype")},
                   "implementation": impl.name, "status": status}
            if status == "ok":
                times = samples[impl.name]
                row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                           peak_extra_MB=memory[impl.name] / 2**20)
                if ceiling:
                    row["roofline_fraction"] = ceiling(case, row["median_ms"] / 1e3)
            case_rows.append(row)
        reference = next((r for r in case_rows if r["implementation"] == REFERENCE and r["status"] == "ok"), None)
        for row in case_rows:
            if reference and row["status"] == "ok":
                row["fastmath_speedup"] = row["median_ms"] / reference["median_ms"]
                row["fastmath_memory_saving"] = row["peak_extra_MB"] / max(reference["peak_extra_MB"], 1e-3)
            for column in COLUMNS:
                row.setdefault(column, "")
        rows.extend(case_rows)
        summary = ", ".join(
            f"{r['implementation']} {r['median_ms']:.1f} ms {r['peak_extra_MB']:.0f} MB" if r["status"] == "ok"
            else f"{r['implementation']} ({r['status']})" for r in case_rows
        )
        print(f"{module.NAME} {case}: {summary}", flush=True)
    print(write_results(module.NAME, rows, COLUMNS, device, out_dir))
    from .plots import plot_results

    plot_results(module.NAME, rows, device, out_dir)
    return rows


def _roofline(module, device):
    """case, seconds -> fraction of the GPU's measured ceiling, or None on CPU."""
    if device != "cuda" or not hasattr(module, "work"):
        return None
    from .roofline import copy_bandwidth_bytes_per_s, matmul_flops_per_s

    rates = {"bytes": copy_bandwidth_bytes_per_s(), "flops": matmul_flops_per_s()}
    print(f"measured: copy {rates['bytes'] / 1e9:.0f} GB/s, bf16 matmul {rates['flops'] / 1e12:.0f} TFLOP/s")

    def fraction(case, seconds):
        ((kind, amount),) = module.work(case).items()
        return amount / seconds / rates[kind]

    return fraction


def main(argv=None):
    parser = argparse.ArgumentParser(description="internal: one memory measurement in a fresh process")
    parser.add_argument("--memory-of", nargs=3, metavar=("MODULE", "CASE_JSON", "NAMES_JSON"), required=True)
    args = parser.parse_args(argv)
    module_name, case_json, names_json = args.memory_of
    print(json.dumps(_measure_here(module_name, json.loads(case_json), json.loads(names_json), "cpu")))


if __name__ == "__main__":
    main()
