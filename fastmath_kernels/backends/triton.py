"""The "triton" backend: glue from the ops' contracts to the launchers in fastmath_kernels/triton/.

Those modules are imported on the first call, not here: importing them switches the Triton
interpreter on where no GPU is visible, which only a run on the "triton" backend should do.
"""

from .._dispatch import HAS_TRITON, triton_interpreter_enabled
from .._planning import device_type, is_planning
from .._registry import Kernels, declare_backend, register_backend
from .row_kernels import TokenChunkedLogprobs, row_kernel_cross_entropy

NAME = "triton"
PRIORITY = 10  # below cuda's, except for linear_cross_entropy, where cuda.py registers itself lower


def triton_cannot_run_on(device):
    if is_planning():
        # Its kernels have no fake implementations; the CUDA kernels' fakes allocate the same buffers.
        return "backend='triton' does not run on fake tensors; planning uses the CUDA kernels' fake implementations"
    if not HAS_TRITON:
        return "backend='triton' needs the triton package, which is not installed"
    if device_type(device) != "cuda" and not triton_interpreter_enabled():
        return (
            f"backend='triton' got a tensor on {device}; Triton runs CPU tensors "
            "only through its interpreter (TRITON_INTERPRET=1)"
        )
    return None


def _triton_rows_forward(logits, targets, temperature, with_entropy, workspace=None):
    from ..triton.token_logprobs import logprob_rows_forward_triton

    return logprob_rows_forward_triton(logits, targets, temperature, with_entropy)


def _triton_rows_backward(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                          workspace=None):
    from ..triton.token_logprobs import logprob_rows_backward_triton

    logprob_rows_backward_triton(grad_logits, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature)


def _triton_grpo_forward(*arguments):
    from ..triton.grpo_token_loss import grpo_token_loss_forward_triton

    return grpo_token_loss_forward_triton(*arguments)


def _triton_grpo_backward(*arguments):
    from ..triton.grpo_token_loss import grpo_token_loss_backward_triton

    return grpo_token_loss_backward_triton(*arguments)


def _group_advantages_triton(rewards, group_size, scale, eps):
    from ..triton.group_advantages import group_advantages_triton

    return group_advantages_triton(rewards, group_size, scale, eps)


declare_backend(NAME, triton_cannot_run_on, priority=PRIORITY, automatic_on=("cuda",), builtin=True)
# Not differentiable: the ops' autograd.Functions pair these forwards with their backwards.
register_backend("token_logprobs", NAME, Kernels(_triton_rows_forward, _triton_rows_backward))
register_backend("grpo_token_loss", NAME, Kernels(_triton_grpo_forward, _triton_grpo_backward))
register_backend("group_advantages", NAME, _group_advantages_triton)
register_backend("linear_token_logprobs", NAME, TokenChunkedLogprobs(NAME))
register_backend("linear_cross_entropy", NAME, row_kernel_cross_entropy(NAME))
