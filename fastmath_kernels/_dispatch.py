"""Backend choice for every op: "cuda" (csrc/ extension), "triton", "torch" (reference), or any
backend registered later (_registry.register_backend); each is declared in fastmath_kernels/backends/.

Auto choice (backend=None): among the op's backends that run on the tensors and are declared for
their device type, the one with the highest priority for that op. The built-ins give CUDA tensors
the op's fastest measured GPU backend and CPU tensors "torch". FASTMATH_BACKEND replaces the auto
choice wherever the named backend can run on the tensors; an explicit backend= argument wins over
both, and raises if it cannot run.
On a machine without a GPU, Triton kernels run through the Triton interpreter, which
fastmath_kernels.triton switches on before it defines any kernel.
"""

import contextlib
import importlib.util
import os

import torch

from ._planning import device_type
from ._registry import (
    backend_names,
    cannot_run_on,
    declared_backend,
    is_registered,
    op_backend_names,
    priority,
    registration,
)

BACKEND_ENV = "FASTMATH_BACKEND"
# Runs on every device: the automatic choice off the GPU, and the last resort for a dtype.
REFERENCE_BACKEND = "torch"

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


def __getattr__(name):
    # BACKENDS is read from the registry at each access, so later registrations are listed.
    if name == "BACKENDS":
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_backends():
    """Backends that can run on this machine, highest declared priority first."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    return [name for name in backend_names() if any(cannot_run_on(name, device) is None for device in devices)]


# (name, where it was set) of the innermost preferred_backend block; FASTMATH_BACKEND outside any.
_preferences = []


@contextlib.contextmanager
def preferred_backend(name, source="preferred_backend"):
    """Within the block, `name` replaces the automatic choice as FASTMATH_BACKEND does, and wins over
    that variable; an explicit backend= argument still wins over both. None: no change.

    source names the setting in errors (the trainer passes "kernels.backend")."""
    if name is None:
        yield
        return
    _check_backend_name(name, source, None)
    _preferences.append((name, source))
    try:
        yield
    finally:
        _preferences.pop()


def _preference():
    """(preferred backend or None, the setting it came from)."""
    return _preferences[-1] if _preferences else (os.environ.get(BACKEND_ENV), BACKEND_ENV)


def _check_backend_name(name, source, op):
    accepted = name in backend_names() if op is None else is_registered(op, name)
    if accepted:
        return
    if name not in backend_names():
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    raise ValueError(f"{source}: {op} has no {name!r} backend; choose one of {', '.join(op_backend_names(op))}")


def _runs_on(name, tensor, op):
    return (op is None or is_registered(op, name)) and cannot_run_on(name, tensor.device) is None


def _automatic_candidates(tensor, op):
    """The backends the automatic choice may pick for op on tensor, highest priority first."""
    kind = device_type(tensor.device)
    names = backend_names() if op is None else op_backend_names(op)
    candidates = [
        name for name in names if declared_backend(name).chosen_automatically_on(kind) and _runs_on(name, tensor, op)
    ]
    return sorted(candidates, key=lambda name: -priority(op, name))  # stable: ties keep the listing order


def _automatic_choice(tensor, op):
    candidates = _automatic_candidates(tensor, op)
    return candidates[0] if candidates else REFERENCE_BACKEND


def _taking_dtype(name, tensor, op):
    """name, or where its kernels do not take tensor's dtype, the automatic choice among those that do."""
    if op is None or registration(op, name).takes(tensor.dtype):
        return name
    for candidate in _automatic_candidates(tensor, op):
        if registration(op, candidate).takes(tensor.dtype):
            return candidate
    raise ValueError(f"{op}: no backend takes {tensor.dtype} tensors on {tensor.device}")


def resolve_backend(backend, tensor, op=None):
    """The backend that will run an op on `tensor`; raises ValueError if it cannot run there.

    op: the name the op registers its backends under; given, only those backends are accepted,
    their priorities for that op decide the automatic choice, and one whose kernels do not take
    tensor's dtype hands over to the automatic choice among those that do.
    """
    if backend is None:
        # A preference (preferred_backend, else FASTMATH_BACKEND) applies where that backend can
        # run on the tensor's device; elsewhere the automatic choice stands.
        preferred, source = _preference()
        if preferred:
            _check_backend_name(preferred, source, None)
            if _runs_on(preferred, tensor, op):
                return _taking_dtype(preferred, tensor, op)
        return _taking_dtype(_automatic_choice(tensor, op), tensor, op)
    _check_backend_name(backend, "backend", op)
    reason = cannot_run_on(backend, tensor.device)
    if reason is not None:
        raise ValueError(reason)
    return _taking_dtype(backend, tensor, op)
