"""Sequences into rows of a fixed capacity: first-fit decreasing, or in data order.

GRPO packs its rollouts first-fit decreasing, and SFT its documents by default
(data.packing): taking the longest first and putting each into the first row with room for it
wastes a few percent of a row, where packing in data order (a new row whenever the next sequence
does not fit) wastes up to half of one per row.
"""

from .errors import BudgetError


def _check_fits(length, capacity):
    if length > capacity:
        raise BudgetError(f"a sequence of {length} tokens exceeds the budget of {capacity}")


def in_data_order(lengths, capacity):
    """Bins (lists of indices, in order) of consecutive sequences, a new one wherever the next does not fit."""
    bins, filled = [], capacity
    for index, length in enumerate(lengths):
        _check_fits(length, capacity)
        if filled + length > capacity:
            bins.append([])
            filled = 0
        bins[-1].append(index)
        filled += length
    return bins


def first_fit_decreasing(lengths, capacity):
    """Bins (lists of indices, longest first) whose lengths sum to at most capacity each.

    A max-tree over the bins' free room finds the first bin with room in O(log n) steps, so a
    dataset's documents pack in seconds where a scan of every open bin would take hours.
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    leaves = 1
    while leaves < len(lengths):
        leaves *= 2
    room = [-1] * (2 * leaves)  # room[leaves + b]: bin b's free room; -1 while bin b is not open
    bins = []
    for index in order:
        length = lengths[index]
        _check_fits(length, capacity)
        if room[1] >= length:
            node = 1
            while node < leaves:  # the leftmost subtree with room, down to its leaf
                node = 2 * node if room[2 * node] >= length else 2 * node + 1
            bins[node - leaves].append(index)
        else:
            node = leaves + len(bins)
            bins.append([index])
            room[node] = capacity
        room[node] -= length
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


# data.packing's choices.
PACKINGS = {"first_fit_decreasing": first_fit_decreasing, "data_order": in_data_order}
