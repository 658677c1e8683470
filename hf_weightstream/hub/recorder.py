"""Making fetched bytes durable and committing complete shards, off the connections' threads.

Group commit: one fsync and one record update cover every range that landed since the last one, so many parallel
fetches cost one fsync instead of one each. Once recorded, a range is unlocked for other processes (they read it
from the partial file). Complete shards are verified and committed by a second thread at a low CPU priority, and
only while no forward pass computes (or once someone waits for the commits): hashing never slows the forward pass,
and never delays recording (what is not recorded is lost to a ``kill -9``).
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

RECORD_INTERVAL_S = 0.1  # at most ten fsyncs and record updates a second, whatever the number of connections


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
    """The threads that record fetched ranges and commit complete shards of a source."""

    def __init__(self, streams: dict[str, ShardStream], on_commit: Callable[[], None]) -> None:
        self._streams = streams
        self._on_commit = on_commit
        # Set while no forward pass of the model computes, or once someone waits for the commits: hashing a shard
        # is CPU work the forward pass would lose on a small machine, and nothing needs the commit before then.
        self.may_verify = threading.Event()
        self.may_verify.set()
        self._wake = threading.Event()
        self._wake_committer = threading.Event()
        self._halt = threading.Event()
        self._stopped = False
        self._flush_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def poke(self) -> None:
        if not self._threads:
            with self._start_lock:
                if not self._threads and not self._stopped:
                    for target, name in ((self._record, "recorder"), (self._commit, "committer")):
                        thread = threading.Thread(target=target, name=f"hf_weightstream-{name}", daemon=True)
                        thread.start()
                        self._threads.append(thread)
        self._wake.set()

    def stop(self) -> bool:
        """Record everything fetched so far (no commit: exiting stays quick; the next run commits). False if a thread
        is still running (a commit hashing a large shard): it may still read through the partial files."""
        self._stopped = True
        self._halt.set()
        self._wake.set()
        self._wake_committer.set()
        if not join_threads(self._threads, timeout=10):
            return False
        self.flush()
        return True

    def _record(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            if not self._stopped:
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - keep recording the other shards; say what happened
                    logger.exception("hf_weightstream: recording fetched bytes failed")
                self._wake_committer.set()
                self._halt.wait(RECORD_INTERVAL_S)  # group what lands meanwhile into the next fsync

    def _commit(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: a nice value per thread; elsewhere no-op
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stopped:
            self._wake_committer.wait()
            self._wake_committer.clear()
            for stream in list(self._streams.values()):
                if self._stopped:
                    return
                try:
                    if stream.ready_to_commit() and self._wait_to_verify():
                        stream.commit()
                        self._on_commit()
                except OSError as err:  # disk full, permissions: the bytes stay usable in this process
                    self._failed(stream, err)
                except Exception:  # noqa: BLE001 - keep committing the other shards; say what happened
                    logger.exception("hf_weightstream: committing %s failed", stream.remote.describe())

    def _wait_to_verify(self) -> bool:
        """Wait until no forward pass computes (`may_verify`); False if stopped meanwhile."""
        while not self.may_verify.wait(0.1):
            if self._stopped:
                return False
        return not self._stopped

    def flush(self) -> None:
        with self._flush_lock:
            for stream in list(self._streams.values()):
                pending, generation = stream.take_unrecorded()
                record = None
                try:
                    if pending:
                        record = stream.partial.sync_and_record(pending, generation)
                        if record is None:
                            stream.reconcile()
                except OSError as err:  # disk full, permissions: the bytes stay usable in this process
                    self._failed(stream, err)
                finally:
                    stream.recorded(record, pending)

    def _failed(self, stream: ShardStream, err: OSError) -> None:
        logger.warning("Could not save the fetched bytes of %s: %s", stream.remote.describe(), err)
        stream.failure = err
        self._on_commit()
