"""Loading a local Hugging Face causal LM and its tokenizer, and the loss module FSDP wraps."""

import os

import torch
from torch import nn

from fastmath_kernels import linear_cross_entropy

from .attention import DOCUMENT_MASKED, register_document_attention
from .data import DataError


def resolve_dtype(name, device, trainable=False):
    """auto: fp32 on CPU; on GPU bf16 for inference and fp32 master weights for training.

    A trained GPU model still computes in bf16: FSDP's mixed-precision policy casts its
    parameters for each forward, and a single process runs the forward under autocast.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and not trainable else torch.float32
    return getattr(torch, name)


def load_tokenizer(model_config):
    from transformers import AutoTokenizer

    path = model_config.path
    if not os.path.isdir(path):
        raise DataError(f"{path}: model directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: no usable tokenizer ({str(error).splitlines()[0][:160]})") from None
    if model_config.chat_template:
        tokenizer.chat_template = model_config.chat_template
    if not tokenizer.chat_template:
        raise DataError(f"{path}: the tokenizer has no chat template; set model.chat_template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_config, device, trainable=False):
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_config.dtype, device, trainable)
    if model_config.attn_implementation == DOCUMENT_MASKED:
        register_document_attention()
    if trainable and dtype in (torch.bfloat16, torch.float16) and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"model.dtype={model_config.dtype}: the optimizer steps {dtype} weights, and updates smaller than "
            "about 1/256 of a weight round away; model.dtype=auto trains fp32 weights with bf16 compute",
            flush=True,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_config.path, dtype=dtype, trust_remote_code=model_config.trust_remote_code,
            attn_implementation=model_config.attn_implementation,
        )
    except (OSError, ValueError) as error:
        raise DataError(f"{model_config.path}: could not load the model ({str(error).splitlines()[0][:160]})") from None
    return model.to(device)


class CausalLMLoss(nn.Module):
    """The root module FSDP wraps: backbone, then the fused-linear loss on the final hidden states.

    The loss runs inside the root's forward, where FSDP has gathered the root's own parameters,
    so lm_head.weight (tied to the embeddings or not) is a whole tensor there. The full logits
    are never computed.
    """

    def __init__(self, causal_lm, low_memory_loss=False):
        super().__init__()
        self.causal_lm = causal_lm
        self.low_memory_loss = low_memory_loss
        # Set when the parameters stay fp32 without FSDP's cast (one process on a GPU): the
        # backbone then runs under autocast and the loss takes hidden and weight in this dtype.
        self.autocast_dtype = None

    def forward(self, input_ids, position_ids, attention_mask=None, targets=None, head=None,
                document_boundaries=None, longest_document=None):
        """The summed cross-entropy at targets, or head(hidden, lm_head_weight) when a head is given.

        GRPO passes its own head (token log-probs and the clipped loss); it runs here, inside the
        root's forward, for the same reason as the cross-entropy. Packed rows come with
        document_boundaries (cumulative lengths over the flattened rows) and longest_document;
        the document-masked attention reads them under transformers' names for packed rows.
        """
        packing = {}
        if document_boundaries is not None:
            packing = dict(cu_seq_lens_q=document_boundaries, cu_seq_lens_k=document_boundaries,
                           max_length_q=longest_document, max_length_k=longest_document)
        autocast = self.autocast_dtype is not None
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype, enabled=autocast):
            # No KV cache in training: it is never read, and its presence stops transformers from
            # separating packed documents by their position ids in its own attention paths.
            hidden = self.causal_lm.model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                **packing
            ).last_hidden_state
        weight = self.causal_lm.lm_head.weight
        if autocast:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        if head is not None:
            return head(hidden, weight)
        return linear_cross_entropy(hidden, weight, targets, reduction="sum", low_memory=self.low_memory_loss)
