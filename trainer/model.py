"""Loading a local Hugging Face causal LM and its tokenizer, and the loss module FSDP wraps.

Two ways to load the model: whole (`load_causal_lm`, one process or weights without
safetensors), or, for FSDP, built without weights and then filled shard by shard from the
safetensors files (`build_causal_lm_without_weights`, `load_local_shards`), so that no rank
ever holds the whole model in host memory.
"""

import contextlib
import json
import os

import torch
from torch import nn

from fastmath_kernels import linear_cross_entropy

from .attention import DOCUMENT_MASKED, register_document_attention
from .errors import DataError


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


def prepare_causal_lm_load(model_config, device, trainable):
    """The dtype to load the weights in; registers the document-masked attention where configured.

    Warns (rank 0) where trained weights would be bf16 or fp16: their optimizer updates round away.
    """
    dtype = resolve_dtype(model_config.dtype, device, trainable)
    if model_config.attn_implementation == DOCUMENT_MASKED:
        register_document_attention()
    if trainable and dtype in (torch.bfloat16, torch.float16) and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"model.dtype={model_config.dtype}: the optimizer steps {dtype} weights, and updates smaller than "
            "about 1/256 of a weight round away; model.dtype=auto trains fp32 weights with bf16 compute",
            flush=True,
        )
    return dtype


def _could_not_load(path, error):
    return DataError(f"{path}: could not load the model ({str(error).splitlines()[0][:160]})")


def load_causal_lm(model_config, device, trainable=False):
    """The whole model on `device`. On a GPU it goes there weight by weight, so host memory holds
    one weight at a time: under torchrun every rank of an evaluation loads it, 8 x 29.5 GB per
    node for the 14B model in bf16 if each went through host memory whole."""
    if device.type == "cuda" and (model := load_weight_by_weight(model_config, device, trainable)) is not None:
        return model
    from transformers import AutoModelForCausalLM

    dtype = prepare_causal_lm_load(model_config, device, trainable)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_config.path, dtype=dtype, trust_remote_code=model_config.trust_remote_code,
            attn_implementation=model_config.attn_implementation,
        )
    except (OSError, ValueError) as error:
        raise _could_not_load(model_config.path, error) from None
    return model.to(device)


SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_weights(path):
    """(the file that lists the weights, {weight name: file holding it}) of a model directory's
    safetensors weights, or None where it has none (an index json, else model.safetensors)."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{index}: not a safetensors index with a weight_map ({error})") from None
        return index, {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="pt") as handle:
                return single, dict.fromkeys(handle.keys(), single)
        except (OSError, SafetensorError) as error:
            raise DataError(f"{single}: not a readable safetensors file ({error})") from None
    return None


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and their buffers as usual.

    Parameters then cost nothing and skip their random initialisation; buffers such as the rotary
    inv_freq are computed at construction and are not in the weights files, so they stay real.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        if parameter is not None and not parameter.is_meta:
            parameter = type(parameter)(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_parameters_untouched(module):
    """Gives each meta parameter uninitialised host memory; tied parameters stay one parameter.

    Memory that is allocated but never written has no resident pages. FSDP's sharding reads only
    this rank's rows of each parameter, so the rest of the model never takes host memory. (FSDP
    itself refuses meta parameters once its root is settled, which apply_fsdp does.)
    """
    materialized = {}
    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is None or not parameter.is_meta:
                continue
            if id(parameter) not in materialized:
                materialized[id(parameter)] = type(parameter)(
                    torch.empty_like(parameter, device="cpu"), requires_grad=parameter.requires_grad
                )
            submodule._parameters[name] = materialized[id(parameter)]


def check_embeddings_tied(causal_lm):
    """Where the config ties the output embeddings to the input ones, they must be one parameter."""
    output = causal_lm.get_output_embeddings()
    tied = getattr(causal_lm.config.get_text_config(), "tie_word_embeddings", False)
    if tied and output is not None and output.weight is not causal_lm.get_input_embeddings().weight:
        raise RuntimeError(f"{causal_lm.name_or_path}: the config ties the embeddings, but the model holds two")


def build_causal_lm_without_weights(model_config, device, trainable=False):
    """The configured causal LM as from_pretrained builds it, with uninitialised parameters in host memory.

    Its buffers are computed, its parameters hold no values yet and take no resident memory
    until written: shard it, then fill each rank's shards with load_local_shards. device: where
    the model will run, which decides the dtype of model.dtype=auto.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = prepare_causal_lm_load(model_config, device, trainable)
    path = model_config.path
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=model_config.trust_remote_code,
                attn_implementation=model_config.attn_implementation,
            )
        model.config.name_or_path = path
        if model.can_generate() and os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _could_not_load(path, error) from None
    materialize_parameters_untouched(model)
    check_embeddings_tied(model)
    return model.eval()  # as from_pretrained returns it


def named_weights(causal_lm):
    """[(every name of one tensor, the tensor)] for the parameters and persistent buffers.

    A tied tensor comes once with all its names: a checkpoint may store it under any one of them.
    """
    names, tensors = {}, {}
    for name, tensor in causal_lm.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    return [(tuple(names[key]), tensors[key]) for key in tensors]


def plan_weight_reads(causal_lm, listing, files):
    """[(file, stored name, tensor)] for every tensor to fill, all found before anything is read.

    Every parameter must be in the files; a persistent buffer that is not keeps the value the
    model computed for it, as from_pretrained leaves it.
    """
    parameters = {id(parameter) for parameter in causal_lm.parameters()}
    reads = []
    for names, tensor in named_weights(causal_lm):
        stored = next((name for name in names if name in files), None)
        if stored is not None:
            reads.append((files[stored], stored, tensor))
        elif id(tensor) in parameters:
            raise DataError(f"{listing}: no weight {' or '.join(names)}")
    return reads


def reason_to_load_whole(causal_lm, path):
    """Why a model built without weights cannot be filled from these files as they are, or None.

    from_pretrained renames some checkpoints' weights and keeps some modules in fp32; a model
    that needs either loads whole, through it.
    """
    if getattr(causal_lm, "_keep_in_fp32_modules", None):
        return f"it keeps {', '.join(causal_lm._keep_in_fp32_modules)} in fp32"
    listing, files = safetensors_weights(path)
    try:
        plan_weight_reads(causal_lm, listing, files)
    except DataError as error:
        return f"its weights are stored under other names than the model's ({str(error).split(': ', 1)[-1]})"
    return None


def build_for_filling(model_config, device, trainable=False):
    """(the model built without weights, None), or (None, why it must load whole through from_pretrained)."""
    if safetensors_weights(model_config.path) is None:
        return None, "it has no safetensors weights"
    causal_lm = build_causal_lm_without_weights(model_config, device, trainable=trainable)
    reason = reason_to_load_whole(causal_lm, model_config.path)
    return (None, reason) if reason else (causal_lm, None)


def load_weight_by_weight(model_config, device, trainable=False):
    """The whole model built without weights, moved to device, then filled from the safetensors files
    one weight at a time; None where the files cannot fill it as they are (build_for_filling)."""
    causal_lm, _ = build_for_filling(model_config, device, trainable)
    if causal_lm is None:
        return None
    causal_lm.to(device)  # unwritten host pages: nothing is resident until the weights arrive
    load_local_shards(causal_lm, model_config.path)
    check_embeddings_tied(causal_lm)
    return causal_lm


def local_rows(tensor):
    """(this rank's part of tensor, the first row of it in the whole tensor).

    FSDP shards dim 0 as torch.chunk does; a tensor that is not a DTensor is whole on every rank.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach(), 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local_shape[1:]) != tuple(tensor.shape[1:]):
        raise NotImplementedError(f"a tensor of shape {list(tensor.shape)} is sharded as {tensor.placements}; "
                                  "only shards along dim 0 load from rows")
    return tensor.to_local().detach(), offset[0] if offset else 0


def _fill_local_rows(handle, file, name, tensor):
    """Copies this rank's rows of weight `name` from an open safetensors file into tensor, cast to its dtype."""
    stored = handle.get_slice(name)
    if tuple(stored.get_shape()) != tuple(tensor.shape):
        raise DataError(f"{file}: weight {name} has shape {list(stored.get_shape())}, "
                        f"the model's is {list(tensor.shape)}")
    local, start = local_rows(tensor)
    if tensor.dim() == 0:
        local.copy_(handle.get_tensor(name))
    elif local.numel() > 0:
        local.copy_(stored[start:start + local.shape[0]])  # reads only these rows of the file


def load_local_shards(causal_lm, path):
    """Fills every parameter's and persistent buffer's local part from a directory's safetensors weights.

    Each rank reads only the rows of its own shards (a tensor that is not sharded, whole); no
    collective is involved. Names are the causal LM's state-dict names; a tied weight may be
    stored under any of its names. A parameter missing from the files, or a weight of another
    shape, raises DataError naming the file and the weight.
    """
    found = safetensors_weights(path)
    if found is None:
        raise DataError(f"{path}: no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX})")
    listing, files = found
    with torch.no_grad():
        for file, name, tensor in plan_weight_reads(causal_lm, listing, files):
            _load_local_rows(file, name, tensor, listing)


def _load_local_rows(file, name, tensor, listing):
    """Opens the file for this one weight: closing it unmaps the pages read, so that the file pages a
    rank holds are those of one weight's rows, never those of its whole share of the model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            if name not in handle.keys():
                raise DataError(f"{file}: no weight {name}, which {os.path.basename(listing)} places there")
            _fill_local_rows(handle, file, name, tensor)
    except (OSError, SafetensorError) as error:
        raise DataError(f"{file}: could not read weight {name} ({str(error).splitlines()[0][:160]})") from None


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
