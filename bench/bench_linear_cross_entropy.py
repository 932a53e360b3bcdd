"""linear_cross_entropy (the SFT loss from hidden states), forward + backward, against its peers.

Every implementation computes F.cross_entropy(hidden @ weight.T, targets) with ignore_index
-100 on one token in ten, the way SFT masks prompt tokens.
"""

import torch

import fastmath_kernels as fk

from . import peers
from .harness import Implementation, ready

NAME = "linear_cross_entropy"
IGNORE_EVERY = 10


def cases(device):
    if device == "cuda":
        return [dict(group="N sweep", N=n, H=4096, V=151936, dtype="bfloat16") for n in (4096, 16384)]
    return (
        [dict(group="N sweep", N=n, H=256, V=32768, dtype="float32") for n in (1024, 2048, 4096)]
        + [dict(group="V sweep", N=512, H=256, V=v, dtype="float32") for v in (32768, 151936)]
        + [dict(group="bf16", N=1024, H=256, V=32768, dtype="bfloat16")]
    )


def make_inputs(case, device):
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    hidden = torch.randn(case["N"], case["H"], generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(case["V"], case["H"], generator=generator) / case["H"] ** 0.5).to(device, dtype)
    targets = torch.randint(0, case["V"], (case["N"],), generator=generator)
    targets[::IGNORE_EVERY] = -100
    upstream = torch.randn(case["N"], generator=generator).to(device)
    return hidden, weight.requires_grad_(), targets.to(device), upstream


def work(case):
    return {"flops": 6 * case["N"] * case["H"] * case["V"]}


def _loss_run(loss_fn):
    def run(inputs):
        hidden, weight, targets, _ = inputs
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, targets).backward()

    return run


def _from_logprobs(logprob_fn):
    def loss(hidden, weight, targets):
        counted = targets != -100
        return -logprob_fn(hidden[counted], weight, targets[counted]).mean()

    return _loss_run(loss)


def _scaled_default_chunk(factor, backend=None):
    def loss(hidden, weight, targets):
        from fastmath_kernels.chunked_linear import default_chunk_size

        chunk_size = factor * default_chunk_size(targets.numel(), weight.shape[0], hidden.device)
        return fk.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, backend=backend)

    return loss


def implementations(device):
    impls = [
        ready("naive torch", _loss_run(peers.naive_cross_entropy)),
        Implementation(
            "torch.compile naive",
            lambda: _loss_run(torch.compile(peers.naive_cross_entropy, dynamic=True)),
        ),
        ready("fastmath", _loss_run(fk.linear_cross_entropy)),
        ready("fastmath low_memory", _loss_run(lambda h, w, t: fk.linear_cross_entropy(h, w, t, low_memory=True))),
    ]
    if device == "cuda":
        impls.append(ready(
            "fastmath triton", _loss_run(lambda h, w, t: fk.linear_cross_entropy(h, w, t, backend="triton"))
        ))
        # Larger chunks: fewer passes over the fp32 weight-gradient buffer, larger logits buffers.
        impls.append(ready("fastmath 2x chunk", _loss_run(_scaled_default_chunk(2))))
        impls.append(ready("fastmath 4x chunk", _loss_run(_scaled_default_chunk(4))))
        impls.append(ready("fastmath triton 2x chunk", _loss_run(_scaled_default_chunk(2, "triton"))))
    impls.append(peers.liger_fused_linear_cross_entropy(device))
    if device == "cuda":
        impls.append(peers.liger_fused_linear_cross_entropy(device, fp32_weight_grad=True))
    impls.extend(peers.linear_logprob_peers(_from_logprobs))
    impls.append(peers.cut_cross_entropy(device))
    return impls
