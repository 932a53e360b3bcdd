"""Kernel microbenchmarks: one module per op, run together by `python -m bench`."""
