"""GRPO group advantages as one Triton program (one launch, no host sync).

The rewards are read as a [num_groups, group_size] tile grid. Reward batches are small, so a
single program that loops over tiles costs no more than a grid of them and keeps the batch-std
mode (which needs every reward) in the same launch.
"""

import torch
import triton
import triton.language as tl

SCALE_MODES = {"group": 0, "batch": 1, "none": 2}
_TILE_ELEMENTS = 4096

# Finite rewards are valid; NaN fails every comparison, so it drops out too.
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _safe_divide(deviation, denominator):
    # With eps = 0 a group of equal rewards has std 0 and deviations 0: its advantages are 0.
    positive = denominator > 0.0
    return tl.where(positive, deviation / tl.where(positive, denominator, 1.0), 0.0)


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,
    advantages_ptr,
    num_groups,
    group_size,
    eps,
    SCALE_MODE: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_SIZE)
    col_in_group = cols < group_size

    batch_std = 0.0
    if SCALE_MODE == 1:
        # Names distinct from the per-group ones below: Triton types a name once per kernel.
        batch_total = 0.0
        batch_count = 0.0
        for start in range(0, num_groups, BLOCK_GROUPS):
            rows = start + tl.arange(0, BLOCK_GROUPS)
            in_bounds = (rows[:, None] < num_groups) & col_in_group[None, :]
            offsets = rows[:, None] * group_size + cols[None, :]
            x = tl.load(rewards_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            valid = in_bounds & (tl.abs(x) <= _FLOAT32_MAX)
            batch_total += tl.sum(tl.sum(tl.where(valid, x, 0.0), axis=1), axis=0)
            batch_count += tl.sum(tl.sum(valid.to(tl.float32), axis=1), axis=0)
        batch_mean = batch_total / tl.maximum(batch_count, 1.0)
        squares = 0.0
        for start in range(0, num_groups, BLOCK_GROUPS):
            rows = start + tl.arange(0, BLOCK_GROUPS)
            in_bounds = (rows[:, None] < num_groups) & col_in_group[None, :]
            offsets = rows[:, None] * group_size + cols[None, :]
            x = tl.load(rewards_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            valid = in_bounds & (tl.abs(x) <= _FLOAT32_MAX)
            deviation = tl.where(valid, x - batch_mean, 0.0)
            squares += tl.sum(tl.sum(deviation * deviation, axis=1), axis=0)
        batch_std = tl.sqrt(squares / tl.maximum(batch_count - 1.0, 1.0))

    for start in range(0, num_groups, BLOCK_GROUPS):
        rows = start + tl.arange(0, BLOCK_GROUPS)
        in_bounds = (rows[:, None] < num_groups) & col_in_group[None, :]
        offsets = rows[:, None] * group_size + cols[None, :]
        x = tl.load(rewards_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        valid = in_bounds & (tl.abs(x) <= _FLOAT32_MAX)
        count = tl.sum(valid.to(tl.float32), axis=1)
        mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / tl.maximum(count, 1.0)
        deviation = tl.where(valid, x - mean[:, None], 0.0)
        if SCALE_MODE == 0:
            group_std = tl.sqrt(tl.sum(deviation * deviation, axis=1) / tl.maximum(count - 1.0, 1.0))
            advantages = _safe_divide(deviation, group_std[:, None] + eps)
        elif SCALE_MODE == 1:
            advantages = _safe_divide(deviation, batch_std + eps)
        else:
            advantages = deviation
        advantages = tl.where(valid & (count[:, None] >= 2.0), advantages, 0.0)
        tl.store(advantages_ptr + offsets, advantages, mask=in_bounds)


def group_advantages_triton(rewards, group_size, scale, eps):
    rewards = rewards.contiguous()
    advantages = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    if rewards.numel() == 0:
        return advantages
    block_size = triton.next_power_of_2(group_size)
    num_groups = rewards.numel() // group_size
    block_groups = min(max(1, _TILE_ELEMENTS // block_size), triton.next_power_of_2(num_groups))
    _group_advantages_kernel[(1,)](
        rewards,
        advantages,
        num_groups,
        group_size,
        float(eps),
        SCALE_MODE=SCALE_MODES[scale],
        BLOCK_GROUPS=block_groups,
        BLOCK_SIZE=block_size,
    )
    return advantages
