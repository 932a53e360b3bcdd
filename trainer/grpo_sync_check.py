"""The weight-sync check: does the rollout engine's copy of the policy compute what the trainer's does?

A rollout engine that holds its own copy of the weights (vLLM) can hold a stale, partial or
corrupted one: a sync skipped or cut short, a layer it received only in part, prefix-cache
blocks computed with the old weights, memory that a sleep released and a wake did not refill.
Each fault shows in the same place: the engine's log-probs of the tokens it samples.

So after the first weight sync of a run (fresh or resumed) and every grpo.engine.sync_check_every-th
sync after it, the engine samples PROBE_TOKENS tokens for PROBE_PROMPTS prompts at the rollout
temperature with no top-p or min-p filter, where the log-probs it reports are those of
log_softmax(logits / temperature). The trainer scores the same tokens with its own forward; the
largest difference over every rank is the step's sync_logprob_gap, and a gap above
grpo.engine.sync_check_max_gap stops the run. The probe's prompts are those the previous rollout began
with, whose KV blocks the engine's prefix cache holds: a cache kept across the sync would serve
blocks of the old weights, and the gap would show it.
"""

import dataclasses

import torch

from .errors import SyncCheckError
from .grpo_batch import pack_rollouts, sampling_logprobs
from .grpo_loss import logprob_head
from .parallel import all_reduce_named
from .rollout import SamplingSettings
from .rollout.keyed_sampling import sequence_keys

PROBE_PROMPTS = 2
PROBE_TOKENS = 16
# The default largest gap by the engine's compute dtype: float32 engines match the trainer to
# about 1e-6 (vLLM's CPU build, measured); bf16 kernels differ by up to tenths of a nat on
# ordinary tokens, while a corrupted copy differs by several nats.
DEFAULT_MAX_GAP = {torch.float32: 1e-3}
DEFAULT_MAX_GAP_16_BIT = 1.0
_PROBE_STREAM = 1 << 40  # keeps the probe's sampling keys apart from every rollout round's



class SyncCheck:
    def __init__(self, grpo, rollout_engine, seed):
        self.every = grpo.engine.sync_check_every if rollout_engine.holds_weights else 0
        dtype = rollout_engine.weight_dtype or torch.float32  # None: computes in the policy's own fp32
        self.max_gap = grpo.engine.sync_check_max_gap or DEFAULT_MAX_GAP.get(dtype, DEFAULT_MAX_GAP_16_BIT)
        self.settings = SamplingSettings(n=1, temperature=grpo.sampling.temperature, top_p=1.0, min_p=0.0,
                                         max_new_tokens=PROBE_TOKENS)
        self.grpo, self.seed = grpo, seed
        self.first_step = self.previous_prompts = None

    def due(self, step):
        """Whether the sync before `step`'s rollout is checked: the run's first, then every `every`-th."""
        if not self.every:
            return False
        if self.first_step is None:
            self.first_step = step
        return step == self.first_step or step % self.every == 0

    def probe(self, rollout_engine, step, prompts):
        """(prompt ids, Completion) pairs sampled by the engine now; call inside the rollout phase."""
        chosen = [list(ids) for ids in (self.previous_prompts or prompts)[:PROBE_PROMPTS]]
        keys = sequence_keys(self.seed, _PROBE_STREAM + step, range(len(chosen)), 1)
        completions = rollout_engine.generate(chosen, self.settings, row_keys=keys)
        return [(chosen[c.prompt_index], c) for c in completions]

    def remember(self, prompts):
        """The prompts this step's rollout began with: the next probe's, held in the prefix cache."""
        self.previous_prompts = [list(ids) for ids in prompts[:PROBE_PROMPTS]]

    @torch.no_grad()
    def gap(self, trainer, probes, step, low_memory=False):
        """The largest |engine - trainer| log-prob over the probed tokens of every rank; raises SyncCheckError
        above the limit. Every rank calls it at the same step: the trainer's forward is collective under FSDP."""
        completions = [dataclasses.replace(completion, prompt_index=index)
                       for index, (_, completion) in enumerate(probes)]
        sequences = [list(prompt) + list(c.token_ids) for (prompt, _), c in zip(probes, completions)]
        starts = [len(prompt) for prompt, _ in probes]
        (row,) = pack_rollouts(sequences, starts, None)
        engine_logp = sampling_logprobs(completions, starts, row).to(trainer.device)
        row = row.to(trainer.device)
        trainer_logp = trainer.module(**row.inputs, head=logprob_head(row, self.grpo, low_memory))
        largest = float(((trainer_logp.float() - engine_logp).abs() * row.completion_targets).max())
        value = all_reduce_named({"gap": largest}, trainer.device, op="max")["gap"]
        if value > self.max_gap:
            raise SyncCheckError(
                f"step {step + 1}: after the weight sync, the rollout engine's log-probs of tokens it sampled differ "
                f"from the trainer's by up to {value:.3g} nats, above grpo.engine.sync_check_max_gap={self.max_gap:g}: "
                "its copy of the policy is stale, partial or corrupted (a skipped or cut-short sync, a layer received "
                "in part, prefix-cache blocks of the old weights, or memory a sleep released and a wake did not "
                "refill)"
            )
        return value
