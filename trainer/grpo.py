"""Stage 2: GRPO. A loss plus a rollout loop on the same engine as SFT.

Each step: sample group_size completions for each prompt, score them with the recipe's rewards,
normalise rewards within groups (group_advantages), then num_iterations policy-gradient steps
with the clipped token loss (grpo_token_loss, plus beta * k3 KL to a frozen reference model
when beta > 0) on log-probs from the fused-linear kernel (linear_token_logprobs), masked after
each completion's end-of-sequence token. The rollouts train packed, without padding, in
micro-batches of at most train.max_tokens_per_micro_batch tokens (grpo_batch.py).
"""

import dataclasses
import math
import time

import torch

from fastmath_kernels import group_advantages, grpo_token_loss, linear_token_logprobs

from .checkpoint import check_no_earlier_checkpoints
from .config import ConfigError
from .data import DataError, load_records, to_messages
from .engine import Engine
from .grpo_batch import aggregation_weights, pack_rollouts, padding_row, step_tokens
from .metrics import MetricsLogger, plot_loss
from .model import load_tokenizer
from .parallel import (
    all_gather_concat, all_reduce_max, all_reduce_sum, init_distributed, is_distributed, shutdown,
)
from .rewards import RewardComputer, RewardSettings
from .rollout import SamplingSettings, make_engine, sync_weights
from .rollout.keyed_sampling import sequence_keys


def load_prompts(config, tokenizer, files=None, answer_field=None):
    """(prompt token ids, gold answer) per row; the prompt is the chat up to the assistant turn.

    files and answer_field default to the GRPO training data's.
    """
    answer_field = answer_field or config.grpo.answer_field
    prompts = []
    for path, number, row in load_records(files or config.data.train_files):
        where = f"{path}:{number}"
        if answer_field not in row or row[answer_field] is None:
            raise DataError(f"{where}: missing field {answer_field!r} (the gold answer)")
        row = dict(row)
        row.setdefault(config.data.solution_field, "")
        messages = to_messages(row, config.data, config.model.system_prompt, where)[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append((tokenizer(text, add_special_tokens=False)["input_ids"], str(row[answer_field])))
    return prompts


def kept_sequences(completions, mask_truncated):
    """1.0 per completion whose tokens count in the loss; 0.0 for one cut by max_new_tokens when masked."""
    return torch.tensor([0.0 if mask_truncated and c.finish_reason == "length" else 1.0 for c in completions])


def rollout_sequences(chosen, completions):
    """(prompt + completion token ids, index of the first completion token) of every completion."""
    prompts = [chosen[c.prompt_index][0] for c in completions]
    return [list(p) + list(c.token_ids) for p, c in zip(prompts, completions)], [len(p) for p in prompts]


def check_token_budget(prompts, config):
    """Before the model loads: every prompt plus grpo.max_new_tokens must fit one micro-batch."""
    budget = config.train.max_tokens_per_micro_batch
    longest = max(len(ids) for ids, _ in prompts)
    if budget is not None and longest + config.grpo.max_new_tokens > budget:
        raise ConfigError(
            f"train.max_tokens_per_micro_batch={budget} cannot hold the longest prompt ({longest} tokens) plus "
            f"grpo.max_new_tokens={config.grpo.max_new_tokens}; raise the budget to at least "
            f"{longest + config.grpo.max_new_tokens} or shorten the completions"
        )


def score_groups(chosen, completions, rewards):
    """(total rewards, {reward name: values}) for every completion, groups in prompt order."""
    reward_values, parts = [], {}
    for prompt_index, (_, gold) in enumerate(chosen):
        group = [c for c in completions if c.prompt_index == prompt_index]
        totals, group_parts = rewards.group([c.text for c in group], gold, [len(c.token_ids) for c in group])
        reward_values.extend(totals)
        for name, values in group_parts.items():
            parts.setdefault(name, []).extend(values)
    return reward_values, parts


def step_advantages(reward_values, grpo, device, rank, world_size):
    """Advantages of this rank's rewards; scale "batch" divides by the std of every rank's rewards."""
    rewards = torch.tensor(reward_values, dtype=torch.float32, device=device)
    if grpo.scale_rewards != "batch" or world_size == 1:
        return group_advantages(rewards, grpo.group_size, scale=grpo.scale_rewards)
    # Every rank holds the same number of groups (sample_groups fills its batch back up).
    everyone = group_advantages(all_gather_concat(rewards), grpo.group_size, scale="batch")
    return everyone[rank * rewards.numel() : (rank + 1) * rewards.numel()]


def sample_groups(indices, step, prompts, rollout, sampling, rewards, config, rank):
    """Rollouts and rewards for one step: (chosen prompts, completions, rewards, parts, rounds).

    With grpo.dynamic_sampling, groups whose rewards are all equal (no learning signal) are
    dropped and replaced by groups of further prompts, drawn for up to grpo.max_sampling_rounds
    rounds; if too few informative groups turn up, dropped ones fill the batch back to its size
    (their advantages are 0), so every rank trains on the same number of groups.
    """
    grpo = config.grpo
    kept, spare = [], []
    rounds = 0
    while True:
        chosen = [prompts[i] for i in indices]
        # Keyed by (seed, step, round, prompt): the same completions on 1 or N ranks, and after a resume.
        row_keys = sequence_keys(config.train.seed, step + (rounds << 32), indices, grpo.group_size)
        completions = rollout.generate([p for p, _ in chosen], sampling, row_keys=row_keys)
        reward_values, parts = score_groups(chosen, completions, rewards)
        rounds += 1
        if not grpo.dynamic_sampling:
            return chosen, completions, reward_values, parts, rounds
        for position, prompt in enumerate(chosen):
            group = [c for c in completions if c.prompt_index == position]
            lo, hi = position * grpo.group_size, (position + 1) * grpo.group_size
            entry = (prompt, group, reward_values[lo:hi], {k: v[lo:hi] for k, v in parts.items()})
            informative = zero_variance_groups(reward_values[lo:hi], grpo.group_size) == 0
            (kept if informative else spare).append(entry)
        if len(kept) >= grpo.prompts_per_step or rounds >= grpo.max_sampling_rounds:
            break
        generator = torch.Generator().manual_seed((config.train.seed * 7919 + step) * 131 + rank * 17 + rounds)
        indices = torch.randint(len(prompts), (grpo.prompts_per_step,), generator=generator).tolist()
    groups = (kept + spare)[: grpo.prompts_per_step]
    chosen, completions, reward_values, parts = [], [], [], {}
    for position, (prompt, group, values, group_parts) in enumerate(groups):
        chosen.append(prompt)
        completions.extend(dataclasses.replace(c, prompt_index=position) for c in group)
        reward_values.extend(values)
        for name, part in group_parts.items():
            parts.setdefault(name, []).extend(part)
    return chosen, completions, reward_values, parts, rounds


def sampling_logprobs(completions, sequence_starts, row):
    """[T] the engine's log-probs of one row's completion tokens at their target positions, 0 elsewhere."""
    table = torch.zeros(row.tokens)
    offset = 0
    for index in row.sequence_ids:
        completion = completions[index]
        if completion.logprobs is None:
            raise ValueError("grpo.tis_cap > 0 needs sampling log-probs, which this rollout engine does not return")
        start = offset + sequence_starts[index] - 1  # the position whose target is the first completion token
        table[start : start + len(completion.logprobs)] = torch.tensor(completion.logprobs)
        offset += sequence_starts[index] + len(completion.token_ids)
    return table


def truncated_importance_weight(trainer_logp, sampling_logp, mask, cap):
    """min(exp(trainer - sampler), cap) on completion tokens, 1 elsewhere; a constant of the step."""
    weight = torch.exp(trainer_logp.detach() - sampling_logp).clamp(max=cap)
    return torch.where(mask > 0, weight, torch.ones_like(weight))


def zero_variance_groups(rewards, group_size):
    """Groups whose finite rewards are all equal: their advantages, and so their gradients, are 0."""
    count = 0
    for start in range(0, len(rewards), group_size):
        finite = [r for r in rewards[start : start + group_size] if math.isfinite(r)]
        count += len(set(finite)) <= 1
    return count


def token_statistics(logp, old_logp, ref_logp, entropy, advantages, mask, grpo):
    """[clipped tokens, KL sum, entropy sum, tokens] over the masked tokens of one update.

    Every argument holds one value per token (advantages too). A token is clipped where the clip
    changes its gradient: ratio below 1 - eps_low with a negative advantage, or above
    1 + eps_high with a positive one. KL is the k3 estimate.
    """
    ratio = torch.exp(logp - old_logp)
    clipped = ((ratio < 1 - grpo.eps_low) & (advantages < 0)) | ((ratio > 1 + grpo.eps_high) & (advantages > 0))
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = (torch.exp(delta) - delta - 1.0) * mask
    else:
        kl = torch.zeros_like(logp)
    return torch.stack([(clipped * mask).sum(), kl.sum(), (entropy * mask).sum(), mask.sum()])


def load_reference(config, device):
    """The frozen reference policy for the KL term, sharded like the policy under FSDP."""
    from .model import CausalLMLoss, load_causal_lm
    from .parallel import apply_fsdp

    # Loaded like the policy where one process runs it (fp32 under bf16 autocast), so that the KL
    # starts at 0; under FSDP both compute with bf16 weights, which bf16 storage gives directly.
    causal_lm = load_causal_lm(config.model, device, trainable=not is_distributed())
    causal_lm.requires_grad_(False)
    causal_lm.eval()
    return apply_fsdp(CausalLMLoss(causal_lm), device, config.parallel)


@dataclasses.dataclass
class PackedStep:
    """This rank's rollouts of one step as packed rows, with every per-token quantity per row."""

    rows: list  # MicroBatch, on the device
    weights: list  # [T] per row: the aggregation's weight of each token
    advantages: list  # [T] per row: the advantage of each token's sequence
    counted: list  # [T] per row: 1.0 on tokens in the loss
    sampling_logp: list  # [T] per row, or None without grpo.tis_cap
    pad_tokens: int
    computed_tokens: int


def pack_step(chosen, completions, advantages, config, pad_token_id, device, world_size):
    """Packs the rollouts and turns the loss aggregation into per-token weights over the whole step."""
    grpo = config.grpo
    sequences, starts = rollout_sequences(chosen, completions)
    rows = pack_rollouts(sequences, starts, config.train.max_tokens_per_micro_batch)
    # Under FSDP every rank runs as many forward and backward passes as the rank with the most rows.
    rows += [padding_row(pad_token_id) for _ in range(all_reduce_max(len(rows)) - len(rows))]
    rows = [row.to(device) for row in rows]
    kept = kept_sequences(completions, grpo.mask_truncated).to(device)
    counted = [row.completion_targets * kept[row.token_sequence] for row in rows]
    all_counted = torch.cat(counted)
    weights = aggregation_weights(all_counted, step_tokens(rows, "token_sequence"), len(sequences),
                                  grpo.loss_aggregation, grpo.max_new_tokens, all_reduce_sum(all_counted.sum()),
                                  world_size)
    sizes = [row.tokens for row in rows]
    sampling = [sampling_logprobs(completions, starts, row).to(device) for row in rows] if grpo.tis_cap > 0 else None
    return PackedStep(
        rows=rows, weights=list(weights.split(sizes)), advantages=[advantages[row.token_sequence] for row in rows],
        counted=counted, sampling_logp=sampling, pad_tokens=sum(row.pad_tokens for row in rows),
        computed_tokens=sum(sizes),
    )


def logprob_head(row, grpo, low_memory, with_entropy=False):
    """The log-probs of one packed row's targets, computed inside the root module's forward."""
    def head(hidden, weight):
        return linear_token_logprobs(hidden[0], weight, row.targets, temperature=grpo.temperature,
                                     with_entropy=with_entropy, low_memory=low_memory)

    return head


def loss_head(step, index, old_logp, ref_logp, grpo, low_memory, statistics):
    """The weighted clipped loss of row `index`; adds its token statistics into `statistics`."""
    row, advantages, counted = step.rows[index], step.advantages[index], step.counted[index]

    def head(hidden, weight):
        logp, entropy = logprob_head(row, grpo, low_memory, with_entropy=True)(hidden, weight)
        old = logp.detach() if old_logp is None else old_logp
        # One token per row of the kernel's [B, T] layout, so each carries its own advantage.
        per_token = grpo_token_loss(logp[:, None], old[:, None], advantages,
                                    ref_logp=None if ref_logp is None else ref_logp[:, None], beta=grpo.beta,
                                    eps_low=grpo.eps_low, eps_high=grpo.eps_high)[:, 0]
        if step.sampling_logp is not None:
            # The engine sampled from its own copy; weight each token by the truncated ratio of
            # the trainer's probability (at rollout) to the engine's.
            per_token = per_token * truncated_importance_weight(old, step.sampling_logp[index], counted, grpo.tis_cap)
        with torch.no_grad():
            statistics.add_(token_statistics(logp, old, ref_logp, entropy, advantages, counted, grpo))
        return (per_token * step.weights[index]).sum()

    return head


def update_policy(engine, reference, step, grpo, low_memory):
    """grpo.num_iterations optimizer steps, each over every packed row; returns (loss, grad norm, lr, statistics).

    The reference and old-policy log-probs come first, row by row under no_grad. Each row is
    forwarded and backwarded on its own (gradients accumulate), and its loss is already weighted
    for the whole step, so the rows add up to the whole-batch loss.
    """
    rows = step.rows
    with torch.no_grad():
        ref = [reference(**row.inputs, head=logprob_head(row, grpo, low_memory)) if reference is not None else None
               for row in rows]
        # Several updates per rollout: the ratio is against the policy that sampled.
        old = [engine.module(**row.inputs, head=logprob_head(row, grpo, low_memory))
               if grpo.num_iterations > 1 else None for row in rows]
    statistics = torch.zeros(4, device=engine.device)  # clipped tokens, KL sum, entropy sum, tokens
    for _ in range(grpo.num_iterations):
        step_loss = torch.zeros((), device=engine.device)
        for index, row in enumerate(rows):
            # FSDP averages gradients over ranks, so each rank's loss is its own aggregate.
            loss = engine.module(**row.inputs, head=loss_head(step, index, old[index], ref[index], grpo, low_memory,
                                                              statistics))
            loss.backward()
            step_loss += loss.detach()
        loss_value, grad_norm, lr = engine.optimizer_step(step_loss, what="GRPO loss", hint="check the rewards")
    return loss_value, grad_norm, lr, statistics


def run_grpo(config):
    # The prompts are read and checked before the model loads: bad data fails in seconds.
    check_no_earlier_checkpoints(config)
    rank, world_size, _ = init_distributed()
    log = print if rank == 0 else (lambda *_: None)
    grpo = config.grpo
    tokenizer = load_tokenizer(config.model)
    prompts = load_prompts(config, tokenizer)
    check_token_budget(prompts, config)
    steps_per_epoch = len(prompts) // (grpo.prompts_per_step * world_size)
    if steps_per_epoch == 0:
        raise DataError(f"data.train_files: {len(prompts)} prompts are fewer than one step needs "
                        f"(grpo.prompts_per_step {grpo.prompts_per_step} x {world_size} ranks)")
    rewards = RewardComputer(RewardSettings(
        weights=grpo.reward_weights, cosine_max_len=grpo.cosine_max_len, timeout_s=grpo.reward_timeout_s,
        unparseable_gold=grpo.unparseable_gold,
    ))
    engine = Engine(config, tokenizer)
    device = engine.device
    low_memory_loss = config.train.low_memory_loss
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    engine.set_schedule(total_steps)
    log(f"grpo: {len(prompts)} prompts, {steps_per_epoch} steps per epoch, {grpo.group_size} samples per prompt")
    reference = load_reference(config, device) if grpo.beta > 0 else None
    if reference is not None:
        log(f"grpo: beta {grpo.beta}, frozen reference model loaded from {config.model.path}")
    rollout = make_engine(grpo.rollout_engine, root_module=engine.module, tokenizer=engine.tokenizer, device=device,
                          model_path=config.model.path, seed=config.train.seed,
                          gpu_memory_utilization=grpo.vllm_gpu_memory_utilization)
    sampling = SamplingSettings(n=grpo.group_size, temperature=grpo.temperature, top_p=grpo.top_p,
                                min_p=grpo.min_p, max_new_tokens=grpo.max_new_tokens)

    start_step = engine.resume(log)
    metrics = MetricsLogger(config.run_dir, rank, total_steps, start_step, description="grpo")
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.train.seed * 7919 + epoch))
            first = (index * world_size + rank) * grpo.prompts_per_step
            indices = order[first : first + grpo.prompts_per_step].tolist()
            chosen, completions, reward_values, parts, sampling_rounds = sample_groups(
                indices, step, prompts, rollout, sampling, rewards, config, rank)
            rollout_s = time.perf_counter() - started
            advantages = step_advantages(reward_values, grpo, device, rank, world_size)

            packed = pack_step(chosen, completions, advantages, config, engine.tokenizer.pad_token_id, device, world_size)
            train_started = time.perf_counter()
            loss_value, grad_norm, lr, step_stats = update_policy(engine, reference, packed, grpo, low_memory_loss)
            engine.scheduler.step()
            train_s = time.perf_counter() - train_started
            sync_started = time.perf_counter()
            synced_bytes = sync_weights(engine.module, rollout, grpo.weight_sync_bucket_mb * 2**20)
            sync_s = time.perf_counter() - sync_started

            finite = [v for v in reward_values if math.isfinite(v)]
            correct = [a for a in parts["accuracy"] if math.isfinite(a)]
            lengths = [len(c.token_ids) for c in completions]
            summary = all_reduce_sum(torch.tensor([
                loss_value, grad_norm, sum(finite), len(finite), sum(correct),
                float(sum(lengths)), float(len(completions)),
                float(sum(c.finish_reason == "length" for c in completions)),
                float(zero_variance_groups(reward_values, grpo.group_size)), float(len(chosen)),
                *step_stats.tolist(), float(packed.pad_tokens), float(packed.computed_tokens),
            ], device=device)).tolist()
            extremes = torch.tensor([-min(lengths), max(lengths)], dtype=torch.float32, device=device)
            if is_distributed():
                torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
            tokens_seen = max(summary[13], 1.0)
            values = {
                "loss": summary[0] / world_size, "grad_norm": summary[1] / world_size, "lr": lr,
                "reward": summary[2] / max(summary[3], 1), "accuracy": summary[4] / max(summary[3], 1),
                "completion_tokens": summary[5] / summary[6], "min_completion_tokens": -extremes[0].item(),
                "max_completion_tokens": extremes[1].item(), "truncated_fraction": summary[7] / summary[6],
                "zero_variance_groups": summary[8] / summary[9], "clip_fraction": summary[10] / tokens_seen,
                "kl": summary[11] / tokens_seen, "entropy": summary[12] / tokens_seen,
                "rollout_s": rollout_s, "train_s": train_s, "sync_s": sync_s, "synced_MB": synced_bytes / 2**20,
                "step_s": time.perf_counter() - started, "reward_failures": sum(rewards.counts.values()),
                "sampling_rounds": sampling_rounds, "pad_fraction": summary[14] / max(summary[15], 1.0),
                "micro_batches": len(packed.rows),
            }
            for name, values_of_reward in parts.items():
                finite_values = [v for v in values_of_reward if math.isfinite(v)]
                values[f"reward_{name}"] = sum(finite_values) / max(len(finite_values), 1)
            if (peak := engine.peak_memory_gb()) is not None:
                values["peak_memory_GB"] = peak
            metrics.log_step(step + 1, values)
            engine.after_step(step + 1, total_steps)
        engine.finish(start_step, total_steps, metrics.message)
        if rewards.counts:
            metrics.message(f"reward failures and skips: {dict(rewards.counts)}")
    finally:
        metrics.close()
    if rank == 0:
        for key in ("reward", "completion_tokens"):
            plot_loss(config.run_dir, key=key, filename=f"{key}.png", title=f"GRPO {key}")
    shutdown()
    return config.run_dir
