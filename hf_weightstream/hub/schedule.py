"""Who gets the link: the forward pass first, then the bytes it will read next, then completing the files.

Three kinds of fetch share one model's ``connections``:

1. demand: a read the engine waits for (its unit's ranges, cut into pieces fetched in parallel). Queued, and taken
   by the next free connection before anything else.
2. readahead: the ranges the forward pass will read next, in its read order (handed over by `expect_reads`), up
   to ``READAHEAD_BYTES`` past the last range it read. They go to the partial file, not to memory, so the weight
   budget is untouched; and the first forward pass, which traces the schedule and has no prefetch of its own,
   still overlaps downloading with computing. The next range is what the forward pass waits for next: it goes out
   as one wave, a piece per connection, like a demand read (bench_hub's first decoder block then came 0.45 s
   sooner after the embedding); the ranges after it in ``READAHEAD_CHUNK_BYTES`` requests. Before the read order
   is known (from the headers until the first read), the head start: the first ``HEAD_START_BYTES`` of the
   tensors in file order.
3. fill (``complete_download``): the rest of each shard in file order, so that it can be verified and committed;
   only while no demand or readahead fetch is queued or running: in the gaps the forward pass leaves, so that
   it never shares the link with the bytes the forward pass waits for or reads next.

Background fetches (2 and 3) are claimed by idle connections when they start, never queued, so a demand read never
waits behind queued low-priority work. And when a demand read finds every connection busy, that many background
fetches yield (fill first, then the readahead furthest ahead): they stop at their next body chunk, keep the bytes
they got, and the rest of their range is claimed again later. So a demand read waits at most one body chunk
behind background traffic, and fill requests can be large (fewer requests, less time-to-first-byte paid). A
background fetch of bytes a demand read waits for (the readahead had them first: the head start holds the
embedding when the first read comes) never yields: that read would wait for its rest behind its other pieces;
unless it is a guess of the head start that the lookup needs little of (`FetchScheduler.drop_guesses`). Nor does
any fetch of the head start: it holds what the first read and the one after it need (the embedding table, the
first block), and a stopped request loses the bytes already in its socket. Demand
reads are served in the order they began, so a read that claims again what a stopped fetch left goes first. The
sizes below and ``StreamConfig.max_connections`` (12) were chosen from ``python -m benchmarks.bench_hub --sweep``
against the latency-modelled local Hub.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import StreamingRuntimeError
from .partial import Superseded
from .remote import Cancelled
from .stream import Claim, ShardStream

logger = logging.getLogger(__name__)

DEMAND, READAHEAD, FILL = 0, 1, 2
# Measured (benchmarks/results/hub_sweep_*.md, 0.2 s to first byte, 20 MB/s per connection, 100 MB/s in all): 12
# connections get 92-93% of the link with 4-8 MiB requests, 96% with 16 MiB, 98% with 32 MiB; 8 connections need
# 32 MiB for 96%; 4 connections never pass 76%. Readahead requests stay at 8 MiB because the requests in flight
# complete together: 12 x 8 MiB is about two decoder blocks of a 600 MB model in flight, so blocks arrive nearly in
# order and the forward pass can run on the first while the next arrive. A demand read is needed whole, now: what is
# left of it to fetch (not what the readahead already has in flight) is cut into one piece per connection, so it
# takes one wave of requests (bench_hub's first read, the rest of a 131 MB embedding table behind the head start,
# ended 0.7 s sooner than in three 10 MB pieces). Fill is not needed in any order and yields to demand reads, so it
# uses the large requests.
MIN_DEMAND_PIECE_BYTES = 1 << 20  # smaller pieces would cost more in round trips than they save in transfer


def wave_piece(nbytes: int, connections: int) -> int:
    """The piece size that sends ``nbytes`` out as one wave over ``connections`` (not below the minimum)."""
    return max(MIN_DEMAND_PIECE_BYTES, -(-nbytes // connections))


def wave_pieces(sizes: list[int], connections: int) -> list[int]:
    """The piece size of each of several ranges (``sizes`` bytes) read at once, so that they go out as one wave: a
    piece per range, then the connections left to the ranges with the largest pieces (not below the minimum).
    One piece size for all would cut each range up to a piece more, and more pieces than connections wait a
    round trip."""
    counts = [1] * len(sizes)
    for _ in range(connections - len(sizes)):
        i = max(range(len(sizes)), key=lambda k: sizes[k] / counts[k], default=None)
        if i is None or sizes[i] / counts[i] <= MIN_DEMAND_PIECE_BYTES:
            break
        counts[i] += 1
    return [wave_piece(size, count) for size, count in zip(sizes, counts, strict=True)]


READAHEAD_CHUNK_BYTES = 8 << 20  # one readahead request
FILL_CHUNK_BYTES = 32 << 20  # one filler request
MIN_FILL_BYTES = 4 << 20  # fill requests are cut smaller when less is missing, but not below this
READAHEAD_BYTES = 1 << 30  # how far ahead of the forward pass (in its read order) idle connections fetch to disk
# Fetched as soon as the headers are known, before any forward pass (`Background.start_ahead`): the first bytes of
# the shards in file order, which save_pretrained writes in module order. The link is otherwise idle while
# from_pretrained builds the model (and, on a process's first load, imports its code: seconds).
HEAD_START_BYTES = 128 << 20
# Fetched before the first header is known (`HubSource.start_ahead_once_located`), on half the connections: the bytes
# right after the header, whatever tensors they are. Enough to keep the link busy until the requests the header
# orders (on the other half, `Background.start_ahead`) get their first byte: 0.25 s of bench_hub's link. Beyond
# that, the header says what comes first; the whole head start sent blind was the embedding table, all of it wasted
# on a short prompt.
BLIND_HEAD_START_BYTES = 24 << 20


@dataclass(eq=False)
class Job:
    """One HTTP range to fetch for a claim; ``out`` is the reader's buffer for a demand read.

    ``awaited`` jobs hand their error to the reader waiting for them; the others (background work) report it
    themselves. ``order`` ranks readahead jobs (how far ahead of the forward pass), for choosing which yields.
    ``guess``: a readahead job started before the forward pass's first read, when which rows of the embedding it
    would look up was not known (`FetchScheduler.drop_guesses`). ``since``: when the read a demand job is for
    began; the queue is in that order.
    """

    stream: ShardStream
    claim: Claim
    priority: int = DEMAND
    order: int = 0
    out: memoryview | None = None
    awaited: bool = False
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    yield_requested: bool = False
    guess: bool = False
    since: float = field(default_factory=time.monotonic)

    @property
    def stopping(self) -> bool:
        """Whether the fetch stops at its next body chunk: dropped, or asked to yield and awaited by no read."""
        return self.claim.dropped or (self.yield_requested and not self.claim.awaited)

    def run(self) -> None:
        try:
            self.stream.fetch(self.claim, self.out, lambda: self.stopping)
        except BaseException as err:  # noqa: BLE001 - handed to the reader, or logged for background work
            self.error = err
        finally:
            self.finished.set()


class FetchScheduler:
    """The HTTP connections of one model: ``connections`` threads, demand jobs first, in the order their reads
    began.

    The engine asks for units in execution order, so first come is what the forward pass needs first. When no demand
    job is queued, an idle connection asks ``background(forward_active)`` for work (module docstring).
    """

    def __init__(self, connections: int, background: Callable[[bool], Job | None]) -> None:
        self._connections = connections
        self._background = background
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._held = 0  # reads waiting to claim again what stopping fetches leave: no new background work
        self._warned_background = False

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def lock(self) -> threading.Condition:
        """Held by a worker while it picks its next job (reentrant)."""
        return self._cond

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            if self._stopped:
                for job in jobs:
                    job.stream.release(job.claim)
                raise StreamingRuntimeError("This model's Hub source was closed; load the model again.")
            # In the order their reads began: a read that claims again what a cut fetch left (rows the embedding
            # lookup waits for now) goes before the reads that came after it (the next block, prefetched).
            queued = sorted([*self._queue, *jobs], key=lambda job: job.since)
            self._queue = collections.deque(queued)
            self._start_threads()
            self._make_room()
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._start_threads()
            self._cond.notify_all()

    def stop(self, timeout: float) -> list[threading.Thread]:
        """Fail queued jobs and tell running ones to stop (within one body chunk); returns the threads to join."""
        with self._cond:
            self._stopped = True
            queued, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for job in queued:
            job.error = StreamingRuntimeError("This model's Hub source was closed while the read waited.")
            job.stream.release(job.claim)
            job.finished.set()
        return list(self._threads)

    def hold(self, step: int) -> None:
        """``+1``: a read waits for fetches it asked to stop, to claim their rest itself; the connections they free
        wait for that read's jobs instead of taking new background work (which would put the read a request behind
        it). ``-1``: its jobs are queued."""
        with self._cond:
            self._held += step
            self._cond.notify_all()

    def cut(self, claims: list[Claim]) -> list[Claim]:
        """Ask the background fetches of ``claims`` to yield (at their next body chunk): a demand read needs only a
        small part of them and fetches it itself, rather than waiting for the rest to arrive first. Returns the
        claims that will stop soon (not those of demand reads, or awaited by one)."""
        wanted = {id(claim) for claim in claims}
        stopping = []
        with self._cond:
            for job in self._running:
                if job.priority != DEMAND and id(job.claim) in wanted:
                    job.yield_requested = True
                    if job.stopping:
                        stopping.append(job.claim)
        return stopping

    def drop_guesses(self, stream: ShardStream, start: int, end: int, needed: list[tuple[int, int]]) -> None:
        """Stop the fetches guessed before the first read (`Job.guess`) of bytes of ``[start, end)`` (an embedding
        table) that hold little of ``needed`` (the rows looked up), and have more than a little still to come
        (`ShardStream.drop_if_sparse`).

        The head start fetches the table right after the first block, because a long prompt reads nearly all of
        it: then every piece holds rows, and none stops. A short prompt reads a few rows, and the rest of the table
        would only share the link with the bytes the forward pass reads next: bench_hub's 32-token prompt had 70-80
        MB of the 131 MB table come before its first token. The pieces stop at their next body chunk, awaited or not
        (`Claim.dropped`): the bytes received stay, the rows they had not reached are fetched by the lookup itself,
        and the rest later, by the fill or when read.
        """
        with self._cond:
            for job in self._running:
                claim = job.claim
                if not job.guess or job.stream is not stream or claim.start < start or end < claim.end:
                    continue
                stream.drop_if_sparse(claim, needed)

    def _make_room(self) -> None:
        """Ask background jobs to yield to queued demand jobs no free connection will take (not those fetching
        bytes a demand read waits for: they are demand work already; nor the head start's, module docstring)."""
        yielding = sum(1 for j in self._running if j.yield_requested)
        shortfall = len(self._queue) - (self._connections - len(self._running) + yielding)
        if shortfall <= 0:
            return
        background = [
            j
            for j in self._running
            if j.priority != DEMAND and not j.yield_requested and not j.claim.awaited and not j.guess
        ]
        background.sort(key=lambda j: (-j.priority, -j.order))
        for job in background[:shortfall]:
            job.yield_requested = True

    def _forward_active(self) -> bool:
        """Whether the forward pass is using the link: reads it waits for, or the bytes it reads next."""
        return bool(self._queue) or any(j.priority != FILL for j in self._running)

    def _background_failed(self, err: Exception) -> None:
        """Picking background work failed (a partial file another process discarded could not be opened again: a
        full disk, a cache that became read-only): the connection stays, for the reads, which report such errors
        themselves; the background tries again a second later. Said once per model."""
        if not self._warned_background:
            self._warned_background = True
            logger.warning("hf_weightstream: background download paused: %s", err, exc_info=err)

    def _start_threads(self) -> None:
        while len(self._threads) < self._connections and not self._stopped:
            thread = threading.Thread(
                target=self._work, name=f"hf_weightstream-fetch-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if self._queue:
                        job = self._queue.popleft()
                        break
                    try:
                        job = None if self._held else self._background(self._forward_active())
                    except Exception as err:  # noqa: BLE001 - a connection must outlive its background work
                        self._background_failed(err)
                        job = None
                    if job is not None:
                        break
                    self._cond.wait(timeout=1.0)
                self._running.add(job)
            try:
                job.run()
                if not job.awaited and job.error is not None:
                    _background_failed(job)
            finally:
                with self._cond:
                    self._running.discard(job)
                    self._cond.notify_all()


def _background_failed(job: Job) -> None:
    if isinstance(job.error, (Cancelled, Superseded)):
        return
    stream = job.stream
    if stream.failure is None:
        logger.warning(
            "Background download of %s stopped: %s. Reads of this model still fetch what they need; a later run "
            "(or wait_until_cached) resumes the download.",
            stream.remote.describe(),
            job.error,
        )
    stream.failure = job.error


class Background:
    """What idle connections fetch while the forward pass is not waiting: readahead, then fill (module docstring).

    Before the engine's first read only `start_ahead`'s head start is fetched; the fill waits for that read.
    """

    def __init__(self, streams: dict[str, ShardStream], fill: bool, connections: int) -> None:
        self.streams = streams
        self.fill = fill
        self.connections = connections
        self.active = False
        self._order: list[tuple[ShardStream, int, int]] = []
        self._planned: dict[str, list[tuple[int, int, int]]] = {}  # shard -> sorted (start, end, position)
        self._position = -1
        self._head: list[tuple[ShardStream, int, int]] = []  # the head start's order (`start_ahead`)

    def expect_reads(self, reads: list[tuple[str, int, int]]) -> None:
        """The engine's order, which starts with the first forward pass's first read. A head start still being
        fetched goes on in its own order until that read (`start_ahead`)."""
        self._position = -1
        self._order = [(self.streams[s], o, o + n) for s, o, n in reads if s in self.streams]
        planned: dict[str, list[tuple[int, int, int]]] = {}
        for position, (stream, start, end) in enumerate(self._order):
            planned.setdefault(stream.remote.shard, []).append((start, end, position))
        self._planned = {shard: sorted(spans) for shard, spans in planned.items()}

    def start_ahead(self, reads: list[tuple[str, int, int]]) -> None:
        """Read ``reads`` ahead until the forward pass's first read (the engine's order takes over then, not when
        `expect_reads` hands it over: the model is built before the prompt is known, and the head start holds the
        embedding table that a long prompt looks up whole).

        The first read is cut for half the connections: a head start replaces another still in flight (the bytes
        after the first header, sent before it was parsed), and pieces that all end at once would leave the link
        idle for a round trip while the next requests, those of the lookup, go out. The other half goes on to the
        next reads."""
        self._head = [(self.streams[s], o, o + n) for s, o, n in reads if s in self.streams]

    def planned_range(self, shard: str, offset: int) -> tuple[int, int, int] | None:
        """The planned read (start, end, position) holding byte ``offset`` of ``shard``, if any."""
        spans = self._planned.get(shard, [])
        i = bisect.bisect_right(spans, (offset, float("inf"), 0)) - 1
        return spans[i] if i >= 0 and spans[i][0] <= offset < spans[i][1] else None

    def note_read(self, shard: str, offset: int) -> None:
        self.active = True
        planned = self.planned_range(shard, offset)
        if planned is not None:
            self._position = planned[2]

    def next_job(self, forward_active: bool) -> Job | None:
        head = not self.active  # the head start (`start_ahead`)
        order, position = (self._head, -1) if head else (self._order, self._position)  # may be replaced meanwhile
        spread = max(1, self.connections // 2) if head else self.connections
        count = len(order)
        if count:  # from the range after the last one read (from the first before any: embedding rows come first)
            ahead = 0
            for step in range(1, count + 1):
                if ahead >= READAHEAD_BYTES:
                    break
                stream, start, end = order[(position + step) % count]
                # The next read is the forward pass's next wait: one wave of requests, like a demand read.
                limit = wave_piece(end - start, spread) if step == 1 else READAHEAD_CHUNK_BYTES
                if head:  # its first 128 MiB as one read (no table known) in 8 MiB pieces, not 6 of 21 MiB
                    limit = min(limit, READAHEAD_CHUNK_BYTES)
                claim = stream.claim_next(start, end, limit)
                if claim is not None:
                    return Job(stream, claim, READAHEAD, order=step, guess=head)
                ahead += end - start
        if self.fill and self.active and not forward_active:
            # Large requests, but not so large that the last of the files keeps connections idle.
            missing = sum(s.missing_bytes() for s in self.streams.values())
            limit = max(MIN_FILL_BYTES, min(FILL_CHUNK_BYTES, missing // self.connections))
            for stream in self.streams.values():
                claim = stream.claim_next(0, stream.size, limit)
                if claim is not None:
                    return Job(stream, claim, FILL)
        return None
