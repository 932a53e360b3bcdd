"""GRPO's rollouts as packed micro-batches: no padding, at most a token budget each.

Each step's sequences (prompt + completion) are packed first-fit decreasing by length into
rows of at most `train.max_tokens_per_micro_batch` tokens; a sequence is never split. A row is
one micro-batch: position ids restart at each sequence and the document-masked attention keeps
the sequences apart. Everything per token is flat ([T] for a row of T tokens), and every loss
aggregation becomes a weight per token computed over the whole step, so the sum over
micro-batches is the whole-batch loss.
"""

import dataclasses

import torch

from .attention import packed_inputs
from .grpo_loss import StepTokens, aggregation_weights
from .packing import first_fit_decreasing
from .parallel import all_reduce_max, all_reduce_sum


@dataclasses.dataclass
class MicroBatch:
    """One packed row: the module's inputs and, per position, its target and its sequence."""

    sequence_ids: list  # the step's sequences in this row, in order
    inputs: dict  # input_ids and position_ids [1, T], document_boundaries, longest_document
    targets: torch.Tensor  # [T] next token within the sequence; 0 at each sequence's last position
    token_sequence: torch.Tensor  # [T] the step-local index of each position's sequence
    completion_targets: torch.Tensor  # [T] float: 1 where the target is a completion token
    pad_tokens: int = 0

    @property
    def tokens(self):
        return self.targets.numel()

    def to(self, device):
        moved = {key: value.to(device) if torch.is_tensor(value) else value for key, value in self.inputs.items()}
        return dataclasses.replace(self, inputs=moved, targets=self.targets.to(device),
                                   token_sequence=self.token_sequence.to(device),
                                   completion_targets=self.completion_targets.to(device))


def _row(sequences, completion_starts, members):
    ids, positions, targets, owner, counted = [], [], [], [], []
    for index in members:
        sequence, start = sequences[index], completion_starts[index]
        ids.extend(sequence)
        positions.extend(range(len(sequence)))
        targets.extend(sequence[1:] + [0])
        owner.extend([index] * len(sequence))
        # Position i predicts token i + 1: counted where that token belongs to the completion.
        counted.extend(float(i + 1 >= start and i + 1 < len(sequence)) for i in range(len(sequence)))
    lengths = [len(sequences[index]) for index in members]
    inputs = packed_inputs(torch.tensor([ids]), torch.tensor([positions]), lengths)
    return MicroBatch(list(members), inputs, torch.tensor(targets), torch.tensor(owner), torch.tensor(counted))


def padding_row(pad_token_id):
    """A one-token row that adds nothing: it keeps a rank with fewer rows in step with the others."""
    inputs = packed_inputs(torch.tensor([[pad_token_id]]), torch.zeros(1, 1, dtype=torch.long), [1])
    return MicroBatch([], inputs, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1), pad_tokens=1)


def pack_rollouts(sequences, completion_starts, budget):
    """The step's sequences in rows of at most `budget` tokens (None: one row holding them all)."""
    lengths = [len(sequence) for sequence in sequences]
    bins = first_fit_decreasing(lengths, budget) if budget else [list(range(len(lengths)))]
    return [_row(sequences, completion_starts, sorted(members)) for members in bins]


def step_tokens(rows, name):
    """The concatenation of one per-token field over the step's rows."""
    return torch.cat([getattr(row, name) for row in rows])


def kept_sequences(completions, mask_truncated):
    """1.0 per completion whose tokens count in the loss; 0.0 for one cut by max_new_tokens when masked."""
    return torch.tensor([0.0 if mask_truncated and c.finish_reason == "length" else 1.0 for c in completions])


def rollout_sequences(chosen, completions):
    """(prompt + completion token ids, index of the first completion token) of every completion."""
    prompts = [chosen[c.prompt_index][0] for c in completions]
    return [list(p) + list(c.token_ids) for p, c in zip(prompts, completions)], [len(p) for p in prompts]


def sampling_logprobs(completions, sequence_starts, row):
    """[T] the engine's log-probs of one row's completion tokens at their target positions, 0 elsewhere."""
    table = torch.zeros(row.tokens)
    offset = 0
    for index in row.sequence_ids:
        completion = completions[index]
        if completion.logprobs is None:
            raise ValueError("grpo.loss.tis_cap > 0 needs sampling log-probs, which this rollout engine does not "
                             "return")
        start = offset + sequence_starts[index] - 1  # the position whose target is the first completion token
        table[start : start + len(completion.logprobs)] = torch.tensor(completion.logprobs)
        offset += sequence_starts[index] + len(completion.token_ids)
    return table


@dataclasses.dataclass
class PackedStep:
    """This rank's rollouts of one step as packed rows, with every per-token quantity per row."""

    rows: list  # MicroBatch, on the device
    weights: list  # [T] per row: the aggregation's weight of each token
    advantages: list  # [T] per row: the advantage of each token's sequence
    counted: list  # [T] per row: 1.0 on tokens in the loss
    sampling_logp: list  # [T] per row, or None without grpo.loss.tis_cap
    pad_tokens: int
    computed_tokens: int


def pack_step(chosen, completions, advantages, config, pad_token_id, device, world_size):
    """Packs the rollouts; grpo.loss.aggregation (grpo_loss.AGGREGATIONS) weights their tokens over the whole step."""
    grpo = config.grpo
    sequences, starts = rollout_sequences(chosen, completions)
    rows = pack_rollouts(sequences, starts, config.train.max_tokens_per_micro_batch)
    # Under FSDP every rank runs as many forward and backward passes as the rank with the most rows.
    rows += [padding_row(pad_token_id) for _ in range(all_reduce_max(len(rows)) - len(rows))]
    rows = [row.to(device) for row in rows]
    kept = kept_sequences(completions, grpo.loss.mask_truncated).to(device)
    counted = [row.completion_targets * kept[row.token_sequence] for row in rows]
    all_counted = torch.cat(counted)
    tokens = StepTokens(all_counted, step_tokens(rows, "token_sequence"), len(sequences), grpo.sampling.max_new_tokens,
                        all_reduce_sum(all_counted.sum()), world_size)
    weights = aggregation_weights(grpo.loss.aggregation, tokens)
    sizes = [row.tokens for row in rows]
    weighted = grpo.loss.tis_cap > 0
    sampling = [sampling_logprobs(completions, starts, row).to(device) for row in rows] if weighted else None
    return PackedStep(
        rows=rows, weights=list(weights.split(sizes)), advantages=[advantages[row.token_sequence] for row in rows],
        counted=counted, sampling_logp=sampling, pad_tokens=sum(row.pad_tokens for row in rows),
        computed_tokens=sum(sizes),
    )
