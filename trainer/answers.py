"""Final answers of math completions, checked against gold answers with math-verify.

One implementation for the GRPO rewards and for SFT data curation. Two ways to read a completion:

- last_boxed: the content of its last \\boxed{...} (braces balanced) is the answer, parsed as
  \\boxed{answer}; the gold answer is parsed as $gold$, or as plain text when that yields nothing.
- first_match: the reference recipe's reading. math-verify parses the whole completion as LaTeX
  only, a boxed answer ranking before any other match, and keeps the first match, under the
  normalisation the recipe sets (no malformed-operator or nits fixes, equations split). The gold
  answer is parsed as \\boxed{gold} with math-verify's default extraction. In practice (math-verify
  0.9) the first match is the last box, except that several boxes in one stretch of text come back
  as one set, which a single gold answer never equals.

judge() gives CORRECT, WRONG or NO_ANSWER, or raises UnparseableGold when the gold answer yields
nothing. Other errors from math-verify propagate: each caller counts them.
"""

import functools
import logging
import re

from .errors import UnparseableGold

ANSWER_EXTRACTIONS = ("last_boxed", "first_match")
CORRECT, WRONG, NO_ANSWER = "correct", "wrong", "no_answer"

_BOXED = re.compile(r"\\boxed\s*\{")
_EQUATIONS_WARNING = "equations=True in NormalizationConfig is deprecated"



def last_boxed(text):
    """Content of the last \\boxed{...} in text (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, index = 1, start
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            return text[start : index - 1].strip()
    return None


class _DropEquationsWarning(logging.Filter):
    # The recipe's normalisation sets equations=True, which still splits equations but warns on every parse.
    def filter(self, record):
        return not record.getMessage().startswith(_EQUATIONS_WARNING)


@functools.lru_cache(maxsize=None)
def _first_match_extraction():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(_DropEquationsWarning())
    normalization = NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all", equations=True
    )
    return [LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0,
                                  try_extract_without_anchor=False)]


@functools.lru_cache(maxsize=65536)
def parse_gold(gold, extraction="last_boxed", timeout_s=5):
    """math-verify's parse of a gold answer (a string); UnparseableGold when it yields nothing."""
    from math_verify import parse

    if extraction == "first_match":
        parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s)
    else:
        parsed = parse(f"${gold}$", parsing_timeout=timeout_s) or parse(gold, parsing_timeout=timeout_s)
    if not parsed:
        raise UnparseableGold(gold)
    return parsed


def _check_extraction(extraction):
    if extraction not in ANSWER_EXTRACTIONS:
        raise ValueError(f"answer extraction must be one of {', '.join(ANSWER_EXTRACTIONS)}, got {extraction!r}")


@functools.lru_cache(maxsize=65536)
def _judge_boxed(answer, gold, timeout_s):
    """Cached: RL groups repeat the same short boxed answers many times."""
    from math_verify import parse, verify

    parsed_gold = parse_gold(gold, "last_boxed", timeout_s)
    parsed_answer = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    if not parsed_answer:
        return NO_ANSWER
    return CORRECT if verify(parsed_gold, parsed_answer, timeout_seconds=timeout_s) else WRONG


def judge(text, gold, extraction="last_boxed", timeout_s=5):
    """CORRECT, WRONG or NO_ANSWER for a completion against a gold answer.

    Raises UnparseableGold when the gold answer cannot be parsed, whatever the completion holds.
    """
    _check_extraction(extraction)
    gold = str(gold)
    if extraction == "last_boxed":
        parse_gold(gold, extraction, timeout_s)
        answer = last_boxed(text)
        return NO_ANSWER if answer is None else _judge_boxed(answer, gold, timeout_s)
    from math_verify import parse, verify

    parsed_gold = parse_gold(gold, extraction, timeout_s)
    parsed_answer = parse(text, extraction_config=_first_match_extraction(), extraction_mode="first_match",
                          parsing_timeout=timeout_s)
    if not parsed_answer:
        return NO_ANSWER
    # The recipe's argument order: verify is not symmetric for every pair of answer types.
    return CORRECT if verify(parsed_answer, parsed_gold, timeout_seconds=timeout_s) else WRONG


def gold_is_parseable(gold, extraction="last_boxed", timeout_s=5):
    """Whether math-verify can parse the gold answer under `extraction`; other errors propagate."""
    _check_extraction(extraction)
    try:
        parse_gold(str(gold), extraction, timeout_s)
        return True
    except UnparseableGold:
        return False


def verify_answer(answer, gold, timeout_s=5):
    """Whether an extracted answer equals the gold one by math-verify; UnparseableGold if gold cannot be parsed."""
    return _judge_boxed(answer, str(gold), timeout_s) == CORRECT
