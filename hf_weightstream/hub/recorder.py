"""Making fetched bytes durable and committing complete shards, off the connections' threads.

Group commit: one fsync and one record update cover every range that landed since the last one, so many parallel
fetches cost one fsync instead of one each. Once recorded, a range is unlocked for other processes (they read it
from the partial file). Complete shards are verified and committed here too, at a low CPU priority: hashing never
slows the forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from .stream import ShardStream

logger = logging.getLogger(__name__)


def join_threads(threads: list[threading.Thread], timeout: float) -> bool:
    """Join ``threads`` within ``timeout`` seconds in all; True if they all ended. Skips the calling thread: a
    finalizer runs on whichever thread triggered the garbage collection, possibly one of ours."""
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threads:
        if thread is not me:
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() and t is not me for t in threads)


class Recorder:
    """The one thread that records fetched ranges and commits complete shards of a source."""

    def __init__(self, streams: dict[str, ShardStream], on_commit: Callable[[], None]) -> None:
        self._streams = streams
        self._on_commit = on_commit
        self._wake = threading.Event()
        self._stopped = False
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def poke(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopped:
                    self._thread = threading.Thread(target=self._run, name="hf_weightstream-recorder", daemon=True)
                    self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """Record everything fetched so far (no commit: exiting stays quick; the next run commits)."""
        self._stopped = True
        self._wake.set()
        if self._thread is None or join_threads([self._thread], timeout=10):
            self.flush(commit=False)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: a nice value per thread; elsewhere no-op
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            if not self._stopped:
                try:
                    self.flush(commit=True)
                except Exception:  # noqa: BLE001 - keep recording the other shards; say what happened
                    logger.exception("hf_weightstream: recording fetched bytes failed")

    def flush(self, commit: bool) -> None:
        with self._flush_lock:
            for stream in list(self._streams.values()):
                try:
                    pending, generation = stream.take_unrecorded()
                    if pending:
                        record = stream.partial.sync_and_record(pending, generation)
                        if record is None:
                            stream.reconcile()
                        else:
                            stream.recorded(record, pending)
                    if commit and stream.ready_to_commit():
                        stream.commit()
                        self._on_commit()
                except OSError as err:  # disk full, permissions: the bytes stay usable in this process
                    logger.warning("Could not save the fetched bytes of %s: %s", stream.remote.describe(), err)
                    stream.failure = err
                    self._on_commit()
