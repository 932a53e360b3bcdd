"""The one training core both stages drive: model, FSDP, optimizer, schedule, step, and the stage loop.

A stage (SFT, GRPO) supplies its data, its step and its metrics; `run_stage` owns the frame
around them: the checkpoint guard, loading, resume, the loop, checkpoints, metrics, plots and
shutdown.
"""

import math
import os
import time

import torch

from fastmath_kernels import preferred_backend

from .checkpoint import check_no_earlier_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import config_as_dict, save_config
from .errors import ConfigError, TrainingError
from .evaluate import HeldOutDuringTraining
from .export import export_hf
from .metrics import MetricsLogger, plot_loss
from .model import (
    CausalLMLoss,
    build_for_filling,
    check_embeddings_tied,
    load_causal_lm,
    load_local_shards,
    load_tokenizer,
)
from .parallel import all_reduce_sum, apply_fsdp, init_distributed, is_distributed, shutdown


def warmup_cosine(total_steps, warmup_ratio, min_lr_ratio):
    """Learning-rate multiplier: linear warmup, then cosine decay to min_lr_ratio."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def check_finite(loss, grad_norm, what="loss", hint="check the data"):
    """(loss, grad norm) as numbers, read in one host sync; raises TrainingError unless both are finite."""
    loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise TrainingError(
            f"non-finite {what} or gradient norm (loss {loss_value}, grad norm {norm_value}); "
            f"the last complete checkpoint is kept; lower optim.lr or {hint}"
        )
    return loss_value, norm_value


def load_sharded_model(config, device, trainable):
    """The configured causal LM inside the loss module, sharded under FSDP.

    A frozen copy (trainable=False, for a reference policy) is loaded like the trained one where
    one process runs it (fp32 under bf16 autocast), so that their log-probs start equal; under
    FSDP both compute with bf16 weights, which bf16 storage gives directly.

    Under FSDP with safetensors weights, no rank loads the whole model: it is built without
    weights, sharded, and each rank reads only the rows of its own shards from the files. A full
    copy per rank would take 8 x 59 GB of host memory per node for the 14.8B model in fp32.
    """
    model_config = config.model
    weights_trainable = trainable or not is_distributed()
    causal_lm, why_whole = None, None
    if is_distributed():
        causal_lm, why_whole = build_for_filling(model_config, device, trainable=weights_trainable)
    filled_after_sharding = causal_lm is not None
    if not filled_after_sharding:
        if why_whole and int(os.environ.get("RANK", "0")) == 0:
            print(f"{model_config.path}: {why_whole}, so every rank loads the whole model before sharding it",
                  flush=True)
        causal_lm = load_causal_lm(model_config, device, trainable=weights_trainable)
    if not trainable:
        causal_lm.requires_grad_(False)
        causal_lm.eval()
    root = apply_fsdp(CausalLMLoss(causal_lm, low_memory_loss=config.train.low_memory_loss), device, config.parallel)
    if filled_after_sharding:
        load_local_shards(root.causal_lm, model_config.path)
        check_embeddings_tied(root.causal_lm)
    return root


class Trainer:
    def __init__(self, config, tokenizer=None):
        """tokenizer: already loaded (stages load it first, to check their data before the model)."""
        self.config = config
        self.rank, self.world_size, self.device = init_distributed()
        torch.manual_seed(config.train.seed)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.module = load_sharded_model(config, self.device, trainable=True)
        self.parameters = [p for p in self.module.parameters() if p.requires_grad]
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
        )
        self.scheduler = None
        self.total_steps = None

    def peak_memory_gb(self):
        """This rank's peak GPU memory allocated since the last call, in GiB (None on CPU)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def set_schedule(self, total_steps):
        optim = self.config.optim
        self.total_steps = total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total_steps, optim.warmup_ratio, optim.min_lr_ratio)
        )

    def train_step(self, micro_batches):
        """One optimizer step over this rank's micro-batches; returns plain-number metrics.

        The loss is the mean over every counted token of the step, on all ranks: each micro-batch
        contributes its token-loss sum divided by the global token count. FSDP's gradient
        reduce-scatter averages over ranks, hence the factor world_size.
        """
        counts = torch.tensor([
            float(sum(int((batch["targets"] != -100).sum()) for batch in micro_batches)),
            float(sum(batch.get("pad_tokens", 0) for batch in micro_batches)),
            float(sum(batch["input_ids"].numel() for batch in micro_batches)),
        ], device=self.device)
        counts = all_reduce_sum(counts)
        scale = self.world_size / counts[0].clamp_min(1.0)
        inputs = [{key: value.to(self.device) if torch.is_tensor(value) else value
                   for key, value in batch.items() if key != "pad_tokens"} for batch in micro_batches]
        step_loss = self.accumulate_gradients(inputs, scale=scale)
        mean_loss = all_reduce_sum(step_loss) / self.world_size
        loss_value, grad_norm, lr = self.optimizer_step(mean_loss)
        self.scheduler.step()
        global_tokens, pad_tokens, computed_tokens = counts.tolist()  # one host sync for the three
        return {"loss": loss_value, "grad_norm": grad_norm, "tokens": int(global_tokens), "lr": lr,
                "pad_fraction": pad_tokens / max(computed_tokens, 1.0), "micro_batches": len(micro_batches)}

    def accumulate_gradients(self, micro_batches, heads=None, scale=None):
        """Forward and backward over each micro-batch (model inputs), gradients accumulating.

        heads: one loss head per micro-batch (None: the module's cross-entropy); each loss is
        multiplied by scale when given. Returns the sum of the losses, detached.
        """
        step_loss = torch.zeros((), device=self.device)
        for index, inputs in enumerate(micro_batches):
            loss = self.module(**inputs) if heads is None else self.module(**inputs, head=heads[index])
            if scale is not None:
                loss = loss * scale
            loss.backward()
            step_loss += loss.detach()
        return step_loss

    def optimizer_step(self, loss, what="loss", hint="check the data"):
        """Clips the gradients and steps the optimizer; returns (loss, grad norm, lr) as numbers.

        A non-finite loss or gradient norm stops the run before the update. The scheduler's
        step is the caller's: GRPO takes several optimizer steps per schedule step.
        """
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = check_finite(loss, grad_norm, what, hint)
        lr = self.optimizer.param_groups[0]["lr"]  # what this optimizer step uses
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, lr

    def resume(self, log):
        """With checkpoint.resume=auto, restores the newest complete checkpoint; returns the step to start at.

        Weights, optimizer moments, RNG and the step come from the checkpoint; the optimizer's
        settings and the learning-rate schedule come from the current configuration, so
        `--resume auto optim.lr=2e-5 train.epochs=10` continues on the newly configured schedule.
        """
        if self.config.checkpoint.resume != "auto":
            return 0
        path = latest_checkpoint(self.config.run_dir, log=log)
        if not path:
            log("no complete checkpoint to resume from; starting at step 0")
            return 0
        saved = load_checkpoint(path, self.module, self.optimizer, self.scheduler, self.rank)
        step = saved["step"]
        if step > self.total_steps:
            raise ConfigError(
                f"{path} is at step {step}, beyond the {self.total_steps} steps this configuration trains "
                f"(train.epochs={self.config.train.epochs}, train.max_steps={self.config.train.max_steps}); "
                "raise them to continue that run, or choose another run_dir"
            )
        self._apply_configured_optimizer(step, saved.get("total_steps"), log)
        log(f"resumed from {path} at step {step}")
        return step

    def _apply_configured_optimizer(self, step, saved_total_steps, log):
        """Replaces the optimizer settings and schedule a checkpoint restored with the configured ones.

        Loading brings back the saved param groups (lr, initial_lr, betas, weight decay) and the
        scheduler's saved base_lrs; the schedule's shape (warmup, cosine over total_steps) is
        already the configured one. The learning rate at `step` becomes what the configured
        schedule gives there.
        """
        optim = self.config.optim
        group = self.optimizer.param_groups[0]
        checkpoint_values = {"optim.lr": self.scheduler.base_lrs[0], "optim.weight_decay": group["weight_decay"],
                             "optim.beta1": group["betas"][0], "optim.beta2": group["betas"][1]}
        configured = {"optim.lr": optim.lr, "optim.weight_decay": optim.weight_decay,
                      "optim.beta1": optim.beta1, "optim.beta2": optim.beta2}
        changes = [f"{key} {checkpoint_values[key]:g} -> {configured[key]:g}"
                   for key in configured if checkpoint_values[key] != configured[key]]
        if saved_total_steps is not None and saved_total_steps != self.total_steps:
            changes.append(f"total steps {saved_total_steps} -> {self.total_steps}")
        if changes:
            log(f"resume: the configuration differs from the checkpoint ({', '.join(changes)}); "
                f"the configured values apply from step {step + 1}")
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=optim.lr, lr=optim.lr * factor, weight_decay=optim.weight_decay,
                         betas=(optim.beta1, optim.beta2))
        self.scheduler.base_lrs = [optim.lr] * len(self.optimizer.param_groups)
        # get_last_lr() reads this; the next scheduler.step() recomputes it from base_lrs.
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _save(self, step):
        save_checkpoint(self.config.run_dir, step, self.module, self.optimizer, self.scheduler,
                        {"step": step, "total_steps": self.total_steps}, self.rank, self.config.checkpoint.keep)

    def after_step(self, step, total_steps):
        """Saves a checkpoint after `step` (1-based) when checkpoint.every_steps says so."""
        every = self.config.checkpoint.every_steps
        if every and step % every == 0 and step < total_steps:
            self._save(step)

    def finish(self, start_step, total_steps, log):
        """The final checkpoint (unless the run resumed at its end) and the Hugging Face export."""
        if start_step < total_steps and self.config.checkpoint.save_final:
            self._save(total_steps)
        if self.config.checkpoint.export_hf:
            # model.dtype=auto on GPU trains fp32 master weights for bf16 compute: export bf16.
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.config.model.dtype == "auto" else None
            export = export_hf(self.module, self.tokenizer, os.path.join(self.config.run_dir, "hf_model"), self.rank,
                               dtype=dtype)
            log(f"exported a Hugging Face model to {export}")


def stage_total_steps(config, steps_per_epoch):
    """train.epochs over the data, cut at train.max_steps when set."""
    total_steps = steps_per_epoch * config.train.epochs
    return min(total_steps, config.train.max_steps) if config.train.max_steps else total_steps


def run_stage(config, stage):
    """Runs a training stage from its first (or resumed) step to the end; returns config.run_dir.

    stage supplies: prepare(tokenizer, world_size, log) -> steps per epoch, called before the
    model loads so that bad data fails in seconds; start(trainer, log) once the trainer exists;
    train_step(trainer, step) -> {metric name: number}; closing_messages(); and plots, a list
    of (metric, file name, title). The kernels run on kernels.backend where it is set.
    """
    with preferred_backend(config.kernels.backend, "kernels.backend"):
        return _run_stage(config, stage)


def _run_stage(config, stage):
    check_no_earlier_checkpoints(config)
    rank, world_size, _ = init_distributed(config.parallel.timeout_minutes)
    log = print if rank == 0 else (lambda *_: None)
    tokenizer = load_tokenizer(config.model)
    total_steps = stage_total_steps(config, stage.prepare(tokenizer, world_size, log))
    held_out = HeldOutDuringTraining.for_stage(config, tokenizer, rank, world_size)
    if held_out is not None:
        log(held_out.describe())
    trainer = Trainer(config, tokenizer)
    trainer.set_schedule(total_steps)
    if rank == 0:
        os.makedirs(config.run_dir, exist_ok=True)
        save_config(config, os.path.join(config.run_dir, "config.yaml"))  # every resolved value of this run
    stage.start(trainer, log)
    start_step = trainer.resume(log)
    metrics = MetricsLogger(config.run_dir, rank, total_steps, start_step, description=config.stage,
                            tracking=config.tracking, run_config=config_as_dict(config))
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            values = stage.train_step(trainer, step)
            values["step_s"] = time.perf_counter() - started
            if held_out is not None and held_out.due(step + 1, total_steps):
                values.update(held_out(trainer.module, trainer.device))
            if "tokens" in values:
                values["tokens_per_s"] = values["tokens"] / max(values["step_s"], 1e-9)
            if (peak := trainer.peak_memory_gb()) is not None:
                values["peak_memory_GB"] = peak
            metrics.log_step(step + 1, values)
            trainer.after_step(step + 1, total_steps)
        trainer.finish(start_step, total_steps, metrics.message)
        for message in stage.closing_messages():
            metrics.message(message)
    finally:
        metrics.close()
    if rank == 0:
        plots = stage.plots + ([("eval_pass_at_1", "eval_pass_at_1.png", f"{config.stage}: held-out pass@1")]
                               if held_out is not None else [])
        for key, filename, title in plots:
            if plot := plot_loss(config.run_dir, key=key, filename=filename, title=title):
                print(f"{key} curve: {plot}")
    shutdown()
    return config.run_dir
