"""SFT data curation: for each problem, the shortest trace whose answer is right.

python -m trainer.curate traces.jsonl [more files] --tokenizer DIR --output sft.jsonl

1. Reads rows of (problem, trace, gold answer) from jsonl/json/parquet files, possibly several
   traces per problem; field names are options. A row without one of them stops the run (exit
   code 2) with the file, line and field.
2. Checks each trace's answer against its gold answer with math-verify, under the same answer
   extraction as the GRPO rewards (answers.py). Drops, each counted: traces whose gold answer
   does not parse, traces without an answer, wrong answers, and traces math-verify fails on.
3. Counts each correct trace's tokens with the given tokenizer and drops those outside
   --min-tokens/--max-tokens (counted).
4. Groups problems by normalised text: lower-cased (str.lower), every run of whitespace
   (str.split: spaces, tabs, newlines and other Unicode whitespace) turned into one space, none
   left at either end. Each problem keeps its shortest correct trace in tokens (the first read on
   a tie), written with the problem text and gold answer of that trace's row.
5. Writes jsonl rows {problem, solution, answer} (the SFT loader's default field names; options
   change them) atomically: a temporary file in the output's folder, renamed once complete.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from .answers import ANSWER_EXTRACTIONS, CORRECT, NO_ANSWER, judge
from .config import DataConfig, GRPOConfig
from .data import load_records
from .errors import DataError, UnparseableGold


@dataclasses.dataclass
class Trace:
    problem: str
    trace: str
    answer: str
    where: str  # file:line, for messages
    tokens: int = 0


@dataclasses.dataclass
class CurationCounts:
    """How many rows each stage keeps or drops, in the order of the stages."""

    rows: int = 0
    problems: int = 0  # distinct normalised problems read
    unparseable_gold: int = 0
    no_answer: int = 0
    wrong_answer: int = 0
    check_failed: int = 0  # math-verify raised on the trace
    correct: int = 0
    under_min_tokens: int = 0
    over_max_tokens: int = 0
    longer_duplicates: int = 0  # correct traces of a problem that kept a shorter one
    written: int = 0

    def table(self):
        labels = {
            "rows": "rows read", "problems": "distinct problems read",
            "unparseable_gold": "dropped: gold answer does not parse", "no_answer": "dropped: no answer in the trace",
            "wrong_answer": "dropped: wrong answer", "check_failed": "dropped: math-verify failed",
            "correct": "correct traces", "under_min_tokens": "dropped: under --min-tokens",
            "over_max_tokens": "dropped: over --max-tokens", "longer_duplicates": "dropped: a shorter trace is kept",
            "written": "rows written (one per problem)",
        }
        width = max(len(label) for label in labels.values())
        return "\n".join(f"{labels[name]:<{width}}  {getattr(self, name):>8}" for name in labels)


def normalise_problem(text):
    """The deduplication key: lower-case, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def read_traces(files, problem_field, trace_field, answer_field):
    """Every row as a Trace; DataError naming the file, line and field for a missing or non-text field."""
    traces = []
    for path, number, row in load_records(files):
        where = f"{path}:{number}"
        values = {}
        for name in (problem_field, trace_field, answer_field):
            value = row.get(name)
            if value is None:
                present = ", ".join(sorted(key for key, field in row.items() if field is not None))
                raise DataError(f"{where}: missing field {name!r} (fields present: {present})")
            if name == answer_field and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # numeric gold answers, as in AMC-style data
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
            values[name] = value
        traces.append(Trace(values[problem_field], values[trace_field], values[answer_field], where))
    return traces


def correct_traces(traces, extraction, counts, timeout_s=5, progress=True):
    """The traces whose answer math-verify finds equal to their gold answer; the others counted by reason."""
    from tqdm import tqdm

    kept = []
    for trace in tqdm(traces, desc="checking answers", unit="trace", disable=not progress, dynamic_ncols=True):
        try:
            verdict = judge(trace.trace, trace.answer, extraction, timeout_s)
        except UnparseableGold:
            counts.unparseable_gold += 1
            continue
        except Exception:  # math-verify failing on one trace drops that trace, counted
            counts.check_failed += 1
            continue
        if verdict == CORRECT:
            kept.append(trace)
        elif verdict == NO_ANSWER:
            counts.no_answer += 1
        else:
            counts.wrong_answer += 1
    counts.correct = len(kept)
    return kept


def within_token_limits(traces, tokenizer, min_tokens, max_tokens, counts):
    """Sets each trace's token count; keeps those within [min_tokens, max_tokens] (None: no limit)."""
    if traces:
        ids = tokenizer([t.trace for t in traces], add_special_tokens=False)["input_ids"]
        for trace, trace_ids in zip(traces, ids):
            trace.tokens = len(trace_ids)
    kept = []
    for trace in traces:
        if min_tokens is not None and trace.tokens < min_tokens:
            counts.under_min_tokens += 1
        elif max_tokens is not None and trace.tokens > max_tokens:
            counts.over_max_tokens += 1
        else:
            kept.append(trace)
    return kept


def shortest_per_problem(traces, counts):
    """One trace per normalised problem, the fewest tokens (the first read on a tie), in first-seen order."""
    best = {}
    for trace in traces:
        key = normalise_problem(trace.problem)
        if key not in best or trace.tokens < best[key].tokens:
            best[key] = trace
    counts.longer_duplicates = len(traces) - len(best)
    return list(best.values())


def write_jsonl_atomically(rows, path):
    """Writes rows as jsonl to a temporary file beside `path`, then renames it: never a partial file at `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"{path}: the output folder {folder} does not exist")
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=".curate-", suffix=".tmp",
                                         delete=False)
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


@dataclasses.dataclass
class CurationOptions:
    problem_field: str = "problem"
    trace_field: str = "generation"
    answer_field: str = "answer"
    answer_extraction: str = "last_boxed"
    min_tokens: int = None
    max_tokens: int = None
    # The written field names: those the SFT and GRPO loaders read by default.
    output_problem_field: str = DataConfig.problem_field
    output_trace_field: str = DataConfig.solution_field
    output_answer_field: str = GRPOConfig.answer_field
    timeout_s: int = 5
    progress: bool = True


def curate(files, tokenizer, output, options=None):
    """Writes the curated rows to `output`; returns (rows written, CurationCounts)."""
    options = options or CurationOptions()
    counts = CurationCounts()
    traces = read_traces(files, options.problem_field, options.trace_field, options.answer_field)
    counts.rows = len(traces)
    counts.problems = len({normalise_problem(t.problem) for t in traces})
    kept = correct_traces(traces, options.answer_extraction, counts, options.timeout_s, options.progress)
    kept = within_token_limits(kept, tokenizer, options.min_tokens, options.max_tokens, counts)
    kept = shortest_per_problem(kept, counts)
    rows = [{options.output_problem_field: t.problem, options.output_trace_field: t.trace,
             options.output_answer_field: t.answer} for t in kept]
    write_jsonl_atomically(rows, output)
    counts.written = len(rows)
    return rows, counts


def load_tokenizer(path):
    """A local Hugging Face tokenizer directory; DataError in one line when it cannot be loaded."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"{path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: no usable tokenizer ({str(error).splitlines()[0][:160]})") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.curate", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="jsonl, json or parquet files of traces")
    parser.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    parser.add_argument("--output", required=True, help="the jsonl file to write")
    parser.add_argument("--problem-field", default="problem")
    parser.add_argument("--trace-field", default="generation")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--answer-extraction", choices=ANSWER_EXTRACTIONS, default="last_boxed")
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--output-problem-field", default=DataConfig.problem_field)
    parser.add_argument("--output-trace-field", default=DataConfig.solution_field)
    parser.add_argument("--output-answer-field", default=GRPOConfig.answer_field)
    parser.add_argument("--timeout-s", type=int, default=5, help="math-verify's time limit per parse")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("min_tokens", "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if args.min_tokens is not None and args.max_tokens is not None and args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens {args.min_tokens} is above --max-tokens {args.max_tokens}")
    return args


def main(argv=None):
    import datasets

    args = parse_args(argv)
    datasets.disable_progress_bars()  # an error then stays one line; the answer check has its own bar
    options = CurationOptions(
        problem_field=args.problem_field, trace_field=args.trace_field, answer_field=args.answer_field,
        answer_extraction=args.answer_extraction, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
        output_problem_field=args.output_problem_field, output_trace_field=args.output_trace_field,
        output_answer_field=args.output_answer_field, timeout_s=args.timeout_s, progress=not args.no_progress,
    )
    try:
        _, counts = curate(args.files, load_tokenizer(args.tokenizer), args.output, options)
    except DataError as error:
        print(f"curate: error: {error}", file=sys.stderr)
        return 2
    print(counts.table())
    print(f"wrote {counts.written} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
