"""Rollout engines: prompts in, sampled completions out, behind one contract (base.py).

This package holds the contract and its registry (base.py), the engines (hf.py, vllm.py), keyed
sampling, and what every engine shares: weight syncs from the trainer's policy and the dealing
of evaluation problems across ranks.
"""

import importlib
import pkgutil

from .base import (
    ENGINES,
    Completion,
    RolloutEngine,
    RolloutShape,
    SamplingSettings,
    engine_class,
    eval_sampling,
    register_engine,
)
from .shares import gather_shares, merge_shares, rank_share, sample_problems
from .weights import ensure_engine_weights, sync_weights

__all__ = ["ENGINES", "Completion", "RolloutEngine", "RolloutShape", "SamplingSettings", "engine_class",
           "ensure_engine_weights", "eval_sampling", "gather_shares", "merge_shares", "rank_share",
           "register_engine", "sample_problems", "sync_weights"]

# Every module here is imported, so an engine registers by its @register_engine alone.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
