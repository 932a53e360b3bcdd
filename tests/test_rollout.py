"""Rollout engines: the contract and its registry, stop strings and the weight sync (the vLLM engine:
test_vllm_engine.py, test_vllm_contract.py)."""

import json
import os
import tempfile

import pytest
import torch
from transformers import AutoTokenizer

from trainer.model import CausalLMLoss
from trainer.rollout import (
    ENGINES,
    Completion,
    RolloutEngine,
    SamplingSettings,
    eval_sampling,
    register_engine,
    sync_weights,
)
from trainer.rollout.hf import HFRolloutEngine
from trainer.toy.model_dir import build_model_dir
from trainer.toy.task import WORDS


class RecordingEngine(RolloutEngine):
    """Stands in for an engine's weight store: keeps what sync_weights sends, sync by sync."""

    holds_weights = True

    def __init__(self):
        self.syncs = []

    def sync(self, named_tensors):
        self.syncs.append([(name, tensor.clone()) for name, tensor in named_tensors])


def load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=2)
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_one_sync_sends_every_tensor_whole_the_tied_head_included(tmp_path):
    _, _, model = load(tmp_path)
    root, engine = CausalLMLoss(model), RecordingEngine()
    sent = sync_weights(root, engine)
    expected = model.state_dict()
    (received,) = engine.syncs
    assert [name for name, _ in received] == list(expected)  # the state dict's order: layer by layer
    assert "lm_head.weight" in expected and model.config.tie_word_embeddings  # vLLM keeps an old head it is not sent
    assert all(torch.equal(tensor, expected[name]) for name, tensor in received)
    assert sent == sum(t.numel() * t.element_size() for t in expected.values())


def test_sync_sends_the_engines_dtype_from_fp32_master_weights(tmp_path):
    _, _, model = load(tmp_path)
    engine = RecordingEngine()
    engine.weight_dtype = torch.bfloat16
    sent = sync_weights(CausalLMLoss(model), engine)
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    received = dict(engine.syncs[0])
    assert all(received[name].dtype == torch.bfloat16 and torch.equal(received[name], expected[name])
               for name in expected)
    assert sent == sum(t.numel() * 2 for t in expected.values())  # half the fp32 bytes


def test_hf_engine_needs_no_sync(tmp_path):
    _, tokenizer, model = load(tmp_path)
    engine = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"))
    assert sync_weights(engine.root, engine) == 0


def test_stop_strings_end_completions(tmp_path):
    from trainer.rollout.keyed_sampling import sequence_keys

    _, tokenizer, model = load(tmp_path)
    engine = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"))
    prompt = tokenizer("tom has 3 apples .", add_special_tokens=False)["input_ids"]
    free = SamplingSettings(n=8, temperature=1.0, top_p=1.0, max_new_tokens=30)
    completions = engine.generate([prompt], free, row_keys=sequence_keys(0, 0, [0], 8))
    # Pick a word that the untrained model samples in some completion, and stop on it.
    word = next(w for w in WORDS if len(w) > 3 and any(w in c.text for c in completions))
    stopped = engine.generate([prompt], SamplingSettings(n=8, temperature=1.0, top_p=1.0, max_new_tokens=30,
                                                         stop=[word]), row_keys=sequence_keys(0, 0, [0], 8))
    for before, after in zip(completions, stopped):
        if word in before.text:
            assert after.text.rstrip().endswith(word) and len(after.token_ids) <= len(before.token_ids)
            assert after.token_ids == before.token_ids[: len(after.token_ids)]  # the same sample, cut
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids


def test_a_kv_budget_splits_the_rollout_into_calls_with_the_same_samples(tmp_path):
    from trainer.rollout.keyed_sampling import sequence_keys

    _, tokenizer, model = load(tmp_path)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("tom has 3 apples .", "ann has 12 pears and 4 more .", "5 plus 7")]
    settings = SamplingSettings(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12)
    keys = sequence_keys(0, 3, [0, 1, 2], 4)
    whole = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu")).generate(prompts, settings, keys)
    longest = max(len(ids) for ids in prompts)
    budgeted = HFRolloutEngine(CausalLMLoss(model), tokenizer, torch.device("cpu"),
                               max_batch_tokens=5 * (longest + 12))
    assert budgeted.rows_per_call(prompts, settings) == 5  # 12 rows: calls of 5, 5 and 2
    calls = []
    original = budgeted._generate_call
    budgeted._generate_call = lambda *args: calls.append(len(args[0])) or original(*args)
    split = budgeted.generate(prompts, settings, keys)
    assert calls == [5, 5, 2]
    assert [c.prompt_index for c in split] == [c.prompt_index for c in whole] == [0] * 4 + [1] * 4 + [2] * 4
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=1e-5) for a, b in zip(split, whole))


def gather_on_two_ranks(rank, init_file, out_dir):
    """One gloo rank: FSDP2-shard a model whose first dimensions do not split evenly, then sync it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=12, intermediate_size=21, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    root = CausalLMLoss(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(root)
    engine = RecordingEngine()
    engine.weight_dtype = torch.bfloat16
    sent = sync_weights(root, engine)
    received = dict(engine.syncs[0])
    torch.save({"expected": expected, "received": received, "sent": sent, "syncs": len(engine.syncs)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_weights_are_gathered_whole_in_the_engine_dtype_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(gather_on_two_ranks, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        expected, received = result["expected"], result["received"]
        assert received.keys() == expected.keys() and result["syncs"] == 1
        for name, tensor in expected.items():
            assert received[name].dtype == torch.bfloat16 and torch.equal(received[name], tensor), name
        assert result["sent"] == sum(t.numel() * 2 for t in expected.values())


def rows_per_call_on_two_ranks(rank, init_file, out_dir):
    """One gloo rank with prompts of its own lengths: the rows a generate call may hold under a KV budget."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    engine = HFRolloutEngine(None, None, torch.device("cpu"), max_batch_tokens=1000)
    prompts = [[1] * 10, [1] * 30] if rank == 0 else [[1] * 10, [1] * 90]  # rank 1 holds the longest prompt
    per_call = engine.rows_per_call(prompts, SamplingSettings(n=4, max_new_tokens=110))
    torch.save(per_call, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_makes_the_same_generate_calls_under_a_kv_budget(tmp_path):
    # Under FSDP each generate call is a collective: the ranks must agree on the rows per call.
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(rows_per_call_on_two_ranks, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)] == [1000 // 200] * 2  # 90 + 110 tokens


@register_engine("fixed_answer")
class FixedAnswerEngine(RolloutEngine):
    """An engine without a model: every sample of every prompt is FIXED_TEXT. What GRPO, evaluation
    and the planner then report follows from the text and the gold answers alone."""

    FIXED_TEXT = "so \\boxed{ 7 } </think>"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids = tokenizer.encode(self.FIXED_TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.prompts_seen = 0

    def generate(self, prompt_ids, settings, row_keys=None):
        self.prompts_seen += len(prompt_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=False)
        return [Completion(index, list(self.token_ids), text, "stop")
                for index in range(len(prompt_ids)) for _ in range(settings.n)]

    @classmethod
    def for_training(cls, trainer, config):
        return cls(trainer.tokenizer)

    @classmethod
    def sample_benchmark(cls, config, problems, tokenizer, device, rank, world_size):
        engine = cls(tokenizer)
        per_prompt = [[] for _ in problems]
        for completion in engine.generate([prompt for prompt, _ in problems], eval_sampling(config.eval)):
            per_prompt[completion.prompt_index].append(completion)
        return per_prompt, 1

    @classmethod
    def plan_rollout(cls, config, architecture, policy, resident, gpu_bytes, shape):
        held = {**resident, "fixed answers": shape.sequences * shape.sequence_tokens * 8}
        return [("rollout (fixed answers)", held)], [f"{shape.sequences} fixed answers"]


def fixed_answer_tokens(model):
    """The fixed answer's length: its tokens and the end-of-sequence token."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    return len(tokenizer.encode(FixedAnswerEngine.FIXED_TEXT, add_special_tokens=False)) + 1


def write_benchmark(path, answers):
    with open(path, "w") as handle:
        for answer in answers:
            handle.write(json.dumps({"problem": "tom has 3 apples . he gets 4 more . how many apples does he have ?",
                                     "answer": answer}) + "\n")
    return str(path)


def test_a_registered_engine_is_a_choice_of_both_keys_and_unknown_names_are_refused(tmp_path):
    from trainer.config import ConfigError, load_config

    assert ENGINES["fixed_answer"] is FixedAnswerEngine and FixedAnswerEngine.name == "fixed_answer"
    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_benchmark(tmp_path / "prompts.jsonl", ["7"])
    grpo = ["stage=grpo", f"model.path={model}", f"data.train_files={data}"]
    config = load_config(None, [*grpo, "grpo.engine.name=fixed_answer", "eval.engine=fixed_answer"])
    assert config.grpo.engine.name == config.eval.engine == "fixed_answer"
    with pytest.raises(ConfigError, match=r"grpo.engine.name: 'fixed_answers' is not one of .*fixed_answer"):
        load_config(None, [*grpo, "grpo.engine.name=fixed_answers"])
    with pytest.raises(ValueError, match="registered twice"):
        register_engine("hf")(FixedAnswerEngine)


def test_the_eval_stage_scores_what_a_registered_engine_returns(tmp_path):
    from trainer.config import load_config
    from trainer.evaluate import run_eval

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_benchmark(tmp_path / "bench.jsonl", ["7", "7", "12", "3"])
    run_eval(load_config(None, ["stage=eval", f"model.path={model}", f"eval.data={data}", "eval.engine=fixed_answer",
                                "eval.samples=3", "eval.budgets=3,16", f"run_dir={tmp_path / 'eval'}"]))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    small, large = result["rows"]
    length = fixed_answer_tokens(model)
    assert result["problems"] == 4 and result["samples_per_problem"] == 3
    # Within 16 tokens every sample answers 7: two of the four gold answers.
    assert large["pass_at_1"] == large["maj_at_k"] == 0.5 and large["mean_tokens"] == length
    assert large["unfinished_fraction"] == 0.0
    # Cut at 3 tokens ("so \boxed{ 7"), no sample has a closed box or an end.
    assert small["pass_at_1"] == 0.0 and small["mean_tokens"] == 3 and small["unfinished_fraction"] == 1.0


def test_grpo_trains_on_what_a_registered_engine_samples(tmp_path):
    from trainer.config import load_config
    from trainer.grpo import run_grpo
    from trainer.metrics import read_metrics

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_benchmark(tmp_path / "prompts.jsonl", ["7"] * 8)
    config = load_config(None, [
        "stage=grpo", f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_files={data}",
        "grpo.engine.name=fixed_answer", "grpo.prompts_per_step=4", "grpo.group_size=3",
        "grpo.sampling.max_new_tokens=12",
        "train.max_steps=2", "checkpoint.export_hf=false",
    ])
    run_grpo(config)
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        # Every sample is the fixed, correct answer: each group has one reward, so no advantage.
        assert record["accuracy"] == 1.0 and record["completion_tokens"] == fixed_answer_tokens(model)
        assert record["zero_variance_groups"] == 1.0 and record["loss"] == 0.0


def test_the_planner_asks_the_configured_engine_for_its_rollout_memory(tmp_path):
    from trainer.config import load_config
    from trainer.plan_stages import grpo_shapes, rollout_phases

    model = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    data = write_benchmark(tmp_path / "prompts.jsonl", ["7"])
    config = load_config(None, ["stage=grpo", f"model.path={model}", f"data.train_files={data}",
                                "grpo.engine.name=fixed_answer",
                                "grpo.max_prompt_tokens=100", "grpo.sampling.max_new_tokens=28",
                                "grpo.prompts_per_step=2",
                                "grpo.group_size=4"])
    shape, note = grpo_shapes(config)
    assert (shape.prompt_tokens, shape.sequence_tokens, shape.sequences, note) == (100, 128, 8, None)
    phases, notes = rollout_phases(config, None, None, {"parameters": 1000}, 80 * 2**30, shape)
    assert [(p.name, p.items, p.total) for p in phases] == [
        ("rollout (fixed answers)", {"parameters": 1000, "fixed answers": 8 * 128 * 8}, 1000 + 8192)]
    assert notes == ["8 fixed answers"]
