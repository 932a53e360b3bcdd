"""What a run reports: a progress bar, metrics.jsonl, TensorBoard when installed, a loss plot at the end."""

import json
import os
import secrets
import time


class MetricsLogger:
    """Rank 0 writes; other ranks keep quiet. Values passed in are plain Python numbers."""

    def __init__(self, run_dir, rank, total_steps, start_step=0, description="train", tracking=None,
                 run_config=None):
        """tracking: a TrackingConfig (None: TensorBoard only); run_config: the values recorded with a wandb run."""
        self.rank, self.run_dir = rank, run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.started = time.perf_counter()
        self.bar = self.writer = self.wandb_run = None
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._drop_records_after(start_step)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True)
        if tracking is None or tracking.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                self.writer = None
        if tracking is not None and tracking.wandb:
            self.wandb_run = start_wandb(run_dir, tracking, run_config)

    def _drop_records_after(self, step):
        """A resumed run repeats the steps after its checkpoint: their old records go."""
        records = [r for r in read_metrics(self.run_dir) if r["step"] <= step]
        with open(self.path + ".tmp", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(self.path + ".tmp", self.path)

    def log_step(self, step, values):
        if self.rank != 0:
            return
        record = {"step": step, **values, "elapsed_s": round(time.perf_counter() - self.started, 3)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        # The headline numbers of each stage; metrics.jsonl and TensorBoard get every value.
        headline = ("loss", "lr", "tokens_per_s", "reward", "accuracy", "completion_tokens", "kl", "pad_fraction",
                    "micro_batches", "peak_memory_GB")
        shown = {k: values[k] for k in headline if k in values}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def message(self, text):
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(run_dir, tracking, run_config):
    """A Weights & Biases run; a resumed run_dir continues the run it started (its id is kept in run_dir)."""
    import wandb

    id_file = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file) as handle:
            run_id = handle.read().strip()
    else:
        run_id = secrets.token_hex(6)  # letters and digits, as wandb run ids are
        with open(id_file, "w") as handle:
            handle.write(run_id)
    name = tracking.wandb_run_name or os.path.basename(os.path.normpath(run_dir))
    return wandb.init(project=tracking.wandb_project, name=name, id=run_id, resume="allow", dir=run_dir,
                      config=run_config)


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure, axis, path, xlabel, ylabel, title):
    """Labels and grid on axis, then figure written to path as PNG and closed; returns path."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def plot_loss(run_dir, key="loss", filename="loss.png", title="training loss"):
    """PNG of key against step from metrics.jsonl; returns its path, or None without matplotlib."""
    records = [r for r in read_metrics(run_dir) if key in r]
    plt = pyplot()
    if not records or plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in records], [r[key] for r in records], linewidth=1.5)
    return save_figure(figure, axis, os.path.join(run_dir, filename), "step", key, title)
