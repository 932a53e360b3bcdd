"""Document-masked attention for packed rows, registered with transformers' attention registry.

A packed row holds several documents; position ids restart at 0 where each one begins. Every
token attends to the earlier tokens of its own document only, and no [L, L] tensor is built:

- CUDA, bf16/fp16: `torch.nn.attention.varlen.varlen_attn` (flash kernels, causal tiles skipped)
  over cumulative document lengths;
- otherwise (CPU, fp32, or a torch without varlen): causal SDPA over documents of similar
  length gathered into small batches, so memory stays linear in the row's tokens.

Any Hugging Face causal LM loaded with `attn_implementation="document_masked"` uses it. Calls
that carry a padding mask or a KV cache (generation, padded batches) take transformers' own
SDPA path, so the same model also samples.
"""

import inspect
import math

import torch
import torch.nn.functional as F

from fastmath_kernels import planned_device_type as device_type

DOCUMENT_MASKED = "document_masked"

# A group's padded size may exceed its real tokens by this factor, or by this many tokens where
# that is more: many short documents then share one SDPA call (the CPU path's only waste).
GROUP_PADDING_SLACK = 1.25
GROUP_PADDING_TOKENS = 2048


def document_boundaries(lengths, device=None):
    """(cumulative lengths as int32 [n + 1], longest document) of documents laid end to end."""
    cumulative = [0]
    for length in lengths:
        cumulative.append(cumulative[-1] + length)
    return torch.tensor(cumulative, dtype=torch.int32, device=device), max(lengths)


def packed_inputs(input_ids, position_ids, document_lengths):
    """The model inputs of packed rows: token and position ids with the boundaries of the documents
    laid end to end over the flattened rows (what document-masked attention reads)."""
    cumulative, longest = document_boundaries(document_lengths)
    return {"input_ids": input_ids, "position_ids": position_ids, "document_boundaries": cumulative,
            "longest_document": longest}


def boundaries_from_positions(position_ids, batch, length, device):
    """Document boundaries of the flattened [B * L] tokens: a document starts where its position is 0.

    One host sync; the trainer passes the boundaries it already knows instead.
    """
    if position_ids is None:
        return document_boundaries([length] * batch, device)
    starts = (position_ids.expand(batch, length).reshape(-1) == 0).nonzero().flatten().tolist()
    row_starts = set(range(0, batch * length, length))
    starts = sorted(set(starts) | row_starts)  # a row always begins a document
    lengths = [end - start for start, end in zip(starts, starts[1:] + [batch * length])]
    return document_boundaries(lengths, device)


def _varlen_options():
    """Keyword arguments of this torch's varlen_attn for causal attention, or None where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in parameters, "scale" in parameters


_VARLEN = _varlen_options()


def _repeat_heads(tensor, groups, dim):
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=dim)


def varlen_usable(query, scaling, dropout=0.0):
    """Whether the flash varlen kernels compute this call exactly (they have no dropout)."""
    if _VARLEN is None or device_type(query.device) != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    if dropout:
        return False
    has_scale = _VARLEN[3]
    return has_scale or scaling is None or math.isclose(scaling, query.shape[-1] ** -0.5)


def varlen_document_attention(query, key, value, cumulative, longest, scaling):
    """[T, Hq, D] queries, [T, Hkv, D] keys and values -> [T, Hq, D] through flash varlen kernels."""
    varlen_attn, causal, has_gqa, has_scale = _VARLEN
    options = dict(causal)
    if has_scale and scaling is not None:
        options["scale"] = scaling
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and has_gqa:
        options["enable_gqa"] = True
    elif groups > 1:
        key, value = _repeat_heads(key, groups, 1), _repeat_heads(value, groups, 1)
    return varlen_attn(query, key, value, cumulative, cumulative, longest, longest, **options)


def length_groups(lengths, slack=GROUP_PADDING_SLACK, spare_tokens=GROUP_PADDING_TOKENS):
    """Document indices in groups of similar length, each padded to its longest document at a cost
    of at most max(slack x its tokens, its tokens + spare_tokens)."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    groups, current, tokens = [], [], 0
    for index in order:
        grown = tokens + lengths[index]
        if current and (len(current) + 1) * lengths[current[0]] > max(slack * grown, grown + spare_tokens):
            groups.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    if current:
        groups.append(current)
    return groups


class _GroupPlan:
    """Gather indices of one set of document boundaries, built once and reused by every layer."""

    def __init__(self, bounds, device):
        starts, lengths = bounds[:-1], [end - start for start, end in zip(bounds, bounds[1:])]
        self.bounds, self.device, self.groups = bounds, device, []
        positions = []
        for members in length_groups(lengths):
            longest = lengths[members[0]]
            first = torch.tensor([starts[m] for m in members], device=device)[:, None]
            size = torch.tensor([lengths[m] for m in members], device=device)[:, None]
            offset = torch.arange(longest, device=device)[None, :]
            valid = offset < size
            index = torch.where(valid, first + offset, first)  # pad slots read the document's first token
            self.groups.append((index, valid))
            positions.append(index[valid])
        # Every token lies in exactly one document, so the positions are a permutation of 0..T-1.
        self.order = torch.cat(positions).argsort()


_last_plan = None


def _plan_for(cumulative, device):
    global _last_plan
    bounds = cumulative.tolist()
    if _last_plan is None or _last_plan.bounds != bounds or _last_plan.device != device:
        _last_plan = _GroupPlan(bounds, device)
    return _last_plan


def grouped_document_attention(query, key, value, cumulative, scaling, dropout=0.0):
    """The exact reference: causal SDPA per document, documents of similar length batched together.

    query [T, Hq, D], key and value [T, Hkv, D]; returns [T, Hq, D]. Pad slots inside a group
    sit after each document's tokens, so causal attention never lets a real token see them.
    """
    plan = _plan_for(cumulative, query.device)
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for index, valid in plan.groups:
        def gather(tensor, index=index):
            return tensor[index].transpose(1, 2)  # [documents, heads, longest, D]

        out = F.scaled_dot_product_attention(
            gather(query), _repeat_heads(gather(key), groups, 1), _repeat_heads(gather(value), groups, 1),
            is_causal=True, scale=scaling, dropout_p=dropout,
        )
        pieces.append(out.transpose(1, 2)[valid])
    return torch.cat(pieces)[plan.order]


def document_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [B, Hq, L, D], key/value [B, Hkv, L, D].

    Returns ([B, L, Hq, D], None). Training passes `cu_seq_lens_q` and `max_length_q` (the
    names transformers uses for packed rows); without them the boundaries come from
    `position_ids`.
    """
    batch, heads, length, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"model.attn_implementation={DOCUMENT_MASKED} does not support softcapping; "
                         "choose flash_attention_2 for this model")
    cumulative, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cumulative is None:
        cumulative, longest = boundaries_from_positions(kwargs.get("position_ids"), batch, length, query.device)
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:
        raise ValueError(
            f"a {longest}-token document is longer than this model's {window}-token sliding window, which "
            f"model.attn_implementation={DOCUMENT_MASKED} does not apply; choose flash_attention_2 for this model"
        )
    query, key, value = _autocast_operands(query, key, value)
    tokens = batch * length

    def flat(tensor):
        return tensor.transpose(1, 2).reshape(tokens, tensor.shape[1], head_dim)

    dropout = dropout if module.training else 0.0
    if varlen_usable(query, scaling, dropout):
        out = varlen_document_attention(flat(query), flat(key), flat(value), cumulative.to(query.device, torch.int32),
                                        int(longest), scaling)
    else:
        out = grouped_document_attention(flat(query), flat(key), flat(value), cumulative.cpu(), scaling, dropout)
    return out.reshape(batch, length, heads, head_dim), None


def _autocast_operands(query, key, value):
    """q, k, v in autocast's low precision where it is on, as SDPA under autocast would take them.

    Rotary embeddings in fp32 lift bf16 projections back to fp32 under autocast, which would keep
    a model with fp32 master weights off the varlen kernels.
    """
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.bfloat16, torch.float16):
            return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def _document_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (documents come from the boundaries); SDPA's mask where padding is given."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_document_attention():
    """Makes `attn_implementation="document_masked"` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DOCUMENT_MASKED, document_attention)
    AttentionMaskInterface.register(DOCUMENT_MASKED, _document_mask)
