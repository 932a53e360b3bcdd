"""The GRPO policy loss from hidden states, forward + backward, against its peers.

Every implementation computes the DAPO-aggregated clipped loss (token mean over the completion
mask) of log_softmax(hidden @ weight.T) at the sampled tokens, with old log-probs from the
sampling policy and one advantage per sequence, beta = 0. fastmath composes
linear_token_logprobs and grpo_token_loss; Liger's chunked GRPO loss does the same in one
module; the naive version materialises the logits.
"""

import torch

import fastmath_kernels as fk

from .harness import Implementation, ready
from .peers import TRITON_ON_CPU, import_peer, naive_linear_logprobs

NAME = "grpo_loss"
EPS = 0.2


def cases(device):
    if device == "cuda":
        return [dict(group="N sweep", N=n, H=4096, V=151936, dtype="bfloat16") for n in (4096, 16384)]
    return [dict(group="N sweep", N=n, H=256, V=32768, dtype="float32") for n in (1024, 4096)]


SEQUENCE_LENGTH = 512


def make_inputs(case, device):
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    length = min(SEQUENCE_LENGTH, case["N"])
    sequences = case["N"] // length
    hidden = torch.randn(sequences, length, case["H"], generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(case["V"], case["H"], generator=generator) / case["H"] ** 0.5).to(device, dtype)
    tokens = torch.randint(0, case["V"], (sequences, length), generator=generator).to(device)
    lengths = torch.randint(length // 4 + 1, length + 1, (sequences,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float().to(device)
    old_logp = (-8.0 + 0.1 * torch.randn(sequences, length, generator=generator)).to(device)
    advantages = torch.randn(sequences, generator=generator).to(device)
    return hidden, weight.requires_grad_(), tokens, mask, old_logp, advantages


def work(case):
    return {"flops": 6 * case["N"] * case["H"] * case["V"]}


def _clipped(logp, old_logp, advantages, mask):
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - EPS, 1 + EPS) * advantages[:, None]
    return (-torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()


def naive(inputs):
    hidden, weight, tokens, mask, old_logp, advantages = inputs
    hidden.grad = weight.grad = None
    logp = naive_linear_logprobs(hidden.flatten(0, 1), weight, tokens.flatten()).view(tokens.shape)
    _clipped(logp, old_logp, advantages, mask).backward()


def _fastmath(low_memory):
    def run(inputs):
        hidden, weight, tokens, mask, old_logp, advantages = inputs
        hidden.grad = weight.grad = None
        logp = fk.linear_token_logprobs(hidden, weight, tokens, low_memory=low_memory)
        per_token = fk.grpo_token_loss(logp, old_logp, advantages, eps_low=EPS)
        ((per_token * mask).sum() / mask.sum()).backward()

    return run


def _liger_chunked():
    module = import_peer("liger_kernel.chunked_loss", "liger-kernel")
    loss_fn = module.LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, compiled=False, epsilon_low=EPS, epsilon_high=EPS, loss_type="dapo",
        temperature=1.0,
    )

    def run(inputs):
        hidden, weight, tokens, mask, old_logp, advantages = inputs
        hidden.grad = weight.grad = None
        loss, _ = loss_fn(hidden, weight, tokens, mask, advantages, old_per_token_logps=old_logp)
        loss.backward()

    return run


def _naive_compiled():
    compiled_loss = torch.compile(
        lambda h, w, t, m, o, a: _clipped(
            naive_linear_logprobs(h.flatten(0, 1), w, t.flatten()).view(t.shape), o, a, m),
        dynamic=True,
    )

    def run(inputs):
        inputs[0].grad = inputs[1].grad = None
        compiled_loss(*inputs).backward()

    return run


def implementations(device):
    impls = [
        ready("naive torch", naive),
        Implementation("torch.compile naive", _naive_compiled),
        ready("fastmath", _fastmath(low_memory=False)),
        Implementation("liger chunked GRPO loss (torch)", _liger_chunked),
    ]
    if device == "cuda":  # on CPU the torch path already slices the vocabulary either way
        impls.insert(3, ready("fastmath low_memory", _fastmath(low_memory=True)))
    if device != "cuda":
        impls.append(Implementation("liger triton_grpo_loss", None, TRITON_ON_CPU))
    return impls
