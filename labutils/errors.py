"""Errors the lab raises on purpose, so callers (the CLI, notebooks) can tell them from bugs."""


class LabError(RuntimeError):
    """Something the user can fix: a missing download, a machine without CUDA, a full GPU."""


class BadInput(LabError, ValueError):
    """An argument outside what is allowed. The message names the value given and the allowed range."""
