"""Word problems on small numbers with a short chain of thought, as jsonl in the recipe's fields.

"tom has 37 apples . he gets 5 more . he gives away 8 . how many apples does he have ?"
-> solution "37 + 5 = 42 . 42 - 8 = 34 . \\boxed{ 34 } </think>", answer "34"; with detours the
solution re-checks steps first ("wait , check 37 + 5 = 42 . yes . so 34 ."), which GRPO should
learn to drop.
Every intermediate result stays in 0..99; numbers are written with one token per digit, and the
worked steps write each number with two digits ("08 + 5 = 13"), so a digit's place never moves.
"""

import dataclasses
import json
import random

NAMES = ["tom", "ann", "bob", "eve"]
ITEMS = ["apples", "coins", "books", "cards"]
WORDS = (
    NAMES + ITEMS
    + ["has", "he", "she", "gets", "more", "gives", "away", "doubles", "triples", "them", "how", "many", "does",
       "have", "?", ".", "+", "-", "x", "=", "</think>", "\\boxed{", "}", "wait", ",", "check", "yes", "so"]
)


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """Which steps a story takes: add or subtract 1..max_operand, multiply by one of factors."""

    max_operand: int = 9
    factors: tuple = (2, 3)


def _operation(rng, value, arithmetic):
    """(text, symbol, operand, result) of one step that keeps the result in 0..99."""
    largest = arithmetic.max_operand
    choices = []
    if value <= 99 - largest:
        choices.append("add")
    if value >= 1:
        choices.append("sub")
    if value <= 33 and arithmetic.factors:
        choices.append("mul")
    kind = rng.choice(choices)
    if kind == "add":
        operand = rng.randint(1, min(largest, 99 - value))
        return f"gets {operand} more", "+", operand, value + operand
    if kind == "sub":
        operand = rng.randint(1, min(largest, value))
        return f"gives away {operand}", "-", operand, value - operand
    if len(arithmetic.factors) == 1:
        factor = arithmetic.factors[0]
    else:
        factor = 2 if value > 24 or rng.random() < 0.5 else 3
    return ("doubles them" if factor == 2 else "triples them"), "x", factor, value * factor


def _story(rng, arithmetic):
    """(problem text, [(value, symbol, operand)] steps, answer) of one problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = "she" if name in ("ann", "eve") else "he"
    value = rng.randint(1, 40)
    sentences = [f"{name} has {value} {item} ."]
    steps = []
    for _ in range(rng.randint(2, 3)):
        text, symbol, operand, result = _operation(rng, value, arithmetic)
        sentences.append(f"{pronoun} {text} .")
        steps.append((value, symbol, operand))
        value = result
    sentences.append(f"how many {item} does {pronoun} have ?")
    return " ".join(sentences), steps, value


def _apply(value, symbol, operand):
    return value + operand if symbol == "+" else value - operand if symbol == "-" else value * operand


def _trace(rng, steps, detour_probability, slip_at=None):
    """A solution: each step worked out (a slip of +-1..3 at step slip_at, carried on), maybe re-checked."""
    value, lines = steps[0][0], []
    for index, (_, symbol, operand) in enumerate(steps):
        result = _apply(value, symbol, operand)
        if index == slip_at:
            result += rng.choice([-3, -2, -1, 1, 2, 3])
        result = max(0, result)  # a slip carried on stays a count (never so on a right trace)
        lines.append(f"{value:02d} {symbol} {operand} = {result:02d} .")
        value = result
    detours = []
    if rng.random() < detour_probability:
        for step in rng.sample(lines, k=rng.randint(1, len(lines))):
            detours.append(f"wait , check {step} yes . so {value:02d} .")
    # The answer comes before </think>, the form the format reward asks for.
    return " ".join(lines + detours) + f" \\boxed{{ {value} }} </think>"


def make_problem(rng, detour_probability=0.0, arithmetic=Arithmetic()):
    """One problem; with detour_probability the solution re-checks 1-3 of its steps ("wait , ...")."""
    problem, steps, answer = _story(rng, arithmetic)
    return {"problem": problem, "solution": _trace(rng, steps, detour_probability), "answer": str(answer)}


def make_traced_problem(rng, traces, detour_probability, wrong_probability, arithmetic=Arithmetic()):
    """One problem with several sampled traces, as rows {problem, generation, answer}: each trace
    re-checks steps with detour_probability and slips on one step (a wrong answer) with wrong_probability."""
    problem, steps, answer = _story(rng, arithmetic)
    rows = []
    for _ in range(traces):
        slip_at = rng.randrange(len(steps)) if rng.random() < wrong_probability else None
        rows.append({"problem": problem, "generation": _trace(rng, steps, detour_probability, slip_at),
                     "answer": str(answer)})
    return rows


def write_traces(path, count, seed, detour_probability, traces_per_problem, wrong_probability,
                 arithmetic=Arithmetic()):
    """count problems with traces_per_problem traces each, as rows of problem, generation, answer."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            for row in make_traced_problem(rng, traces_per_problem, detour_probability, wrong_probability,
                                           arithmetic):
                handle.write(json.dumps(row) + "\n")
    return path


def write_problems(path, count, seed, detour_probability=0.0, arithmetic=Arithmetic()):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps(make_problem(rng, detour_probability, arithmetic)) + "\n")
    return path
