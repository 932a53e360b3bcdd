"""Triton kernels and their launchers. Imported lazily, on the first call with backend="triton".

Triton decides at kernel definition whether a kernel is compiled for a GPU or run by its
interpreter, so without a visible GPU the interpreter is switched on here, before any kernel
module below is imported. An explicit TRITON_INTERPRET setting is respected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
