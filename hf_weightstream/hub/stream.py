"""One remote shard being streamed: which of its bytes are present, which are being fetched and by whom.

``present`` is what this process may read from the partial file: what the record names (ours or another
process's) plus what we wrote and have not recorded yet. A range being fetched is claimed, in memory for the
threads of this process and with a byte-range lock (`RangeLocks`) for other processes, so a byte is fetched once
even when a demand read, the readahead, the filler and another process want it at the same time. A lock is held
until the bytes it covers are recorded; a process that finds a range locked waits for the record to name it
(`ShardStream.claim_missing` reports such ranges as ``foreign``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from . import cache
from .partial import PartialFile, Superseded
from .ranges import RangeSet
from .remote import RangeFetcher, RemoteFile, Yielded

# A read, or the background filler, fetches a range itself once the other process holding it (suspended, hung)
# has let nothing be recorded in the file for this long.
FOREIGN_PATIENCE_S = 60.0

logger = logging.getLogger(__name__)

MAX_MISMATCHES = 2  # complete files whose sha256 did not match before we stop refetching one
RECORD_EVERY_BYTES = 2 << 20  # a long fetch hands its bytes to the recorder this often: a kill loses less
# ... or after this long, whatever it got: on a slow link a connection takes seconds to reach 2 MiB, and 12 of them
# lost up to 24 MiB of written bytes to a kill -9 (35% more fetched in all, killed 2 s in at 2 MB/s).
RECORD_EVERY_SECONDS = 0.5
# A read needing under a quarter of what another thread's fetch still misses, behind more than a round trip's worth
# of its bytes (what one connection of bench_hub's link moves in 0.2 s; cf. schedule.MIN_DEMAND_PIECE_BYTES), has
# that fetch yield and fetches its part itself.
SPARSE_SHARE = 4
CUT_AHEAD_BYTES = 1 << 20


@dataclass(eq=False)
class Claim:
    """A byte range one fetch has taken on; others needing it wait for ``done`` instead of fetching it again.

    ``awaited``: a demand read waits for it, so the background fetch that took it must not yield it: its rest
    would only be claimed again once that read's other fetches are done, behind them on the link. ``dropped``: its
    fetch stops at its next body chunk all the same (a guess the forward pass turned out to need little of), and
    the readers waiting for part of it claim that part themselves.
    """

    start: int
    end: int
    done: threading.Event = field(default_factory=threading.Event)
    awaited: bool = False
    dropped: bool = False


@dataclass
class Claimed:
    """What `ShardStream.claim_missing` found in a range: new claims to fetch, claims of other threads to wait for,
    whether other processes are fetching part of it, and the descriptor holding the present bytes (valid even if
    the partial file is replaced later). ``sparse``: claims of other threads the read waits for only a small part
    of (see `claim_missing`)."""

    mine: list[Claim]
    waits: list[threading.Event]
    foreign: bool
    fd: int
    sparse: list[Claim] = field(default_factory=list)


class ShardStream:
    """One remote shard: present and claimed ranges, fetching claims into the partial file, and its commit."""

    def __init__(
        self,
        remote: RemoteFile,
        partial: PartialFile,
        recorded: RangeSet,
        fetcher: RangeFetcher,
        on_change: Callable[[], None],
        on_fetched: Callable[[], None],
    ) -> None:
        self.remote = remote
        self.partial = partial
        self._fetcher = fetcher
        self._on_change = on_change  # claims or files changed: the connections and the recorder look again
        self._on_fetched = on_fetched  # bytes landed: the recorder records them
        self._lock = threading.Lock()
        self.present = recorded.copy()
        self.unrecorded = RangeSet()
        self._recording = RangeSet()  # taken by the recorder, not recorded yet
        self._claims: list[Claim] = []
        self.committed: Path | None = None
        self.verified: str | None = None  # the sha256 we checked when we committed it
        self.failure: BaseException | None = None  # why the background stopped fetching this shard
        self._mismatches = 0
        self.mismatch_report: str | None = None  # said once, at the next forward pass (`HubSource.forward_began`)
        # Patience with other processes (`others_stalled`): since when they have held ranges this process wants
        # (a read's or the filler's: one clock for both) while recording nothing, and the ranges seen held since.
        # Only their records restart it: our own fetches of other ranges must not, or a busy link waits for a
        # stopped process forever.
        self._foreign_wait: float | None = None
        self._foreign_held = RangeSet()

    @property
    def size(self) -> int:
        return self.remote.size

    def missing_bytes(self) -> int:
        with self._lock:
            return 0 if self.committed else self.size - self.present.total

    # -- claims ---------------------------------------------------------------------------------------
    def _taken(self) -> RangeSet:
        """What is present or being fetched by a thread of this process (call with ``_lock`` held)."""
        taken = self.present.copy()
        taken.update((c.start, c.end) for c in self._claims)
        return taken

    def drop_if_sparse(self, claim: Claim, needed: list[tuple[int, int]]) -> None:
        """Mark ``claim`` dropped (its fetch stops) if ``needed`` holds under ``1 / SPARSE_SHARE`` of it and more
        than ``CUT_AHEAD_BYTES`` of it is still to come: not one nearly done, as the bytes already sent into its
        socket are lost when it stops (`FetchScheduler.drop_guesses`)."""
        held = sum(max(0, min(e, claim.end) - max(s, claim.start)) for s, e in needed)
        with self._lock:
            missing = self.present.gap_bytes(claim.start, claim.end)
        if held * SPARSE_SHARE < claim.end - claim.start and missing > CUT_AHEAD_BYTES:
            claim.dropped = True

    def unclaimed_bytes(self, start: int, end: int) -> int:
        """Bytes of ``[start, end)`` neither present nor being fetched by a thread of this process."""
        with self._lock:
            return self._taken().gap_bytes(start, end)

    def claim_missing(
        self, start: int, end: int, pieces: Callable[[int, int], list[tuple[int, int]]], ignore_foreign: bool = False
    ) -> Claimed:
        """Claim what nobody holds or fetches in ``[start, end)``, cut by ``pieces(start, end)``; with
        ``ignore_foreign``, also what another process has locked (it stopped making progress).

        A claim of another thread that the range needs only a small part of (under ``1 / SPARSE_SHARE`` of what it
        still misses: a few embedding rows in a head start's 10 MB piece), with more than ``CUT_AHEAD_BYTES`` to
        arrive before that part, is reported as ``sparse`` and not marked awaited: the caller asks its background
        fetch to yield, and claims that part itself once it has, instead of waiting for the piece to get there.
        """
        self.refresh()
        with self._lock:
            if self.committed is not None:
                return Claimed([], [], False, self.partial.fd)
            mine: list[Claim] = []
            waits: list[threading.Event] = []
            sparse: list[Claim] = []
            foreign = False
            for gap_start, gap_end in self.present.gaps(start, end):
                busy = [c for c in self._claims if c.start < gap_end and gap_start < c.end]
                for claim in busy:
                    first = max(gap_start, claim.start)
                    needed = min(gap_end, claim.end) - first
                    ahead = self.present.gap_bytes(claim.start, first)  # to come before it
                    missing = self.present.gap_bytes(claim.start, claim.end)
                    if claim.dropped or (ahead > CUT_AHEAD_BYTES and needed * SPARSE_SHARE < missing):
                        sparse.append(claim)
                    else:
                        claim.awaited = True
                waits.extend(c.done for c in busy)
                for s, e in RangeSet((c.start, c.end) for c in busy).gaps(gap_start, gap_end):
                    taken, elsewhere = self._lock_range(s, e)
                    if ignore_foreign:
                        taken, elsewhere = taken + elsewhere, []
                    foreign = foreign or bool(elsewhere)
                    for ts, te in taken:
                        mine.extend(Claim(ps, pe) for ps, pe in pieces(ts, te))
            self._claims.extend(mine)
        return Claimed(self._drop_recorded(mine), waits, foreign, self.partial.fd, sparse)

    def claim_next(self, start: int, end: int, limit: int) -> Claim | None:
        """Claim the first byte range of ``[start, end)`` (at most ``limit`` bytes) nobody holds or fetches; for
        background work, which skips what other processes are fetching."""
        self.refresh()
        with self._lock:
            if self.committed is not None or self.failure is not None:
                return None
            claim = None
            for gap_start, gap_end in self._taken().gaps(start, end):
                got, elsewhere = self._lock_range(gap_start, min(gap_end, gap_start + limit))
                if not got and elsewhere and self._stalled():
                    got = [(gap_start, min(gap_end, gap_start + limit))]  # taken over, as a demand read would
                if got:
                    claim = Claim(*got[0])
                    self._release_locks(got[1:])
                    break
            if claim is None:
                return None
            self._claims.append(claim)
        dropped = self._drop_recorded([claim])
        return dropped[0] if dropped else None

    def others_stalled(self) -> bool:
        """Whether other processes have held ranges this process wants for `FOREIGN_PATIENCE_S` and recorded
        nothing meanwhile: the process holding them (suspended with SIGSTOP, hung) is taken over instead of waited
        for forever."""
        with self._lock:
            return self._stalled()

    def _stalled(self) -> bool:
        return self._foreign_wait is not None and time.monotonic() - self._foreign_wait > FOREIGN_PATIENCE_S

    def _foreign_patience_restarts(self) -> None:
        self._foreign_wait, self._foreign_held = None, RangeSet()

    def _lock_range(self, start: int, end: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Take byte-range locks on the parts of ``[start, end)`` no other process holds: (taken, held elsewhere).

        Held elsewhere starts the patience clock. Taking a range seen held, not recorded, restarts it: its holder
        let go without recording (it died), and whoever holds ranges next gets a whole patience."""
        locks = self.partial.claims
        if locks.acquire(start, end):
            taken, elsewhere = [(start, end)], RangeSet()
        else:
            elsewhere = locks.busy(start, end)
            taken = []
            for s, e in elsewhere.gaps(start, end):
                if locks.acquire(s, e):
                    taken.append((s, e))
                else:
                    elsewhere.add(s, e)  # locked meanwhile
        if self._foreign_held and any(self._foreign_held.gap_bytes(s, e) < e - s for s, e in taken):
            self._foreign_patience_restarts()
        if elsewhere:
            if self._foreign_wait is None:
                self._foreign_wait = time.monotonic()
            self._foreign_held.update(elsewhere)
        return taken, list(elsewhere)

    def _drop_recorded(self, claims: list[Claim]) -> list[Claim]:
        """Give back new claims that another process recorded just before we locked them (it records, then
        unlocks; we lock, then look at the record: so nothing it fetched is fetched again)."""
        if not claims or not self.partial.claims.enabled:
            return claims
        self.refresh()
        with self._lock:
            kept = [c for c in claims if not self.present.covers(c.start, c.end)]
        for claim in claims:
            if claim not in kept:
                self.release(claim)
        return kept

    def release(self, claim: Claim) -> None:
        """Give back a claim that was never fetched."""
        self._settle(claim, claim.start, self.partial.generation)

    def _settle(self, claim: Claim, upto: int, generation: int) -> None:
        with self._lock:
            self._claims.remove(claim)
            if upto > claim.start and generation == self.partial.generation and self.committed is None:
                self.present.add(claim.start, upto)
                self.unrecorded.add(claim.start, upto)
            else:
                upto = claim.start
            self._release_locks([(upto, claim.end)])  # the fetched part stays locked until it is recorded
        claim.done.set()
        self._on_change()

    def _release_locks(self, ranges: list[tuple[int, int]]) -> None:
        for start, end in ranges:
            self.partial.claims.release(start, end)

    # -- fetching -------------------------------------------------------------------------------------
    def fetch(self, claim: Claim, out: memoryview | None, should_yield: Callable[[], bool]) -> None:
        """Fetch a claimed range into the partial file and, for a demand read, into ``out`` (its buffer)."""
        generation = self.partial.generation
        written = published = claim.start
        published_at = time.monotonic()
        superseded = False

        def sink(offset: int, chunk: memoryview) -> None:
            nonlocal written, published, published_at, superseded
            if out is not None:
                out[offset - claim.start : offset - claim.start + len(chunk)] = chunk
            if superseded:
                return
            try:
                self.partial.write(offset, chunk, generation)
            except Superseded:
                superseded = True
                if out is None:
                    raise
            else:
                written = offset + len(chunk)
                now = time.monotonic()
                if written - published >= RECORD_EVERY_BYTES or now - published_at >= RECORD_EVERY_SECONDS:
                    self._publish(published, written, generation)
                    published, published_at = written, now

        try:
            self._fetcher.fetch(self.remote, claim.start, claim.end, sink, should_yield)
        except Yielded:
            pass  # the bytes up to `written` are kept; the rest is claimed again later
        finally:
            self._settle(claim, written, generation)
            if superseded:
                self.reconcile()

    def _publish(self, start: int, end: int, generation: int) -> None:
        """Bytes of a fetch still running are on disk: readable here now, recorded (and unlocked) soon."""
        with self._lock:
            if generation == self.partial.generation and self.committed is None:
                self.present.add(start, end)
                self.unrecorded.add(start, end)
        self._on_fetched()

    # -- other processes --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Take in ranges another process recorded (a ``stat`` when nothing changed)."""
        if self.committed is not None:
            return
        changed, record = self.partial.refresh()
        if not changed:
            return
        if record is None:
            self.reconcile()  # committed or discarded elsewhere
            return
        with self._lock:
            before = self.present.total
            self.present.update(record)
            if self.present.total > before:  # another process recorded bytes: it is alive
                self._foreign_patience_restarts()

    def reconcile(self) -> None:
        """Our partial file was committed or discarded by someone else: follow it."""
        repo = self.remote.repo
        blob = repo.blob_path(self.remote.sha256)
        with self.partial.locked():
            if self.committed is not None or self.partial.is_current():
                return
            committed = cache.committed_file(self.remote)  # without symlinks: the snapshot file, not blobs/
            if committed is not None:
                self.partial.adopt(os.open(committed, os.O_RDONLY))
                with self._lock:
                    self._mark_committed(committed)
                cache.link_snapshot(repo, self.remote.shard, self.remote.sha256, new_blob=False)
            else:
                recorded = self.partial.open(blob) or RangeSet()
                with self._lock:
                    self.present, self.unrecorded = recorded, RangeSet()
        self._on_change()

    # -- durability and commit ----------------------------------------------------------------------------
    def take_unrecorded(self) -> tuple[RangeSet, int]:
        """Ranges written but not yet recorded, and the partial file generation they were written to; until
        `recorded` or `not_recorded`, the shard is not committed."""
        with self._lock:
            pending, self.unrecorded = self.unrecorded, RangeSet()
            self._recording = pending
            return pending, self.partial.generation

    def recorded(self, record: RangeSet | None, pending: RangeSet) -> None:
        """``pending`` is in the record now (merged with others' into ``record``), or will never be (None: the file
        was committed or replaced meanwhile): either way, other processes no longer wait for it."""
        with self._lock:
            if record is not None:
                self.present.update(record)
            self._release_locks(list(pending))
            self._recording = RangeSet()

    def retry_after_failure(self) -> None:
        """Let the background try again after a network or disk failure (not after repeated sha256 mismatches)."""
        with self._lock:
            if self._mismatches < MAX_MISMATCHES:
                self.failure = None

    def ready_to_commit(self) -> bool:
        with self._lock:
            return (
                self.committed is None
                and self.failure is None
                and not self.unrecorded
                and not self._recording
                and self.present.covers(0, self.size)
            )

    def commit(self) -> None:
        """Verify the complete partial file (sha256 == LFS oid) and move it into the cache; discard it if not.

        ``_on_change`` takes the scheduler's lock, so it is never called with the file lock held: a connection
        holding the scheduler's lock may be waiting for the file lock (in `refresh`).
        """
        remote = self.remote
        with self.partial.locked():
            stale = not self.partial.is_current()
            if not stale:
                try:
                    self.verified = cache.install(self.partial, remote)
                except cache.ChecksumMismatch as mismatch:
                    self._mismatch(mismatch.digest)
                    return
                with self._lock:
                    self._mark_committed(remote.repo.blob_path(remote.sha256))
        if stale:  # committed or discarded by another process meanwhile
            self.reconcile()
            return
        logger.info("%s is complete and verified: committed to the Hub cache", remote.describe())
        self._on_change()

    def _mark_committed(self, blob: Path) -> None:
        self.committed = blob
        self.present = RangeSet([(0, self.size)])
        self.unrecorded = RangeSet()

    def _mismatch(self, digest: str) -> None:
        self._mismatches += 1
        logger.warning(
            "%s: the downloaded file has sha256 %s but the Hub says %s. Discarding the %d bytes fetched and "
            "fetching the file again.",
            self.remote.describe(),
            digest,
            self.remote.sha256,
            self.size,
        )
        self.partial.discard()
        recorded = self.partial.open(self.remote.repo.blob_path(self.remote.sha256)) or RangeSet()
        with self._lock:
            self.present, self.unrecorded = recorded, RangeSet()
            self.mismatch_report = (
                f"{self.remote.describe()} did not match its sha256 (the Hub says {self.remote.sha256}, the bytes "
                f"fetched hash to {digest}): the server or the network corrupted it. Outputs computed since the "
                "model read this file may be wrong; its weights were dropped and the file is fetched again, so the "
                "next call reads checked bytes once it is complete."
            )
            if self._mismatches >= MAX_MISMATCHES:
                self.failure = CheckpointError(
                    f"{self.remote.describe()} did not match its sha256 {self._mismatches} times in a row: the "
                    "server or the network corrupts it. Nothing was written to the cache."
                )
