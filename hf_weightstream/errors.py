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


def not_copyable(what: str, fix: str = "") -> StreamingRuntimeError:
    """Why ``copy.deepcopy``/``pickle``/``share_memory`` of a streamed model (or a part of it) is refused, and what
    to do instead."""
    fix = fix or (
        "Load another copy with from_pretrained(..., device_map='stream') (nothing is read until it runs), or "
        "write the weights out with save_pretrained() or state_dict(). (A peft adapter with modules_to_save "
        "deep-copies the modules it trains: load it on a model loaded without streaming.)"
    )
    return StreamingRuntimeError(
        f"{what} cannot be copied, pickled or shared between processes: it belongs to a streamed model, whose "
        f"weights are not in memory but read on use by its streaming engine (with its threads and open files). {fix}"
    )
