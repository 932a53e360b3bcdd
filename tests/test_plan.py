"""The memory planner (python -m trainer.plan) on fake tensors: the paper's config fits 8 x 80 GiB,
the whole rollout batch in one row does not, and its figures agree with arithmetic."""

import json
import os
import subprocess
import sys

import pytest

from trainer.plan import GIB, read_architecture, run_plan
from trainer.plan_stages import parameter_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIG = os.path.join(REPO, "configs", "fast_math_r1_14b.yaml")
PAPER_MODEL = os.path.join(REPO, "configs", "models", "deepseek-r1-distill-qwen-14b", "config.json")


def quiet(*_):
    pass


def state_bytes(plan):
    """Parameters + gradients + optimizer states in the optimizer-step phase."""
    items = next(phase for phase in plan.phases if phase.name == "optimizer step").items
    return items["parameters"] + items["gradients"] + items["optimizer states"]


@pytest.fixture(scope="module")
def paper_plans():
    plans, report, failures = run_plan(PAPER_CONFIG, gpus=8, gpu_memory_gb=80, log=quiet)
    return {plan.stage: plan for plan in plans}, report, failures


def test_the_paper_config_fits_eight_80_gib_gpus(paper_plans):
    plans, report, failures = paper_plans
    assert failures == []
    assert set(plans) == {"sft", "grpo", "eval"}
    # The figures the README quotes, within 3%; every one at most 90% of 80 GiB. GRPO and the
    # evaluation run vLLM: its share of the GPU (0.5 beside training, 0.9 alone) is their peak.
    for stage, peak in (("sft", 51.1), ("grpo", 64.1), ("eval", 72.0)):
        assert plans[stage].peak_phase.total / GIB == pytest.approx(peak, rel=0.03), stage
        assert plans[stage].peak_phase.total <= 72 * GIB
    grpo = plans["grpo"]
    assert [phase.name for phase in grpo.phases[:2]] == ["weight sync (vLLM weights awake)", "rollout (vLLM awake)"]
    assert grpo.peak_phase.name == "rollout (vLLM awake)"
    assert any(phase.name.startswith("reference log-probs (32768 tokens)") for phase in grpo.phases)
    # The sync holds vLLM's bf16 weights (2 bytes x P) and the largest parameter gathered whole, the
    # embedding (152064 x 5120 x 2 bytes), beside the resident training state.
    parameters, _ = parameter_counts(read_architecture(PAPER_MODEL))
    sync = grpo.phases[0].items
    assert sync["vLLM weights (bf16, awake)"] == pytest.approx(2 * parameters)
    assert sync["the parameter being gathered (bf16)"] == 152064 * 5120 * 2
    note = next(note for note in grpo.notes if note.startswith("vLLM's share"))
    assert "5.1 GiB of its own" in note and "sequences of 16896 tokens at a time" in note
    assert "| reserved for vLLM |" in report and "reference model" in report


def test_sharded_training_state_is_sixteen_bytes_per_parameter_over_the_ranks(paper_plans):
    plans, _, _ = paper_plans
    parameters, _ = parameter_counts(read_architecture(PAPER_MODEL))
    assert 14.7e9 < parameters < 14.8e9
    for stage in ("sft", "grpo"):
        assert state_bytes(plans[stage]) == pytest.approx(16 * parameters / 8, rel=0.02)


def test_checkpointed_activations_are_one_hidden_state_per_layer(paper_plans):
    plans, _, _ = paper_plans
    # SFT: one 24000-token row; GRPO: a 32768-token row; 48 layers of hidden 5120, 2 bytes each.
    assert plans["sft"].decoder_activations == pytest.approx(48 * 24000 * 5120 * 2, rel=0.10)
    assert plans["grpo"].decoder_activations == pytest.approx(48 * 32768 * 5120 * 2, rel=0.10)


def test_command_line_overrides_reach_only_the_planned_stage():
    from trainer.plan import stage_configs

    # 16384 is below SFT's 24000-token rows, which SFT's validation refuses; GRPO takes it.
    planned, others = stage_configs(PAPER_CONFIG, ["train.max_tokens_per_micro_batch=16384"], ["grpo"])
    assert list(planned) == ["grpo"] and planned["grpo"].train.max_tokens_per_micro_batch == 16384
    assert set(others) == {"sft", "eval"} and others["sft"].data.max_seq_len == 24000


def small_qwen2(tmp_path, **shape):
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
              "intermediate_size": 704, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
              "vocab_size": 1000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    config.update(shape)
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def sft_config(tmp_path, model_dir, **values):
    lines = [f"model:\n  path: {model_dir}", "parallel:\n  activation_checkpointing: true",
             f"data:\n  train_files: [{tmp_path / 'absent.jsonl'}]\n  max_seq_len: {values.get('max_seq_len', 4096)}",
             f"train:\n  micro_batch_size: {values.get('micro_batch_size', 1)}", f"run_dir: {tmp_path / 'run'}"]
    path = tmp_path / "sft.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_24_layer_qwen2_agrees_with_arithmetic_on_four_ranks(tmp_path):
    model_dir = small_qwen2(tmp_path)
    plans, _, failures = run_plan(sft_config(tmp_path, model_dir), gpus=4, gpu_memory_gb=80, log=quiet)
    (plan,) = plans
    assert failures == [] and plan.stage == "sft"
    parameters, _ = parameter_counts(read_architecture(str(model_dir / "config.json")))
    assert state_bytes(plan) == pytest.approx(16 * parameters / 4, rel=0.02)
    assert plan.decoder_activations == pytest.approx(24 * 4096 * 256 * 2, rel=0.10)
    # Twice the tokens, twice the activations.
    longer, _, _ = run_plan(sft_config(tmp_path, model_dir, max_seq_len=8192), gpus=4, log=quiet)
    assert longer[0].decoder_activations == pytest.approx(2 * plan.decoder_activations, rel=0.02)


def run_module(*args, timeout=600):
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        environment.pop(name, None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=timeout)


def test_the_whole_rollout_batch_in_one_row_does_not_fit_and_exits_non_zero(tmp_path):
    # Without a token budget GRPO trains a GPU's 16 completions (16 x 16896 tokens) as one row.
    output = tmp_path / "plan.md"
    # With HF rollouts, whose KV cache the plan counts per generate call.
    result = run_module("trainer.plan", "--config", PAPER_CONFIG, "--gpus", "8", "--gpu-memory-gb", "80",
                        "--stage", "grpo", "--output", str(output),
                        "stages.grpo.train.max_tokens_per_micro_batch=270336", "stages.grpo.grpo.engine.name=hf")
    assert result.returncode == 1, result.stderr[-2000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("does not fit: grpo")]
    assert message and "policy forward+backward (270336 tokens)" in message[0] and "activations" in message[0]
    needed = float(message[0].split("needs ")[1].split(" GiB")[0])
    assert needed > 80
    assert "DOES NOT FIT" in output.read_text()
    # grpo.engine.max_batch_tokens=131072 of 16896-token rows: 7 per call, so 3 calls for 16 completions.
    assert "rollout (HF generate, 3 calls of 7 x 16896 tokens)" in output.read_text()


def test_run_plan_stops_a_run_that_does_not_fit_before_any_weights_load(tmp_path):
    # One GPU (no torchrun) of 80 GiB: a 0.3B model with 128 rows of 8192
    # tokens cannot fit (about 140 GiB); the model directory holds no weights, so only the plan can have run.
    model_dir = small_qwen2(tmp_path, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                            num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    result = run_module("trainer.run", "--config", sft_config(tmp_path, model_dir, max_seq_len=8192,
                                                              micro_batch_size=128), "--plan")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "does not fit: sft" in result.stderr
    assert "planning for GPUs of 80 GiB" in result.stdout
    # Fits: the run goes on past the plan, to the model directory, which has no usable tokenizer.
    fits = run_module("trainer.run", "--config", sft_config(tmp_path, model_dir, max_seq_len=1024), "--plan")
    assert "plan: sft fits 1 GPU(s) of 80 GiB" in fits.stdout, fits.stdout[-2000:] + fits.stderr[-2000:]
    assert fits.returncode == 2 and f"error: {model_dir}: " in fits.stderr and "tokenizer" in fits.stderr


def test_bad_planner_arguments_are_one_line_errors(tmp_path):
    result = run_module("trainer.plan", "--config", PAPER_CONFIG, "--gpus", "0")
    assert result.returncode == 2 and "error: --gpus must be at least 1, got 0" in result.stderr
    config = sft_config(tmp_path, tmp_path / "nowhere")
    result = run_module("trainer.plan", "--config", config)
    assert result.returncode == 2 and "no config.json for model.path" in result.stderr
