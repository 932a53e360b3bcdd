"""Stage 2: GRPO. A loss plus a rollout loop on the same engine as SFT.

Each step: sample group_size completions for each prompt, score them with the recipe's rewards,
normalise rewards within groups (group_advantages), then one policy-gradient step with the
clipped token loss (grpo_token_loss) on log-probs from the fused-linear kernel
(linear_token_logprobs), masked after each completion's end-of-sequence token.
"""

import math
import time

import torch

from fastmath_kernels import group_advantages, grpo_token_loss, linear_token_logprobs

from .checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DataError, load_records, to_messages
from .engine import Engine
from .metrics import MetricsLogger, plot_loss
from .parallel import all_reduce_sum, shutdown
from .rewards import RewardComputer, RewardSettings
from .rollout import SamplingSettings, make_engine


def load_prompts(config, tokenizer):
    """(prompt token ids, gold answer) per row; the prompt is the chat up to the assistant turn."""
    prompts = []
    for path, number, row in load_records(config.data.train_files):
        where = f"{path}:{number}"
        if config.grpo.answer_field not in row or row[config.grpo.answer_field] is None:
            raise DataError(f"{where}: missing field {config.grpo.answer_field!r} (the gold answer)")
        row = dict(row)
        row.setdefault(config.data.solution_field, "")
        messages = to_messages(row, config.data, config.model.system_prompt, where)[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append((tokenizer(text, add_special_tokens=False)["input_ids"], str(row[config.grpo.answer_field])))
    return prompts


def aggregate(per_token_loss, mask, method, max_new_tokens):
    """Masked reduction of [B, T] token losses to the step loss (before the cross-rank mean)."""
    if method == "grpo":  # mean over each sequence's tokens, then over sequences
        return ((per_token_loss * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    if method == "dr_grpo":  # a constant normaliser: no length bias
        return (per_token_loss * mask).sum() / (mask.shape[0] * max_new_tokens)
    return (per_token_loss * mask).sum() / mask.sum().clamp_min(1)  # bnpo and dapo: mean over tokens


def policy_batch(prompts, completions, pad_token_id):
    """Right-padded prompt+completion ids, their position ids, and the completion-token mask."""
    sequences = [list(prompts[c.prompt_index][0]) + list(c.token_ids) for c in completions]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.float32)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (sequence, completion) in enumerate(zip(sequences, completions)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        start = len(sequence) - len(completion.token_ids)
        completion_mask[row, start : len(sequence)] = 1.0
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return input_ids, position_ids, attention_mask, completion_mask


def run_grpo(config):
    engine = Engine(config)
    rank, world_size, device = engine.rank, engine.world_size, engine.device
    log = print if rank == 0 else (lambda *_: None)
    grpo = config.grpo
    prompts = load_prompts(config, engine.tokenizer)
    steps_per_epoch = len(prompts) // (grpo.prompts_per_step * world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(prompts)} prompts are fewer than one step needs ({grpo.prompts_per_step} x {world_size} ranks)")
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    engine.set_schedule(total_steps)
    log(f"grpo: {len(prompts)} prompts, {steps_per_epoch} steps per epoch, {grpo.group_size} samples per prompt")
    rewards = RewardComputer(RewardSettings(
        weights=grpo.reward_weights, cosine_max_len=grpo.cosine_max_len, timeout_s=grpo.reward_timeout_s,
        unparseable_gold=grpo.unparseable_gold,
    ))
    rollout = make_engine(grpo.rollout_engine, root_module=engine.module, tokenizer=engine.tokenizer, device=device)
    sampling = SamplingSettings(n=grpo.group_size, temperature=grpo.temperature, top_p=grpo.top_p,
                                min_p=grpo.min_p, max_new_tokens=grpo.max_new_tokens)

    start_step = 0
    if config.checkpoint.resume == "auto":
        path = latest_checkpoint(config.run_dir, log=log)
        if path:
            start_step = load_checkpoint(path, engine.module, engine.optimizer, engine.scheduler, rank)["step"]
            log(f"resumed from {path} at step {start_step}")
    metrics = MetricsLogger(config.run_dir, rank, total_steps, start_step, description="grpo")
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.train.seed * 7919 + epoch))
            first = (index * world_size + rank) * grpo.prompts_per_step
            chosen = [prompts[i] for i in order[first : first + grpo.prompts_per_step].tolist()]
            completions = rollout.generate([p for p, _ in chosen], sampling)
            rollout_s = time.perf_counter() - started

            reward_values, parts = [], {}
            for prompt_index, (_, gold) in enumerate(chosen):
                group = [c for c in completions if c.prompt_index == prompt_index]
                totals, group_parts = rewards.group([c.text for c in group], gold, [len(c.token_ids) for c in group])
                reward_values.extend(totals)
                for name, values in group_parts.items():
                    parts.setdefault(name, []).extend(values)
            reward_tensor = torch.tensor(reward_values, dtype=torch.float32)
            advantages = group_advantages(reward_tensor, grpo.group_size, scale=grpo.scale_rewards).to(device)

            input_ids, position_ids, attention_mask, mask = policy_batch(chosen, completions, engine.tokenizer.pad_token_id)
            input_ids, position_ids, mask = input_ids.to(device), position_ids.to(device), mask.to(device)
            targets, token_mask = input_ids[:, 1:], mask[:, 1:]

            def head(hidden, weight):
                logp = linear_token_logprobs(hidden[:, :-1], weight, targets, temperature=grpo.temperature)
                # One optimizer step per rollout batch: the sampling policy is the current one.
                per_token = grpo_token_loss(logp, logp.detach(), advantages, eps_low=grpo.eps_low, eps_high=grpo.eps_high)
                return aggregate(per_token, token_mask, grpo.loss_aggregation, grpo.max_new_tokens)

            # FSDP averages gradients over ranks, so each rank's loss is its own mean.
            loss = engine.module(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask.to(device), head=head)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.parameters, config.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = engine.scheduler.get_last_lr()[0]
            engine.optimizer.step()
            engine.scheduler.step()
            engine.optimizer.zero_grad(set_to_none=True)

            finite = [v for v in reward_values if math.isfinite(v)]
            correct = [a for a in parts["accuracy"] if math.isfinite(a)]
            summary = all_reduce_sum(torch.tensor([
                loss.item(), grad_norm.item(), sum(finite), len(finite), sum(correct),
                float(sum(len(c.token_ids) for c in completions)), float(len(completions)),
                float(sum(c.finish_reason == "length" for c in completions)),
            ], device=device)).tolist()
            values = {
                "loss": summary[0] / world_size, "grad_norm": summary[1] / world_size, "lr": lr,
                "reward": summary[2] / max(summary[3], 1), "accuracy": summary[4] / max(summary[3], 1),
                "completion_tokens": summary[5] / summary[6], "truncated_fraction": summary[7] / summary[6],
                "rollout_s": rollout_s, "step_s": time.perf_counter() - started,
                "reward_failures": sum(rewards.counts.values()),
            }
            metrics.log_step(step + 1, values)
            every = config.checkpoint.every_steps
            if every and (step + 1) % every == 0 and step + 1 < total_steps:
                save_checkpoint(config.run_dir, step + 1, engine.module, engine.optimizer, engine.scheduler,
                                {"step": step + 1}, rank, config.checkpoint.keep)
        if start_step < total_steps:
            save_checkpoint(config.run_dir, total_steps, engine.module, engine.optimizer, engine.scheduler,
                            {"step": total_steps}, rank, config.checkpoint.keep)
        if config.checkpoint.export_hf:
            export_hf(engine.module, engine.tokenizer, f"{config.run_dir}/hf_model", rank)
        if rewards.counts:
            metrics.message(f"reward failures and skips: {dict(rewards.counts)}")
    finally:
        metrics.close()
    if rank == 0:
        for key in ("reward", "completion_tokens"):
            plot_loss(config.run_dir, key=key, filename=f"{key}.png", title=f"GRPO {key}")
    shutdown()
    return config.run_dir
