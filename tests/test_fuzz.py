"""Bad data, fuzzed: every input gets a clear error or a counted skip within its time limit.

Random bytes, truncated JSON, wrong types, huge and empty fields and non-UTF-8 go through the
data loader; random text and LaTeX built to be slow go through the rewards.
"""

import json
import math
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import DataConfig
from trainer.data import DataError, build_documents, load_records
from trainer.rewards import RewardComputer, RewardSettings, accuracy_reward, last_boxed
from trainer.toy.model_dir import build_tokenizer
from trainer.toy.task import WORDS

TOKENIZER = build_tokenizer(WORDS)
# Derandomised, so that a CI failure reproduces; FASTMATH_FUZZ_EXAMPLES=1000 searches deeper.
FUZZ = settings(max_examples=int(os.environ.get("FASTMATH_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
rows = st.dictionaries(st.sampled_from(["problem", "solution", "answer", "x"]), json_values, max_size=4)


def corrupt(line, how, cut):
    if how == "truncate":
        return line[: cut % max(len(line), 1)]
    if how == "latin1":
        return line.encode("utf-8") + b"\xff\xfe"
    return line


def load_all(path):
    """What a run does with a data file: load, render and tokenise every row."""
    records = load_records([str(path)])
    documents, stats = build_documents(records, TOKENIZER, DataConfig(max_seq_len=64), None)
    return records, documents, stats


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_get_a_data_error_or_load(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(data)
    try:
        load_all(path)
    except DataError as error:
        assert str(path) in str(error)  # the message names the file


@FUZZ
@given(st.lists(rows, min_size=1, max_size=5), st.sampled_from(["keep", "truncate", "latin1"]), st.integers(0, 500))
def test_wrong_types_truncated_json_and_non_utf8_get_a_data_error_or_load(tmp_path_factory, records, how, cut):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    lines = [json.dumps(r) for r in records]
    lines[-1] = corrupt(lines[-1], how, cut)
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    try:
        _, documents, stats = load_all(path)
    except DataError as error:
        assert str(path) in str(error)
        return
    # Loaded: every row was a usable example, and the counts add up.
    assert stats.examples == len(documents) + stats.dropped_overlong + stats.dropped_empty_completion


def test_huge_and_empty_fields_are_truncated_or_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    rows_written = [
        {"problem": "tom has 3 apples .", "solution": "3 + 4 = 7 . " * 200_000},  # 2.4 MB solution
        {"problem": "", "solution": "3 + 4 = 7 ."},
        {"problem": "tom has 3 apples .", "solution": ""},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows_written))
    started = time.perf_counter()
    _, documents, stats = load_all(path)
    assert time.perf_counter() - started < 60
    assert stats.examples == 3 and stats.truncated == 1
    assert all(len(d.input_ids) <= 64 for d in documents)
    assert stats.examples == len(documents) + stats.dropped_overlong + stats.dropped_empty_completion


latex_pieces = st.sampled_from(
    ["\\boxed{", "}", "{", "\\frac{", "^{", "\\sqrt{", "(", ")", "x", "7", "9", "\\pi", "</think>", "\\\\", "$", " "]
)
completions = st.lists(latex_pieces, max_size=40).map("".join) | st.text(max_size=200)


@FUZZ
@given(st.lists(completions, min_size=2, max_size=4), st.sampled_from(["7", "\\frac{1}{2}", "x^2", "", "\\\\"]))
def test_rewards_never_raise_on_fuzzed_text(group, gold):
    computer = RewardComputer(RewardSettings(weights={"format": 1.0, "cosine_length": 1.0, "length": 1.0}, timeout_s=1))
    started = time.perf_counter()
    totals, parts = computer.group(group, gold, [len(c) for c in group])
    assert time.perf_counter() - started < 5 * len(group)
    assert len(totals) == len(group)
    # NaN only where the gold answer cannot be checked, and then for the whole group.
    assert all(math.isfinite(t) for t in totals) or all(math.isnan(t) for t in totals)


@pytest.mark.parametrize("answer", [
    "9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "99999!!", "(" * 300 + "1" + ")" * 300,
    "\\frac{1}{" * 60 + "2" + "}" * 60, "x" * 20000, "\\sqrt{" * 200 + "2" + "}" * 200,
])
def test_latex_built_to_be_slow_is_checked_within_its_time_limit(answer):
    started = time.perf_counter()
    score = accuracy_reward(f"\\boxed{{{answer}}}", "3", timeout_s=1)
    assert time.perf_counter() - started < 10
    assert score == 0.0, f"{answer[:40]!r} is not 3"


@FUZZ
@given(st.text(max_size=300))
def test_last_boxed_returns_balanced_content_or_none(text):
    content = last_boxed(text)
    if content is not None:
        assert content.count("{") == content.count("}")
        assert content.strip() in text
