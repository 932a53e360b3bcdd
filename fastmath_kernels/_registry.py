"""One table per op, {backend name: implementation}, and the device rule of every backend.

Each op module registers its implementations when it is imported; its public function asks
_dispatch.resolve_backend for a name and looks the implementation up here. A new backend is one
register_backend call: its name is then accepted by backend= and FASTMATH_BACKEND, and listed
by available_backends() wherever its device rule lets it run.

What an implementation is depends on the op (a function, a Kernels pair, a strategy object);
the op module documents the calls it makes on it.
"""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A forward kernel and the backward that differentiates it.

    differentiable: the forward records its own gradient (plain torch ops, or a torch.library
    custom op with an autograd registration, the form torch.compile and FakeTensor see), so the
    op calls it directly. Otherwise the op's one autograd.Function pairs forward with backward.
    """

    forward: Callable
    backward: Callable | None = None
    differentiable: bool = False

    def __post_init__(self):
        if self.backward is None and not self.differentiable:
            raise ValueError("Kernels needs a backward unless its forward is differentiable")


@dataclasses.dataclass(frozen=True)
class Registration:
    implementation: object
    dtypes: frozenset | None  # the input dtypes the implementation takes; None: all of them

    def takes(self, dtype):
        return self.dtypes is None or dtype in self.dtypes


def runs_anywhere(device):
    return None


# backend name -> cannot_run_on(device): None where the backend runs, else the reason it cannot.
# Insertion order is the listing order: the built-in backends, fastest first, then newcomers.
_DEVICE_RULES = {}
_DECLARED = set()  # built-in names, kept even while no op registers them
_TABLES = {}  # op name -> {backend name: Registration}
_names = ()  # cached: resolve_backend checks names on every call


def declare_backend(backend_name, cannot_run_on):
    """Fixes where a built-in backend runs and its place in the listings."""
    _DEVICE_RULES[backend_name] = cannot_run_on
    _DECLARED.add(backend_name)
    _refresh_names()


def register_backend(op_name, backend_name, implementation, *, cannot_run_on=None, dtypes=None):
    """Adds `implementation` as op_name's `backend_name` backend.

    cannot_run_on(device) returns None where the backend can run, else the sentence that
    backend=<name> raises there. A backend has one rule for every op: a new name takes the one
    given (default: runs anywhere), a known name keeps its own. dtypes: the input dtypes the
    implementation takes; others go to the automatic choice among the op's backends that take them.
    """
    for what, name in (("op_name", op_name), ("backend_name", backend_name)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    known_rule = _DEVICE_RULES.get(backend_name)
    if known_rule is not None and cannot_run_on is not None and cannot_run_on is not known_rule:
        raise ValueError(f"backend {backend_name!r} already has a device rule; register without cannot_run_on")
    table = _TABLES.setdefault(op_name, {})
    if backend_name in table:
        raise ValueError(f"{op_name} already has a {backend_name!r} backend; unregister_backend it first")
    if known_rule is None:
        _DEVICE_RULES[backend_name] = cannot_run_on or runs_anywhere
    table[backend_name] = Registration(implementation, None if dtypes is None else frozenset(dtypes))
    _refresh_names()


def unregister_backend(op_name, backend_name):
    """Removes op_name's `backend_name` backend; a name no op registers any more is forgotten."""
    table = _TABLES.get(op_name, {})
    if backend_name not in table:
        raise ValueError(f"{op_name} has no {backend_name!r} backend")
    del table[backend_name]
    if backend_name not in _DECLARED and not any(backend_name in t for t in _TABLES.values()):
        del _DEVICE_RULES[backend_name]
    _refresh_names()


def _refresh_names():
    global _names
    _names = tuple(name for name in _DEVICE_RULES if any(name in table for table in _TABLES.values()))


def backend_names():
    """Every backend some op registers, built-ins first."""
    return _names


def op_backend_names(op_name):
    table = _TABLES.get(op_name, {})
    return tuple(name for name in _names if name in table)


def is_registered(op_name, backend_name):
    return isinstance(backend_name, str) and backend_name in _TABLES.get(op_name, ())


def registration(op_name, backend_name):
    return _TABLES[op_name][backend_name]


def implementation(op_name, backend_name):
    return _TABLES[op_name][backend_name].implementation


def cannot_run_on(backend_name, device):
    """None where the backend can run on tensors of `device`, else the reason it cannot."""
    return _DEVICE_RULES[backend_name](device)
