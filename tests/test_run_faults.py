"""Runs under faults: GRPO killed mid-run, an export cut short, a corrupted checkpoint, a rank dying.

Each resumes with --resume auto and must repeat the uninterrupted run's per-step metrics.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer.metrics import read_metrics
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_run_faults")
    model = build_model_dir(str(root / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(root / "train.jsonl"), 256, seed=1)
    return {"model": model, "data": data}


def grpo_arguments(toy, run_dir, *extra):
    return [
        "stage=grpo", f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.sampling.max_new_tokens=12",
        "grpo.rewards.cosine_max_len=100",
        "optim.lr=1e-3", "train.max_steps=8", "checkpoint.every_steps=2", *extra,
    ]


def sft_arguments(toy, run_dir, *extra):
    return [
        f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
        "data.max_seq_len=256", "optim.lr=3e-3", "train.micro_batch_size=2", "train.max_steps=10",
        "checkpoint.every_steps=2", "checkpoint.export_hf=false", *extra,
    ]


def run(args, launcher=()):
    completed = subprocess.run([sys.executable, *launcher, "-m", "trainer.run", *args],
                               capture_output=True, text=True, cwd=REPO, timeout=600, env=ENV)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def wait_for_records(process, run_dir, count, timeout=300):
    deadline = time.time() + timeout
    while len(read_metrics(run_dir)) < count:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)


def step_metrics(run_dir, keys):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "one record per step, in order"
    return [{k: r[k] for k in keys} for r in records]


GRPO_KEYS = ("loss", "reward", "accuracy", "completion_tokens", "grad_norm")


@pytest.mark.parametrize("kill_after", [3, 6])
def test_grpo_sigkill_then_resume_matches_the_uninterrupted_run(toy, tmp_path, kill_after):
    run(grpo_arguments(toy, tmp_path / "whole", "checkpoint.export_hf=false"))
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.run", *grpo_arguments(toy, killed_dir, "checkpoint.export_hf=false")],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_records(process, killed_dir, kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run(grpo_arguments(toy, killed_dir, "checkpoint.export_hf=false") + ["checkpoint.resume=auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert step_metrics(killed_dir, GRPO_KEYS) == step_metrics(tmp_path / "whole", GRPO_KEYS)


def test_export_cut_short_is_redone_on_resume(toy, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    run(grpo_arguments(toy, run_dir))
    export = run_dir / "hf_model"
    # Copied out of the file's memory map, which the truncation below would pull from under them.
    expected = {name: tensor.clone() for name, tensor in load_file(str(export / "model.safetensors")).items()}
    # What a kill during the final export leaves: the final checkpoint, a half-written .tmp, no export.
    os.rename(export, str(export) + ".tmp")
    weights = export.parent / "hf_model.tmp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run(grpo_arguments(toy, run_dir) + ["checkpoint.resume=auto"])
    assert not (export.parent / "hf_model.tmp").exists()
    reloaded = load_file(str(export / "model.safetensors"))
    assert reloaded.keys() == expected.keys()
    assert all((reloaded[k] == expected[k]).all() for k in expected)
    assert len(read_metrics(run_dir)) == 8  # no step was repeated or lost


def test_corrupted_checkpoint_is_reported_and_the_previous_one_used(toy, tmp_path):
    import shutil

    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    run(sft_arguments(toy, whole, "checkpoint.keep=5"))
    # As if the run had stopped after step 6, and step 6's checkpoint were then damaged on disk.
    shutil.copytree(whole, damaged)
    for step in (8, 10):
        shutil.rmtree(damaged / "checkpoints" / f"step_{step:08d}")
    newest = damaged / "checkpoints" / "step_00000006"
    files = [p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # same size: only the checksum can tell
    largest.write_bytes(bytes(data))
    # The copied metrics as the stopped run left them, marked so the resumed run's own rows can be told apart.
    rows = [dict(r, logged_before_the_stop=True) for r in read_metrics(damaged) if r["step"] <= 6]
    (damaged / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = run(sft_arguments(toy, damaged, "checkpoint.resume=auto", "checkpoint.keep=5"))
    output = resumed.stdout + resumed.stderr
    assert "step_00000006 is incomplete or corrupted" in output
    assert "resumed from" in output and "step_00000004" in output
    # Steps 1-4 stay as logged before the stop; 5-10 are the resumed run's.
    records = read_metrics(damaged)
    assert [r.get("logged_before_the_stop", False) for r in records] == [True] * 4 + [False] * 6
    assert step_metrics(damaged, ("loss",)) == step_metrics(whole, ("loss",))


def _worker_pid(agent_pid, rank):
    """The torchrun worker of the given rank: a child of the agent with RANK=<rank>."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
        except OSError:
            continue
        if parent == agent_pid and f"RANK={rank}".encode() in environment:
            return int(name)
    return None


@pytest.mark.distributed
def test_a_dying_rank_stops_the_run_promptly_and_it_resumes(toy, tmp_path):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    run(sft_arguments(toy, tmp_path / "whole"), launcher)
    run_dir = tmp_path / "killed"
    agent = subprocess.Popen([sys.executable, *launcher, "-m", "trainer.run", *sft_arguments(toy, run_dir)],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_records(agent, run_dir, 5)
    victim = _worker_pid(agent.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert time.time() - killed_at < 60, "the surviving rank must not hang"
    assert "exitcode" in stderr and "-9" in stderr  # torchrun names the rank that died and how
    run(sft_arguments(toy, run_dir, "checkpoint.resume=auto"), launcher)
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole")]
    resumed = [r["loss"] for r in read_metrics(run_dir)]
    assert resumed == pytest.approx(whole, rel=1e-6)
    assert json.loads((run_dir / "checkpoints" / "step_00000010" / "manifest.json").read_text())["files"]


def test_sigkill_during_the_final_export_then_resume_exports(tmp_path):
    from safetensors.torch import load_file

    # A model big enough that writing its export takes a while, so the kill lands inside it.
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=512, layers=8)
    data = write_problems(str(tmp_path / "train.jsonl"), 64, seed=1)
    arguments = [f"model.path={model}", f"data.train_files={data}", "data.pack=false", "train.micro_batch_size=4",
                 "train.max_steps=1", "optim.lr=1e-4"]
    run([f"run_dir={tmp_path / 'whole'}", *arguments])
    expected = {k: v.clone() for k, v in load_file(str(tmp_path / "whole" / "hf_model" / "model.safetensors")).items()}
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "trainer.run", f"run_dir={killed_dir}", *arguments],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed_dir / "hf_model.tmp"
    deadline = time.time() + 300
    while not partial.exists():
        assert process.poll() is None, "the run ended before its export could be interrupted"
        assert time.time() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "hf_model").exists(), "the kill came after the export was complete"
    run([f"run_dir={killed_dir}", *arguments, "checkpoint.resume=auto"])
    exported = load_file(str(killed_dir / "hf_model" / "model.safetensors"))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert not partial.exists() and len(read_metrics(killed_dir)) == 1
