"""Nothing a run reads is executed: checkpoints, model directories and model output stay data."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from trainer.checkpoint import UnsafeCheckpoint, check_metadata_is_data
from trainer.config import ModelConfig
from trainer.data import DataError
from trainer.rewards import RewardComputer, RewardSettings, accuracy_reward
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _RunsCode(str(marker))}))
    with pytest.raises(UnsafeCheckpoint, match="refers to io.open"):
        check_metadata_is_data(str(tmp_path))
    assert not marker.exists()


@pytest.mark.slow
def test_a_real_checkpoint_passes_the_metadata_check_and_a_tampered_one_stops_the_resume(tmp_path):
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_problems(str(tmp_path / "train.jsonl"), 64, seed=1)
    arguments = [f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_files={data}",
                 "data.pack=false", "train.micro_batch_size=4", "train.max_steps=2", "checkpoint.export_hf=false"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "trainer.run", *arguments, *extra],  # noqa: E731
                                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run().returncode == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    check_metadata_is_data(str(checkpoint))  # what DCP writes is plain metadata
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][".metadata"] = (checkpoint / ".metadata").stat().st_size  # a consistent manifest too
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    completed = run("checkpoint.resume=auto")
    assert completed.returncode == 2 and "not loading it" in completed.stderr
    assert not marker.exists()


REMOTE_CODE = """
import pathlib

from transformers import LlamaConfig, LlamaForCausalLM

pathlib.Path({marker!r}).write_text("ran")


class Config(LlamaConfig):
    model_type = "fastmath_unknown"


class Model(LlamaForCausalLM):
    config_class = Config
"""


def model_with_remote_code(tmp_path):
    """A model directory whose config names its own code (evil.py), which leaves a marker file when run."""
    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    marker = tmp_path / "ran"
    (tmp_path / "model" / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(model_type="fastmath_unknown",
                  auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    return path, marker


def test_remote_code_in_a_model_directory_is_not_run_unless_asked_for(tmp_path):
    import torch

    from trainer.model import load_causal_lm, load_tokenizer

    path, marker = model_with_remote_code(tmp_path)
    with pytest.raises(DataError, match="could not load the model"):
        load_causal_lm(ModelConfig(path=path), torch.device("cpu"))
    load_tokenizer(ModelConfig(path=path))  # the tokenizer files are plain data and still load
    assert not marker.exists()


LOAD_WITH_REMOTE_CODE = """
import sys

import torch
from safetensors.torch import load_file

from trainer.config import ModelConfig
from trainer.model import load_causal_lm

path = sys.argv[1]
model = load_causal_lm(ModelConfig(path=path, trust_remote_code=True), torch.device("cpu"))
saved = load_file(path + "/model.safetensors")
same = all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
print(type(model).__module__, type(model).__name__, same)
"""


@pytest.mark.slow
def test_remote_code_in_a_model_directory_runs_when_asked_for(tmp_path):
    path, marker = model_with_remote_code(tmp_path)
    # Offline, with a private module cache: the code comes from the directory and nowhere else.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", LOAD_WITH_REMOTE_CODE, path], capture_output=True, text=True,
                               cwd=REPO, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    module, name, same_weights = completed.stdout.split()[-3:]
    assert module.endswith(".evil") and name == "Model" and same_weights == "True"
    assert marker.read_text() == "ran"


INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w')\")",
    "eval(\"open('{marker}', 'w')\")",
    "().__class__.__base__.__subclasses__()",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_model_output_is_never_evaluated(tmp_path, template):
    marker = tmp_path / "ran"
    text = template.format(marker=marker)
    for completion in (f"\\boxed{{{text}}} </think>", text, f"</think> {text}"):
        assert accuracy_reward(completion, "2", timeout_s=1) == 0.0
        computer = RewardComputer(RewardSettings(weights={"format": 1.0, "cosine_length": 1.0, "length": 1.0}))
        computer.group([completion, "\\boxed{2} </think>"], "2", [10, 5])
    assert not marker.exists()
