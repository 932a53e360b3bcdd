"""First-fit decreasing: sequences into rows of a fixed capacity, with little room left over.

SFT packs its documents with it and GRPO its rollouts. Taking the longest first and putting each
into the first row with room for it wastes a few percent of a row where packing in data order
(a new row whenever the next sequence does not fit) wastes up to half of one per row.
"""

from .errors import BudgetError


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
        if length > capacity:
            raise BudgetError(f"a sequence of {length} tokens exceeds the budget of {capacity}")
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
