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
