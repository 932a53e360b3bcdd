"""Keyed sampling: a sequence's tokens depend on its key only, and follow softmax(logits / T)."""

import math

import pytest
import torch

from trainer.rollout.keyed_sampling import KeyedSampler, filter_logits, keyed_uniform, sequence_keys


def test_uniforms_are_a_pure_function_of_key_and_position():
    keys = sequence_keys(0, 3, [5, 9], 2)
    assert keys.tolist() == sequence_keys(0, 3, [5, 9], 2).tolist() and len(set(keys.tolist())) == 4
    together = keyed_uniform(keys, 7)
    assert torch.equal(together[2:3], keyed_uniform(keys[2:3], 7))  # batch composition does not matter
    assert not torch.equal(keyed_uniform(keys, 8), together)  # the position does
    assert ((together > 0) & (together < 1)).all()


def test_uniforms_are_uniform():
    values = torch.cat([keyed_uniform(sequence_keys(1, 0, range(512), 1), position) for position in range(128)])
    assert abs(values.mean().item() - 0.5) < 0.005
    assert abs(values.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(values.float(), bins=10, min=0, max=1) / values.numel()
    assert (histogram - 0.1).abs().max() < 0.005


def test_samples_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature, rows = 0.7, 40000
    sampler = KeyedSampler(sequence_keys(2, 0, range(rows), 1), prompt_length=3, temperature=temperature)
    scores = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1).clone())
    assert (torch.isfinite(scores).sum(-1) == 1).all()  # exactly the sampled token is left for the argmax
    frequencies = torch.bincount(scores.argmax(-1), minlength=5).double() / rows
    expected = torch.softmax(logits.double() / temperature, -1)
    # Binomial standard error at 40k draws is at most 0.0025; allow 4 of them.
    assert (frequencies - expected).abs().max() < 0.01


def test_filtered_tokens_are_never_sampled():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 5000
    sampler = KeyedSampler(sequence_keys(3, 0, range(rows), 1), 0, temperature=1.0, top_p=0.7)
    chosen = sampler.sample(logits.expand(rows, -1).clone(), 0)
    counts = torch.bincount(chosen, minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0


def test_top_p_and_min_p_filters():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(scores, top_p=0.7, min_p=0.0))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    kept = torch.isfinite(filter_logits(scores, top_p=1.0, min_p=0.2))
    assert kept.tolist() == [[True, True, True, False]]  # below 0.2 * 0.5 = 0.1 goes
    assert math.isfinite(filter_logits(scores, top_p=0.01, min_p=0.0)[0, 0].item())  # the top token stays


@pytest.mark.slow
def test_generated_completions_do_not_depend_on_the_batch(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rollout import SamplingSettings
    from trainer.rollout.hf import sample_completions
    from trainer.toy.model_dir import build_model_dir
    from trainer.toy.task import WORDS

    path = build_model_dir(str(tmp_path / "model"), WORDS, hidden_size=32, layers=1)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [tokenizer(f"tom has {n} apples .", add_special_tokens=False)["input_ids"] for n in (3, 17, 5, 42)]
    settings = SamplingSettings(n=3, temperature=1.0, top_p=0.95, max_new_tokens=10)
    together = sample_completions(model, tokenizer, prompts, settings, batch_prompts=4, progress=False)
    one_by_one = sample_completions(model, tokenizer, prompts, settings, batch_prompts=1, progress=False)
    def token_ids(groups):
        return [[c.token_ids for c in group] for group in groups]

    assert token_ids(together) == token_ids(one_by_one)
    assert len({tuple(c.token_ids) for group in together for c in group}) > 6  # they are samples, not one greedy path
