"""Stage 2: GRPO. A stage of the trainer's loop: rollouts, rewards, and a clipped policy update.

Each step: sample group_size completions for each prompt, score them with the recipe's rewards
(grpo_rollouts.py), normalise rewards within groups (group_advantages), then num_iterations
policy-gradient steps with the clipped token loss (grpo_token_loss, plus beta * k3 KL to a
frozen reference model when beta > 0) on log-probs from the fused-linear kernel
(linear_token_logprobs), masked after each completion's end-of-sequence token (grpo_loss.py).
The rollouts train packed, without padding, in micro-batches of at most
train.max_tokens_per_micro_batch tokens (grpo_batch.py).
"""

import math
import time

from .errors import DataError
from .grpo_batch import pack_step
from .grpo_loss import update_policy
from .grpo_rollouts import (
    check_token_budget,
    keep_last_tokens,
    load_prompts,
    sample_groups,
    step_advantages,
    step_prompts,
    zero_variance_groups,
)
from .grpo_sync_check import SyncCheck
from .parallel import all_reduce_named
from .rewards import RewardComputer
from .rollout import SamplingSettings, engine_class, ensure_engine_weights, sync_weights
from .training import load_sharded_model, run_stage


class GRPOStage:
    """Stage 2 for the trainer's loop; train_step returns the step's named metrics."""

    plots = [("reward", "reward.png", "GRPO reward"),
             ("completion_tokens", "completion_tokens.png", "GRPO completion_tokens")]

    def __init__(self, config):
        self.config, self.grpo = config, config.grpo
        self.prompts = self.rewards = self.reference = self.rollout = None
        self.world_size = self.steps_per_epoch = self.rollout_engine_class = None

    def prepare(self, tokenizer, world_size, log):
        grpo = self.grpo
        self.prompts, truncated = keep_last_tokens(load_prompts(self.config, tokenizer), grpo.max_prompt_tokens)
        if grpo.max_prompt_tokens is not None:
            log(f"grpo: {truncated} of {len(self.prompts)} prompts were longer than grpo.max_prompt_tokens="
                f"{grpo.max_prompt_tokens} and keep only their last {grpo.max_prompt_tokens} tokens")
        check_token_budget(self.prompts, self.config)
        self.rollout_engine_class = engine_class(grpo.engine.name)
        self.rollout_engine_class.check_startup(self.config, world_size)  # it can start here: before loading
        self.world_size = world_size
        self.steps_per_epoch = len(self.prompts) // (grpo.prompts_per_step * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"data.train_files: {len(self.prompts)} prompts are fewer than one step needs "
                            f"(grpo.prompts_per_step {grpo.prompts_per_step} x {world_size} ranks)")
        self.rewards = RewardComputer(grpo.rewards)
        log(f"grpo: {len(self.prompts)} prompts, {self.steps_per_epoch} steps per epoch, "
            f"{grpo.group_size} samples per prompt")
        return self.steps_per_epoch

    def start(self, trainer, log):
        grpo, config = self.grpo, self.config
        if grpo.loss.beta > 0:
            self.reference = load_sharded_model(config, trainer.device, trainable=False)
            log(f"grpo: beta {grpo.loss.beta}, frozen reference model loaded from {config.model.path}")
        self.rollout = self.rollout_engine_class.for_training(trainer, config)
        self.sync_check = SyncCheck(grpo, self.rollout, config.train.seed)
        sampling = grpo.sampling
        self.sampling = SamplingSettings(n=grpo.group_size, temperature=sampling.temperature, top_p=sampling.top_p,
                                         min_p=sampling.min_p, max_new_tokens=sampling.max_new_tokens,
                                         stop=list(sampling.stop_strings) or None)

    def train_step(self, trainer, step):
        grpo, config, rank = self.grpo, self.config, trainer.rank
        started = time.perf_counter()
        # A run's first step, fresh or resumed: an engine with its own weights holds no policy yet.
        first_sync_bytes = ensure_engine_weights(trainer.module, self.rollout)
        indices = step_prompts(len(self.prompts), step, self.steps_per_epoch, grpo.prompts_per_step, rank,
                               self.world_size, config.train.seed)
        prompt_ids = [self.prompts[index][0] for index in indices]
        with self.rollout.phase():  # awake across the sampling rounds, asleep for training
            probes = self.sync_check.probe(self.rollout, step, prompt_ids) if self.sync_check.due(step) else None
            batch = sample_groups(indices, step, self.prompts, self.rollout, self.sampling, self.rewards, config, rank)
        self.sync_check.remember(prompt_ids)
        timings = {"rollout_s": time.perf_counter() - started}
        if probes is not None:  # the synced copy against the policy it was synced from, before this update
            timings["sync_logprob_gap"] = self.sync_check.gap(trainer, probes, step, config.train.low_memory_loss)
        advantages = step_advantages(batch.rewards, grpo, trainer.device, rank, self.world_size)
        packed = pack_step(batch.chosen, batch.completions, advantages, config, trainer.tokenizer.pad_token_id,
                           trainer.device, self.world_size)
        train_started = time.perf_counter()
        update = update_policy(trainer, self.reference, packed, grpo, config.train.low_memory_loss)
        trainer.scheduler.step()
        timings["train_s"] = time.perf_counter() - train_started
        sync_started = time.perf_counter()
        synced_bytes = first_sync_bytes + sync_weights(trainer.module, self.rollout)
        timings.update(sync_s=time.perf_counter() - sync_started, synced_MB=synced_bytes / 2**20)
        values = step_metrics(batch, packed, update, grpo, trainer.device, self.world_size)
        values.update(timings, reward_failures=sum(self.rewards.counts.values()))
        return values

    def closing_messages(self):
        return [f"reward failures and skips: {dict(self.rewards.counts)}"] if self.rewards.counts else []


def step_metrics(batch, packed, update, grpo, device, world_size):
    """The step's metrics over every rank: sums reduced by name, then the ratios logged."""
    loss, grad_norm, lr, statistics = update
    finite = [v for v in batch.rewards if math.isfinite(v)]
    correct = [a for a in batch.parts["accuracy"] if math.isfinite(a)]
    lengths = [len(c.token_ids) for c in batch.completions]
    clipped, kl, entropy, loss_tokens, tis_deviation = statistics.tolist()
    sums = all_reduce_named({
        "loss": loss, "grad_norm": grad_norm, "reward": sum(finite), "scored": len(finite), "correct": sum(correct),
        "completion_tokens": sum(lengths), "completions": len(batch.completions),
        "truncated": sum(c.finish_reason == "length" for c in batch.completions),
        "zero_variance_groups": zero_variance_groups(batch.rewards, grpo.group_size), "groups": len(batch.chosen),
        "clipped_tokens": clipped, "kl": kl, "entropy": entropy, "loss_tokens": loss_tokens,
        "pad_tokens": packed.pad_tokens, "computed_tokens": packed.computed_tokens,
    }, device)
    extremes = all_reduce_named({"shortest": -min(lengths), "longest": max(lengths), "tis": tis_deviation}, device,
                                op="max")
    scored, loss_tokens = max(sums["scored"], 1), max(sums["loss_tokens"], 1.0)
    values = {
        "loss": sums["loss"] / world_size, "grad_norm": sums["grad_norm"] / world_size, "lr": lr,
        "reward": sums["reward"] / scored, "accuracy": sums["correct"] / scored,
        "completion_tokens": sums["completion_tokens"] / sums["completions"],
        "min_completion_tokens": -extremes["shortest"], "max_completion_tokens": extremes["longest"],
        "truncated_fraction": sums["truncated"] / sums["completions"],
        "zero_variance_groups": sums["zero_variance_groups"] / sums["groups"],
        "clip_fraction": sums["clipped_tokens"] / loss_tokens, "kl": sums["kl"] / loss_tokens,
        "entropy": sums["entropy"] / loss_tokens, "sampling_rounds": batch.sampling_rounds,
        "pad_fraction": sums["pad_tokens"] / max(sums["computed_tokens"], 1.0), "micro_batches": len(packed.rows),
    }
    if grpo.loss.tis_cap > 0:
        values["tis_weight_max_deviation"] = extremes["tis"]  # largest |TIS weight - 1| over loss tokens
    for name, values_of_reward in batch.parts.items():
        finite_values = [v for v in values_of_reward if math.isfinite(v)]
        values[f"reward_{name}"] = sum(finite_values) / max(len(finite_values), 1)
    return values


def run_grpo(config):
    return run_stage(config, GRPOStage(config))
