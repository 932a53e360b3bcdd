"""Document-masked attention: packed rows equal their documents run alone, with no [L, L] mask."""

import pytest
import torch
from helpers import max_relative_error

from trainer.attention import (
    DOCUMENT_MASKED,
    boundaries_from_positions,
    document_attention,
    document_boundaries,
    grouped_document_attention,
    length_groups,
    register_document_attention,
    varlen_document_attention,
    varlen_usable,
)
from trainer.config import ConfigError, load_config
from trainer.model import CausalLMLoss

DOCUMENT_LENGTHS = [37, 5, 61, 1, 23, 14]  # odd sizes, a one-token document among them


def reference_attention(query, key, value, lengths, scaling=None):
    """float64 causal softmax attention per document, written out: [T, Hq, D] -> [T, Hq, D]."""
    groups = query.shape[1] // key.shape[1]
    outputs, start = [], 0
    for length in lengths:
        q = query[start : start + length].double().transpose(0, 1)
        k = key[start : start + length].double().repeat_interleave(groups, dim=1).transpose(0, 1)
        v = value[start : start + length].double().repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) * (scaling or q.shape[-1] ** -0.5)
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        outputs.append((scores.softmax(-1) @ v).transpose(0, 1))
        start += length
    return torch.cat(outputs)


def random_qkv(lengths, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = sum(lengths)

    def draw(h):
        return torch.randn(tokens, h, head_dim, generator=generator, device=device).to(dtype).requires_grad_()

    return draw(heads), draw(kv_heads), draw(kv_heads)


@pytest.mark.parametrize("spare_tokens", [0, 2048])
def test_length_groups_cover_every_document_once_within_the_padding_slack(spare_tokens):
    lengths = [3000, 7, 2900, 640, 1, 660, 650, 2, 1500, 5000]
    groups = length_groups(lengths, slack=1.25, spare_tokens=spare_tokens)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        tokens = sum(lengths[i] for i in group)
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= max(1.25 * tokens, tokens + spare_tokens) or len(group) == 1
    # Short documents share one call where the padding costs little.
    assert len(length_groups([40, 80, 55, 61, 79], spare_tokens=2048)) == 1
    assert len(length_groups([40, 80, 55, 61, 79], spare_tokens=0)) == 2


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_attention_matches_float64_per_document(dtype, tolerance):
    query, key, value = random_qkv(DOCUMENT_LENGTHS, dtype=dtype)
    cumulative, _ = document_boundaries(DOCUMENT_LENGTHS)
    out = grouped_document_attention(query, key, value, cumulative, scaling=None)
    expected = reference_attention(query, key, value, DOCUMENT_LENGTHS)
    assert out.dtype == dtype and out.shape == query.shape
    assert max_relative_error(out, expected) < tolerance

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    grads = [t.grad.clone() for t in (query, key, value)]
    for tensor in (query, key, value):
        tensor.grad = None
    (expected * weights.double()).sum().backward()
    for name, grad, tensor in zip("qkv", grads, (query, key, value)):
        assert max_relative_error(grad, tensor.grad) < tolerance, name


def test_boundaries_from_restarting_positions_and_row_starts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cumulative, longest = boundaries_from_positions(positions, 2, 6, "cpu")
    assert cumulative.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    cumulative, longest = boundaries_from_positions(None, 2, 6, "cpu")
    assert cumulative.tolist() == [0, 6, 12] and longest == 6
    # One row of positions shared by the whole batch.
    cumulative, longest = boundaries_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]]), 2, 6, "cpu")
    assert cumulative.tolist() == [0, 3, 5, 6, 9, 11, 12] and longest == 3


def as_module_inputs(tensor):
    """[T, H, D] -> transformers' [1, H, T, D] layout."""
    return tensor.detach().transpose(0, 1)[None]


def test_under_autocast_fp32_queries_are_taken_in_its_low_precision(monkeypatch):
    """Rotary embeddings hand fp32 q/k to the attention under autocast; it computes as SDPA would, in
    bf16, so that on a GPU the varlen kernels (bf16/fp16 only) take them."""
    import trainer.attention

    seen = []
    usable = trainer.attention.varlen_usable
    monkeypatch.setattr(trainer.attention, "varlen_usable", lambda q, *a: seen.append(q.dtype) or usable(q, *a))
    query, key, value = random_qkv(DOCUMENT_LENGTHS)
    cumulative, longest = document_boundaries(DOCUMENT_LENGTHS)
    module = torch.nn.Module()
    inputs = [as_module_inputs(t) for t in (query, key, value)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = document_attention(module, *inputs, None, cu_seq_lens_q=cumulative, max_length_q=longest)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    expected = reference_attention(query, key, value, DOCUMENT_LENGTHS)
    assert max_relative_error(out[0], expected) < 2e-2


def test_a_sliding_window_is_refused_only_where_a_document_is_longer():
    query, key, value = random_qkv(DOCUMENT_LENGTHS)
    cumulative, longest = document_boundaries(DOCUMENT_LENGTHS)
    inputs = [as_module_inputs(t) for t in (query, key, value)]
    module = torch.nn.Module()
    out, _ = document_attention(module, *inputs, None, cu_seq_lens_q=cumulative, max_length_q=longest,
                                sliding_window=longest)
    assert max_relative_error(out[0], reference_attention(query, key, value, DOCUMENT_LENGTHS)) < 1e-5
    with pytest.raises(ValueError, match="61-token document is longer than this model's 60-token sliding window"):
        document_attention(module, *inputs, None, cu_seq_lens_q=cumulative, max_length_q=longest, sliding_window=60)
    assert not varlen_usable(query, None, dropout=0.1)  # the flash varlen kernels have no dropout


def tiny_model(architecture, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = config_class(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False)
    register_document_attention()
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=DOCUMENT_MASKED)
    return model.float().eval()


def documents(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (length,), generator=generator) for length in lengths]


def logits_and_grads(model, input_ids, position_ids, weights, **packing):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, position_ids=position_ids, **packing).logits[0]
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("boundaries_given", [True, False], ids=["boundaries", "from-positions"])
def test_packed_row_equals_each_document_alone(architecture, boundaries_given):
    """Logits and every parameter gradient: packed row vs the sum of separate runs, fp32, relative 1e-5."""
    model = tiny_model(architecture)
    docs = documents([19, 7, 33, 1, 12])
    weights = [torch.randn(len(d), 97, generator=torch.Generator().manual_seed(i)) for i, d in enumerate(docs)]

    separate_logits, separate_grads = [], {}
    for doc, weight in zip(docs, weights):
        logits, grads = logits_and_grads(model, doc[None], torch.arange(len(doc))[None], weight)
        separate_logits.append(logits)
        for name, grad in grads.items():
            separate_grads[name] = separate_grads.get(name, 0) + grad

    packed_ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packing = {}
    if boundaries_given:
        cumulative, longest = document_boundaries([len(d) for d in docs])
        packing = dict(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative, max_length_q=longest, max_length_k=longest)
    packed_logits, packed_grads = logits_and_grads(model, packed_ids, positions, torch.cat(weights), **packing)

    assert max_relative_error(packed_logits, torch.cat(separate_logits)) < 1e-5
    for name, grad in separate_grads.items():
        assert max_relative_error(packed_grads[name], grad) < 1e-5, name


def test_packed_batch_with_padding_through_the_training_module():
    """Two collated rows (one padded) give each document's logits, through CausalLMLoss's head."""
    from trainer.data import Pack, collate

    model = tiny_model("qwen2")
    docs = documents([11, 4, 9, 16])

    def pack(group):
        ids = torch.cat(group).tolist()
        return Pack(ids, ids[1:] + [-100], [p for d in group for p in range(len(d))], [len(d) for d in group])

    batch = collate([pack(docs[:3]), pack(docs[3:])], pad_token_id=0)
    assert "attention_mask" not in batch and batch["document_boundaries"].tolist() == [0, 11, 15, 24, 40, 48]
    weight = model.lm_head.weight
    with torch.no_grad():
        hidden = CausalLMLoss(model)(batch["input_ids"], batch["position_ids"], head=lambda h, w: h,
                                     document_boundaries=batch["document_boundaries"],
                                     longest_document=batch["longest_document"])
        packed_logits = hidden @ weight.T
        rows = [packed_logits[0, :11], packed_logits[0, 11:15], packed_logits[0, 15:24], packed_logits[1, :16]]
        for doc, logits in zip(docs, rows):
            alone = model(input_ids=doc[None], position_ids=torch.arange(len(doc))[None]).logits[0]
            assert max_relative_error(logits, alone) < 1e-5


def test_generation_with_document_masked_equals_sdpa():
    """Left-padded sampling takes transformers' SDPA path: greedy tokens equal an sdpa model's."""
    model = tiny_model("llama")
    reference = tiny_model("llama")
    reference.config._attn_implementation = "sdpa"
    reference.load_state_dict(model.state_dict())
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    options = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, **options), reference.generate(input_ids, **options))


def test_config_validates_the_attention_implementation():
    base = ["model.path=m", "data.train_files=[d.jsonl]"]
    assert load_config(None, base).model.attn_implementation == DOCUMENT_MASKED
    with pytest.raises(ConfigError, match="did you mean 'document_masked'"):
        load_config(None, base + ["model.attn_implementation=document_mask"])
    with pytest.raises(ConfigError, match="packed documents attend to each other"):
        load_config(None, base + ["model.attn_implementation=sdpa"])
    with pytest.raises(ConfigError, match="GRPO packs its rollouts"):
        load_config(None, base + ["stage=grpo", "model.attn_implementation=eager", "data.pack=false"])
    assert load_config(None, base + ["model.attn_implementation=sdpa", "data.pack=false"]).data.pack is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_the_grouped_reference_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lengths = [1000, 3, 517, 2048, 77, 1]
    query, key, value = random_qkv(lengths, heads=8, kv_heads=2, head_dim=128, dtype=dtype, device="cuda")
    assert varlen_usable(query, None), "torch.nn.attention.varlen is missing or unusable here"
    cumulative, longest = document_boundaries(lengths, device="cuda")
    fast = varlen_document_attention(query, key, value, cumulative, longest, None)
    exact = reference_attention(query, key, value, lengths)
    plain = grouped_document_attention(query, key, value, cumulative.cpu(), None)
    weights = torch.randn(fast.shape, device="cuda", dtype=torch.float32)
    results = []
    for out in (fast, plain):
        for tensor in (query, key, value):
            tensor.grad = None
        (out.float() * weights).sum().backward()
        results.append((out, [t.grad.clone() for t in (query, key, value)]))
    for tensor in (query, key, value):
        tensor.grad = None
    (exact * weights.double()).sum().backward()
    truth = [t.grad for t in (query, key, value)]
    (fast, fast_grads), (plain, plain_grads) = results
    assert max_relative_error(fast, exact) <= 2 * max_relative_error(plain, exact) + 1e-3
    for name, ours, baseline, expected in zip("qkv", fast_grads, plain_grads, truth):
        assert max_relative_error(ours, expected) <= 2 * max_relative_error(baseline, expected) + 1e-3, name


@pytest.mark.gpu
def test_packed_model_on_cuda_matches_documents_alone_in_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model("qwen2").cuda().to(torch.bfloat16)
    docs = [d.cuda() for d in documents([300, 17, 511, 2])]
    cumulative, longest = document_boundaries([len(d) for d in docs], device="cuda")
    positions = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs)[None], position_ids=positions, cu_seq_lens_q=cumulative,
                       cu_seq_lens_k=cumulative, max_length_q=longest, max_length_k=longest).logits[0].float()
        alone = torch.cat([model(input_ids=d[None]).logits[0].float() for d in docs])
    assert max_relative_error(packed, alone) < 2e-2
