"""The embedded recipe's handling of its own directories."""

import os

from trainer.config import load_config
from trainer.toy.recipe import _start_stage_afresh


def stage(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", "model.path=unused", "data.train_files=[unused.jsonl]",
                              *overrides])


def with_checkpoint(directory):
    os.makedirs(os.path.join(directory, "checkpoints", "step_00000002"))
    return directory


def test_a_rerun_clears_only_stage_directories_inside_the_recipe_dir(tmp_path):
    recipe_dir = tmp_path / "toy"
    inside = with_checkpoint(str(recipe_dir / "sft"))
    _start_stage_afresh(stage(inside), str(recipe_dir))
    assert not os.path.exists(inside)

    outside = with_checkpoint(str(tmp_path / "elsewhere"))
    _start_stage_afresh(stage(outside), str(recipe_dir))
    _start_stage_afresh(stage(str(recipe_dir)), str(recipe_dir))  # the recipe dir itself is never removed
    assert os.path.isdir(os.path.join(outside, "checkpoints")) and os.path.isdir(recipe_dir)


def test_a_stage_set_to_resume_keeps_its_checkpoints(tmp_path):
    recipe_dir = tmp_path / "toy"
    inside = with_checkpoint(str(recipe_dir / "grpo"))
    _start_stage_afresh(stage(inside, "checkpoint.resume=auto"), str(recipe_dir))
    assert os.path.isdir(os.path.join(inside, "checkpoints", "step_00000002"))


def test_the_task_samples_several_traces_per_problem_with_detours_and_slips(tmp_path):
    import json
    import re

    from trainer.toy.task import write_traces

    def boxed(row):
        return re.search(r"\\boxed\{ (\d+) \}", row["generation"]).group(1)

    def rows(detours, wrong):
        path = write_traces(str(tmp_path / "traces.jsonl"), 40, seed=3, detour_probability=detours,
                            traces_per_problem=3, wrong_probability=wrong)
        with open(path) as handle:
            return [json.loads(line) for line in handle]

    clean = rows(0.0, 0.0)
    assert len(clean) == 120 and len({r["problem"] for r in clean}) <= 40
    assert all(boxed(r) == r["answer"] and "wait" not in r["generation"] for r in clean)
    slipped = rows(0.0, 1.0)
    wrong = sum(boxed(r) != r["answer"] for r in slipped)
    assert wrong >= 110  # a slip of 1-3 is carried to the answer (a clamp at 0 can land back on it)
    detoured = rows(1.0, 0.0)
    assert all("wait , check" in r["generation"] and boxed(r) == r["answer"] for r in detoured)


def test_the_report_places_the_accuracy_jump_from_the_held_out_curve(tmp_path):
    import json

    from trainer.toy.recipe import HeldOutCurve

    rows = [{"step": step, "loss": 1.0} for step in range(1, 13)]
    for step, value in ((3, 0.1), (6, 0.85), (9, 0.93), (12, 0.97)):
        rows[step - 1]["eval_pass_at_1"] = value
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = HeldOutCurve.read(str(tmp_path))
    assert (curve.steps, curve.total_steps, curve.first_step_at_mark) == ([3, 6, 9, 12], 12, 9)
    assert curve.summary() == "held-out pass@1 during SFT first reached 90% at step 9 of 12 (75% of the schedule)"
    rows[8]["eval_pass_at_1"], rows[11]["eval_pass_at_1"] = 0.5, 0.6
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert HeldOutCurve.read(str(tmp_path)).summary() == (
        "held-out pass@1 during SFT never reached 90% in 12 steps (best 85.0%)")


def test_the_tasks_arithmetic_can_be_narrowed_and_every_answer_still_follows_its_steps(tmp_path):
    import json
    import re

    import pytest

    from trainer.config import ConfigError
    from trainer.toy.task import Arithmetic, write_problems

    step = re.compile(r"(\d\d) ([-+x]) (\d) = (\d\d) \.")  # two-digit numbers: a digit's place never moves

    def steps(arithmetic):
        path = write_problems(str(tmp_path / "p.jsonl"), 400, seed=5, arithmetic=arithmetic)
        problems = [json.loads(line) for line in open(path)]
        found = []
        for problem in problems:
            chain = step.findall(problem["solution"])
            for (a, symbol, b, result), following in zip(chain, chain[1:] + [None]):
                a, b, result = int(a), int(b), int(result)
                assert result == {"+": a + b, "-": a - b, "x": a * b}[symbol] and 0 <= result <= 99
                if following is not None:
                    assert int(following[0]) == result  # each step starts from the last one's result
            assert int(chain[-1][3]) == int(problem["answer"]) and problem["solution"].count(" = ") == len(chain)
            found += [(int(a), symbol, int(b)) for a, symbol, b, _ in chain]
        return found

    def carried(a, symbol, b):
        units = {"+": a % 10 + b, "-": a % 10 - b, "x": (a % 10) * b}[symbol]
        return not 0 <= units <= 9 or (symbol == "x" and (a // 10) * b > 9)

    everything = steps(Arithmetic())
    assert {b for _, s, b in everything if s == "x"} == {2, 3} and max(b for _, s, b in everything if s != "x") == 9
    assert not any(carried(a, s, b) for a, s, b in everything)
    with_carries = steps(Arithmetic(carries=True))
    assert sum(carried(a, s, b) for a, s, b in with_carries) > len(with_carries) / 4
    narrow = steps(Arithmetic(max_operand=6, factors=()))
    assert {s for _, s, _ in narrow} == {"+", "-"} and max(b for _, _, b in narrow) == 6
    assert {b for _, s, b in steps(Arithmetic(factors=(3,))) if s == "x"} == {3}

    base = ["model.path=m", "data.train_files=[t.jsonl]", "recipe=toy"]
    assert load_config(None, [*base, "toy.task.factors=[]", "toy.task.max_operand=6"]).toy.task.factors == []
    with pytest.raises(ConfigError, match="toy.task.carries"):
        load_config(None, [*base, "toy.task.carries=3"])
    with pytest.raises(ConfigError, match="toy.task.max_operand"):
        load_config(None, [*base, "toy.task.max_operand=12"])
    with pytest.raises(ConfigError, match="toy.task.factors"):
        load_config(None, [*base, "toy.task.factors=[4]"])
