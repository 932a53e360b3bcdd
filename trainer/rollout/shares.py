"""Evaluation problems dealt across ranks and gathered back: the same keys whatever the split."""

import dataclasses

from ..parallel import all_gather_objects
from .keyed_sampling import sequence_keys


def rank_share(count, rank, world_size):
    """The items `rank` takes: rank, rank + N, ..., as the HF engine's data-parallel evaluation deals them."""
    return range(rank, count, world_size)


def merge_shares(shares, count):
    """The items of every rank's (indices, items) in index order; each index must come exactly once."""
    merged, seen = [None] * count, [False] * count
    for indices, items in shares:
        if len(indices) != len(items):
            raise ValueError(f"a share holds {len(items)} items for {len(indices)} indices")
        for index, item in zip(indices, items):
            if seen[index]:
                raise ValueError(f"item {index} came from two ranks")
            merged[index], seen[index] = item, True
    if not all(seen):
        raise ValueError(f"{seen.count(False)} of {count} items came from no rank")
    return merged


def gather_shares(indices, items, count):
    """Every rank's share merged (merge_shares), on every rank."""
    return merge_shares(all_gather_objects((list(indices), items)), count)


def sample_problems(engine, prompts, settings, seed, rank=0, world_size=1):
    """settings.n completions per prompt (a list per prompt, in order), sampled by every rank for its
    rank_share and gathered on every rank. Rows are keyed by (seed, 0, problem index, sample), as
    rollout.hf.sample_completions keys them, so the split across ranks changes no key."""
    share = rank_share(len(prompts), rank, world_size)
    per_prompt = [[] for _ in share]
    keys = sequence_keys(seed, 0, share, settings.n)
    for completion in engine.generate([prompts[index] for index in share], settings, row_keys=keys):
        problem = share[completion.prompt_index]
        per_prompt[completion.prompt_index].append(dataclasses.replace(completion, prompt_index=problem))
    return gather_shares(share, per_prompt, len(prompts))
