"""Bad configurations are rejected at start-up, before any model or data loads, naming the key."""

import os
import re
import subprocess
import sys
import time

import pytest

from trainer.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = ["stage=grpo", "model.path=/nonexistent/model", "data.train_files=/nonexistent/data.jsonl"]


@pytest.mark.parametrize("override,key", [
    ("grpo.sampling.top_p=1.5", "grpo.sampling.top_p"),
    ("grpo.sampling.min_p=1", "grpo.sampling.min_p"),
    ("grpo.sampling.temperature=0", "grpo.sampling.temperature"),
    ("grpo.loss.eps_low=0", "grpo.loss.eps_low"),
    ("grpo.group_size=1", "grpo.group_size"),
    ("grpo.loss.beta=-0.1", "grpo.loss.beta"),
    ("grpo.num_iterations=0", "grpo.num_iterations"),
    ("grpo.rewards.weights={}", "grpo.rewards.weights"),
    ("grpo.rewards.weights={lenght: 1.0}", "did you mean 'length'"),
    ("grpo.rewards.weights={format: yes}", "grpo.rewards.weights.format"),
    ("grpo.engine.name=vlm", "did you mean 'vllm'"),
    ("grpo.engine.max_batch_tokens=0", "grpo.engine.max_batch_tokens"),
    ("grpo.loss.aggregation=mean", "grpo.loss.aggregation"),
    ("grpo.prompts_per_step=0", "grpo.prompts_per_step"),
    ("grpo.sampling.max_new_tokens=many", "grpo.sampling.max_new_tokens"),
    ("grpo.unknown_key=1", "grpo.unknown_key"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ("train.max_steps=0", "train.max_steps"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
])
def test_impossible_grpo_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, GRPO + [override])


@pytest.mark.parametrize("override,key", [
    ("eval.budgets=[0]", "eval.budgets"), ("eval.budgets=[]", "eval.budgets"), ("eval.samples=0", "eval.samples"),
    ("eval.top_p=0", "eval.top_p"), ("eval.max_problems=0", "eval.max_problems"),
])
def test_impossible_eval_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["stage=eval", "model.path=/m", "eval.data=/d.jsonl", override])


@pytest.mark.parametrize("override,message", [
    # Metrics are logged every step (progress bar, metrics.jsonl, TensorBoard); no key thins them.
    ("train.log_every=10", "unknown config key 'train.log_every'"),
    ("checkpoint.resume=latest", "checkpoint.resume: 'latest' is not one of none, auto"),
])
def test_keys_that_would_change_nothing_are_rejected(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.path=/m", "data.train_files=/d.jsonl", override])


def test_a_stage_file_needs_a_stage(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("model: {path: /m}\nstages:\n  sft: {data: {train_files: [a.jsonl]}}\n  grpo: {}\n")
    with pytest.raises(ConfigError, match="choose one with --stage"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no stage 'dpo'"):
        load_config(str(path), ["stage=dpo"])
    assert load_config(str(path), ["stage=sft"]).data.train_files == ["a.jsonl"]


def test_the_command_line_rejects_bad_settings_in_one_line_before_loading_anything():
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "trainer.run", *GRPO, "grpo.sampling.top_p=1.5"],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "grpo.sampling.top_p" in completed.stderr
    assert "nonexistent" not in completed.stderr  # the model path was never reached
    assert time.perf_counter() - started < 60


def test_the_paper_config_is_valid_for_each_stage():
    path = os.path.join(REPO, "configs", "fast_math_r1_14b.yaml")
    sft = load_config(path, ["stage=sft"])
    assert (sft.optim.lr, sft.train.epochs, sft.data.max_seq_len, sft.data.pack) == (1e-5, 10, 24000, True)
    grpo = load_config(path, ["stage=grpo"])
    settings = grpo.grpo
    assert (grpo.optim.lr, settings.loss.beta, settings.group_size, settings.sampling.max_new_tokens) == (4e-6, 0.04, 8,
                                                                                                        16384)
    assert (grpo.grpo.sampling.top_p, grpo.grpo.sampling.min_p, grpo.grpo.rewards.cosine_max_len) == (0.9, 0.05, 30000)
    evaluation = load_config(path, ["stage=eval"])
    assert evaluation.eval.budgets == [8000, 12000, 16000, 24000, 32000]


# The published scripts' values (../shared/REFERENCE_RECIPE.md), written out here independently of the config.
REFERENCE_SFT = {
    "model.path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "model.system_prompt": "Please reason step by step, and put your final answer within \\boxed{{}}.",
    "data.train_files": ["RabotniKuma/Fast-Math-R1-SFT"], "data.split": "train",
    "data.problem_field": "problem", "data.solution_field": "generation", "data.loss_on": "all",
    "data.pack": True, "data.max_seq_len": 24000,
    "train.micro_batch_size": 1, "train.grad_accum": 8, "train.seed": 2025,
    "optim.lr": 1e-5, "optim.warmup_ratio": 0.0, "optim.beta2": 0.999,
    "parallel.activation_checkpointing": True,
}
REFERENCE_GRPO = {
    "model.system_prompt": "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
                           "You should think step-by-step. Return final answer within \\boxed{{}}.",
    "data.train_files": ["RabotniKuma/Fast-Math-R1-GRPO"], "grpo.answer_field": "answer",
    "grpo.prompts_per_step": 2, "grpo.group_size": 8, "grpo.max_prompt_tokens": 512,
    "grpo.sampling.max_new_tokens": 16384,
    "train.max_steps": 40, "checkpoint.every_steps": 5, "optim.lr": 4e-6, "optim.warmup_ratio": 0.0,
    "grpo.loss.beta": 0.04, "grpo.loss.eps_low": 0.2, "grpo.loss.eps_high": 0.2, "grpo.num_iterations": 1,
    "grpo.sampling.temperature": 1.0, "grpo.sampling.top_p": 0.9, "grpo.sampling.min_p": 0.05,
    "grpo.loss.advantage_eps": 1e-4,
    "grpo.loss.scale_rewards": "group", "grpo.rewards.weights": {"format": 1.0, "cosine_length": 1.0, "length": 1.0},
    "grpo.rewards.cosine_max_len": 30000, "grpo.rewards.length_unit": "chars",
    "grpo.rewards.length_scope": "rank_batch",
    "grpo.rewards.answer_extraction": "first_match", "grpo.rewards.unparseable_gold": "reward_one", "train.seed": 2025,
    "grpo.engine.name": "vllm",
}
# The reference's inference example: vLLM at temperature 1.0, top-p 0.9, min-p 0.05.
REFERENCE_EVAL = {"eval.engine": "vllm", "eval.temperature": 1.0, "eval.top_p": 0.9, "eval.min_p": 0.05}


@pytest.mark.parametrize("stage, reference", [("sft", REFERENCE_SFT), ("grpo", REFERENCE_GRPO),
                                              ("eval", REFERENCE_EVAL)])
def test_the_paper_config_holds_the_reference_scripts_values(stage, reference):
    config = load_config(os.path.join(REPO, "configs", "fast_math_r1_14b.yaml"), [f"stage={stage}"])
    for key, expected in reference.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert value == expected, key
    if stage == "sft":  # the reference's plain template: role tag, newline, content, EOS; then the assistant tag
        chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        assert _render(config.model.chat_template, chat) == "<|system|>\ns</s><|user|>\nu</s><|assistant|>"


def _render(template, messages):
    import jinja2

    return jinja2.Template(template).render(messages=messages, eos_token="</s>", add_generation_prompt=True)


def test_the_sft_token_budget_must_hold_a_document_and_one_pack_per_micro_batch():
    base = ["model.path=m", "data.train_files=[d.jsonl]", "data.max_seq_len=2048"]
    assert load_config(None, base + ["train.max_tokens_per_micro_batch=4096"]).train.max_tokens_per_micro_batch == 4096
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch=1024 is below data.max_seq_len=2048"):
        load_config(None, base + ["train.max_tokens_per_micro_batch=1024"])
    with pytest.raises(ConfigError, match="set train.micro_batch_size=1"):
        load_config(None, base + ["train.max_tokens_per_micro_batch=4096", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="at least 1 or unset"):
        load_config(None, base + ["train.max_tokens_per_micro_batch=0"])


SHIPPED_CONFIGS = {
    "fast_math_r1_14b.yaml": {stage: [f"stage={stage}"] for stage in ("sft", "grpo", "eval")},
    "toy.yaml": {stage: [f"stage={stage}", "model.path=m", "data.train_files=[t.jsonl]", "eval.data=e.jsonl"]
                 for stage in ("sft", "grpo", "eval")},
}


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_one_parser_reads_each_shipped_config_and_its_resolved_values_round_trip(tmp_path, name):
    from trainer.config import RunConfig, config_as_dict, save_config

    for stage, overrides in SHIPPED_CONFIGS[name].items():
        config = load_config(os.path.join(REPO, "configs", name), overrides)
        assert config.stage == stage
        saved = tmp_path / f"{stage}.yaml"
        save_config(config, str(saved))
        reloaded = load_config(str(saved))
        assert reloaded == config and reloaded is not config
        assert config_as_dict(reloaded) == config_as_dict(config)
        assert config != RunConfig()  # the file's values were read, not the defaults


def test_the_toy_recipe_is_a_stages_file_with_its_task_settings():
    path = os.path.join(REPO, "configs", "toy.yaml")
    base = ["model.path=m", "data.train_files=[t.jsonl]", "eval.data=e.jsonl"]
    sft = load_config(path, ["stage=sft", *base])
    grpo = load_config(path, ["stage=grpo", *base])
    assert (sft.recipe, sft.train.epochs, sft.optim.lr, sft.optim.beta2) == ("toy", 15, 1.5e-3, 0.999)
    assert (grpo.train.max_steps, grpo.optim.lr, grpo.optim.beta2, grpo.grpo.loss.beta) == (30, 5e-5, 0.95, 0.04)
    assert (sft.toy.task.train_problems, sft.toy.task.carries, sft.toy.model.heads, sft.toy.epoch_ablation) == (
        2200, False, 8, [1, 3])
    # A stages.<stage> override reaches one stage; a plain one reaches whichever stage runs.
    assert load_config(path, ["stage=sft", *base, "stages.sft.train.epochs=2"]).train.epochs == 2
    assert load_config(path, ["stage=grpo", *base, "stages.sft.train.epochs=2"]).train.epochs == 1
    assert load_config(path, ["stage=grpo", *base, "train.seed=7"]).train.seed == 7


def test_every_stage_of_a_stages_file_is_checked_and_enumerated_keys_suggest_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: {path: /m}\ndata: {train_files: [a.jsonl]}\n"
                    "stages:\n  sft: {}\n  grpo: {grpo: {group_sise: 8}}\n")
    with pytest.raises(ConfigError, match=r"stages.grpo.grpo.group_sise.*did you mean 'group_size'"):
        load_config(str(path), ["stage=sft"])
    with pytest.raises(ConfigError, match=r"grpo.loss.aggregation: 'dapp' is not one of .*did you mean 'dapo'"):
        load_config(None, ["model.path=m", "data.train_files=[a]", "grpo.loss.aggregation=dapp"])
    with pytest.raises(ConfigError, match=r"recipe: 'tot' is not one of toy.*did you mean 'toy'"):
        load_config(None, ["model.path=m", "data.train_files=[a]", "recipe=tot"])
    with pytest.raises(ConfigError, match="has no stages section"):
        load_config(_plain(tmp_path), ["stages.sft.train.epochs=2"])
    with pytest.raises(ConfigError, match="toy.epoch_ablation"):
        load_config(None, ["model.path=m", "data.train_files=[a]", "recipe=toy", "toy.epoch_ablation=[0]"])


def _plain(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("model: {path: /m}\ndata: {train_files: [a.jsonl]}\n")
    return str(path)


def test_stop_strings_are_a_grpo_setting_checked_like_any_other():
    base = ["stage=grpo", "model.path=m", "data.train_files=[a.jsonl]"]
    config = load_config(None, [*base, 'grpo.sampling.stop_strings=["</answer>", "\\n\\n\\n"]'])
    assert config.grpo.sampling.stop_strings == ["</answer>", "\n\n\n"]
    assert load_config(None, base).grpo.sampling.stop_strings == []
    with pytest.raises(ConfigError, match="grpo.sampling.stop_strings: expected a list of non-empty strings"):
        load_config(None, [*base, "grpo.sampling.stop_strings=['']"])


def test_config_md_is_what_the_code_generates():
    # A fresh process: engines or aggregations other tests register must not enter the reference.
    generated = subprocess.run([sys.executable, "-m", "trainer.config_reference"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr[-2000:]
    with open(os.path.join(REPO, "CONFIG.md")) as handle:
        written = handle.read()
    assert generated.stdout == written, "CONFIG.md is stale: python -m trainer.config_reference > CONFIG.md"
    for key in ("`grpo.loss.aggregation` | `dapo` | `grpo`, `bnpo`, `dr_grpo`, `dapo` |",
                "`kernels.backend` | none |", "`toy.task.carries` | false |"):
        assert key in written, key
    unexplained = [line.split("|")[1].strip() for line in written.splitlines()
                   if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert unexplained == [], "keys without a comment beside their field in the code"


def test_the_readme_key_table_states_the_code_defaults():
    import yaml

    from trainer.config import RunConfig

    with open(os.path.join(REPO, "README.md")) as handle:
        rows = re.findall(r"^\| (`[a-z_]+(?:\.[a-z_]+)+`(?:, `[a-z_]+(?:\.[a-z_]+)+`)*) \| ([^|]+) \|", handle.read(),
                          re.M)
    assert len(rows) >= 12
    config, checked = RunConfig(), 0
    for keys, defaults in rows:
        keys = [key.strip("` ") for key in keys.split(",")]
        values = [value.strip().strip("`") for value in defaults.split(", ")] if len(keys) > 1 else [defaults.strip()]
        for key, stated in zip(keys, values, strict=True):
            actual = config
            for part in key.split("."):
                actual = getattr(actual, part)
            stated = None if stated in ("none", "auto") else yaml.safe_load(stated.strip("`"))
            assert stated == actual, f"README.md states {key} = {stated!r}; the code's default is {actual!r}"
            checked += 1
    assert checked >= 14


def test_keys_of_the_earlier_flat_grpo_layout_still_load_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model: {path: m}\ndata: {train_files: [a.jsonl]}\n"
                    "grpo: {temperature: 0.7, reward_weights: {format: 2.0}, rollout_engine: hf}\n"
                    "stages:\n  grpo: {grpo: {loss_aggregation: grpo, max_new_tokens: 64}}\n")
    with pytest.warns(FutureWarning) as caught:
        config = load_config(str(path), ["stage=grpo", "grpo.beta=0.1", "grpo.reward_weights.length=0.5",
                                         "stages.grpo.grpo.top_p=0.8"])
    grpo = config.grpo
    assert (grpo.sampling.temperature, grpo.sampling.top_p, grpo.sampling.max_new_tokens) == (0.7, 0.8, 64)
    # A mapping given on the command line replaces the file's whole, as it always has.
    assert grpo.rewards.weights == {"length": 0.5} and grpo.engine.name == "hf"
    assert (grpo.loss.aggregation, grpo.loss.beta) == ("grpo", 0.1)
    messages = sorted(str(warning.message) for warning in caught)
    assert len(messages) == 8, messages
    assert f"{path}: grpo.temperature is now grpo.sampling.temperature; the old name works until the next release" \
        in messages
    assert "override: grpo.reward_weights.length is now grpo.rewards.weights.length; the old name works until the " \
        "next release" in messages
    with pytest.raises(ConfigError, match="unknown config key 'grpo.temprature'"):
        load_config(None, ["stage=grpo", "model.path=m", "data.train_files=[a.jsonl]", "grpo.temprature=1"])
