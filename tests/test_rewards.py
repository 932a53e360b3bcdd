import json
import math
import os

import pytest

from trainer import rewards
from trainer.rewards import (
    RewardComputer,
    RewardSettings,
    accuracy_reward,
    builtin_reward,
    builtin_reward_names,
    cosine_length_reward,
    default_reward_weights,
    format_reward,
    format_reward_no_think,
    is_known_reward,
    kimi_length_rewards,
    last_boxed,
)

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def benchmark_rows(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present (it ships beside the repository, not in it)")
    return [json.loads(line) for line in open(path)]


def test_last_boxed_balances_braces():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed {\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert last_boxed(r"no answer \boxed{unclosed") is None
    assert last_boxed("plain text") is None


def test_format_rewards():
    assert format_reward(r"think \boxed{4} </think> so 4") == 1.0
    assert format_reward(r"think </think> \boxed{4}") == 0.0  # boxed only after the thinking
    assert format_reward(r"\boxed{4} but never closes") == 0.0
    assert format_reward_no_think(r"answer \boxed{4}") == 1.0 and format_reward_no_think("4") == 0.0


def test_cosine_length_reward_follows_the_formula():
    right, wrong = r"\boxed{2}", r"\boxed{3}"
    assert cosine_length_reward(right, "2", max_len=10**9) == pytest.approx(1.0, abs=1e-6)
    assert cosine_length_reward(wrong, "2", max_len=10**9) == pytest.approx(-1.0, abs=1e-6)
    padded_right = right + " " * (100 - len(right))
    padded_wrong = wrong + " " * (100 - len(wrong))
    assert cosine_length_reward(padded_right, "2", max_len=100) == pytest.approx(0.1)
    assert cosine_length_reward(padded_wrong, "2", max_len=100) == pytest.approx(-0.1)
    assert cosine_length_reward(padded_right, "2", max_len=200) == pytest.approx(0.55)  # progress 0.5
    assert cosine_length_reward(padded_wrong + " " * 500, "2", max_len=200) == pytest.approx(-0.1)  # clipped


def test_kimi_length_rewards():
    lengths, correct = [10, 20, 30], [True, False, True]
    assert kimi_length_rewards(lengths, correct) == pytest.approx([0.5, 0.0, -0.5])
    assert kimi_length_rewards([10, 30], [False, False]) == pytest.approx([0.0, -0.5])
    assert kimi_length_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]


def test_math500_reference_solutions_verify_against_their_answers():
    rows = benchmark_rows("math500.jsonl")
    correct = sum(accuracy_reward(row["solution"], row["answer"]) for row in rows)
    shifted = sum(accuracy_reward(row["solution"], rows[i - 1]["answer"]) for i, row in enumerate(rows))
    assert correct >= 490, f"only {correct:.0f} of {len(rows)} reference solutions verified"
    assert shifted <= 15, f"{shifted:.0f} false positives against shifted gold answers"


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl", "amc23.jsonl"])
def test_competition_answers_of_either_type(name):
    rows = benchmark_rows(name)
    for row in rows:
        answer = row["answer"]  # a string in AIME, a JSON number in AMC
        value = float(answer)
        text = str(int(value)) if value.is_integer() else str(value)
        assert accuracy_reward(rf"... so \boxed{{{text}}}", answer) == 1.0, row
        assert accuracy_reward(rf"... so \boxed{{{value + 1:g}}}", answer) == 0.0, row


def test_unparseable_gold_gives_no_signal_by_default_and_is_counted():
    computer = RewardComputer(RewardSettings())
    totals, parts = computer.group([r"\boxed{1} </think>", r"\boxed{2} </think>"], r"\\\\", [5, 9])
    assert all(math.isnan(t) for t in totals) and computer.counts["unparseable_gold"] == 2
    recipe = RewardComputer(RewardSettings(unparseable_gold="reward_one"))
    totals, _ = recipe.group([r"x \boxed{1} </think>"], r"\\\\", [5])
    assert totals[0] == pytest.approx(1.0 + 1.0 + 0.0)  # format + cosine (correct, short) + length


def broken_reward(completion, gold, num_tokens):
    raise RuntimeError("a bug in a user's reward")


def test_a_failing_custom_reward_gives_zero_and_is_counted():
    settings = RewardSettings(weights={"format": 1.0, "tests.test_rewards:broken_reward": 2.0})
    computer = RewardComputer(settings)
    totals, parts = computer.group([r"\boxed{4} </think>", "nothing"], "4", [3, 1])
    assert totals == [1.0, 0.0]
    assert parts["tests.test_rewards:broken_reward"] == [0.0, 0.0]
    assert computer.counts["tests.test_rewards:broken_reward_failed_RuntimeError"] == 2


def test_recipe_rewards_for_a_group():
    computer = RewardComputer(RewardSettings(cosine_max_len=1000))
    completions = [r"12 + 30 = 42 \boxed{42} </think>", r"wrong \boxed{41} </think>", "no answer at all"]
    totals, parts = computer.group(completions, "42", [8, 4, 3])
    assert parts["accuracy"] == [1.0, 0.0, 0.0]
    assert parts["format"] == [1.0, 1.0, 0.0]
    expected_length = kimi_length_rewards([8, 4, 3], [True, False, False])
    expected = [f + c + k for f, c, k in zip(parts["format"], parts["cosine_length"], expected_length)]
    assert totals == pytest.approx(expected)


def slow_reward(completion, gold, num_tokens):
    import time

    time.sleep(30)
    return 1.0


def raising_reward(completion, gold, num_tokens):
    raise KeyError("boom")


def test_a_custom_reward_that_hangs_or_raises_gives_zero_and_is_counted():
    import time

    computer = RewardComputer(RewardSettings(
        weights={"tests.test_rewards.slow_reward": 1.0, "tests.test_rewards.raising_reward": 1.0}, timeout_s=1,
    ))
    started = time.perf_counter()
    totals, parts = computer.group([r"\boxed{1} </think>", r"\boxed{2} </think>"], "1", [5, 5])
    assert time.perf_counter() - started < 5
    assert totals == [0.0, 0.0]
    assert computer.counts["tests.test_rewards.slow_reward_timed_out"] == 2
    assert computer.counts["tests.test_rewards.raising_reward_failed_KeyError"] == 2


def test_rewards_at_the_recipe_constants_on_edge_cases():
    """Hand-written formulas at max_len 30000, (0.1, 1.0) correct and (-0.1, -1.0) wrong."""
    completions = [
        "",                                                            # empty
        r"\boxed{7}",                                                  # right, but no </think>
        r"a \boxed{\frac{1}{2}} b \boxed{{7}} </think> text after",   # several boxes, nested braces
        "x" * 15000 + r" \boxed{7} </think>",                           # right and long
        r"the answer is 7 </think>",                                   # no box
    ]
    tokens = [0, 3, 12, 5000, 6]
    computer = RewardComputer(RewardSettings())  # format + cosine_length + length, max_len 30000
    totals, parts = computer.group(completions, "7", tokens)

    def cosine(length, correct):
        low, high = (0.1, 1.0) if correct else (-0.1, -1.0)
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * min(1.0, length / 30000)))

    correct = [False, True, True, True, False]
    assert parts["accuracy"] == [1.0 if c else 0.0 for c in correct]
    assert parts["format"] == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert parts["cosine_length"] == pytest.approx([cosine(len(c), ok) for c, ok in zip(completions, correct)])
    assert parts["cosine_length"][0] == pytest.approx(-1.0)  # an empty wrong answer gets the full penalty
    lam = [0.5 - t / 5000 for t in tokens]
    assert parts["length"] == pytest.approx([lam[i] if correct[i] else min(0.0, lam[i]) for i in range(5)])
    expected = [parts["format"][i] + parts["cosine_length"][i] + parts["length"][i] for i in range(5)]
    assert totals == pytest.approx(expected)


@pytest.fixture
def private_registry(monkeypatch):
    """Rewards registered in a test go into a copy of the registry, dropped when the test ends."""
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))


def test_a_reward_registered_with_the_decorator_is_used_through_the_weights(private_registry):
    @builtin_reward("brevity")
    def brevity(group):
        return group.each_completion(lambda completion: -len(completion) / 100)

    assert is_known_reward("brevity") and builtin_reward_names()[-1] == "brevity"
    from trainer.config import ConfigError, load_config

    grpo = ["stage=grpo", "model.path=m", "data.train_files=[a.jsonl]"]
    config = load_config(None, [*grpo, "grpo.rewards.weights={format: 1.0, brevity: 0.5}"])
    with pytest.raises(ConfigError, match="unknown reward 'brevety'.*did you mean 'brevity'"):
        load_config(None, [*grpo, "grpo.rewards.weights={brevety: 0.5}"])
    computer = RewardComputer(RewardSettings(weights=config.grpo.rewards.weights))
    completions = [
        "a" * 90 + r" \boxed{4} </think>",  # 109 characters, format 1
        "x" * 250,                          # no answer: format 0
        r"\boxed{5}</think>",               # 17 characters, wrong but well formatted
        "",
    ]
    totals, parts = computer.group(completions, "4", [30, 70, 5, 0])
    assert list(parts) == ["accuracy", "format", "brevity"]
    assert parts["accuracy"] == [1.0, 0.0, 0.0, 0.0]
    assert parts["brevity"] == pytest.approx([-1.09, -2.5, -0.17, 0.0])
    assert totals == pytest.approx([1.0 - 0.545, -1.25, 1.0 - 0.085, 0.0])


def test_a_reward_with_a_setting_of_its_own_is_one_registration(private_registry):
    @builtin_reward("brevity", settings={"chars_per_point": 100.0})
    def brevity(group):
        scale = group.setting("chars_per_point")
        return group.each_completion(lambda completion: -len(completion) / scale)

    from trainer.config import ConfigError, load_config

    grpo = ["stage=grpo", "model.path=m", "data.train_files=[a.jsonl]", "grpo.rewards.weights={brevity: 1.0}"]
    completions = ["a" * 50, "b" * 250]
    by_default = load_config(None, grpo).grpo.rewards
    assert by_default.options == {}
    totals, _ = RewardComputer(by_default).group(completions, "4", [10, 50])
    assert totals == pytest.approx([-0.5, -2.5])
    configured = load_config(None, [*grpo, "grpo.rewards.options={brevity: {chars_per_point: 25}}"]).grpo.rewards
    totals, parts = RewardComputer(configured).group(completions, "4", [10, 50])
    assert parts["brevity"] == pytest.approx([-2.0, -10.0]) and totals == parts["brevity"]
    with pytest.raises(ConfigError, match=r"grpo.rewards.options.brevity.chars: unknown setting; brevity has "
                                          r"chars_per_point"):
        load_config(None, [*grpo, "grpo.rewards.options={brevity: {chars: 25}}"])
    with pytest.raises(ConfigError, match=r"options.brevity.chars_per_point: expected a value like 100.0, got 'x'"):
        load_config(None, [*grpo, "grpo.rewards.options={brevity: {chars_per_point: x}}"])
    with pytest.raises(ConfigError, match=r"options.format: no registered reward of that name has settings "
                                          r"\(rewards with settings: brevity\)"):
        load_config(None, [*grpo, "grpo.rewards.options={format: {scale: 1}}"])


def test_a_registered_reward_gets_the_per_completion_failure_handling(private_registry):
    @builtin_reward("integer_answer")
    def integer_answer(group):
        def is_integer(completion):
            answer = last_boxed(completion)  # None makes int() raise TypeError
            return 1.0 if str(int(answer)) == answer else float("nan")

        return group.each_completion(is_integer)

    computer = RewardComputer(RewardSettings(weights={"integer_answer": 2.0}))
    completions = [r"\boxed{12}", r"\boxed{\frac{1}{2}}", r"\boxed{ 07 }", "none"]
    totals, parts = computer.group(completions, "12", [1, 1, 1, 1])
    assert parts["integer_answer"] == [1.0, 0.0, 0.0, 0.0]
    assert totals == [2.0, 0.0, 0.0, 0.0]
    assert computer.counts["integer_answer_failed_ValueError"] == 1
    assert computer.counts["integer_answer_non_finite"] == 1  # "07" parses to 7, which prints differently
    assert computer.counts["integer_answer_failed_TypeError"] == 1


def test_a_reward_giving_the_wrong_number_of_values_is_refused(private_registry):
    builtin_reward("one_value")(lambda group: [1.0])
    computer = RewardComputer(RewardSettings(weights={"one_value": 1.0}))
    with pytest.raises(ValueError, match="'one_value' gave 1 values for 2 completions"):
        computer.group(["a", "b"], "1", [1, 1])


def test_the_builtin_names_and_default_weights():
    names = builtin_reward_names()
    assert set(names) >= {"format", "format_no_think", "cosine_length", "length", "accuracy"}
    assert "brevity" not in names and "integer_answer" not in names  # the tests' registrations are gone
    assert list(default_reward_weights().items()) == [("format", 1.0), ("cosine_length", 1.0), ("length", 1.0)]
    settings = RewardSettings()
    assert settings.weights == default_reward_weights()
    settings.weights["format"] = 0.0  # each settings owns its weights
    assert RewardSettings().weights["format"] == 1.0 and default_reward_weights()["format"] == 1.0
    assert is_known_reward("length") and not is_known_reward("lenght")


def test_registering_a_name_twice_or_a_dotted_name_is_refused(private_registry):
    with pytest.raises(ValueError, match="reward 'format' is already registered"):
        builtin_reward("format")(lambda group: [0.0] * len(group.completions))
    with pytest.raises(ValueError, match="import path"):
        builtin_reward("my.reward")
    computer = RewardComputer(RewardSettings(weights={"format": 1.0}))
    assert computer.group([r"\boxed{1} </think>", "no"], "1", [1, 1])[0] == [1.0, 0.0]  # the original kept


def test_kimi_length_rewards_with_bounds_from_a_wider_batch():
    # min 5 and max 105 come from other groups of the batch: lam = 0.5 - (len - 5) / 100.
    assert kimi_length_rewards([25, 55], [True, False], bounds=(5, 105)) == pytest.approx([0.3, 0.0])
    assert kimi_length_rewards([25, 85], [True, False], bounds=(5, 105)) == pytest.approx([0.3, -0.3])
    assert kimi_length_rewards([9, 9], [True, True], bounds=(9, 9)) == [0.0, 0.0]


@pytest.mark.parametrize("field,value", [("length_unit", "words"), ("length_scope", "batch"),
                                         ("answer_extraction", "first_box"), ("unparseable_gold", "zero")])
def test_reward_settings_refuse_unknown_choices(field, value):
    with pytest.raises(ValueError, match=f"RewardSettings.{field} must be one of"):
        RewardSettings(**{field: value})


def test_character_lengths_and_a_rank_batch_scope_through_the_computer():
    settings = RewardSettings(weights={"length": 1.0}, length_unit="chars", length_scope="rank_batch")
    groups = [([r"\boxed{1}", "x" * 109], "1", [50, 1]), (["y" * 59], "2", [7])]
    (_, first), (_, second) = RewardComputer(settings).score_batch(groups)
    # Characters 9, 109, 59 over the whole batch: min 9, max 109; token counts play no part.
    assert first["length"] + second["length"] == pytest.approx([0.5, -0.5, 0.0])
