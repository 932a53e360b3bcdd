"""GRPO's samples: the prompts, and each step's rollouts scored in groups of one prompt's completions."""

import dataclasses
import math

import torch

from fastmath_kernels import group_advantages

from .data import epoch_order, load_records, to_messages
from .errors import ConfigError, DataError
from .parallel import all_gather_concat, all_reduce_max
from .rollout.keyed_sampling import sequence_keys


def load_prompts(config, tokenizer, files=None, answer_field=None, split=None, what="data.train_files"):
    """(prompt token ids, gold answer) per row; the prompt is the chat up to the assistant turn.

    files, answer_field and split (of a Hub dataset) default to the GRPO training data's.
    """
    answer_field = answer_field or config.grpo.answer_field
    prompts = []
    for path, number, row in load_records(files or config.data.train_files, split or config.data.split, what):
        where = f"{path}:{number}"
        if answer_field not in row or row[answer_field] is None:
            raise DataError(f"{where}: missing field {answer_field!r} (the gold answer)")
        row = dict(row)
        row.setdefault(config.data.solution_field, "")
        messages = to_messages(row, config.data, config.model.system_prompt, where)[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append((tokenizer(text, add_special_tokens=False)["input_ids"], str(row[answer_field])))
    return prompts


def keep_last_tokens(prompts, max_tokens):
    """(prompts, how many were cut): a prompt over max_tokens keeps its last max_tokens tokens.

    Left truncation, as the reference recipe does: the end of the prompt, where the chat template
    opens the assistant turn, is what generation continues from. None keeps every prompt whole.
    """
    if max_tokens is None:
        return prompts, 0
    kept = [(ids[-max_tokens:], gold) for ids, gold in prompts]
    return kept, sum(len(ids) > max_tokens for ids, _ in prompts)


def check_token_budget(prompts, config):
    """Before the model loads: every prompt plus grpo.sampling.max_new_tokens must fit one micro-batch."""
    budget = config.train.max_tokens_per_micro_batch
    longest = max(len(ids) for ids, _ in prompts)
    if budget is not None and longest + config.grpo.sampling.max_new_tokens > budget:
        raise ConfigError(
            f"train.max_tokens_per_micro_batch={budget} cannot hold the longest prompt ({longest} tokens) plus "
            f"grpo.sampling.max_new_tokens={config.grpo.sampling.max_new_tokens}; raise the budget to at least "
            f"{longest + config.grpo.sampling.max_new_tokens} or shorten the completions"
        )


def step_prompts(num_prompts, step, steps_per_epoch, prompts_per_step, rank, world_size, seed):
    """Indices of this rank's prompts for `step`: a seeded order per epoch, split across ranks."""
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_order(num_prompts, epoch, seed)
    first = (index * world_size + rank) * prompts_per_step
    return order[first : first + prompts_per_step]


@dataclasses.dataclass
class ScoredGroup:
    """One prompt's completions with their rewards."""

    prompt: tuple  # (prompt token ids, gold answer)
    completions: list  # Completion
    rewards: list  # the weighted total per completion
    parts: dict  # {reward name: value per completion}


@dataclasses.dataclass
class RolloutBatch:
    """A step's scored groups, flattened: completion i belongs to chosen[completions[i].prompt_index]."""

    chosen: list
    completions: list
    rewards: list
    parts: dict
    sampling_rounds: int


def scored_groups(indices, step, sampling_round, prompts, rollout, sampling, rewards, config):
    """Yields a ScoredGroup per prompt in `indices`, in order, from one rollout of them all, scored as one batch."""
    chosen = [prompts[i] for i in indices]
    # Keyed by (seed, step, round, prompt): the same completions on 1 or N ranks, and after a resume.
    row_keys = sequence_keys(config.train.seed, step + (sampling_round << 32), indices, config.grpo.group_size)
    completions = rollout.generate([ids for ids, _ in chosen], sampling, row_keys=row_keys)
    groups = [[c for c in completions if c.prompt_index == position] for position in range(len(chosen))]
    # Scored together: with grpo.rewards.length_scope=rank_batch the length reward spans this whole round.
    scored = rewards.score_batch([
        ([c.text for c in group], gold, [len(c.token_ids) for c in group]) for (_, gold), group in zip(chosen, groups)
    ])
    for prompt, group, (totals, parts) in zip(chosen, groups, scored):
        yield ScoredGroup(prompt, group, totals, parts)


def flatten_groups(groups, sampling_rounds):
    """A RolloutBatch of groups, each completion's prompt_index its group's position."""
    batch = RolloutBatch([], [], [], {}, sampling_rounds)
    for position, group in enumerate(groups):
        batch.chosen.append(group.prompt)
        batch.completions.extend(dataclasses.replace(c, prompt_index=position) for c in group.completions)
        batch.rewards.extend(group.rewards)
        for name, values in group.parts.items():
            batch.parts.setdefault(name, []).extend(values)
    return batch


def sample_groups(indices, step, prompts, rollout, sampling, rewards, config, rank):
    """This step's RolloutBatch.

    With grpo.dynamic_sampling, groups whose rewards are all equal (no learning signal) are
    dropped and replaced by groups of further prompts, drawn for up to grpo.max_sampling_rounds
    rounds; if too few informative groups turn up, dropped ones fill the batch back to its size
    (their advantages are 0), so every rank trains on the same number of groups. Every rank
    samples the same number of rounds: one that has enough goes on until all have.
    """
    grpo = config.grpo
    kept, spare = [], []
    rounds = 0
    while True:
        groups = list(scored_groups(indices, step, rounds, prompts, rollout, sampling, rewards, config))
        rounds += 1
        if not grpo.dynamic_sampling:
            return flatten_groups(groups, rounds)
        for group in groups:
            (kept if zero_variance_groups(group.rewards, grpo.group_size) == 0 else spare).append(group)
        done = len(kept) >= grpo.prompts_per_step or rounds >= grpo.max_sampling_rounds
        # Under FSDP each round's generate calls are collectives: the ranks stop together, once all are done.
        if all_reduce_max(int(not done)) == 0:
            return flatten_groups((kept + spare)[: grpo.prompts_per_step], rounds)
        generator = torch.Generator().manual_seed((config.train.seed * 7919 + step) * 131 + rank * 17 + rounds)
        indices = torch.randint(len(prompts), (grpo.prompts_per_step,), generator=generator).tolist()


def zero_variance_groups(rewards, group_size):
    """Groups whose finite rewards are all equal: their advantages, and so their gradients, are 0."""
    count = 0
    for start in range(0, len(rewards), group_size):
        finite = [r for r in rewards[start : start + group_size] if math.isfinite(r)]
        count += len(set(finite)) <= 1
    return count


def step_advantages(reward_values, grpo, device, rank, world_size):
    """Advantages of this rank's rewards; scale "batch" divides by the std of every rank's rewards."""
    rewards = torch.tensor(reward_values, dtype=torch.float32, device=device)
    if grpo.loss.scale_rewards != "batch" or world_size == 1:
        return group_advantages(rewards, grpo.group_size, scale=grpo.loss.scale_rewards, eps=grpo.loss.advantage_eps)
    # Every rank holds the same number of groups (sample_groups fills its batch back up).
    everyone = group_advantages(all_gather_concat(rewards), grpo.group_size, scale="batch", eps=grpo.loss.advantage_eps)
    return everyone[rank * rewards.numel() : (rank + 1) * rewards.numel()]
