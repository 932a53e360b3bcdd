"""One GRPO policy update on fixed rollouts: its loss and the gradients of every optimizer step.

The trainer's own path (Trainer, pack_step, update_policy), with an SGD optimizer that records
the whole gradient each time it steps (AdamW's first step would hide the gradients' size).
Imported by
tests/test_grpo_microbatch.py, and run by it under torchrun for the two-rank case:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo_step_check.py MODEL RUN_DIR OUT
"""

import json
import os
import sys

import torch

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
GROUP_SIZE, PROMPTS_PER_RANK, MAX_NEW_TOKENS, LEARNING_RATE, BETA, TEMPERATURE = 4, 2, 24, 1e-1, 0.1, 0.7


def fixed_rollouts(rank, vocab_size=30):
    """Prompts, completions of several lengths (rank 1's prompts longer, so it packs into more rows) and advantages."""
    from trainer.rollout import Completion

    generator = torch.Generator().manual_seed(100 + rank)
    chosen, completions = [], []
    for prompt_index in range(PROMPTS_PER_RANK):
        prompt = torch.randint(5, vocab_size, (3 + 2 * prompt_index + 8 * rank,), generator=generator).tolist()
        chosen.append((prompt, "0"))
        for sample in range(GROUP_SIZE):
            # Lengths 2..MAX_NEW_TOKENS; one completion per rank is cut at MAX_NEW_TOKENS (left out of the loss).
            length = 2 + (5 * sample + 7 * prompt_index + 7 * rank) % (MAX_NEW_TOKENS - 1)
            tokens = torch.randint(5, vocab_size, (length,), generator=generator).tolist()
            completions.append(Completion(prompt_index, tokens, "", "length" if length == MAX_NEW_TOKENS else "stop"))
    advantages = torch.randn(len(completions), generator=generator)
    return chosen, completions, advantages


def config_for(model, run_dir, aggregation, budget, num_iterations, beta=BETA):
    from trainer.config import load_config

    return load_config(None, [
        "stage=grpo", f"run_dir={run_dir}", f"model.path={model}", "data.train_files=[unused.jsonl]",
        f"grpo.loss.aggregation={aggregation}", f"grpo.loss.beta={beta}", f"grpo.num_iterations={num_iterations}",
        f"grpo.group_size={GROUP_SIZE}", f"grpo.sampling.max_new_tokens={MAX_NEW_TOKENS}", "grpo.loss.eps_high=0.28",
        f"grpo.sampling.temperature={TEMPERATURE}", "grpo.loss.mask_truncated=true", "optim.grad_clip=1e9",
        "optim.warmup_ratio=0",
        f"train.max_tokens_per_micro_batch={'null' if budget is None else budget}",
    ])


def whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps each step's gradients, every parameter's flattened into one float32 vector."""

    def __init__(self, parameters, lr):
        super().__init__(parameters, lr=lr)
        self.recorded = []

    def step(self, closure=None):
        grads = [whole(p.grad).detach().flatten() for group in self.param_groups for p in group["params"]]
        self.recorded.append(torch.cat(grads).cpu())
        return super().step(closure)


def policy_update(model, run_dir, aggregation, budget, num_iterations, beta=BETA):
    """One step on this rank's fixed rollouts: the last update's loss, each update's gradients,
    the rows run and their padding tokens."""
    from trainer.grpo_batch import pack_step
    from trainer.grpo_loss import update_policy
    from trainer.parallel import init_distributed
    from trainer.training import Trainer, load_sharded_model

    rank, world_size, device = init_distributed()
    config = config_for(model, run_dir, aggregation, budget, num_iterations, beta)
    trainer = Trainer(config)
    trainer.optimizer = RecordingSGD(trainer.parameters, lr=LEARNING_RATE)
    trainer.set_schedule(1)
    reference = load_sharded_model(config, device, trainable=False) if beta > 0 else None
    chosen, completions, advantages = fixed_rollouts(rank)
    packed = pack_step(chosen, completions, advantages.to(device), config, trainer.tokenizer.pad_token_id, device,
                       world_size)
    loss, _, _, _ = update_policy(trainer, reference, packed, config.grpo, low_memory=False)
    return {"loss": loss, "gradients": trainer.optimizer.recorded, "rows": len(packed.rows),
            "pad_tokens": packed.pad_tokens}


def main(model, run_dir, out):
    """Every aggregation, micro-batched (a 40-token budget) and whole; each rank writes OUT.rank<N>."""
    from trainer.parallel import init_distributed, shutdown

    rank, _, _ = init_distributed()
    results = {}
    for aggregation in AGGREGATIONS:
        for budget in (40, None):
            result = policy_update(model, os.path.join(run_dir, f"{aggregation}_{budget}"), aggregation, budget,
                                   num_iterations=2)
            result["gradients"] = [g.tolist() for g in result["gradients"]]
            results[f"{aggregation}_{budget}"] = result
    with open(f"{out}.rank{rank}", "w") as handle:
        json.dump(results, handle)
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(*sys.argv[1:4])
