import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import pytest

from trainer import curate as curate_module
from trainer.curate import CurationCounts, CurationOptions, curate, main, normalise_problem
from trainer.toy.model_dir import build_tokenizer
from trainer.toy.task import WORDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def trace(words, answer):
    """`words` unknown words, then a boxed one-digit answer and </think>: words + 6 tokens of the toy tokenizer.

    Each word is one token; "\\boxed{", "▁", the digit and "▁}" are four; "▁" and "</think>" two.
    """
    return "step " * words + f"\\boxed{{ {answer} }} </think>"


FOUR, HALF_EIGHT = "What is 2 + 2?", "Halve eight."
ROWS = [
    (FOUR, trace(10, 4), "4"),  # 1: correct, 16 tokens
    ("  what IS 2 +   2? ", trace(3, 4), "4"),  # 2: the same problem; correct, 9 tokens: kept
    ("What is 2 + 2?\n", trace(1, 5), "4"),  # 3: the shortest, but wrong
    ("WHAT is\t2 + 2?", "step step it is four </think>", "4"),  # 4: no answer
    (FOUR, trace(3, 4), "4"),  # 5: ties with row 2, read later
    (HALF_EIGHT, trace(20, 4), r"\frac{8}{2}"),  # 6: correct, 26 tokens
    (HALF_EIGHT, trace(12, 4), r"\frac{8}{2}"),  # 7: correct, 18 tokens: kept
    (HALF_EIGHT, trace(2, 4), r"\frac{8}{2}"),  # 8: correct, 8 tokens: under --min-tokens 9
    ("Name the empty set.", trace(4, 4), r"\text{}"),  # 9: the gold answer does not parse
    ("What is 3 + 3?", trace(5, 7), "6"),  # 10: wrong
    ("What is 3 + 3?", trace(6, 5), "6"),  # 11: wrong; the problem is lost
    ("Count to nine.", trace(4, 9), 9),  # 12: a numeric gold answer; correct, 10 tokens: kept
    ("Count to nine.", trace(40, 9), 9),  # 13: correct, 46 tokens: over --max-tokens 40
    ("One long problem.", trace(50, 1), "1"),  # 14: correct, 56 tokens: over; the problem is lost
]
EXPECTED_ROWS = [
    {"problem": "  what IS 2 +   2? ", "solution": trace(3, 4), "answer": "4"},
    {"problem": HALF_EIGHT, "solution": trace(12, 4), "answer": r"\frac{8}{2}"},
    {"problem": "Count to nine.", "solution": trace(4, 9), "answer": "9"},
]
EXPECTED_COUNTS = CurationCounts(
    rows=14, problems=6, unparseable_gold=1, no_answer=1, wrong_answer=3, check_failed=0, correct=9,
    under_min_tokens=1, over_max_tokens=2, longer_duplicates=3, written=3,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(WORDS).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def traces_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    with open(path, "w") as handle:
        for problem, generation, answer in ROWS:
            handle.write(json.dumps({"problem": problem, "generation": generation, "answer": answer}) + "\n")
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_the_toy_tokenizer_counts_as_the_rows_say():
    tokenizer = build_tokenizer(WORDS)
    assert [len(tokenizer(trace(n, 4), add_special_tokens=False)["input_ids"]) for n in (0, 3, 12)] == [6, 9, 18]


def test_normalisation_lowercases_and_collapses_whitespace():
    assert normalise_problem("  What IS\t2 +\n\n 2? ") == "what is 2 + 2?"
    assert normalise_problem("x\u00a0y") == "x y"  # Unicode whitespace too
    assert normalise_problem("2+2") != normalise_problem("2 + 2")  # only whitespace runs, never removed


@pytest.mark.parametrize("extraction", ["last_boxed", "first_match"])
def test_curated_rows_and_counts_match_the_hand_computed_ones(tmp_path, traces_file, extraction):
    output = str(tmp_path / "sft.jsonl")
    options = CurationOptions(min_tokens=9, max_tokens=40, answer_extraction=extraction, progress=False)
    rows, counts = curate([traces_file], build_tokenizer(WORDS), output, options)
    assert rows == EXPECTED_ROWS and read_jsonl(output) == EXPECTED_ROWS
    assert counts == EXPECTED_COUNTS
    assert set(os.listdir(tmp_path)) == {"traces.jsonl", "sft.jsonl"}  # no temporary file left


def test_without_token_limits_the_shortest_correct_trace_wins(tmp_path, traces_file):
    output = str(tmp_path / "sft.jsonl")
    rows, counts = curate([traces_file], build_tokenizer(WORDS), output, CurationOptions(progress=False))
    assert [row["solution"] for row in rows] == [trace(3, 4), trace(2, 4), trace(4, 9), trace(50, 1)]
    assert (counts.under_min_tokens, counts.over_max_tokens, counts.longer_duplicates, counts.written) == (0, 0, 5, 4)


def test_the_command_line_writes_the_same_rows_and_prints_the_counts(tmp_path, traces_file, tokenizer_dir):
    output = str(tmp_path / "sft.jsonl")
    command = [sys.executable, "-m", "trainer.curate", traces_file, "--tokenizer", tokenizer_dir, "--output", output,
               "--min-tokens", "9", "--max-tokens", "40"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(output) == EXPECTED_ROWS
    table = dict(line.rsplit(None, 1) for line in done.stdout.splitlines() if line[-1:].isdigit())
    labels = [line.rsplit(None, 1)[0].strip() for line in EXPECTED_COUNTS.table().splitlines()]
    assert [int(table[label]) for label in labels] == list(dataclasses.astuple(EXPECTED_COUNTS))


def test_other_field_names_in_and_out(tmp_path, tokenizer_dir):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"question": FOUR, "trace": trace(3, 4), "gold": "4"}) + "\n")
    output = str(tmp_path / "sft.jsonl")
    assert main([str(path), "--tokenizer", tokenizer_dir, "--output", output, "--problem-field", "question",
                 "--trace-field", "trace", "--answer-field", "gold", "--output-trace-field", "generation",
                 "--no-progress"]) == 0
    assert read_jsonl(output) == [{"problem": FOUR, "generation": trace(3, 4), "answer": "4"}]


@pytest.mark.parametrize("content,message", [
    ('{"problem": "p", "generation": "g", "answer": "1"}\n{"problem": "q", "answer": "2"}\n',
     r"traces.jsonl:2: missing field 'generation' \(fields present: answer, problem\)"),
    ('\n{"problem": 7, "generation": "g", "answer": "1"}\n', r"traces.jsonl:2: field 'problem' must be text, got int"),
    ("", r"traces.jsonl: no examples \(the file is empty\)"),
    ('{"problem": "p", "generation": "g", "answer": "1"\n', r"traces.jsonl:1: malformed JSON"),
])
def test_bad_input_exits_2_with_one_line_naming_the_place(tmp_path, tokenizer_dir, capsys, content, message):
    path = tmp_path / "traces.jsonl"
    path.write_text(content)
    output = tmp_path / "sft.jsonl"
    assert main([str(path), "--tokenizer", tokenizer_dir, "--output", str(output), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("curate: error: ")
    assert re.search(message, error), error
    assert not output.exists()


def test_a_missing_tokenizer_or_output_folder_exits_2(tmp_path, traces_file, tokenizer_dir, capsys):
    assert main([traces_file, "--tokenizer", str(tmp_path / "none"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "tokenizer directory not found" in capsys.readouterr().err
    missing = str(tmp_path / "no" / "o.jsonl")
    assert main([traces_file, "--tokenizer", tokenizer_dir, "--output", missing, "--no-progress"]) == 2
    assert "output folder" in capsys.readouterr().err


def test_a_failed_write_leaves_no_output_and_no_temporary_file(tmp_path, traces_file, monkeypatch):
    output = tmp_path / "sft.jsonl"
    output.write_text("the previous, good file\n")
    calls = []

    def failing_dumps(row, **kwargs):
        calls.append(row)
        if len(calls) == 2:
            raise OSError("disk full")
        return json.dumps(row, **kwargs)

    monkeypatch.setattr(curate_module, "json", types.SimpleNamespace(dumps=failing_dumps))
    with pytest.raises(OSError, match="disk full"):
        curate([traces_file], build_tokenizer(WORDS), str(output), CurationOptions(progress=False))
    monkeypatch.undo()
    assert output.read_text() == "the previous, good file\n"
    assert sorted(os.listdir(tmp_path)) == ["sft.jsonl", "traces.jsonl"]


def math500_file(tmp_path, shift):
    source = os.path.join(SHARED_DATA, "math500.jsonl")
    if not os.path.exists(source):
        pytest.skip(f"{source} is not present (it ships beside the repository, not in it)")
    rows = read_jsonl(source)
    path = tmp_path / f"math500_shift{shift}.jsonl"
    with open(path, "w") as handle:
        for index, row in enumerate(rows):
            gold = rows[(index + shift) % len(rows)]["answer"]
            handle.write(json.dumps({"problem": row["problem"], "solution": row["solution"], "answer": gold}) + "\n")
    return str(path), len(rows)


@pytest.mark.parametrize("shift", [0, 1])
def test_math500_reference_solutions_kept_with_their_answers_and_dropped_with_the_next_ones(tmp_path, shift):
    path, total = math500_file(tmp_path, shift)
    options = CurationOptions(trace_field="solution", progress=False)
    rows, counts = curate([path], build_tokenizer(WORDS), str(tmp_path / "sft.jsonl"), options)
    assert counts.rows == counts.problems == total == 500
    if shift == 0:
        assert counts.written >= 0.99 * total, counts
    else:
        assert counts.written <= 0.01 * total, counts
        assert counts.wrong_answer >= 0.98 * total
