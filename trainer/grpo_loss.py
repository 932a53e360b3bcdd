"""GRPO's update: the loss aggregations, log-prob and loss heads on packed rows, and the policy update
over a step's rows."""

import dataclasses

import torch

from fastmath_kernels import grpo_token_loss, linear_token_logprobs


@dataclasses.dataclass
class LossSettings:
    """The grpo.loss section of a run configuration."""

    aggregation: str = "dapo"  # a name in AGGREGATIONS: grpo, bnpo, dr_grpo, dapo or one registered
    scale_rewards: str = "group"  # group, batch or none (Dr. GRPO)
    advantage_eps: float = 1e-4  # advantages divide by (std + advantage_eps)
    eps_low: float = 0.2  # clip range below 1: ratios under 1 - eps_low stop pulling down
    eps_high: float = 0.2  # clip-higher when above eps_low
    beta: float = 0.0  # k3 KL to a frozen reference model; 0 loads no reference model
    mask_truncated: bool = False  # leave completions cut by max_new_tokens out of the loss
    tis_cap: float = 0.0  # > 0: truncated importance weight min(p_trainer / p_engine, cap) per token


@dataclasses.dataclass
class StepTokens:
    """What an aggregation may normalise by: the step's loss tokens on this rank, and across ranks.

    The normalisers cover the whole step, never one micro-batch, so splitting the step into rows
    changes no weight.
    """

    counted: torch.Tensor  # [T] 1.0 on tokens in the loss
    token_sequence: torch.Tensor  # [T] the sequence (0 .. sequences - 1) each token belongs to
    sequences: int  # sequences on this rank
    max_new_tokens: int
    global_tokens: torch.Tensor  # loss tokens of every rank, summed (a 0-dim tensor)
    world_size: int


# grpo.loss.aggregation name -> function(StepTokens) -> [T] per-token weights w, with sum(w * loss)
# this rank's aggregated loss (FSDP then averages the ranks' gradients).
AGGREGATIONS = {}


def aggregation(name):
    """Function decorator: grpo.loss.aggregation accepts `name` and weights the loss tokens with it."""
    def register(weights):
        AGGREGATIONS[name] = weights
        return weights

    return register


@aggregation("grpo")
def _mean_per_sequence(tokens):
    """Each sequence's mean token loss, averaged over the sequences."""
    per_sequence = torch.zeros(tokens.sequences, dtype=tokens.counted.dtype, device=tokens.counted.device)
    per_sequence.index_add_(0, tokens.token_sequence, tokens.counted)
    return tokens.counted / (per_sequence.clamp_min(1)[tokens.token_sequence] * tokens.sequences)


@aggregation("bnpo")
def _mean_over_rank_tokens(tokens):
    return tokens.counted / tokens.counted.sum().clamp_min(1)


@aggregation("dr_grpo")
def _sum_over_a_constant(tokens):
    """Dr. GRPO: summed token losses over sequences x max_new_tokens, so no length is favoured."""
    return tokens.counted / (tokens.sequences * tokens.max_new_tokens)


@aggregation("dapo")
def _mean_over_every_rank_tokens(tokens):
    """DAPO: the mean over every rank's loss tokens (world_size undoes FSDP's average of the ranks)."""
    return tokens.counted * tokens.world_size / tokens.global_tokens.clamp_min(1)


def aggregation_weights(method, tokens):
    """Per-token weights of grpo.loss.aggregation=method over a step's StepTokens."""
    if method not in AGGREGATIONS:
        raise ValueError(f"grpo.loss.aggregation: unknown aggregation {method!r}; available: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[method](tokens)


def truncated_importance_weight(trainer_logp, sampling_logp, mask, cap):
    """min(exp(trainer - sampler), cap) on completion tokens, 1 elsewhere; a constant of the step."""
    weight = torch.exp(trainer_logp.detach() - sampling_logp).clamp(max=cap)
    return torch.where(mask > 0, weight, torch.ones_like(weight))


STATISTICS = 5  # clipped tokens, KL sum, entropy sum, tokens (summed), largest |TIS weight - 1| (a maximum)


def token_statistics(logp, old_logp, ref_logp, entropy, advantages, mask, grpo):
    """[clipped tokens, KL sum, entropy sum, tokens] over the masked tokens of one update.

    Every argument holds one value per token (advantages too). A token is clipped where the clip
    changes its gradient: ratio below 1 - eps_low with a negative advantage, or above
    1 + eps_high with a positive one. KL is the k3 estimate.
    """
    ratio = torch.exp(logp - old_logp)
    clip = grpo.loss
    clipped = ((ratio < 1 - clip.eps_low) & (advantages < 0)) | ((ratio > 1 + clip.eps_high) & (advantages > 0))
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = (torch.exp(delta) - delta - 1.0) * mask
    else:
        kl = torch.zeros_like(logp)
    return torch.stack([(clipped * mask).sum(), kl.sum(), (entropy * mask).sum(), mask.sum()])


def logprob_head(row, grpo, low_memory, with_entropy=False):
    """The log-probs of one packed row's targets, computed inside the root module's forward."""
    def head(hidden, weight):
        return linear_token_logprobs(hidden[0], weight, row.targets, temperature=grpo.sampling.temperature,
                                     with_entropy=with_entropy, low_memory=low_memory)

    return head


def loss_head(step, index, old_logp, ref_logp, grpo, low_memory, statistics):
    """The weighted clipped loss of row `index`; adds its token statistics into `statistics` (STATISTICS)."""
    row, advantages, counted = step.rows[index], step.advantages[index], step.counted[index]

    def head(hidden, weight):
        logp, entropy = logprob_head(row, grpo, low_memory, with_entropy=True)(hidden, weight)
        old = logp.detach() if old_logp is None else old_logp
        # One token per row of the kernel's [B, T] layout, so each carries its own advantage.
        per_token = grpo_token_loss(logp[:, None], old[:, None], advantages,
                                    ref_logp=None if ref_logp is None else ref_logp[:, None], beta=grpo.loss.beta,
                                    eps_low=grpo.loss.eps_low, eps_high=grpo.loss.eps_high)[:, 0]
        if step.sampling_logp is not None:
            # The engine sampled from its own copy; weight each token by the truncated ratio of
            # the trainer's probability (at rollout) to the engine's.
            weight = truncated_importance_weight(old, step.sampling_logp[index], counted, grpo.loss.tis_cap)
            per_token = per_token * weight
            with torch.no_grad():
                statistics[4] = torch.maximum(statistics[4], ((weight - 1).abs() * counted).max())
        with torch.no_grad():
            statistics[:4] += token_statistics(logp, old, ref_logp, entropy, advantages, counted, grpo)
        return (per_token * step.weights[index]).sum()

    return head


def update_policy(trainer, reference, step, grpo, low_memory):
    """grpo.num_iterations optimizer steps, each over every packed row; returns (loss, grad norm, lr, statistics).

    The reference and old-policy log-probs come first, row by row under no_grad. Each row is
    forwarded and backwarded on its own (gradients accumulate), and its loss is already weighted
    for the whole step, so the rows add up to the whole-batch loss. FSDP averages gradients over
    ranks, so each rank's loss is its own aggregate.
    """
    rows = step.rows
    with torch.no_grad():
        ref = [reference(**row.inputs, head=logprob_head(row, grpo, low_memory)) if reference is not None else None
               for row in rows]
        # Several updates per rollout: the ratio is against the policy that sampled.
        old = [trainer.module(**row.inputs, head=logprob_head(row, grpo, low_memory))
               if grpo.num_iterations > 1 else None for row in rows]
    statistics = torch.zeros(STATISTICS, device=trainer.device)
    for _ in range(grpo.num_iterations):
        heads = [loss_head(step, index, old[index], ref[index], grpo, low_memory, statistics)
                 for index in range(len(rows))]
        step_loss = trainer.accumulate_gradients([row.inputs for row in rows], heads)
        loss_value, grad_norm, lr = trainer.optimizer_step(step_loss, what="GRPO loss", hint="check the rewards")
    return loss_value, grad_norm, lr, statistics
