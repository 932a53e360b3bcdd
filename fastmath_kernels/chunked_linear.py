"""Chunking shared by the fused-linear ops, linear_token_logprobs and linear_cross_entropy.

hidden @ weight.T is computed one chunk of tokens (or one slice of the vocabulary) at a time,
so the full [tokens, vocab] logits never exist: chunk sizes, argument checks, the chunked
matmuls with their fp32 accumulation, and the weight gradient built slice by slice.
"""

import torch

from ._checks import check_chunk_size, check_tensor
from ._planning import device_type, is_planning
from .token_logprobs import logprob_rows_backward

# Elements of one fp32 logits chunk: 32 MB on CPU (cache-friendly, a small fraction of the
# naive peak), 1 GB on GPU (large enough that the matmuls stay efficient).
_CPU_CHUNK_ELEMENTS = 1 << 23
_GPU_CHUNK_ELEMENTS = 1 << 28
# CPU matmuls with fewer rows than this lose much of their speed, whatever the vocabulary.
_CPU_MIN_CHUNK_TOKENS = 128
# low_memory keeps each pass's fp32 logits (plus, on GPU, their gradient in the weight's dtype)
# near this fraction of the gradients returned.
_LOW_MEMORY_BUFFER_FRACTION = 0.15


def default_chunk_size(num_tokens, vocab_size, device):
    if device_type(device) == "cuda":
        rows = _GPU_CHUNK_ELEMENTS // max(vocab_size, 1)
    else:
        rows = max(_CPU_MIN_CHUNK_TOKENS, _CPU_CHUNK_ELEMENTS // max(vocab_size, 1))
    return max(1, min(num_tokens, rows))


def low_memory_chunk_size(num_tokens, weight):
    """Tokens per chunk whose buffers come to about _LOW_MEMORY_BUFFER_FRACTION of the gradients."""
    vocab_size, hidden_size = weight.shape
    gradient_bytes = (num_tokens + vocab_size) * hidden_size * weight.element_size()
    # fp32 logits, plus their gradient in the weight's dtype where ChunkedLinear keeps one.
    bytes_per_logit = 4 + (weight.element_size() if has_mixed_precision_matmuls(weight) else 0)
    rows = int(_LOW_MEMORY_BUFFER_FRACTION * gradient_bytes / bytes_per_logit) // vocab_size
    # Below 64 rows the matmuls fall off a cliff (tensor-core tiles, CPU kernels alike).
    return max(1, min(num_tokens, max(rows, 64)))


def resolve_chunk_size(chunk_size, num_tokens, weight, low_memory):
    if chunk_size is not None:
        return chunk_size
    if low_memory:
        return low_memory_chunk_size(num_tokens, weight)
    return default_chunk_size(num_tokens, weight.shape[0], weight.device)


def vocab_slice_size(chunk_size, num_tokens, vocab_size):
    """Vocabulary columns per slice holding as many logits as chunk_size tokens' rows would."""
    return max(1, min(vocab_size, chunk_size * vocab_size // max(num_tokens, 1)))


def chunk_bounds(num_tokens, chunk_size):
    for start in range(0, num_tokens, chunk_size):
        yield start, min(start + chunk_size, num_tokens)


def vocab_slices(vocab_size, slice_size):
    for start in range(0, vocab_size, slice_size):
        yield start, min(start + slice_size, vocab_size)


def targets_in_slice(targets, start, end):
    """Column of each token's target inside [start, end) (clamped) and whether it is there."""
    inside = (targets >= start) & (targets < end)
    return (targets - start).clamp(0, end - start - 1)[:, None], inside


def check_linear_arguments(hidden, weight, chunk_size):
    check_tensor(hidden, "hidden", floating=True)
    check_tensor(weight, "weight", floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[-1]} "
            f"(weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)})"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast one to match")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    check_chunk_size(chunk_size)


def check_low_memory(low_memory):
    if not isinstance(low_memory, bool):
        raise ValueError(f"low_memory must be True or False, got {low_memory!r}")


# bf16/fp16 matmuls with fp32 output (CUDA, torch >= 2.8); older torch upcasts the operands.
_HAS_MIXED_PRECISION_MM = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


# Elements of the fp32 temporary when addmm cannot accumulate into fp32 itself (64 MB).
_FALLBACK_PRODUCT_ELEMENTS = 1 << 24
_FP32_ACCUMULATION_BY_DEVICE = {}


def _accumulates_into_fp32(device):
    """Whether addmm.dtype_out takes an fp32 `self` with bf16 operands on this device.

    torch releases differ: some require `self` in the operands' dtype. One tiny probe per device.
    Planning on fake tensors has nothing to probe and takes the current releases' answer, yes.
    """
    if is_planning():
        return True
    if device not in _FP32_ACCUMULATION_BY_DEVICE:
        operand = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        accumulator = torch.ones(2, 2, dtype=torch.float32, device=device)
        try:
            torch.ops.aten.addmm.dtype_out(accumulator, operand, operand, torch.float32, out=accumulator)
            # 1 + (1 * 1 + 1 * 1): the accumulator must be added, not only accepted.
            _FP32_ACCUMULATION_BY_DEVICE[device] = bool((accumulator == 3.0).all())
        except RuntimeError:
            _FP32_ACCUMULATION_BY_DEVICE[device] = False
    return _FP32_ACCUMULATION_BY_DEVICE[device]


def has_mixed_precision_matmuls(tensor):
    """Whether bf16/fp16 operands like this tensor get matmuls with an fp32 result."""
    low_precision = tensor.dtype in (torch.float16, torch.bfloat16)
    return device_type(tensor.device) == "cuda" and low_precision and _HAS_MIXED_PRECISION_MM


class ChunkedLinear:
    """hidden [N, H] @ weight [V, H].T one chunk of tokens at a time, with its gradient products."""

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight
        self.mixed_precision_gpu = has_mixed_precision_matmuls(hidden)
        # Without a mixed-precision matmul, low-precision inputs work on one fp32 weight copy.
        exact = weight.dtype == torch.float32 or self.mixed_precision_gpu
        self.weight_fp32 = weight if exact else weight.float()
        self._hidden_fp32 = None

    @property
    def hidden_fp32(self):
        if self._hidden_fp32 is None:
            self._hidden_fp32 = self.hidden.float()
        return self._hidden_fp32

    def logits_buffer(self, chunk_size):
        """One fp32 chunk of logits, reused by every chunk (fresh large allocations fault pages)."""
        rows = min(chunk_size, self.hidden.shape[0])
        return torch.empty(rows, self.weight.shape[0], dtype=torch.float32, device=self.hidden.device)

    def grad_logits_buffer(self, num_elements):
        """Flat room where the row kernels write logits gradients, or None for in place.

        With mixed-precision matmuls the gradient goes straight into the weight's dtype, the
        operand the tensor cores take: no fp32 write followed by a separate rounding pass.
        """
        if not self.mixed_precision_gpu:
            return None
        return torch.empty(num_elements, dtype=self.weight.dtype, device=self.hidden.device)

    def chunk_elements(self, chunk_size):
        return min(chunk_size, self.hidden.shape[0]) * self.weight.shape[0]

    def logits(self, start, end, buffer):
        """float32 logits of tokens [start, end), written into the front of buffer."""
        chunk, out = self.hidden[start:end], buffer[: end - start]
        if self.mixed_precision_gpu:
            return torch.ops.aten.mm.dtype_out(chunk, self.weight.T, torch.float32, out=out)
        return torch.mm(chunk.float(), self.weight_fp32.T, out=out)

    @staticmethod
    def _fp32_product(a, b, scratch=None):
        """a @ b of low-precision operands with an fp32 result, to be rounded once by the caller.

        A matmul with a bf16/fp16 output may add split-K partial sums in that precision, and the
        long reductions here (over the vocabulary, or over every token) are where it would split.
        scratch: free fp32 room of at least that many elements to write the product into.
        """
        elements = a.shape[0] * b.shape[1]
        if scratch is not None and scratch.numel() >= elements:
            out = scratch.view(-1)[:elements].view(a.shape[0], b.shape[1])
        else:
            out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
        return torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)

    @classmethod
    def _add_fp32_product(cls, accumulator, a, b):
        """accumulator (fp32) += a @ b of low-precision operands, summed in fp32."""
        if _accumulates_into_fp32(a.device):
            torch.ops.aten.addmm.dtype_out(accumulator, a, b, torch.float32, out=accumulator)
            return
        # Older torch wants addmm's `self` in the operands' dtype: add the fp32 product in row
        # blocks so that its temporary stays small.
        rows = max(1, _FALLBACK_PRODUCT_ELEMENTS // max(b.shape[1], 1))
        for start in range(0, a.shape[0], rows):
            accumulator[start:start + rows].add_(cls._fp32_product(a[start:start + rows], b))

    def vocab_slice_logits(self, start, end, flat_buffer):
        """float32 logits of every token against vocabulary rows [start, end), in flat_buffer."""
        out = flat_buffer[: self.hidden.shape[0] * (end - start)].view(-1, end - start)
        if self.mixed_precision_gpu:
            return torch.ops.aten.mm.dtype_out(self.hidden, self.weight[start:end].T, torch.float32, out=out)
        return torch.mm(self.hidden_fp32, self.weight_fp32[start:end].T, out=out)

    def write_weight_grad_slice(self, grad_logits, start, end, grad_weight):
        """grad_weight[start:end] = grad_logits.T @ hidden: one fp32 reduction over all tokens, one rounding."""
        if self.mixed_precision_gpu:
            grad_weight[start:end].copy_(self._fp32_product(grad_logits.T, self.hidden))
        elif grad_weight.dtype == torch.float32:
            torch.mm(grad_logits.T, self.hidden_fp32, out=grad_weight[start:end])
        else:
            grad_weight[start:end] = grad_logits.T @ self.hidden_fp32

    def accumulate_grads(self, grad_logits, start, end, grad_hidden, grad_weight_fp32, scratch=None):
        """grad_hidden[start:end] = grad_logits @ weight; grad_weight_fp32 += grad_logits.T @ hidden.

        scratch: the chunk's fp32 logits buffer. With mixed-precision matmuls the operand below
        is in the weight's dtype, never that buffer, so the hidden gradient's fp32 product can be
        written there instead of into an allocation of its own.
        """
        chunk = self.hidden[start:end]
        if self.mixed_precision_gpu:
            operand = grad_logits.to(self.weight.dtype)  # a no-op when written in that dtype already
            if grad_hidden is not None:
                grad_hidden[start:end].copy_(self._fp32_product(operand, self.weight, scratch))
            if grad_weight_fp32 is not None:
                self._add_fp32_product(grad_weight_fp32, operand.T, chunk)
            return
        if grad_hidden is not None:
            if grad_hidden.dtype == torch.float32:
                torch.mm(grad_logits, self.weight_fp32, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = grad_logits @ self.weight_fp32
        if grad_weight_fp32 is not None:
            grad_weight_fp32.addmm_(grad_logits.T, chunk.float())


def grad_logits_target(grad_buffer, logits):
    """The front of grad_buffer shaped like these logits, or the logits themselves."""
    return logits if grad_buffer is None else grad_buffer[: logits.numel()].view(logits.shape)


def weight_grad_buffer(weight):
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)


def finish_weight_grad(grad_weight_fp32, weight):
    return grad_weight_fp32 if weight.dtype == torch.float32 else grad_weight_fp32.to(weight.dtype)


def weight_grad_by_vocab_slices(projection, slice_size, slice_grad):
    """d(loss)/d(weight), one vocabulary slice at a time over every token (the low_memory path).

    slice_grad(grad_logits, logits, start) turns one slice's fp32 logits [N, w], whose first
    column is vocabulary id `start`, into d(loss)/d(logits) in grad_logits. Each slice's weight
    gradient then reduces over all tokens in fp32 inside one matmul and is written once, so
    there is no fp32 [V, H] buffer; the price is one more logits matmul over the vocabulary.
    """
    weight = projection.weight
    grad_weight = torch.empty_like(weight)
    num_tokens, slice_size = projection.hidden.shape[0], min(slice_size, weight.shape[0])
    logits_buffer = torch.empty(num_tokens * slice_size, dtype=torch.float32, device=weight.device)
    grad_buffer = projection.grad_logits_buffer(num_tokens * slice_size)
    for start, end in vocab_slices(weight.shape[0], slice_size):
        logits = projection.vocab_slice_logits(start, end, logits_buffer)
        grad_logits = grad_logits_target(grad_buffer, logits)
        slice_grad(grad_logits, logits, start)
        projection.write_weight_grad_slice(grad_logits, start, end, grad_weight)
    return grad_weight


def logprob_slice_backward(grad_logits, logits, targets, start, lse, entropy, grad_logp, grad_entropy, temperature,
                           backend):
    """A GPU backend's row-kernel backward on one vocabulary slice whose first column is id `start`.

    The GPU row kernels match a target only inside [0, w): targets shifted outside it add
    nothing. The torch rows would index with them instead, so the torch paths slice on their own.
    """
    logprob_rows_backward(
        grad_logits, logits, targets - start, lse, entropy, grad_logp, grad_entropy, temperature, backend
    )
