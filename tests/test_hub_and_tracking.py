"""Models and datasets by Hugging Face Hub name (from a hand-built cache, offline), the loss on
every token, and Weights & Biases tracking in offline mode."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from trainer.config import load_config
from trainer.data import DataError, build_documents, load_records
from trainer.toy.model_dir import build_model_dir, build_tokenizer
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_type, name, files):
    """Lays out `files` ({relative path: source file}) as the Hub cache's snapshot of `name` at main."""
    folder = os.path.join(cache, f"{repo_type}s--{name.replace('/', '--')}")
    snapshot = os.path.join(folder, "snapshots", COMMIT)
    for relative, source in files.items():
        os.makedirs(os.path.dirname(os.path.join(snapshot, relative)), exist_ok=True)
        shutil.copyfile(source, os.path.join(snapshot, relative))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as handle:
        handle.write(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    for key, value in {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}.items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads its settings when imported: the cache location is patched where it is read.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_an_sft_dataset_loads_by_hub_name_from_the_cache(tmp_path, offline_cache):
    problems = write_problems(str(tmp_path / "train.jsonl"), 7, seed=3)
    cache_repo(str(offline_cache), "dataset", "fastmath-test/word-problems", {"data/train.jsonl": problems})
    records = load_records(["fastmath-test/word-problems"], split="train")
    with open(problems) as handle:
        expected = [json.loads(line) for line in handle]
    assert [row for _, _, row in records] == expected
    assert [(name, number) for name, number, _ in records][:2] == [("fastmath-test/word-problems", 1),
                                                                     ("fastmath-test/word-problems", 2)]
    with pytest.raises(DataError, match=r"fastmath-test/word-problems: .*split.*test"):
        load_records(["fastmath-test/word-problems"], split="test")


def test_names_missing_from_an_offline_cache_get_one_clear_line(offline_cache):
    from trainer.hub import local_model_dir

    with pytest.raises(DataError, match=r"data.train_files: fastmath-test/absent is not a local path, and offline "
                                        r"mode \(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE\) finds no cached copy"):
        load_records(["fastmath-test/absent"])
    with pytest.raises(DataError, match=r"model.path: fastmath-test/no-model is not a local path, and offline mode"):
        local_model_dir("fastmath-test/no-model")
    with pytest.raises(DataError, match=r"missing.jsonl: data file not found"):
        load_records(["missing.jsonl"])  # a file name is never taken for a Hub name
    with pytest.raises(DataError, match=r"data/missing.jsonl: data file not found"):
        load_records(["data/missing.jsonl"])


def test_hub_errors_name_the_cause(monkeypatch):
    import httpx2 as httpx  # the HTTP client huggingface_hub uses
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from trainer.hub import local_model_dir

    def raising(error, status):
        # No network here: the Hub's answer (the status and the error huggingface_hub raises for it) is built locally.
        def download(name, **kwargs):
            request = httpx.Request("GET", f"https://huggingface.co/api/models/{name}")
            raise error(f"{status} for {name}", response=httpx.Response(status, request=request))
        return download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(GatedRepoError, 403))
    with pytest.raises(DataError, match="is a gated model on the Hugging Face Hub; accept its terms"):
        local_model_dir("meta-llama/Some-Gated-Model")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(RepositoryNotFoundError, 404))
    with pytest.raises(DataError, match="is neither a local path nor a model on the Hugging Face Hub"):
        local_model_dir("fastmath-test/typo-in-the-name")


@pytest.mark.slow
def test_the_eval_stage_runs_a_model_given_by_hub_name(tmp_path, offline_cache):
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    cache_repo(str(offline_cache), "model", "fastmath-test/tiny-llama",
               {name: os.path.join(model, name) for name in os.listdir(model)})
    data = write_problems(str(tmp_path / "bench.jsonl"), 4, seed=5)
    out = tmp_path / "eval"
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--stage", "eval", "model.path=fastmath-test/tiny-llama",
         f"eval.data={data}", "eval.samples=2", "eval.budgets=[8]", f"run_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["problems"] == 4
    assert result["model"].startswith(str(offline_cache)) and COMMIT in result["model"]


def test_loss_on_all_trains_every_token_of_the_document():
    tokenizer = build_tokenizer(WORDS)
    records = [("rows", 1, {"problem": "tom has 3 apples", "solution": "3 + 1 = 4 . \\boxed{ 4 } </think>"})]
    base = ["model.path=m", "data.train_files=[rows.jsonl]"]
    completion_only, _ = build_documents(records, tokenizer, load_config(None, base).data, None)
    every_token, _ = build_documents(records, tokenizer, load_config(None, [*base, "data.loss_on=all"]).data, None)
    (narrow,), (wide,) = completion_only, every_token
    assert narrow.input_ids == wide.input_ids
    assert all(wide.completion_mask) and 0 < sum(narrow.completion_mask) < len(narrow.input_ids)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_receives_the_runs_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from trainer.metrics import read_metrics
    from trainer.sft import run_sft

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_problems(str(tmp_path / "train.jsonl"), 32, seed=0)
    run_dir = tmp_path / "run"
    config = load_config(None, [f"run_dir={run_dir}", f"model.path={model}", f"data.train_files=[{data}]",
                                "data.max_seq_len=192", "train.max_steps=3", "checkpoint.export_hf=false",
                                "checkpoint.save_final=false", "tracking.wandb=true", "tracking.wandb_project=tests"])
    run_sft(config)
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    logged = wandb_history(log_file)
    written = read_metrics(str(run_dir))
    assert [row["_step"] for row in logged] == [1, 2, 3]
    for sent, record in zip(logged, written):
        for key in ("loss", "grad_norm", "lr", "tokens", "pad_fraction"):
            assert sent[key] == pytest.approx(record[key])


def wandb_history(path):
    """The history rows in a wandb offline log: a 7-byte header, then records in 32 KiB blocks, each
    record a 4-byte checksum, 2-byte length and 1-byte type (full, first, middle, last) before its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, rows, position, pending = path.read_bytes(), [], 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a record header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_an_eval_benchmark_loads_by_hub_name_with_its_split(tmp_path, offline_cache):
    from trainer.grpo_rollouts import load_prompts

    problems = write_problems(str(tmp_path / "bench.jsonl"), 5, seed=9)
    cache_repo(str(offline_cache), "dataset", "fastmath-test/bench", {"test.jsonl": problems})
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    config = load_config(None, ["stage=eval", f"model.path={model}", "eval.data=fastmath-test/bench"])
    from trainer.model import load_tokenizer

    prompts = load_prompts(config, load_tokenizer(config.model), files=[config.eval.data],
                           answer_field=config.eval.answer_field, split=config.eval.split, what="eval.data")
    with open(problems) as handle:
        assert [gold for _, gold in prompts] == [str(json.loads(line)["answer"]) for line in handle]
    with pytest.raises(DataError, match=r"eval.data: fastmath-test/bench: .*split"):
        load_prompts(config, load_tokenizer(config.model), files=["fastmath-test/bench"], split="validation",
                     what="eval.data")
