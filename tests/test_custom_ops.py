"""The torch.library registrations of the CUDA ops, checked without a GPU.

On meta tensors torch.library.opcheck exercises the schema, the fake (shape) functions and the
autograd registration; the kernels themselves are checked against references under `gpu`.
"""

import pytest
import torch

import fastmath_kernels as fk
from fastmath_kernels._dispatch import has_cuda_op

pytestmark = pytest.mark.skipif(not fk.HAS_CUDA_EXT, reason="the CUDA extension is not built here")

META = "meta"


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


OP_CASES = [
    ("group_advantages", lambda: (meta(12), 4, 1, 1e-4)),
    ("token_logprobs_forward", lambda: (meta(5, 33, dtype=torch.bfloat16), meta(5, dtype=torch.long), 0.7, True)),
    ("token_logprobs_forward", lambda: (meta(5, 33), meta(5, dtype=torch.long), 1.0, False)),
    ("grpo_token_loss_forward", lambda: (meta(3, 7), meta(3, 7), meta(3), meta(3, 7), 0.04, 0.2, 0.28)),
    ("grpo_token_loss_forward", lambda: (meta(3, 7), meta(3, 7), meta(3), None, 0.0, 0.2, 0.2)),
    ("grpo_token_loss_backward", lambda: (meta(3, 7), meta(3, 7), meta(3, 7), meta(3), None, 0.0, 0.2, 0.2)),
]


@pytest.mark.parametrize("name,make_args", OP_CASES, ids=[case[0] for case in OP_CASES])
def test_opcheck_on_meta_tensors(name, make_args):
    assert has_cuda_op(name), f"the built extension lacks torch.ops.fastmath.{name}"
    results = torch.library.opcheck(getattr(torch.ops.fastmath, name).default, make_args())
    assert all(outcome == "SUCCESS" for outcome in results.values()), results


def test_fake_shapes_and_dtypes():
    logp, entropy, lse = torch.ops.fastmath.token_logprobs_forward(
        meta(6, 50, dtype=torch.float16), meta(6, dtype=torch.long), 1.0, True
    )
    assert [t.shape for t in (logp, entropy, lse)] == [(6,), (6,), (6,)]
    assert {t.dtype for t in (logp, entropy, lse)} == {torch.float32}
    _, no_entropy, _ = torch.ops.fastmath.token_logprobs_forward(meta(6, 50), meta(6, dtype=torch.long), 1.0, False)
    assert no_entropy.shape == (0,)
    advantages = torch.ops.fastmath.group_advantages(meta(8, dtype=torch.bfloat16), 4, 0, 1e-4)
    assert advantages.shape == (8,) and advantages.dtype == torch.float32
