"""The errors the trainer raises for bad input and for runs that cannot go on.

This module imports nothing from the trainer, so any module can raise them without an import cycle.
Each message names what to fix: the key, the file and line, or the field.
"""


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key."""


class DataError(ValueError):
    """Bad input data, reported in one line naming the file and line or field."""


class UnsafeCheckpoint(DataError):
    """A checkpoint file that would run code when loaded."""


class BudgetError(ValueError):
    """A sequence longer than the micro-batch token budget."""


class TrainingError(RuntimeError):
    """The run cannot go on (for example a non-finite loss); the message says why."""


class SyncCheckError(RuntimeError):
    """The engine's log-probs differ from the trainer's beyond grpo.engine.sync_check_max_gap."""


class UnparseableGold(ValueError):
    """A gold answer that math-verify cannot parse, so no completion can be scored against it."""
