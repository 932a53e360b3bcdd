"""Word problems on small numbers with a short chain of thought, as jsonl in the recipe's fields.

"tom has 37 apples . he gets 2 more . he gives away 5 . how many apples does he have ?"
-> solution "37 + 2 = 39 . 39 - 5 = 34 . \\boxed{ 34 } </think>", answer "34"; with detours the
solution re-checks steps first ("wait , check 37 + 2 = 39 . yes . so 34 ."), which GRPO should
learn to drop.
Every intermediate result stays in 0..99; numbers are written with one token per digit, and the
worked steps write each number with two digits ("06 - 4 = 02"), so a digit's place never moves.
By default no step carries or borrows: a tiny model then learns the digit facts steadily instead
of waiting, for a run of steps that varies widely between seeds and machines, to discover carrying.
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
    """Which steps a story takes: add or subtract 1..max_operand, multiply by one of factors; with
    carries False no step carries or borrows (each digit's own sum, difference or product stays in 0..9)."""

    max_operand: int = 9
    factors: tuple = (2, 3)
    carries: bool = False


def _digits_allow(value, factor):
    return all(int(digit) * factor <= 9 for digit in str(value))


def _operation(rng, value, arithmetic):
    """(text, symbol, operand, result) of one step that keeps the result in 0..99."""
    units = value % 10
    largest_add = min(arithmetic.max_operand, 99 - value if arithmetic.carries else 9 - units)
    largest_sub = min(arithmetic.max_operand, value if arithmetic.carries else units)
    factors = [f for f in arithmetic.factors if value <= 33 and (arithmetic.carries or _digits_allow(value, f))]
    can_add = value <= 99 - arithmetic.max_operand if arithmetic.carries else largest_add >= 1
    choices = [kind for kind, possible in (("add", can_add), ("sub", largest_sub >= 1), ("mul", factors)) if possible]
    kind = rng.choice(choices)
    if kind == "add":
        operand = rng.randint(1, largest_add)
        return f"gets {operand} more", "+", operand, value + operand
    if kind == "sub":
        operand = rng.randint(1, largest_sub)
        return f"gives away {operand}", "-", operand, value - operand
    if len(factors) == 1:
        factor = factors[0]
    elif arithmetic.carries:
        factor = 2 if value > 24 or rng.random() < 0.5 else 3
    else:
        factor = rng.choice(factors)
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
