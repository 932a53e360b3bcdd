import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.data import collate, pack_documents, to_messages, tokenize_chat
from trainer.metrics import read_metrics
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS, write_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = build_model_dir(str(root / "model"), WORDS, hidden_size=64, layers=2)
    data = write_problems(str(root / "train.jsonl"), 128, seed=0)
    return {"root": root, "model": model, "data": data}


def sft_config(toy, run_dir, *overrides):
    base = [
        f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
        "data.max_seq_len=192", "optim.lr=3e-3", "optim.warmup_ratio=0.1", "train.micro_batch_size=2",
        "train.grad_accum=2", "checkpoint.export_hf=false",
    ]
    return load_config(None, base + list(overrides))


def test_packed_documents_do_not_see_each_other(toy):
    """A token's logits are the same alone and packed beside other documents (the trainer's loader)."""
    from transformers import AutoTokenizer

    from trainer.model import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    model = load_causal_lm(sft_config(toy, "unused").model, torch.device("cpu")).eval()
    config = sft_config(toy, "unused").data
    rows = [json.loads(line) for line in open(toy["data"])][:3]
    documents = [tokenize_chat(tokenizer, to_messages(row, config, None, "row")) for row in rows]

    def logits_of(docs):
        batch = collate(pack_documents(docs, 10_000), tokenizer.pad_token_id)
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]

    alone = logits_of([documents[1]])
    packed = logits_of(documents)
    start = len(documents[0].input_ids)
    beside = packed[start : start + len(documents[1].input_ids)]
    assert (beside - alone).abs().max() < 1e-5


def test_completion_only_targets(toy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    row = json.loads(open(toy["data"]).readline())
    document = tokenize_chat(tokenizer, to_messages(row, sft_config(toy, "x").data, "be brief", "row"))
    (pack,) = pack_documents([document], 10_000)
    counted = [t for t in pack.targets if t != -100]
    completion = [i for i, m in zip(document.input_ids, document.completion_mask) if m]
    assert counted == completion  # every completion token is predicted, nothing else
    assert completion[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(completion).strip().startswith(row["solution"].split()[0])


def test_short_run_lowers_the_loss_and_exports_a_loadable_model(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.sft import run_sft

    config = sft_config(toy, str(tmp_path / "run"), "train.epochs=3", "checkpoint.export_hf=true")
    run_sft(config)
    records = read_metrics(config.run_dir)
    losses = [r["loss"] for r in records]
    assert {r["epoch"] for r in records} == {0, 1, 2}
    # Two micro-batches of two packs a step; the shorter pack of each is padded up to the longer.
    assert all(r["micro_batches"] == 2 and 0.0 <= r["pad_fraction"] < 0.5 for r in records)
    assert any(r["pad_fraction"] > 0 for r in records)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(config.run_dir, "hf_model"))
    assert exported.config.num_hidden_layers == 2
    assert os.path.exists(os.path.join(config.run_dir, "loss.png"))


def keep_metrics_up_to(run_dir, last_step):
    """metrics.jsonl as a run killed after logging last_step leaves it, each row marked as that run's."""
    rows = [dict(r, logged_before_the_kill=True) for r in read_metrics(run_dir) if r["step"] <= last_step]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)


def keep_checkpoints(run_dir, *names):
    root = os.path.join(run_dir, "checkpoints")
    assert set(names) <= set(os.listdir(root)), "the checkpoints to resume from must have been kept"
    for name in os.listdir(root):
        if name not in names:
            shutil.rmtree(os.path.join(root, name))


def test_resume_repeats_the_same_losses(toy, tmp_path):
    from trainer.sft import run_sft

    straight = sft_config(toy, str(tmp_path / "straight"), "train.max_steps=8")
    run_sft(straight)
    first = sft_config(toy, str(tmp_path / "resumed"), "train.max_steps=8", "checkpoint.every_steps=3",
                       "checkpoint.keep=3")
    run_sft(first)
    # As if the run had been killed during step 6: the step-3 checkpoint and the metrics of steps 1-5.
    keep_checkpoints(first.run_dir, "step_00000003")
    keep_metrics_up_to(first.run_dir, 5)
    resumed = sft_config(toy, first.run_dir, "train.max_steps=8", "checkpoint.every_steps=3", "checkpoint.resume=auto")
    run_sft(resumed)
    records = read_metrics(resumed.run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    # Steps 1-3 stay as the killed run logged them; 4-8 are the resumed run's own.
    assert [r.get("logged_before_the_kill", False) for r in records] == [True] * 3 + [False] * 5
    expected = [r["loss"] for r in read_metrics(straight.run_dir)]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def scheduled_lr(lr, step, total_steps, warmup_ratio):
    """The documented schedule at 0-based step: linear warmup over round(ratio x total) steps, cosine to 0."""
    warmup = round(warmup_ratio * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))


def test_resume_follows_the_configured_lr_and_epochs(toy, tmp_path, capsys):
    from trainer.sft import run_sft
    from trainer.training import Trainer

    run_dir = str(tmp_path / "run")
    common = ("train.micro_batch_size=4", "train.grad_accum=2", "checkpoint.every_steps=2", "checkpoint.keep=5")
    run_sft(sft_config(toy, run_dir, *common, "train.epochs=1"))
    records = read_metrics(run_dir)
    assert len(records) == 6  # 54 packed sequences, 8 per step
    assert [r["lr"] for r in records] == pytest.approx([scheduled_lr(3e-3, s, 6, 0.1) for s in range(6)], rel=1e-12)

    # Killed during step 5, resumed with a lower lr and twice the epochs: from step 5 on, the
    # optimizer steps at the new schedule's lr (the cosine over 12 steps, peak 1e-3).
    keep_checkpoints(run_dir, "step_00000002", "step_00000004")
    keep_metrics_up_to(run_dir, 4)
    capsys.readouterr()
    run_sft(sft_config(toy, run_dir, *common, "train.epochs=2", "optim.lr=1e-3", "checkpoint.resume=auto"))
    changed = [line for line in capsys.readouterr().out.splitlines() if "optim.lr" in line]
    assert len(changed) == 1 and "optim.lr 0.003 -> 0.001" in changed[0] and "total steps 6 -> 12" in changed[0]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    resumed = [r["lr"] for r in records if "logged_before_the_kill" not in r]
    assert resumed == pytest.approx([scheduled_lr(1e-3, s, 12, 0.1) for s in range(4, 12)], rel=1e-12)
    assert {r["epoch"] for r in records} == {0, 1}

    # The optimizer itself carries the configured settings after a resume, not the checkpoint's.
    config = sft_config(toy, run_dir, "train.epochs=3", "optim.lr=5e-4", "optim.weight_decay=0.1",
                        "optim.beta2=0.99", "checkpoint.resume=auto")
    trainer = Trainer(config)
    trainer.set_schedule(18)
    assert trainer.resume(lambda _: None) == 12
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(scheduled_lr(5e-4, 12, 18, 0.1), rel=1e-12)
        assert (group["initial_lr"], group["weight_decay"], tuple(group["betas"])) == (5e-4, 0.1, (0.9, 0.99))
    assert trainer.scheduler.base_lrs == [5e-4] * len(trainer.optimizer.param_groups)

    # A configuration that ends before the checkpoint's step cannot continue it.
    with pytest.raises(ConfigError, match="step_00000012 is at step 12, beyond the 6 steps"):
        run_sft(sft_config(toy, run_dir, *common, "train.epochs=1", "checkpoint.resume=auto"))


def test_a_fresh_run_refuses_a_run_dir_holding_an_earlier_runs_checkpoints(toy, tmp_path):
    from trainer.sft import run_sft

    run_dir = str(tmp_path / "run")
    run_sft(sft_config(toy, run_dir, "train.max_steps=4", "checkpoint.every_steps=2"))
    root = os.path.join(run_dir, "checkpoints")
    checkpoints, records = sorted(os.listdir(root)), read_metrics(run_dir)
    assert checkpoints == ["step_00000002", "step_00000004"]
    # A shorter fresh run would otherwise leave step 4 behind as the "latest" for --resume auto.
    with pytest.raises(ConfigError) as refused:
        run_sft(sft_config(toy, run_dir, "train.max_steps=3"))
    message = str(refused.value)
    assert f"run_dir {run_dir} already holds checkpoints" in message and "step_00000004" in message
    assert "--resume auto" in message and "choose another run_dir" in message and f"delete {root}" in message
    assert sorted(os.listdir(root)) == checkpoints and read_metrics(run_dir) == records


def test_incomplete_checkpoint_is_skipped(toy, tmp_path):
    from trainer.checkpoint import latest_checkpoint
    from trainer.sft import run_sft

    config = sft_config(toy, str(tmp_path / "run"), "train.max_steps=4", "checkpoint.every_steps=2",
                        "checkpoint.keep=3")
    run_sft(config)
    root = os.path.join(config.run_dir, "checkpoints")
    newest = os.path.join(root, "step_00000004")
    with open(os.path.join(newest, "manifest.json")) as handle:
        some_file = sorted(json.load(handle)["files"])[0]
    with open(os.path.join(newest, some_file), "ab") as handle:
        handle.write(b"corruption")  # size no longer matches the manifest
    messages = []
    assert latest_checkpoint(config.run_dir, log=messages.append) == os.path.join(root, "step_00000002")
    assert "step_00000004" in messages[0]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def cli_error(toy, tmp_path, *overrides, data=None):
    args = [f"run_dir={tmp_path / 'run'}", f"model.path={toy['model']}", f"data.train_files={data or toy['data']}"]
    completed = run_cli(*args, *overrides)
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints"), "nothing may be written for bad input"
    return lines[0]


@pytest.mark.slow
def test_bad_input_gets_one_line_errors(toy, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    assert missing in cli_error(toy, tmp_path, data=missing)

    malformed = tmp_path / "malformed.jsonl"
    good = open(toy["data"]).readline()
    malformed.write_text(good + '{"problem": "x", "solution": \n' + good)
    assert f"{malformed}:2" in cli_error(toy, tmp_path, data=str(malformed))

    no_field = tmp_path / "no_field.jsonl"
    no_field.write_text(good + json.dumps({"problem": "tom has 3 apples ."}) + "\n")
    message = cli_error(toy, tmp_path, data=str(no_field))
    assert f"{no_field}:2" in message and "solution" in message

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert str(empty) in cli_error(toy, tmp_path, data=str(empty))

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in os.listdir(toy["model"]):
        if name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tokenizer / name).write_bytes(open(os.path.join(toy["model"], name), "rb").read())
    assert str(no_tokenizer) in cli_error(toy, tmp_path, f"model.path={no_tokenizer}")

    assert "did you mean 'lr'" in cli_error(toy, tmp_path, "optim.lrr=1e-3")


@pytest.mark.slow
def test_the_command_line_refuses_a_fresh_run_over_earlier_checkpoints_in_one_line(toy, tmp_path):
    from trainer.sft import run_sft

    run_dir = tmp_path / "run"
    run_sft(sft_config(toy, str(run_dir), "train.max_steps=1"))
    completed = run_cli(f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
                        "data.max_seq_len=192", "train.max_steps=1", "checkpoint.export_hf=false")
    assert completed.returncode == 2, completed.stderr[-2000:]
    (line,) = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert f"run_dir {run_dir} already holds checkpoints" in line and "--resume auto" in line
    assert "Traceback" not in completed.stderr
    assert os.listdir(run_dir / "checkpoints") == ["step_00000001"] and len(read_metrics(str(run_dir))) == 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'max_seq_len'"):
        load_config(None, ["data.max_seq_length=10"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many", "model.path=x", "data.train_files=y"])
    with pytest.raises(ConfigError, match="data.overlong"):
        load_config(None, ["data.overlong=split", "model.path=x", "data.train_files=y"])
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["data.train_files=y"])


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(toy, tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate this large sends the weights to inf within a few steps.
    completed = run_cli(
        f"run_dir={run_dir}", f"model.path={toy['model']}", f"data.train_files={toy['data']}",
        "data.max_seq_len=192", "optim.lr=1e30", "optim.warmup_ratio=0", "optim.grad_clip=1e30",
        "train.max_steps=20", "checkpoint.every_steps=1", "checkpoint.keep=1", "checkpoint.export_hf=false",
    )
    assert completed.returncode == 1, completed.stderr[-2000:]
    (line,) = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert "non-finite" in line and "Traceback" not in completed.stderr
    steps = [r["step"] for r in read_metrics(str(run_dir))]
    (kept,) = os.listdir(run_dir / "checkpoints")
    assert kept == f"step_{steps[-1]:08d}", "the last finite step's checkpoint is the one kept"


@pytest.mark.slow
def test_cli_run_from_a_yaml_config_lowers_the_loss(toy, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        f"model: {{path: {toy['model']}}}\n"
        f"data: {{train_files: [{toy['data']}], max_seq_len: 192}}\n"
        "optim: {lr: 3.0e-3, warmup_ratio: 0.1}\n"
        "train: {epochs: 2, micro_batch_size: 2, grad_accum: 2}\n"
        "checkpoint: {export_hf: false}\n"
    )
    completed = run_cli("--config", str(config))
    assert completed.returncode == 0, completed.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run"))]
    assert len(losses) >= 10 and sum(losses[-3:]) < 0.85 * sum(losses[:3])


def test_activation_checkpointing_gives_the_same_losses(toy, tmp_path):
    from trainer.sft import run_sft

    plain = sft_config(toy, str(tmp_path / "plain"), "train.max_steps=3")
    checkpointed = sft_config(toy, str(tmp_path / "ckpt"), "train.max_steps=3",
                              "parallel.activation_checkpointing=true")
    run_sft(plain)
    run_sft(checkpointed)
    expected = [r["loss"] for r in read_metrics(plain.run_dir)]
    assert [r["loss"] for r in read_metrics(checkpointed.run_dir)] == pytest.approx(expected, rel=1e-6)


def test_low_memory_loss_gives_the_same_losses(toy, tmp_path):
    from trainer.sft import run_sft

    plain = sft_config(toy, str(tmp_path / "plain"), "train.max_steps=3")
    low_memory = sft_config(toy, str(tmp_path / "low"), "train.max_steps=3", "train.low_memory_loss=true")
    run_sft(plain)
    run_sft(low_memory)
    expected = [(r["loss"], r["grad_norm"]) for r in read_metrics(plain.run_dir)]
    measured = [(r["loss"], r["grad_norm"]) for r in read_metrics(low_memory.run_dir)]
    assert len(measured) == 3 and measured[0][0] > 0
    for (loss, grad_norm), (expected_loss, expected_norm) in zip(measured, expected):
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert grad_norm == pytest.approx(expected_norm, rel=1e-4)


def test_parquet_chat_messages_and_overlong_counts(toy, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from trainer.data import build_documents, load_records

    rows = [json.loads(line) for line in open(toy["data"])][:6]
    chats = [
        {"messages": [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]}
        for r in rows
    ]
    path = str(tmp_path / "chats.parquet")
    datasets.Dataset.from_list(chats).to_parquet(path)
    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    records = load_records([path])
    assert len(records) == 6 and records[0][:2] == (path, 1)
    lengths = [len(tokenize_chat(tokenizer, c["messages"]).input_ids) for c in chats]
    limit = sorted(lengths)[2]  # half the examples are longer than this
    for overlong, kept, counted in (("truncate", 6, "truncated"), ("drop", 3, "dropped_overlong")):
        config = sft_config(toy, "x", "data.messages_field=messages", f"data.max_seq_len={limit}",
                            f"data.overlong={overlong}").data
        documents, stats = build_documents(records, tokenizer, config, None)
        assert len(documents) == kept
        assert getattr(stats, counted) == sum(length > limit for length in lengths)
        assert max(len(d.input_ids) for d in documents) <= limit


def test_toy_tokenizer_round_trips_multi_digit_numbers(toy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    text = r"tom has 37 apples . 37 + 105 = 142 . \boxed{ 142 } </think>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_held_out_evaluation_during_training_scores_the_model_as_the_eval_stage_does(toy, tmp_path):
    """eval.every_steps: pass@1 logged every N steps and at the last; the last equals an independent
    evaluation of the exported model with the same keyed samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluate import evaluate
    from trainer.grpo_rollouts import load_prompts
    from trainer.sft import run_sft

    held_out = write_problems(str(tmp_path / "held_out.jsonl"), 12, seed=7)
    config = sft_config(toy, str(tmp_path / "run"), "train.max_steps=5", "checkpoint.export_hf=true",
                        "eval.every_steps=2", f"eval.data={held_out}", "eval.samples=2", "eval.budgets=[6,24]",
                        "eval.temperature=1.0", "eval.top_p=1.0", "eval.max_problems=10")
    run_sft(config)
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records if "eval_pass_at_1" in r] == [2, 4, 5]
    last = records[-1]
    model_dir = os.path.join(config.run_dir, "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = load_prompts(config, tokenizer, files=[held_out], what="eval.data")[:10]
    expected = evaluate(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer, [p for p, _ in problems],
                        [a for _, a in problems], samples=2, temperature=1.0, top_p=1.0, budgets=[6, 24],
                        seed=config.train.seed)
    assert last["eval_pass_at_1"] == pytest.approx(expected.final.pass_at_1)
    assert last["eval_maj_at_k"] == pytest.approx(expected.final.maj_at_k)
    assert last["eval_mean_tokens"] == pytest.approx(expected.final.mean_tokens)
    assert expected.final.mean_tokens > 6  # the 24-token budget is the one logged
    assert os.path.exists(os.path.join(config.run_dir, "eval_pass_at_1.png"))


def test_held_out_evaluation_needs_its_data(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.data: no benchmark file given \(eval.every_steps=10 evaluates"):
        sft_config(toy, str(tmp_path / "run"), "eval.every_steps=10")
    with pytest.raises(ConfigError, match="eval.every_steps must be >= 0"):
        sft_config(toy, str(tmp_path / "run"), "eval.every_steps=-1", "eval.data=x.jsonl")
