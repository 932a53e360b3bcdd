"""SFT under faults: SIGKILL mid-training and mid-save, then --resume auto; 1 vs 2 FSDP2 ranks."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.metrics import read_metrics
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_faults")
    model = build_model_dir(str(root / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(root / "train.jsonl"), 256, seed=1)
    return {"model": model, "data": data}


def arguments(toy, run_dir, *extra):
    return [
        f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
        "data.max_seq_len=256", "optim.lr=3e-3", "train.micro_batch_size=4", "train.grad_accum=1",
        "train.max_steps=12", "checkpoint.every_steps=2", "checkpoint.export_hf=false", *extra,
    ]


def run(args, env=None):
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.run", *args], capture_output=True, text=True, cwd=REPO, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def losses(run_dir):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "one record per step, in order"
    return [r["loss"] for r in records]


def test_sigkill_mid_training_then_resume_matches(toy, tmp_path):
    straight = tmp_path / "straight"
    run(arguments(toy, straight))
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.run", *arguments(toy, killed)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(killed)) < 5:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 5 <= len(read_metrics(killed)) < 12, "the kill must land mid-run"
    run(arguments(toy, killed, "checkpoint.resume=auto"))
    assert losses(killed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import trainer.checkpoint as checkpoint
    from trainer.config import load_config
    from trainer.sft import run_sft

    original = checkpoint._write_manifest
    def die_on_second_save(directory, files):
        if directory.endswith("step_00000004.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)  # shards are on disk, the manifest is not
        original(directory, files)
    checkpoint._write_manifest = die_on_second_save
    run_sft(load_config(None, sys.argv[1:]))
""")


def test_sigkill_mid_save_falls_back_to_the_previous_checkpoint(toy, tmp_path):
    straight = tmp_path / "straight"
    run(arguments(toy, straight))
    killed = tmp_path / "killed"
    completed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *arguments(toy, killed)], cwd=REPO, capture_output=True, timeout=600
    )
    assert completed.returncode == -signal.SIGKILL
    root = killed / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000004.tmp"]
    resumed = run(arguments(toy, killed, "checkpoint.resume=auto"))
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert losses(killed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)


@pytest.mark.distributed
def test_two_fsdp_ranks_match_one_process(toy, tmp_path):
    # The same 8 sequences per step: one process accumulates 4 micro-batches, two ranks 2 each.
    common = [f"model.path={toy['model']}", f"data.train_files={toy['data']}", "data.max_seq_len=256",
              "optim.lr=3e-3", "train.micro_batch_size=2", "train.max_steps=4", "checkpoint.export_hf=false"]
    run([f"run_dir={tmp_path / 'one'}", "train.grad_accum=4", *common])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "trainer.run", f"run_dir={tmp_path / 'two'}", "train.grad_accum=2", *common],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert abs(one[0] - two[0]) < 1e-5, (one[0], two[0])
    # Later steps differ only by float summation order inside the sharded optimizer step.
    assert two == pytest.approx(one, rel=1e-4)


def test_each_rank_checksums_its_share_and_the_manifest_covers_every_file(tmp_path):
    from trainer.checkpoint import _checksums, _crc32, _write_manifest, is_complete

    sizes = [5000, 10, 70000, 300, 300, 1]
    for index, size in enumerate(sizes):
        (tmp_path / f"part_{index}.bin").write_bytes(os.urandom(size))
    shares = [_checksums(str(tmp_path), rank, 3) for rank in range(3)]
    assert sorted(name for share in shares for name in share) == sorted(f"part_{i}.bin" for i in range(6))
    assert all(len(share) == 2 for share in shares)  # dealt out evenly
    # Largest first, round-robin: 70000 and 300 bytes, 5000 and 10, 300 and 1.
    assert [sorted(share) for share in shares] == [["part_2.bin", "part_4.bin"], ["part_0.bin", "part_1.bin"],
                                                   ["part_3.bin", "part_5.bin"]]
    merged = {name: entry for share in shares for name, entry in share.items()}
    assert merged["part_2.bin"] == {"size": 70000, "crc32": _crc32(str(tmp_path / "part_2.bin"))}
    _write_manifest(str(tmp_path), merged)
    assert is_complete(str(tmp_path))
    (tmp_path / "part_3.bin").write_bytes(os.urandom(300))  # same size, other bytes
    assert not is_complete(str(tmp_path))
