"""The embedded default task: a tiny model and data built locally, no downloads."""
