"""Backend choice for every op: "cuda" (csrc/ extension), "triton", or "torch" (reference).

Auto choice (backend=None): CUDA tensors go to the op's fastest available GPU backend, CPU
tensors to "torch". FASTMATH_BACKEND replaces the auto choice wherever the named backend can
run on the tensors; an explicit backend= argument wins over both, and raises if it cannot run.
On a machine without a GPU, Triton kernels run through the Triton interpreter, which
fastmath_kernels.triton switches on before it defines any kernel.
"""

import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "torch")
BACKEND_ENV = "FASTMATH_BACKEND"

try:
    from . import _C  # noqa: F401  (loading registers torch.ops.fastmath.*)

    HAS_CUDA_EXT = True
    CUDA_EXT_IMPORT_ERROR = None
except ImportError as error:
    HAS_CUDA_EXT = False
    CUDA_EXT_IMPORT_ERROR = error

HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_cuda_op(name):
    """Whether the loaded extension defines torch.ops.fastmath.<name> (an older build may not)."""
    return HAS_CUDA_EXT and hasattr(torch.ops.fastmath, name)


def triton_interpreter_enabled():
    """True when Triton kernels run on the CPU through the interpreter.

    Without a visible GPU the interpreter is on unless TRITON_INTERPRET is explicitly "0".
    """
    setting = os.environ.get("TRITON_INTERPRET")
    if setting is None:
        return not torch.cuda.is_available()
    return setting == "1"


def available_backends():
    """Backends that can run on this machine, fastest first."""
    backends = []
    gpu = torch.cuda.is_available()
    if HAS_CUDA_EXT and gpu:
        backends.append("cuda")
    if HAS_TRITON and (gpu or triton_interpreter_enabled()):
        backends.append("triton")
    backends.append("torch")
    return backends


def _check_backend_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _runs_on(backend, tensor):
    if backend == "cuda":
        return HAS_CUDA_EXT and tensor.is_cuda
    if backend == "triton":
        return HAS_TRITON and (tensor.is_cuda or triton_interpreter_enabled())
    return True


def _automatic_choice(tensor, gpu_preference):
    if tensor.is_cuda:
        for candidate in gpu_preference:
            if candidate in available_backends():
                return candidate
    return "torch"


def resolve_backend(backend, tensor, gpu_preference=("cuda", "triton")):
    """The backend that will run an op on `tensor`; raises ValueError if it cannot run there.

    gpu_preference is the op's own order of GPU backends, fastest measured first.
    """
    if backend is None:
        # FASTMATH_BACKEND is a preference for the whole process: it applies where that
        # backend can run on the tensor's device; elsewhere the automatic choice stands.
        preferred = os.environ.get(BACKEND_ENV)
        if preferred:
            _check_backend_name(preferred, BACKEND_ENV)
            if _runs_on(preferred, tensor):
                return preferred
        return _automatic_choice(tensor, gpu_preference)
    _check_backend_name(backend, "backend")
    if backend == "cuda":
        if not HAS_CUDA_EXT:
            raise ValueError(
                f"backend='cuda' needs the compiled extension fastmath_kernels._C, which did "
                f"not load ({CUDA_EXT_IMPORT_ERROR}); reinstall with a CUDA build of torch and nvcc"
            )
        if not tensor.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {tensor.device}")
    elif backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not tensor.is_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' got a tensor on {tensor.device}; Triton runs CPU tensors "
                "only through its interpreter (TRITON_INTERPRET=1)"
            )
    return backend
