"""Our rewards under the reference recipe's options, against the recipe's formulas written out here.

The formulas as REFERENCE_RECIPE.md states them: a format regex; a cosine over characters (max_len
30000, progress clipped at 1); the Kimi 1.5 length reward over characters with its min and max
taken over every completion one process scores in a step; correctness from math-verify reading
the completion boxed-first with the first match kept, the gold answer read as \\boxed{gold}, an
unparseable gold answer counting as correct and an error inside verify as wrong. The normalisation
below is the recipe's setting for the completion's parse.
"""

import collections
import json
import math
import os
import random
import re

import pytest

from trainer.answers import CORRECT, judge
from trainer.rewards import RewardComputer, RewardSettings, format_reward
from trainer.rollout import RolloutEngine

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

RECIPE_OPTIONS = dict(
    weights={"format": 1.0, "cosine_length": 1.0, "length": 1.0}, cosine_max_len=30000, unparseable_gold="reward_one",
    length_unit="chars", length_scope="rank_batch", answer_extraction="first_match",
)

RECIPE_FORMAT = re.compile(r"^.*?oxed{(.*?)}.*?</think>.*?$", re.DOTALL)


def recipe_format(text):
    return 1.0 if RECIPE_FORMAT.match(text) else 0.0


def recipe_correct(text, gold):
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}")
    if len(gold_parsed) == 0:
        return True
    settings = NormalizationConfig(basic_latex=True, units=True, boxed="all", equations=True, nits=False,
                                   malformed_operators=False)
    reading = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False,
                                    normalization_config=settings)
    answer = parse(text, extraction_config=[reading], extraction_mode="first_match")
    try:
        return bool(verify(answer, gold_parsed))
    except Exception:
        return False


def recipe_cosine(text, correct):
    """Interpolates from `at_empty` (0 characters) to `at_max` (30000 or more) along half a cosine."""
    at_empty, at_max = (1.0, 0.1) if correct else (-1.0, -0.1)
    weight_of_empty = (1.0 + math.cos(math.pi * min(len(text) / 30000, 1.0))) / 2
    return at_max + (at_empty - at_max) * weight_of_empty


def recipe_kimi(texts, correct):
    """Over the whole batch: every prompt's completions share one min and max."""
    sizes = [len(t) for t in texts]
    low, high = min(sizes), max(sizes)
    if low == high:
        return [0.0 for _ in texts]
    values = []
    for size, ok in zip(sizes, correct):
        lam = 0.5 - (size - low) / (high - low)
        values.append(lam if ok else min(0.0, lam))
    return values


def recipe_batch(batch):
    """{part: values} over a rank's batch of (completion, gold) pairs, and the totals."""
    texts = [text for text, _ in batch]
    correct = [recipe_correct(text, gold) for text, gold in batch]
    parts = {
        "format": [recipe_format(t) for t in texts],
        "cosine_length": [recipe_cosine(t, ok) for t, ok in zip(texts, correct)],
        "length": recipe_kimi(texts, correct),
    }
    totals = [sum(values[i] for values in parts.values()) for i in range(len(batch))]
    return correct, parts, totals


def filler(chars, seed):
    """Reasoning-like text of exactly `chars` characters, without anchors such as 'answer is'."""
    words = ["we", "check", "the", "case", "so", "then", "x", "+", "=", "2", "7", "hence", "factor", "the sum", "of",
             "terms", "wait,", "again", "$x^2$", "\\frac{1}{2}", "\\sqrt{5}", "n = k", "\n"]
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < chars:
        pieces.append(rng.choice(words))
        size += len(pieces[-1]) + 1
    return " ".join(pieces)[:chars]


FRACTION, ROOT = r"\frac{14}{3}", r"3\sqrt{13}"  # MATH-500 gold answers

FRACTION_GROUP = [
    r"Adding the parts gives \boxed{\frac{14}{3}} </think> So the sum is $\frac{14}{3}$.",
    r"so $x = \dfrac{14}{3}$ and \boxed{\dfrac{14}{3}}</think>",
    r"we get \boxed{\frac{28}{6}} </think> reduced",
    r"we get \boxed{4\frac{2}{3}} </think>",
    r"careful \boxed{\frac{3}{14}} </think> the reciprocal",
    r"first \boxed{\frac{3}{14}}, wait, that is the reciprocal: \boxed{\frac{14}{3}} </think>",
    r"first \boxed{\frac{14}{3}}, then wrongly \boxed{5} </think>",
    r"the value is 14/3 </think> 14/3",
    r"The final answer is $\frac{14}{3}$ </think>",
    r"thinking </think> \boxed{\frac{14}{3}}",
    r"\boxed{\frac{14}{3}} and no think tag",
    "",
    r"empty box \boxed{} </think>",
    filler(12000, 1) + r" so \boxed{\frac{14}{3}} </think>",
    filler(29990, 2) + r" \boxed{\frac{14}{3}} </think>",
    filler(31000, 3) + r" \boxed{\frac{14}{3}} </think> done",
    filler(40000, 4) + r" \boxed{7} </think>",
    filler(500, 5),
]

ROOT_GROUP = [
    r"The distance is \boxed{3\sqrt{13}} </think> $3\sqrt{13}$",
    r"\boxed{\sqrt{117}}</think>",
    r"\boxed{3 \sqrt{13}} </think>",
    r"\boxed{\sqrt{13}} </think>",
    r"\boxed{13\sqrt{3}} </think>",
    r"\boxed{\sqrt{39}} </think> then \boxed{3\sqrt{13}}",
    r"so it is \boxed{3\sqrt{13}} </think> or \boxed{\sqrt{117}}",
    filler(8000, 6) + r" \boxed{3\sqrt{13}} </think>",
    filler(20000, 7) + r" \boxed{2\sqrt{13}} </think>",
    filler(30000, 8) + r" \boxed{3\sqrt{13}} </think>",
    filler(45000, 9),
    r"no box here </think> it is 3 sqrt 13",
    "x",
    r"\boxed{10.8166538} </think>",
    "\\boxed{\\sqrt{13}}. Hmm, I dropped a factor:\n\\boxed{3\\sqrt{13}} </think>",
    r"Therefore, the final answer is $3\sqrt{13}$. </think>",
]

UNPARSEABLE_GOLD_GROUP = [r"\boxed{1} </think>", filler(3000, 10), r"\boxed{2}"]


def rank_batch():
    return [(FRACTION_GROUP, FRACTION), (ROOT_GROUP, ROOT), (UNPARSEABLE_GOLD_GROUP, "")]


def score_ours(groups, **options):
    tokens = random.Random(0)  # token counts must not matter under length_unit=chars
    computer = RewardComputer(RewardSettings(**options))
    scored = computer.score_batch([(texts, gold, [tokens.randint(1, 9000) for _ in texts]) for texts, gold in groups])
    parts = collections.defaultdict(list)
    totals = []
    for group_totals, group_parts in scored:
        totals.extend(group_totals)
        for name, values in group_parts.items():
            parts[name].extend(values)
    return totals, parts, computer


def test_the_set_covers_what_the_recipe_distinguishes():
    texts = FRACTION_GROUP + ROOT_GROUP
    golds = [FRACTION] * len(FRACTION_GROUP) + [ROOT] * len(ROOT_GROUP)
    first = [judge(t, g, "first_match") == CORRECT for t, g in zip(texts, golds)]
    last = [judge(t, g, "last_boxed") == CORRECT for t, g in zip(texts, golds)]
    assert len(texts) + len(UNPARSEABLE_GOLD_GROUP) >= 30
    assert 10 <= sum(first) <= len(texts) - 10
    # math-verify reads several boxes before </think> as one set (wrong against one gold answer), and
    # reads an answer stated without a box; otherwise its first match is the last box.
    assert sum(f != la for f, la in zip(first, last)) >= 4
    sizes = [len(t) for t in texts]
    assert max(sizes) > 30000 and sum(29000 < s <= 30100 for s in sizes) >= 2 and min(sizes) == 0
    assert sum(recipe_format(t) for t in texts) >= 10 and sum(recipe_format(t) == 0 for t in texts) >= 10
    # The batch's min and max come from different prompts, so a per-group min/max would differ.
    assert sizes.index(max(sizes)) >= len(FRACTION_GROUP) > sizes.index(min(sizes))


def test_recipe_options_give_the_recipe_rewards():
    totals, parts, computer = score_ours(rank_batch(), **RECIPE_OPTIONS)
    batch = [(text, gold) for texts, gold in rank_batch() for text in texts]
    correct, expected, expected_totals = recipe_batch(batch)
    assert parts["accuracy"] == [1.0 if ok else 0.0 for ok in correct]
    assert parts["format"] == expected["format"]
    assert parts["cosine_length"] == pytest.approx(expected["cosine_length"], abs=1e-12)
    assert parts["length"] == pytest.approx(expected["length"], abs=1e-12)
    assert totals == pytest.approx(expected_totals, abs=1e-12)
    assert computer.counts["unparseable_gold"] == len(UNPARSEABLE_GOLD_GROUP)


def test_each_recipe_option_matters_on_this_set():
    _, recipe_parts, _ = score_ours(rank_batch(), **RECIPE_OPTIONS)
    for option, other in [("length_scope", "group"), ("length_unit", "tokens"), ("answer_extraction", "last_boxed")]:
        _, parts, _ = score_ours(rank_batch(), **{**RECIPE_OPTIONS, option: other})
        changed = "accuracy" if option == "answer_extraction" else "length"
        assert parts[changed] != pytest.approx(recipe_parts[changed]), option


def test_rank_batch_scope_spans_prompts_and_group_scope_keeps_each_group():
    groups = [([r"\boxed{2} </think>", "a" * 100 + r"\boxed{2} </think>"], "2", [7, 7]),
              (["b" * 1000, r"\boxed{5}"], "5", [3, 3])]
    computer = RewardComputer(RewardSettings(weights={"length": 1.0}, length_unit="chars", length_scope="rank_batch"))
    (_, first), (_, second) = computer.score_batch(groups)
    lengths = [18, 118, 1000, 9]
    lam = [0.5 - (n - 9) / (1000 - 9) for n in lengths]
    assert first["length"] + second["length"] == pytest.approx([lam[0], lam[1], min(0.0, lam[2]), lam[3]])
    per_group = RewardComputer(RewardSettings(weights={"length": 1.0}, length_unit="chars"))
    assert per_group.score_batch(groups) == [per_group.group(*group) for group in groups]
    assert per_group.group(*groups[0])[1]["length"] == pytest.approx([0.5, -0.5])
    assert per_group.group(*groups[1])[1]["length"] == pytest.approx([min(0.0, -0.5), 0.5])


def test_an_error_inside_verify_scores_zero_and_is_counted(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("verify failed")

    monkeypatch.setattr(math_verify, "verify", broken)
    totals, parts, computer = score_ours([([r"\boxed{\frac{14}{3}} </think>", "x" * 50], FRACTION)], **RECIPE_OPTIONS)
    assert parts["accuracy"] == [0.0, 0.0] and computer.counts["accuracy_failed_RuntimeError"] == 1
    assert parts["cosine_length"][0] == pytest.approx(recipe_cosine(r"\boxed{\frac{14}{3}} </think>", False))


# Where our format reward (a brace-balanced \boxed{...} before the first </think>) and the recipe's
# regex disagree. Ours is kept; these are the cases, with (ours, the regex's).
FORMAT_DIFFERENCES = [
    (r"\boxed {4} </think>", 1.0, 0.0),  # a space before the brace
    (r"boxed{4} </think>", 0.0, 1.0),  # no backslash: the regex looks for 'oxed{' only
    (r"\fboxed{4} </think>", 0.0, 1.0),
    (r"\boxed{\frac{1}{2} </think>", 0.0, 1.0),  # never closed; the regex takes the brace of {1}
    (r"first </think> \boxed{4} </think>", 0.0, 1.0),  # boxed only after the first </think>
]


@pytest.mark.parametrize("text,ours,regex", FORMAT_DIFFERENCES)
def test_where_the_format_rewards_differ(text, ours, regex):
    assert format_reward(text) == ours and recipe_format(text) == regex


def test_the_format_rewards_agree_on_the_set_and_on_math500():
    texts = FRACTION_GROUP + ROOT_GROUP + UNPARSEABLE_GOLD_GROUP
    assert [format_reward(t) for t in texts] == [recipe_format(t) for t in texts]
    rows = math500_rows()
    for row in rows:
        for text in (row["solution"], row["solution"] + "\n</think>\n", "</think>" + row["solution"]):
            assert format_reward(text) == recipe_format(text), row["unique_id"]


def math500_rows():
    path = os.path.join(SHARED_DATA, "math500.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present (it ships beside the repository, not in it)")
    return [json.loads(line) for line in open(path)]


def test_math500_reference_solutions_under_each_extraction():
    """Reference solutions against their own gold answers, then each against the previous problem's.

    first_match reads brace-less LaTeX such as \\frac43 and 11\\sqrt2 without the malformed-operator
    fix the gold answer gets, so 8 right solutions fail. Of the 3 shifted acceptances, two
    neighbours share an answer (7, 3) and one is x=5 against 5.
    """
    rows = math500_rows()
    accepted, shifted_pairs = {}, {}
    for extraction in ("last_boxed", "first_match"):
        accepted[extraction] = [judge(r["solution"], r["answer"], extraction) == CORRECT for r in rows]
        shifted = [i for i, r in enumerate(rows) if judge(r["solution"], rows[i - 1]["answer"], extraction) == CORRECT]
        shifted_pairs[extraction] = [(rows[i]["answer"], rows[i - 1]["answer"]) for i in shifted]
    assert sum(accepted["last_boxed"]) == 500 and sum(accepted["first_match"]) == 492
    misses = [r["answer"] for r, ok in zip(rows, accepted["first_match"]) if not ok]
    assert misses == ["11\\sqrt2", "\\frac43", "\\frac65", "\\frac{270}7\\text{ degrees}", "\\frac 59", "\\frac9{19}",
                      "\\frac14", "\\frac 34"]
    assert shifted_pairs["last_boxed"] == shifted_pairs["first_match"] == [("x=5", "5"), ("7", "7"), ("3", "3")]
    assert [recipe_correct(r["solution"], r["answer"]) for r in rows] == accepted["first_match"]


def recipe_config(tmp_path, *overrides):
    from trainer.config import load_config

    path = tmp_path / "problems.jsonl"
    problems = ["tom has apples .", "ann has many coins . how many coins does she have ?", "eve gets more books ."]
    path.write_text("".join(json.dumps({"problem": p, "answer": str(i)}) + "\n" for i, p in enumerate(problems)))
    return load_config(None, [
        "stage=grpo", "model.path=m", f"data.train_files=[{path}]", "grpo.prompts_per_step=1", "grpo.group_size=2",
        "grpo.rewards.length_unit=chars", "grpo.rewards.length_scope=rank_batch",
        "grpo.rewards.answer_extraction=first_match",
        "grpo.rewards.unparseable_gold=reward_one", *overrides,
    ])


def test_the_stage_builds_the_recipe_rewards_and_left_truncates_long_prompts(tmp_path):
    from trainer.grpo import GRPOStage
    from trainer.toy.model_dir import build_tokenizer
    from trainer.toy.task import WORDS

    tokenizer = build_tokenizer(WORDS)
    whole = GRPOStage(recipe_config(tmp_path))
    whole.prepare(tokenizer, 1, lambda message: None)
    settings = whole.rewards.settings
    assert (settings.length_unit, settings.length_scope, settings.answer_extraction, settings.unparseable_gold) == (
        "chars", "rank_batch", "first_match", "reward_one")
    lengths = [len(ids) for ids, _ in whole.prompts]
    limit = sorted(lengths)[1]  # the longest prompt, and only it, is over the limit
    messages = []
    cut = GRPOStage(recipe_config(tmp_path, f"grpo.max_prompt_tokens={limit}"))
    cut.prepare(tokenizer, 1, messages.append)
    assert [ids for ids, _ in cut.prompts] == [ids[-limit:] for ids, _ in whole.prompts]
    assert [gold for _, gold in cut.prompts] == ["0", "1", "2"]
    assert any(f"1 of 3 prompts were longer than grpo.max_prompt_tokens={limit}" in m for m in messages), messages


class ScriptedRollout(RolloutEngine):
    """Returns the given completion texts, group_size per prompt, in the order the prompts come."""

    def __init__(self, texts_per_prompt):
        self.texts_per_prompt = texts_per_prompt

    def generate(self, prompt_ids, sampling, row_keys=None):
        from trainer.rollout import Completion

        return [Completion(position, [1] * 3, text, "stop")
                for position in range(len(prompt_ids)) for text in self.texts_per_prompt[position]]


def test_one_rollout_round_is_scored_as_one_rank_batch(tmp_path):
    from trainer.grpo_rollouts import scored_groups

    config = recipe_config(tmp_path, "grpo.prompts_per_step=2")
    prompts = [([5, 6], FRACTION), ([7], ROOT)]
    texts = [[r"\boxed{\frac{14}{3}} </think>", "short"], ["x" * 500 + r"\boxed{3\sqrt{13}} </think>", "y" * 20]]
    settings = RewardSettings(**RECIPE_OPTIONS)
    groups = list(scored_groups([0, 1], 0, 0, prompts, ScriptedRollout(texts), None, RewardComputer(settings), config))
    _, expected, expected_totals = recipe_batch([(t, gold) for group, (_, gold) in zip(texts, prompts) for t in group])
    assert [v for g in groups for v in g.parts["length"]] == pytest.approx(expected["length"], abs=1e-12)
    assert [v for g in groups for v in g.rewards] == pytest.approx(expected_totals, abs=1e-12)
