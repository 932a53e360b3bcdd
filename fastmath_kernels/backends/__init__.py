"""The built-in backends, one module each; importing a module declares its backend and registers
its implementation of every op it covers (see _registry). row_kernels is shared glue, not a backend.

A new backend is one such module: declare_backend(name, device rule, priority=..., automatic_on=...)
and one register_backend(op, name, implementation) per op, each implementation satisfying the
op's contract (the Protocol next to the op's public function).
"""

from . import cuda, torch_reference, triton

BUILTIN = (cuda, triton, torch_reference)
