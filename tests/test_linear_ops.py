import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKEND_DEVICES,
    assert_fp32_accurate,
    assert_within_twice_plain_torch,
)

from fastmath_kernels import linear_cross_entropy, linear_token_logprobs

# (token shape, H, V): N=1, 3-D hidden, V and H not multiples of any block size.
SHAPES = [((1,), 8, 7), ((23,), 19, 1001), ((2, 3), 16, 257), ((40,), 32, 4099)]
REDUCTION_MODES = [(reduction, low_memory) for low_memory in (False, True) for reduction in ("mean", "sum", "none")]


def random_problem(token_shape, hidden_size, vocab_size, dtype, device, seed, ignore_every=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*token_shape, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, token_shape, generator=generator)
    if ignore_every:
        targets.view(-1)[1::ignore_every] = -100
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


def leaf(tensor):
    return tensor.detach().clone().requires_grad_()


def float64_cross_entropy(hidden, weight, targets, reduction, upstream):
    hidden, weight = leaf(hidden.double()), leaf(weight.double())
    loss = F.cross_entropy((hidden @ weight.T).flatten(0, -2), targets.flatten(), reduction=reduction)
    loss = loss.view(targets.shape) if reduction == "none" else loss
    (loss * upstream.double()).sum().backward()
    return loss, hidden.grad, weight.grad


def run_cross_entropy(hidden, weight, targets, reduction, upstream, backend, chunk_size=None, low_memory=False):
    hidden, weight = leaf(hidden), leaf(weight)
    loss = linear_cross_entropy(
        hidden, weight, targets, reduction=reduction, chunk_size=chunk_size, backend=backend, low_memory=low_memory
    )
    (loss * upstream).sum().backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction,low_memory", REDUCTION_MODES)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_cross_entropy_fp32_matches_float64(backend_device, shape, reduction, low_memory, chunk_size):
    backend, device = backend_device
    token_shape, hidden_size, vocab_size = shape
    hidden, weight, targets = random_problem(token_shape, hidden_size, vocab_size, torch.float32, device, 3,
                                             ignore_every=4)
    upstream = torch.randn(token_shape if reduction == "none" else (), device=device)
    loss, grad_hidden, grad_weight = run_cross_entropy(
        hidden, weight, targets, reduction, upstream, backend, chunk_size, low_memory
    )
    ref_loss, ref_hidden, ref_weight = float64_cross_entropy(hidden, weight, targets, reduction, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad_hidden.dtype == hidden.dtype and grad_weight.dtype == weight.dtype
    assert_fp32_accurate(loss, ref_loss, "loss")
    assert_fp32_accurate(grad_hidden, ref_hidden, "grad_hidden")
    assert_fp32_accurate(grad_weight, ref_weight, "grad_weight")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("wants", ["hidden", "weight"])
@pytest.mark.parametrize("op", ["cross_entropy", "token_logprobs"])
def test_low_memory_with_one_input_frozen(backend_device, wants, op):
    backend, device = backend_device
    hidden, weight, targets = random_problem((30,), 12, 203, torch.float32, device, 9, ignore_every=5)
    hidden_leaf = hidden.clone().requires_grad_(wants == "hidden")
    weight_leaf = weight.clone().requires_grad_(wants == "weight")
    options = dict(backend=backend, low_memory=True, chunk_size=7)
    if op == "cross_entropy":
        linear_cross_entropy(hidden_leaf, weight_leaf, targets, **options).backward()
        _, ref_hidden, ref_weight = float64_cross_entropy(hidden, weight, targets, "mean", torch.tensor(1.0))
    else:
        targets = targets.clamp_min(0)
        upstream = torch.randn(30, device=device)
        (linear_token_logprobs(hidden_leaf, weight_leaf, targets, **options) * upstream).sum().backward()
        _, _, ref_hidden, ref_weight = float64_token_logprobs(
            hidden, weight, targets, 1.0, upstream, torch.zeros_like(upstream)
        )
    if wants == "hidden":
        assert weight_leaf.grad is None
        assert_fp32_accurate(hidden_leaf.grad, ref_hidden, "grad_hidden")
    else:
        assert hidden_leaf.grad is None
        assert_fp32_accurate(weight_leaf.grad, ref_weight, "grad_weight")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", ["cross_entropy", "token_logprobs"])
def test_low_memory_peak_is_at_most_1_2x_the_gradients(backend, op):
    # bf16 gradients of 302 MB (hidden 34 MB, weight 268 MB); the default path's fp32 buffer
    # alone would be 537 MB, 1.8x of them.
    num_tokens, hidden_size, vocab_size = 8192, 2048, 65536
    hidden, weight, targets = random_problem((num_tokens,), hidden_size, vocab_size, torch.bfloat16, "cuda", 12)
    hidden.requires_grad_()
    weight.requires_grad_()
    upstream = torch.randn(num_tokens, device="cuda")
    gradient_bytes = (hidden.numel() + weight.numel()) * 2
    # cuBLAS takes its workspace from the caching allocator at the first matmul: not the op's memory.
    torch.mm(hidden[:64].detach(), weight[:64].detach().T)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if op == "cross_entropy":
        linear_cross_entropy(hidden, weight, targets, backend=backend, low_memory=True).backward()
    else:
        (linear_token_logprobs(hidden, weight, targets, backend=backend, low_memory=True) * upstream).sum().backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before
    assert hidden.grad is not None and weight.grad is not None and weight.grad.abs().max() > 0
    mib = 2**20
    assert peak_extra <= 1.2 * gradient_bytes, (
        f"peak extra {peak_extra / mib:.0f} MiB, gradients {gradient_bytes / mib:.0f} MiB")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_default_peak_is_the_fp32_weight_buffer_plus_two_chunk_buffers(backend):
    """Working memory beyond the returned gradients: the fp32 [V, H] buffer, one fp32 logits chunk
    and one bf16 logits-gradient chunk (64 MiB allowed for cuBLAS and row temporaries)."""
    from fastmath_kernels.chunked_linear import default_chunk_size

    num_tokens, hidden_size, vocab_size = 8192, 2048, 65536
    hidden, weight, targets = random_problem((num_tokens,), hidden_size, vocab_size, torch.bfloat16, "cuda", 13)
    hidden.requires_grad_()
    weight.requires_grad_()
    chunk = default_chunk_size(num_tokens, vocab_size, hidden.device)
    allowed = weight.numel() * 4 + chunk * vocab_size * (4 + 2)
    gradient_bytes = (hidden.numel() + weight.numel()) * 2
    torch.mm(hidden[:64].detach(), weight[:64].detach().T)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, targets, backend=backend).backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before
    working = peak_extra - hidden.numel() * 2  # the hidden gradient is returned, not working memory
    mib = 2**20
    print(f"{backend}: peak extra {peak_extra / mib:.0f} MiB = {peak_extra / gradient_bytes:.2f}x the bf16 gradients")
    assert weight.grad.abs().max() > 0
    assert working <= allowed + 64 * mib, f"working memory {working / mib:.0f} MiB > {allowed / mib:.0f} MiB"


def test_low_memory_default_chunks_hold_a_fraction_of_the_gradients():
    from fastmath_kernels.chunked_linear import low_memory_chunk_size

    # Recipe shape on a GPU: gradients 1.38 GB; fp32 logits plus their bf16 gradient, 6 bytes each.
    weight = torch.empty(151936, 4096, dtype=torch.bfloat16, device="meta")
    chunk = low_memory_chunk_size(16384, weight)
    gradient_bytes = (16384 + 151936) * 4096 * 2
    cpu_buffer_bytes = chunk * 151936 * 4  # on a meta (not CUDA) tensor only the fp32 logits count
    assert 0.10 * gradient_bytes < cpu_buffer_bytes <= 0.15 * gradient_bytes
    assert low_memory_chunk_size(10, weight) == 10  # never more tokens than there are
    assert low_memory_chunk_size(100_000, torch.empty(10**6, 8, device="meta")) == 64  # matmul-size floor


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction,low_memory", REDUCTION_MODES)
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(backend_device, reduction, low_memory):
    backend, device = backend_device
    hidden, weight, targets = random_problem((6,), 8, 33, torch.float32, device, 1)
    targets.fill_(-100)
    upstream = torch.ones((6,) if reduction == "none" else (), device=device)
    loss, grad_hidden, grad_weight = run_cross_entropy(
        hidden, weight, targets, reduction, upstream, backend, low_memory=low_memory
    )
    assert loss.abs().max() == 0 and torch.isfinite(loss).all()
    assert grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_custom_ignore_index(backend_device):
    backend, device = backend_device
    hidden, weight, targets = random_problem((12,), 8, 33, torch.float32, device, 2)
    targets[::3] = 7  # token 7 is ignored here although it is a valid id
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=7, backend=backend)
    expected = F.cross_entropy(hidden.double() @ weight.double().T, targets, ignore_index=7)
    assert_fp32_accurate(loss, expected, "loss")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
def test_cross_entropy_low_precision_within_twice_plain_torch(backend_device, dtype, low_memory):
    backend, device = backend_device
    hidden, weight, targets = random_problem((37,), 24, 515, dtype, device, 5, ignore_every=6)
    upstream = torch.tensor(1.0, device=device)
    loss, grad_hidden, grad_weight = run_cross_entropy(
        hidden, weight, targets, "mean", upstream, backend, chunk_size=8, low_memory=low_memory
    )
    ref_loss, ref_hidden, ref_weight = float64_cross_entropy(hidden, weight, targets, "mean", upstream)
    plain_hidden, plain_weight = leaf(hidden), leaf(weight)
    plain_loss = F.cross_entropy(plain_hidden @ plain_weight.T, targets)
    plain_loss.backward()
    assert_within_twice_plain_torch(loss, plain_loss, ref_loss, "loss")
    assert_within_twice_plain_torch(grad_hidden, plain_hidden.grad, ref_hidden, "grad_hidden")
    assert_within_twice_plain_torch(grad_weight, plain_weight.grad, ref_weight, "grad_weight")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_weight_grad_stays_accurate_over_many_chunks(backend_device):
    # 64 chunks: a bf16 sum rounded once per chunk lands near 7x plain torch's error here,
    # the fp32 buffer near 0.6x (bench/weight_grad_accumulation.py has the table).
    backend, device = backend_device
    hidden, weight, targets = random_problem((512,), 16, 131, torch.bfloat16, device, 11)
    upstream = torch.tensor(1.0, device=device)
    _, _, grad_weight = run_cross_entropy(hidden, weight, targets, "mean", upstream, backend, chunk_size=8)
    _, _, ref_weight = float64_cross_entropy(hidden, weight, targets, "mean", upstream)
    plain_weight = leaf(weight)
    F.cross_entropy(hidden @ plain_weight.T, targets).backward()
    assert_within_twice_plain_torch(grad_weight, plain_weight.grad, ref_weight, "grad_weight")


def float64_token_logprobs(hidden, weight, targets, temperature, upstream_logp, upstream_entropy):
    hidden, weight = leaf(hidden.double()), leaf(weight.double())
    log_probs = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    (logp * upstream_logp.double() + entropy * upstream_entropy.double()).sum().backward()
    return logp, entropy, hidden.grad, weight.grad


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
def test_linear_token_logprobs_fp32_matches_float64(backend_device, shape, temperature, low_memory):
    backend, device = backend_device
    token_shape, hidden_size, vocab_size = shape
    hidden, weight, targets = random_problem(token_shape, hidden_size, vocab_size, torch.float32, device, 8)
    upstream_logp = torch.randn(token_shape, device=device)
    upstream_entropy = torch.randn(token_shape, device=device)
    hidden_leaf, weight_leaf = leaf(hidden), leaf(weight)
    logp, entropy = linear_token_logprobs(
        hidden_leaf, weight_leaf, targets, temperature=temperature, with_entropy=True, chunk_size=6, backend=backend,
        low_memory=low_memory,
    )
    (logp * upstream_logp + entropy * upstream_entropy).sum().backward()
    ref = float64_token_logprobs(hidden, weight, targets, temperature, upstream_logp, upstream_entropy)
    for name, ours, expected in zip(
        ("logp", "entropy", "grad_hidden", "grad_weight"), (logp, entropy, hidden_leaf.grad, weight_leaf.grad), ref
    ):
        assert ours.shape == expected.shape, name
        assert_fp32_accurate(ours, expected, name)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,with_entropy", [(1.0, False), (0.7, True)], ids=["logp", "T0.7-entropy"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
def test_linear_token_logprobs_low_precision_within_twice_plain_torch(
    backend_device, dtype, temperature, with_entropy, low_memory
):
    backend, device = backend_device
    hidden, weight, targets = random_problem((2, 11), 24, 301, dtype, device, 6)
    generator = torch.Generator().manual_seed(16)
    upstream_logp, upstream_entropy = torch.randn(2, 2, 11, generator=generator).to(device)
    if not with_entropy:
        upstream_entropy = torch.zeros_like(upstream_entropy)
    hidden_leaf, weight_leaf = leaf(hidden), leaf(weight)
    outputs = linear_token_logprobs(
        hidden_leaf, weight_leaf, targets, temperature=temperature, with_entropy=with_entropy, chunk_size=7,
        backend=backend, low_memory=low_memory,
    )
    logp, entropy = outputs if with_entropy else (outputs, None)
    loss = (logp * upstream_logp).sum() + ((entropy * upstream_entropy).sum() if with_entropy else 0.0)
    loss.backward()
    assert hidden_leaf.grad.dtype == weight_leaf.grad.dtype == dtype
    ref_logp, ref_entropy, ref_hidden, ref_weight = float64_token_logprobs(
        hidden, weight, targets, temperature, upstream_logp, upstream_entropy
    )
    # Plain PyTorch in the same dtype: matmul, log_softmax, entropy and backward all in `dtype`.
    plain_hidden, plain_weight = leaf(hidden), leaf(weight)
    plain_log_probs = torch.log_softmax((plain_hidden @ plain_weight.T) / temperature, -1)
    plain_logp = plain_log_probs.gather(-1, targets[..., None]).squeeze(-1)
    plain_entropy = -(plain_log_probs.exp() * plain_log_probs).sum(-1)
    plain_loss = (plain_logp * upstream_logp.to(dtype)).sum()
    if with_entropy:
        plain_loss = plain_loss + (plain_entropy * upstream_entropy.to(dtype)).sum()
    plain_loss.backward()
    assert_within_twice_plain_torch(logp, plain_logp, ref_logp, "logp")
    if with_entropy:
        assert_within_twice_plain_torch(entropy, plain_entropy, ref_entropy, "entropy")
    assert_within_twice_plain_torch(hidden_leaf.grad, plain_hidden.grad, ref_hidden, "grad_hidden")
    assert_within_twice_plain_torch(weight_leaf.grad, plain_weight.grad, ref_weight, "grad_weight")


def offset_logits_problem(num_tokens, hidden_size, vocab_size, device, seed):
    """fp32 inputs whose logits are +-1e4 plus an O(1) spread, computed exactly in fp32.

    Column 0 holds each token's offset (+-1e4 in hidden, 1 in weight); the other columns are
    small integers (hidden) and sixteenths (weight), so every partial sum of the matmul is a
    multiple of 1/16 below 2^14, exact in fp32 in any order. The float64 reference then sees
    the very logits the op computes, and only the softmax near 1e4 is under test.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (num_tokens, hidden_size), generator=generator).float()
    hidden[:, 0] = 1e4 * (torch.randint(0, 2, (num_tokens,), generator=generator) * 2 - 1)
    weight = torch.randint(-16, 17, (vocab_size, hidden_size), generator=generator).float() / 16
    weight[:, 0] = 1.0
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    assert torch.equal((hidden @ weight.T).double(), hidden.double() @ weight.double().T), "fp32 logits must be exact"
    return hidden, weight, targets


def assert_weight_grad_rows_accurate(grad_weight, ref_weight):
    # Column 0 multiplies the +-1e4 offsets and is about 1e4 times the rest: each part is held
    # to its own scale, the rest row by row.
    assert_fp32_accurate(grad_weight[:, 0], ref_weight[:, 0], "grad_weight[:, 0]")
    assert_fp32_accurate(grad_weight[:, 1:], ref_weight[:, 1:], "grad_weight[:, 1:]", per_row=True)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_token_logprobs_near_1e4_fp32_matches_float64(backend_device, low_memory, temperature):
    backend, device = backend_device
    hidden, weight, targets = offset_logits_problem(13, 8, 301, device, seed=0)
    generator = torch.Generator().manual_seed(1)
    upstream_logp, upstream_entropy = torch.randn(2, 13, generator=generator).to(device)
    hidden_leaf, weight_leaf = leaf(hidden), leaf(weight)
    logp, entropy = linear_token_logprobs(
        hidden_leaf, weight_leaf, targets, temperature=temperature, with_entropy=True, chunk_size=5, backend=backend,
        low_memory=low_memory,
    )
    (logp * upstream_logp + entropy * upstream_entropy).sum().backward()
    ref_logp, ref_entropy, ref_hidden, ref_weight = float64_token_logprobs(
        hidden, weight, targets, temperature, upstream_logp, upstream_entropy
    )
    # Each token against its own log-prob and entropy, each gradient row against its own scale.
    assert_fp32_accurate(logp[:, None], ref_logp[:, None], "logp", per_row=True)
    assert_fp32_accurate(entropy[:, None], ref_entropy[:, None], "entropy", per_row=True)
    assert_fp32_accurate(hidden_leaf.grad, ref_hidden, "grad_hidden", per_row=True)
    assert_weight_grad_rows_accurate(weight_leaf.grad, ref_weight)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low_memory"])
def test_cross_entropy_near_1e4_fp32_matches_float64(backend_device, low_memory):
    backend, device = backend_device
    hidden, weight, targets = offset_logits_problem(13, 8, 301, device, seed=2)
    upstream = torch.tensor(1.0, device=device)
    loss, grad_hidden, grad_weight = run_cross_entropy(
        hidden, weight, targets, "sum", upstream, backend, chunk_size=5, low_memory=low_memory
    )
    ref_loss, ref_hidden, ref_weight = float64_cross_entropy(hidden, weight, targets, "sum", upstream)
    assert_fp32_accurate(loss, ref_loss, "loss")
    assert_fp32_accurate(grad_hidden, ref_hidden, "grad_hidden", per_row=True)
    assert_weight_grad_rows_accurate(grad_weight, ref_weight)


def test_no_grad_forward_and_frozen_weight():
    hidden, weight, targets = random_problem((9,), 8, 50, torch.float32, "cpu", 4)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert_fp32_accurate(loss, F.cross_entropy(hidden.double() @ weight.double().T, targets), "loss")
    hidden_leaf = leaf(hidden)
    linear_cross_entropy(hidden_leaf, weight, targets).backward()  # weight needs no gradient
    reference = leaf(hidden.double())
    F.cross_entropy(reference @ weight.double().T, targets).backward()
    assert_fp32_accurate(hidden_leaf.grad, reference.grad, "grad_hidden")


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(weight=torch.randn(50, 9)), "weight"),  # hidden size mismatch
        (dict(weight=torch.randn(50, 8, dtype=torch.float64)), "weight"),  # dtype mismatch
        (dict(weight=torch.randn(50)), "weight"),
        (dict(targets=torch.full((9,), 50)), "targets"),
        (dict(targets=torch.zeros(9)), "targets"),
        (dict(targets=torch.zeros(8, dtype=torch.long)), "targets"),
        (dict(reduction="avg"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="xla"), "backend"),
        (dict(low_memory="yes"), "low_memory"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    hidden, weight, targets = random_problem((9,), 8, 50, torch.float32, "cpu", 0)
    arguments = dict(hidden=hidden, weight=weight, targets=targets) | kwargs
    with pytest.raises(ValueError, match=argument):
        linear_cross_entropy(**arguments)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError, match=argument):
            linear_token_logprobs(**arguments)
