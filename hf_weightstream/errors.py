"""Exceptions raised by hf_weightstream.

Each error says what is wrong and what to do about it: users meet these in notebooks, far from our code.
They subclass the built-in exception a caller would already catch (``ValueError`` for bad arguments,
``OSError`` for files), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class StreamConfigError(ValueError):
    """A streaming option is unknown or has a value we cannot use."""


class CheckpointError(OSError):
    """A checkpoint file is missing, truncated, corrupt, or not in a format we can stream."""


class BudgetError(ValueError):
    """The memory budget cannot hold what a forward pass needs at once."""


class StreamingRuntimeError(RuntimeError):
    """Streaming failed while the model was running (a read failed, or the model was misused)."""


class StreamingUnsupportedError(StreamConfigError):
    """This model cannot be streamed (yet); the message says why and how to load it instead."""
