"""First-fit decreasing, as SFT packs documents and GRPO packs rollouts."""

import random

import pytest

from trainer.data import Document, collate, pack_documents
from trainer.errors import BudgetError
from trainer.packing import first_fit_decreasing, in_data_order


def first_fit_by_scanning(lengths, capacity):
    """The same rule written plainly: longest first, each into the first open bin with room."""
    bins, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for position, free in enumerate(room):
            if lengths[index] <= free:
                bins[position].append(index)
                room[position] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def test_first_fit_decreasing_never_splits_and_respects_the_budget():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    bins = first_fit_decreasing(lengths, 10)
    # By hand: 9 | 8 | 7 | 5+5 | then 3 joins 7, 2 joins 8, 1 joins 9: four full bins.
    assert bins == [[2, 6], [7, 3], [0, 1], [4, 5]]
    with pytest.raises(BudgetError, match="11 tokens exceeds the budget of 10"):
        first_fit_decreasing([3, 11], 10)


@pytest.mark.parametrize("count, capacity, longest", [(1, 5, 5), (37, 64, 64), (1000, 320, 150), (3001, 24000, 16000)])
def test_first_fit_decreasing_matches_a_scan_of_every_bin(count, capacity, longest):
    generator = random.Random(count)
    lengths = [generator.randint(1, longest) for _ in range(count)]
    bins = first_fit_decreasing(lengths, capacity)
    assert bins == first_fit_by_scanning(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(count))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_sft_packs_waste_less_than_packing_in_data_order():
    generator = random.Random(0)
    lengths = [generator.randint(40, 120) for _ in range(2000)]  # the embedded task's spread of documents
    documents = [Document(list(range(n)), [True] * n) for n in lengths]
    packs = pack_documents(documents, 320)
    in_order = pack_documents(documents, 320, packing="data_order")
    assert sum(lengths) / (320 * len(packs)) > 0.97
    assert len(packs) < 0.9 * len(in_order)
    # Data order: a new row exactly where the next document would overflow the current one.
    for row, following in zip(in_order, in_order[1:]):
        assert sum(row.document_lengths) + following.document_lengths[0] > 320
    assert [n for row in in_order for n in row.document_lengths] == lengths
    # Every document once and whole, its positions restarting at 0.
    assert sorted(n for pack in packs for n in pack.document_lengths) == sorted(lengths)
    for pack in packs:
        assert pack.position_ids == [p for n in pack.document_lengths for p in range(n)]
        assert pack.input_ids == pack.position_ids  # each document's ids are 0..n-1 here


def test_one_row_keeps_documents_in_data_order():
    documents = [Document([1] * 3, [True] * 3), Document([2] * 5, [True] * 5), Document([3] * 2, [True] * 2)]
    (pack,) = pack_documents(documents, 100)
    assert pack.input_ids == [1, 1, 1, 2, 2, 2, 2, 2, 3, 3] and pack.document_lengths == [3, 5, 2]
    unpacked = pack_documents(documents, 100, pack=False)
    assert [p.document_lengths for p in unpacked] == [[3], [5], [2]]
    batch = collate(pack_documents(documents, 6), pad_token_id=0)
    # 5 | 3, then 2 joins 3: two rows of 5 tokens, where data order would need three (3 | 5 | 2).
    assert batch["input_ids"].tolist() == [[2] * 5, [1, 1, 1, 3, 3]] and batch["pad_tokens"] == 0


def test_data_order_packs_consecutive_sequences():
    assert in_data_order([3, 5, 2, 7, 1], 8) == [[0, 1], [2], [3, 4]]
    assert in_data_order([], 8) == []
    with pytest.raises(BudgetError, match="9 tokens exceeds the budget of 8"):
        in_data_order([1, 9], 8)


def test_the_packing_setting_is_checked():
    from trainer.config import ConfigError, load_config

    sft = ["stage=sft", "model.path=m", "data.train_files=[a.jsonl]"]
    assert load_config(None, sft).data.packing == "first_fit_decreasing"
    assert load_config(None, [*sft, "data.packing=data_order"]).data.packing == "data_order"
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, [*sft, "data.packing=best_fit"])
