"""What users would otherwise run, wrapped as benchmark implementations.

Peers come from the optional extra `pip install -e .[bench]`: Liger-Kernel, TRL and
cut-cross-entropy. A peer whose library is missing, or that cannot run on this device, keeps a
row saying why; none is silently dropped. Every wrapper computes the same function as the
fastmath op it is compared with. Libraries are imported only when their peer is built.
"""

import importlib

import torch
import torch.nn.functional as F

from .harness import Implementation, PeerUnavailable, unavailable

TRITON_ON_CPU = "Triton kernel: on CPU it runs only through the Triton interpreter, too slow to time"
VOCAB_CHUNK = 4096  # vocabulary columns per chunk in the chunked torch peers


def import_peer(module_name, package):
    try:
        return importlib.import_module(module_name)
    except Exception as error:  # ImportError, or a library that fails while importing
        first_line = str(error).splitlines()[0][:80] if str(error) else ""
        raise PeerUnavailable(
            f"{package} not importable ({type(error).__name__}: {first_line}); pip install -e .[bench]"
        ) from error


def naive_cross_entropy(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets)


def naive_linear_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


# Per-token log-probs of hidden @ weight.T from each peer: (hidden [N, H], weight [V, H], targets [N]) -> [N].

def _liger_chunked_logprobs():
    module = import_peer("liger_kernel.chunked_loss.fused_linear_ppo", "liger-kernel")
    function = module._ChunkedSelectiveLogProbFunction
    return lambda hidden, weight, targets: function.apply(hidden, weight, targets, None, 1.0, VOCAB_CHUNK)


def _trl_chunked_logprobs():
    function = import_peer("trl.kernels", "trl").ChunkedLogProbFunction
    return lambda hidden, weight, targets: function.apply(
        hidden, weight, None, targets, 1.0, VOCAB_CHUNK, None, 1.0, ())[0]


def _trl_selective_log_softmax():
    selective = import_peer("trl.trainer.utils", "trl").selective_log_softmax
    return lambda hidden, weight, targets: selective(hidden @ weight.T, targets)


LINEAR_LOGPROB_PEERS = {
    "liger chunked logprobs (torch)": _liger_chunked_logprobs,
    "trl ChunkedLogProbFunction": _trl_chunked_logprobs,
    "trl selective_log_softmax": _trl_selective_log_softmax,
}


def linear_logprob_peers(make_run):
    """One Implementation per log-prob peer; make_run(logprob_fn) -> run(inputs)."""
    return [
        Implementation(name, lambda factory=factory: make_run(factory()))
        for name, factory in LINEAR_LOGPROB_PEERS.items()
    ]


def liger_fused_linear_cross_entropy(device, fp32_weight_grad=False):
    """Liger's default sums the weight gradient in the weight's dtype; accum_dtype=float32 keeps
    an fp32 buffer, the numerics fastmath's default has."""
    name = "liger fused linear CE (Triton)" + (", fp32 accumulation" if fp32_weight_grad else "")
    if device != "cuda":
        return unavailable(name, TRITON_ON_CPU)

    def make():
        liger = import_peer("liger_kernel.transformers", "liger-kernel")
        options = {"accum_dtype": torch.float32} if fp32_weight_grad else {}
        loss_fn = liger.LigerFusedLinearCrossEntropyLoss(**options)

        def run(inputs):
            hidden, weight, targets, _ = inputs
            hidden.grad = weight.grad = None
            loss_fn(weight, hidden, targets).backward()  # Liger takes the weight first

        return run

    return Implementation(name, make)


def cut_cross_entropy(device):
    if device != "cuda":
        return unavailable("cut-cross-entropy", "its Triton kernel does not run on CPU")

    def make():
        module = import_peer("cut_cross_entropy", "cut-cross-entropy")

        def run(inputs):
            hidden, weight, targets, _ = inputs
            hidden.grad = weight.grad = None
            module.linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean").backward()

        return run

    return Implementation("cut-cross-entropy", make)
