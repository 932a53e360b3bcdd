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

from .attention import document_boundaries


class BudgetError(ValueError):
    """A sequence longer than the micro-batch token budget."""


def first_fit_decreasing(lengths, capacity):
    """Bins (lists of indices, longest first) whose lengths sum to at most capacity each."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins, room = [], []
    for index in order:
        if lengths[index] > capacity:
            raise BudgetError(f"a sequence of {lengths[index]} tokens exceeds the budget of {capacity}")
        for position, free in enumerate(room):
            if lengths[index] <= free:
                bins[position].append(index)
                room[position] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


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
    cumulative, longest = document_boundaries(lengths)
    inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
              "document_boundaries": cumulative, "longest_document": longest}
    return MicroBatch(list(members), inputs, torch.tensor(targets), torch.tensor(owner), torch.tensor(counted))


def padding_row(pad_token_id):
    """A one-token row that adds nothing: it keeps a rank with fewer rows in step with the others."""
    inputs = {"input_ids": torch.tensor([[pad_token_id]]), "position_ids": torch.zeros(1, 1, dtype=torch.long),
              "document_boundaries": torch.tensor([0, 1], dtype=torch.int32), "longest_document": 1}
    return MicroBatch([], inputs, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1), pad_tokens=1)


def pack_rollouts(sequences, completion_starts, budget):
    """The step's sequences in rows of at most `budget` tokens (None: one row holding them all)."""
    lengths = [len(sequence) for sequence in sequences]
    bins = first_fit_decreasing(lengths, budget) if budget else [list(range(len(lengths)))]
    return [_row(sequences, completion_starts, sorted(members)) for members in bins]


def aggregation_weights(counted, token_sequence, num_sequences, method, max_new_tokens, global_tokens=None,
                        world_size=1):
    """Per-token weights w with sum(w * loss) equal to the aggregated loss of this rank.

    counted [T]: 1 on tokens in the loss; token_sequence [T]: their sequence. The normalisers
    cover the whole step on this rank (and, for dapo, every rank), never one micro-batch:
    grpo: 1 / (tokens of the sequence x sequences); bnpo: 1 / tokens of the rank; dr_grpo:
    1 / (sequences x max_new_tokens); dapo: world_size / tokens of every rank (FSDP averages the
    ranks' gradients).
    """
    if method == "grpo":
        per_sequence = torch.zeros(num_sequences, dtype=counted.dtype, device=counted.device)
        per_sequence.index_add_(0, token_sequence, counted)
        return counted / (per_sequence.clamp_min(1)[token_sequence] * num_sequences)
    if method == "dr_grpo":
        return counted / (num_sequences * max_new_tokens)
    if method == "dapo":
        if global_tokens is None:
            raise ValueError("dapo normalises by the tokens of every rank: pass global_tokens")
        return counted * world_size / global_tokens.clamp_min(1)
    if method == "bnpo":
        return counted / counted.sum().clamp_min(1)
    raise ValueError(f"unknown loss aggregation {method!r}")


def step_tokens(rows, name):
    """The concatenation of one per-token field over the step's rows."""
    return torch.cat([getattr(row, name) for row in rows])
