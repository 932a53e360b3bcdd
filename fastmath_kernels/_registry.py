"""One table per op, {backend name: implementation}, every op's contract, and every backend's declaration.

An op module states what its backends must provide with define_op(op, Contract): a typing.Protocol
whose methods carry the exact calls the op makes. A backend module (fastmath_kernels/backends/)
declares its backend once with declare_backend (name, device rule, priority, the device types where
the automatic choice may pick it) and registers one implementation per op it covers; each
implementation is checked against the op's contract. The automatic choice then takes the highest
priority among the runnable backends of an op, which a registration may override for that op alone.
"""

import dataclasses
import inspect
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


def optional_when_differentiable(method):
    """Marks a contract method an implementation may leave None when its forward is differentiable."""
    method.optional_when_differentiable = True
    return method


@dataclasses.dataclass(frozen=True)
class Backend:
    """cannot_run_on(device): None where the backend runs, else the reason it cannot (backend= raises it).
    automatic_on: device types where the automatic choice may pick it (None: every type)."""

    name: str
    cannot_run_on: Callable
    priority: int = 0
    automatic_on: tuple | None = ()
    builtin: bool = False  # kept while no op registers it, so its listing and rule survive re-registration

    def chosen_automatically_on(self, device_type):
        return self.automatic_on is None or device_type in self.automatic_on


@dataclasses.dataclass(frozen=True)
class Registration:
    implementation: object
    dtypes: frozenset | None  # the input dtypes the implementation takes; None: all of them
    priority: int | None  # this op's own priority for the backend; None: the backend's

    def takes(self, dtype):
        return self.dtypes is None or dtype in self.dtypes


def runs_anywhere(device):
    return None


_BACKENDS = {}  # backend name -> Backend, in declaration order
_CONTRACTS = {}  # op name -> its Protocol
_TABLES = {}  # op name -> {backend name: Registration}
_names = ()  # cached: resolve_backend checks names on every call


def declare_backend(name, cannot_run_on=runs_anywhere, *, priority=0, automatic_on=(), builtin=False):
    """Declares a backend before its registrations: where it runs, its priority, where it is chosen automatically."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already declared")
    _BACKENDS[name] = Backend(name, cannot_run_on, priority, None if automatic_on is None else tuple(automatic_on),
                              builtin)
    _refresh_names()


def define_op(op_name, contract):
    """Fixes what op_name's backends must provide; registrations made earlier are checked now."""
    _CONTRACTS[op_name] = contract
    for backend_name, entry in _TABLES.get(op_name, {}).items():
        _check_contract(op_name, backend_name, entry.implementation)


def register_backend(op_name, backend_name, implementation, *, cannot_run_on=None, dtypes=None, priority=None):
    """Adds `implementation` as op_name's `backend_name` backend.

    A declared backend keeps its own device rule; an undeclared name is declared here with the rule
    given (default: runs anywhere), and is chosen only when named (backend=, FASTMATH_BACKEND).
    dtypes: the input dtypes the implementation takes; others go to the automatic choice among the
    op's backends that take them. priority: this op's own order for the backend, where measurement
    differs from the backend's declared priority.
    """
    for what, name in (("op_name", op_name), ("backend_name", backend_name)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    known = _BACKENDS.get(backend_name)
    if known is not None and cannot_run_on is not None and cannot_run_on is not known.cannot_run_on:
        raise ValueError(f"backend {backend_name!r} already has a device rule; register without cannot_run_on")
    table = _TABLES.setdefault(op_name, {})
    if backend_name in table:
        raise ValueError(f"{op_name} already has a {backend_name!r} backend; unregister_backend it first")
    _check_contract(op_name, backend_name, implementation)
    if known is None:
        _BACKENDS[backend_name] = Backend(backend_name, cannot_run_on or runs_anywhere)
    table[backend_name] = Registration(implementation, None if dtypes is None else frozenset(dtypes), priority)
    _refresh_names()


def unregister_backend(op_name, backend_name):
    """Removes op_name's `backend_name` backend; a name no op registers any more is forgotten."""
    table = _TABLES.get(op_name, {})
    if backend_name not in table:
        raise ValueError(f"{op_name} has no {backend_name!r} backend")
    del table[backend_name]
    if not _BACKENDS[backend_name].builtin and not any(backend_name in t for t in _TABLES.values()):
        del _BACKENDS[backend_name]
    _refresh_names()


def _contract_methods(contract):
    """{name: function} of the calls a contract asks for (__call__: the implementation itself is called)."""
    return {
        name: value for name, value in vars(contract).items()
        if callable(value) and (name == "__call__" or not name.startswith("_"))
    }


def contract_problems(contract, implementation):
    """What `implementation` lacks to satisfy `contract`, one phrase per missing member or call."""
    problems = [f"no attribute {name!r}" for name in getattr(contract, "__annotations__", {})
                if not hasattr(implementation, name)]
    for name, method in _contract_methods(contract).items():
        member = implementation if name == "__call__" else getattr(implementation, name, None)
        if member is None and getattr(method, "optional_when_differentiable", False):
            if getattr(implementation, "differentiable", False):
                continue
        parameters = list(inspect.signature(method).parameters)[1:]  # without self
        call = f"{name}({', '.join(parameters)})"
        if not callable(member):
            problems.append(f"no callable {call}" if name != "__call__" else f"it is not callable as {call}")
            continue
        try:
            inspect.signature(member).bind(*parameters)
        except TypeError:
            problems.append(f"it cannot be called as {call}")
        except ValueError:
            pass  # no signature to read (a builtin): trusted
    return problems


def _check_contract(op_name, backend_name, implementation):
    contract = _CONTRACTS.get(op_name)
    problems = [] if contract is None else contract_problems(contract, implementation)
    if problems:
        raise TypeError(
            f"{op_name}: the {backend_name!r} backend does not satisfy {contract.__name__}: {'; '.join(problems)}"
        )


def _refresh_names():
    global _names
    # Highest priority first; equal priorities keep their declaration order.
    ordered = sorted(_BACKENDS.values(), key=lambda backend: -backend.priority)
    _names = tuple(backend.name for backend in ordered if any(backend.name in table for table in _TABLES.values()))


def backend_names():
    """Every backend some op registers, highest declared priority first."""
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


def declared_backend(backend_name):
    return _BACKENDS[backend_name]


def priority(op_name, backend_name):
    """The backend's priority for op_name: the registration's own where it gives one (op None: the declared)."""
    own = None if op_name is None else _TABLES[op_name][backend_name].priority
    return _BACKENDS[backend_name].priority if own is None else own


def cannot_run_on(backend_name, device):
    """None where the backend can run on tensors of `device`, else the reason it cannot."""
    return _BACKENDS[backend_name].cannot_run_on(device)
