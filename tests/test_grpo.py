import math
import os

import pytest
import torch

from trainer.config import load_config
from trainer.grpo import aggregate, policy_batch
from trainer.metrics import read_metrics
from trainer.rollout import Completion
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems


def test_policy_batch_masks_exactly_the_completion_tokens():
    prompts = [([5, 6, 7], "1"), ([8], "2")]
    completions = [Completion(0, [1, 2], "", "stop"), Completion(1, [3, 4, 9], "", "length")]
    input_ids, position_ids, attention_mask, mask = policy_batch(prompts, completions, pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert position_ids[1, :4].tolist() == [0, 1, 2, 3]


def test_loss_aggregations():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "dapo", 10).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "bnpo", 10).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "grpo", 10).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(loss, mask, "dr_grpo", 10).item() == pytest.approx(10 / (2 * 10))


@pytest.mark.slow
def test_grpo_steps_run_and_report(tmp_path):
    from trainer.grpo import run_grpo

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(tmp_path / "prompts.jsonl"), 32, seed=3)
    config = load_config(None, [
        "stage=grpo", f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_files={data}",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=12", "grpo.cosine_max_len=100",
        "train.max_steps=2", "optim.lr=1e-4", "checkpoint.export_hf=false",
    ])
    run_grpo(config)
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["reward"])
        assert 1 <= record["completion_tokens"] <= 12
        assert 0.0 <= record["accuracy"] <= 1.0
    assert os.path.exists(os.path.join(config.run_dir, "checkpoints", "step_00000002", "manifest.json"))
