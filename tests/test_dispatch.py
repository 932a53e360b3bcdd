import os
import subprocess
import sys

import pytest
import torch

import fastmath_kernels as fk
from fastmath_kernels._dispatch import resolve_backend

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


@needs_cpu_only
def test_available_backends_without_gpu_in_a_fresh_process():
    # A user's plain interpreter: no TRITON_INTERPRET set, nothing imported before.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMATH_BACKEND")}
    printed = subprocess.run(
        [sys.executable, "-c", "import fastmath_kernels as f; print(f.available_backends())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert printed == "['triton', 'torch']"


@needs_cpu_only
def test_auto_choice_on_cpu_is_torch():
    assert resolve_backend(None, torch.zeros(3)) == "torch"


def test_environment_variable_replaces_the_auto_choice(monkeypatch):
    monkeypatch.setenv("FASTMATH_BACKEND", "triton")
    assert resolve_backend(None, torch.zeros(3, device="cuda" if torch.cuda.is_available() else "cpu")) == "triton"
    monkeypatch.setenv("FASTMATH_BACKEND", "jax")
    with pytest.raises(ValueError, match="FASTMATH_BACKEND"):
        fk.group_advantages(torch.randn(4), 2)


def test_explicit_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("FASTMATH_BACKEND", "jax")
    assert resolve_backend("torch", torch.zeros(3)) == "torch"


@needs_cpu_only
def test_cuda_backend_on_cpu_tensors_is_refused_before_launch():
    with pytest.raises(ValueError, match="backend='cuda'"):
        resolve_backend("cuda", torch.zeros(3))


@needs_cpu_only
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.zeros(3))
    assert "triton" not in fk.available_backends()


def test_extension_flag_matches_the_compiled_module():
    try:
        import fastmath_kernels._C  # noqa: F401

        loaded = True
    except ImportError:
        loaded = False
    assert fk.HAS_CUDA_EXT == loaded
    if loaded:
        assert hasattr(torch.ops.fastmath, "group_advantages")


@needs_cpu_only
def test_a_preferred_backend_block_wins_over_the_environment_and_ends_with_the_block(monkeypatch):
    monkeypatch.setenv("FASTMATH_BACKEND", "torch")
    rewards = torch.randn(12)
    with fk.preferred_backend("triton", "kernels.backend"):
        assert resolve_backend(None, rewards, op="group_advantages") == "triton"
        with fk.preferred_backend("torch"):
            assert resolve_backend(None, rewards, op="group_advantages") == "torch"
        assert resolve_backend(None, rewards, op="group_advantages") == "triton"
        assert resolve_backend("torch", rewards, op="group_advantages") == "torch"  # backend= still wins
        # Through the public op: the interpreter's result, equal to the reference's.
        torch.testing.assert_close(fk.group_advantages(rewards, 4), fk.group_advantages(rewards, 4, backend="torch"))
    monkeypatch.delenv("FASTMATH_BACKEND")
    assert resolve_backend(None, rewards, op="group_advantages") == "torch"
    with pytest.raises(ValueError, match="kernels.backend: unknown backend 'jax'"):
        with fk.preferred_backend("jax", "kernels.backend"):
            pass
