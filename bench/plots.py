"""PNG plots of a benchmark's rows: time and peak memory against the swept size, one line per implementation."""

import os

SWEPT = {"N sweep": "N", "V sweep": "V", "H sweep": "H"}


def plot_results(name, rows, device, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no plots written")
        return None
    measured = [r for r in rows if r["status"] == "ok"]
    groups = [g for g in SWEPT if len({r[SWEPT[g]] for r in measured if r["group"] == g}) > 1]
    if not groups:
        return None
    figure, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for row_axes, group in zip(axes, groups):
        key = SWEPT[group]
        group_rows = [r for r in measured if r["group"] == group]
        fixed = {k: group_rows[0][k] for k in ("N", "H", "V", "dtype") if k != key}
        for implementation in dict.fromkeys(r["implementation"] for r in group_rows):
            points = sorted((r[key], r["median_ms"], r["peak_extra_MB"])
                            for r in group_rows if r["implementation"] == implementation)
            style = dict(marker="o", linewidth=2.5 if implementation.startswith("fastmath") else 1.2)
            row_axes[0].plot([p[0] for p in points], [p[1] for p in points], label=implementation, **style)
            row_axes[1].plot([p[0] for p in points], [p[2] for p in points], label=implementation, **style)
        for axis, ylabel in zip(row_axes, ("median time (ms)", "peak extra memory (MB)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(key)
            axis.set_ylabel(ylabel)
            axis.grid(True, which="both", alpha=0.3)
            axis.set_title(f"{name}, {device}: " + ", ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=9)
        row_axes[0].legend(fontsize=8)
    figure.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
