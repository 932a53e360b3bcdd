"""linear_token_logprobs (GRPO's per-token log-probs from hidden states), forward + backward.

Every implementation computes log_softmax(hidden @ weight.T).gather(targets) and back-propagates
a random per-token upstream gradient, as a GRPO loss would.
"""

import fastmath_kernels as fk

from . import peers
from .bench_linear_cross_entropy import cases, make_inputs, work  # noqa: F401  (same shapes)
from .harness import Implementation, ready

NAME = "linear_token_logprobs"


def _logprob_run(logprob_fn):
    def run(inputs):
        hidden, weight, targets, upstream = inputs
        hidden.grad = weight.grad = None
        (logprob_fn(hidden, weight, targets.clamp_min(0)) * upstream).sum().backward()

    return run


def implementations(device):
    import torch

    impls = [
        ready("naive torch", _logprob_run(peers.naive_linear_logprobs)),
        Implementation(
            "torch.compile naive",
            lambda: _logprob_run(torch.compile(peers.naive_linear_logprobs, dynamic=True)),
        ),
        ready("fastmath", _logprob_run(fk.linear_token_logprobs)),
    ]
    if device == "cuda":
        impls.append(ready(
            "fastmath triton", _logprob_run(lambda h, w, t: fk.linear_token_logprobs(h, w, t, backend="triton"))
        ))
    impls.extend(peers.linear_logprob_peers(_logprob_run))
    return impls
