"""`HubSource`: the `ByteSource` of a model from a Hub repo, and `wait_until_cached`.

Shards already in the Hub cache are read in place like `LocalFileSource`. A shard whose content is in
huggingface_hub's shared blob store (put there for another repo) is linked from it and read in place too. The
others are streamed: each is a `ShardStream` over the model's connections (`FetchScheduler`), and its fetched
bytes are recorded (`Recorder`) and finally committed into the cache (`cache.install`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm as hf_tqdm

from ..errors import CheckpointError, StreamingRuntimeError
from ..sources import LocalFileSource, map_range
from . import cache
from .cache import CachedShard
from .partial import PARTIAL_FOLDER, PartialFile, Superseded, pread_into, sweep_committed
from .ranges import RangeSet, even_pieces
from .recorder import Recorder, join_threads
from .remote import HEADER_PROBE_BYTES, Cancelled, HubRepo, RangeFetcher, RemoteFile
from .schedule import DEMAND, Background, FetchScheduler, Job
from .stream import Claim, ShardStream

FOREIGN_POLL_S = 0.02  # how often a read re-checks ranges another process is fetching
# Rows of one lookup closer than this are fetched as one range: a request costs a round trip, about what one
# connection of the link modelled in benchmarks/bench_hub.py (0.2 s to first byte, 12 connections sharing
# 100 MB/s) moves in 2 MiB. A long prompt's rows span the whole table, which is then fetched in large pieces.
ROW_GAP_BYTES = 2 << 20
# A lookup whose rows would still take more requests than the model has connections (a short prompt over a large
# table) would pay a second round trip: its closest spans are merged further, into spans of up to this size, to fit
# one wave of requests. A second round costs 0.2 s on that link, in which one connection moves up to 4 MiB.
ROW_WAVE_SPAN_BYTES = 4 << 20


class ByteProgress:
    """One tqdm bar per model for the weight bytes fetched over the network.

    huggingface_hub's tqdm, so ``HF_HUB_DISABLE_PROGRESS_BARS`` turns it off. It appears with the first weight
    byte (header reads at load time are not shown) and closes when every shard is in the cache.
    """

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._lock = threading.Lock()
        self._bar: hf_tqdm | None = None
        self.total = 0
        self.armed = False

    def update(self, n: int) -> None:
        with self._lock:
            if not self.armed:
                return
            if self._bar is None:
                self._bar = hf_tqdm(
                    total=self.total or None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self._desc,
                    name="hf_weightstream",
                )
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.armed = False


class _Session:
    """Everything a HubSource's threads use. Threads hold this, never the HubSource, so dropping a model lets it be
    garbage collected, and its finalizer stops them."""

    def __init__(self, label: str, connections: int, fill: bool) -> None:
        self.cancelled = threading.Event()
        self.progress = ByteProgress(f"Streaming {label}")
        self.fetcher = RangeFetcher(self.progress.update, self.cancelled)
        self.streams: dict[str, ShardStream] = {}
        self.background = Background(self.streams, fill, connections)
        self.scheduler = FetchScheduler(connections, self.background.next_job)
        self.recorder = Recorder(self.streams, self._state_changed)
        self.state = threading.Condition()
        self._closed = False

    def stream_changed(self) -> None:
        self.recorder.poke()
        self.scheduler.poke()

    def _state_changed(self) -> None:
        with self.state:
            self.state.notify_all()
        if all(s.committed is not None for s in self.streams.values()):
            self.progress.close()

    def ensure(
        self, stream: ShardStream, spans: list[tuple[int, int]], out: memoryview | None, engine_read: bool
    ) -> tuple[int, RangeSet]:
        """A demand read: make every span present, fetching what is missing in parallel pieces.

        With ``out`` (one span only), bytes fetched here also go straight into it. Returns the descriptor that holds
        the bytes and the parts of ``out`` already filled. An ``engine_read`` (not a header read) starts the
        background work and moves the readahead past this range, after its own fetches are queued so they go out
        first. Fetches of other threads that hold little of a span stop, and their part of it is claimed here as
        soon as they have (`ShardStream.claim_missing`).
        """
        filled = RangeSet()
        base = spans[0][0]
        jobs: list[Job] = []  # fetched for this read, not waited for yet
        began = time.monotonic()
        holding = False  # the connections that stopping fetches free are kept for this read (`FetchScheduler.hold`)
        try:
            while True:
                # Under the workers' lock: no idle connection may see a range claimed here before its job is queued
                # (it would skip it and fetch something later in the order first).
                with self.scheduler.lock:
                    impatient = stream.others_stalled()  # another process holds ranges and records nothing
                    fd, new_jobs, cut, waits, foreign = self._claim(stream, spans, out, base, began, impatient)
                    jobs += new_jobs
                    if holding != bool(cut):
                        holding = bool(cut)
                        self.scheduler.hold(1 if holding else -1)
                    if engine_read:
                        engine_read = False
                        if not self.background.active:
                            self.progress.total = sum(s.missing_bytes() for s in self.streams.values())
                            self.progress.armed = True
                        self.background.note_read(stream.remote.shard, base)
                        self.scheduler.poke()
                if cut:
                    # Claimed again as soon as they stopped, not after the other fetches this read waits for (whole
                    # head-start pieces, seconds of transfer).
                    for claim in cut:
                        claim.done.wait()
                    continue
                if not jobs and not waits and not foreign:
                    return fd, filled
                for job in jobs:
                    job.finished.wait()
                for event in waits:
                    event.wait()
                if foreign and not jobs and not waits and self.cancelled.wait(FOREIGN_POLL_S):
                    raise StreamingRuntimeError("This model's Hub source was closed while the read waited.")
                errors = [job.error for job in jobs if job.error is not None and not isinstance(job.error, Superseded)]
                if errors and isinstance(errors[0], Cancelled):
                    raise StreamingRuntimeError("This model's Hub source was closed while the read waited.")
                if errors:
                    raise errors[0]
                if out is not None:
                    filled.update((job.claim.start, job.claim.end) for job in jobs)
                jobs = []
        finally:
            if holding:
                self.scheduler.hold(-1)

    def _claim(
        self,
        stream: ShardStream,
        spans: list[tuple[int, int]],
        out: memoryview | None,
        base: int,
        began: float,
        impatient: bool,
    ) -> tuple[int, list[Job], list[Claim], list[threading.Event], bool]:
        """One round of `ensure` (with the scheduler's lock held): claim and queue what nobody fetches. Returns the
        descriptor, the jobs queued, the fetches asked to stop that hold a part of ``spans``, the fetches to wait
        for, and whether another process holds a part."""
        from . import schedule  # read at call time: tests tune the piece size

        jobs: list[Job] = []
        cut: list[Claim] = []
        waits: list[threading.Event] = []
        foreign = False
        fd = -1
        # One wave: what is left to fetch is cut into a piece per connection (not below a minimum), so the read ends
        # when the link has moved it, not a wave of pieces later.
        missing = [stream.unclaimed_bytes(start, end) for start, end in spans]
        pieces = schedule.wave_pieces(missing, self.scheduler.connections)
        for (start, end), piece in zip(spans, pieces, strict=True):
            got = stream.claim_missing(start, end, lambda s, e, piece=piece: even_pieces(s, e, piece), impatient)
            fd, foreign, waits = got.fd, foreign or got.foreign, waits + got.waits
            cut += self.scheduler.cut(got.sparse)  # they stop soon; the next round claims the part needed here
            jobs += [
                Job(
                    stream,
                    c,
                    DEMAND,
                    out=None if out is None else out[c.start - base : c.end - base],
                    awaited=True,
                    since=began,
                )
                for c in got.mine
            ]
        if jobs:
            self.scheduler.submit(jobs)
        return fd, jobs, cut, waits, foreign

    def read_into(self, stream: ShardStream, offset: int, out: memoryview, engine_read: bool) -> None:
        end = offset + len(out)
        fd, filled = self.ensure(stream, [(offset, end)], out, engine_read)
        for start, stop in filled.gaps(offset, end):
            pread_into(fd, start, out[start - offset : stop - offset], str(stream.partial.data_path))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cancelled.set()
        clean = join_threads(self.scheduler.stop(timeout=5.0), timeout=5.0)
        clean = self.recorder.stop() and clean
        self.fetcher.close()
        self.progress.close()
        if clean:  # a thread still running might use a descriptor: leave them open then
            for stream in self.streams.values():
                stream.partial.close()


def _coalesce(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """``spans``, sorted, merged where they are at most ``gap`` apart."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _fit_wave(spans: list[tuple[int, int]], most: int, span_limit: int) -> list[tuple[int, int]]:
    """Sorted disjoint spans merged, while more than ``most`` are left, across the smallest gaps, as long as a
    merged span stays within ``span_limit`` bytes."""
    # Groups of consecutive spans, by their first and last index: first_of[last] and last_of[first].
    first_of = list(range(len(spans)))
    last_of = list(range(len(spans)))
    count = len(spans)
    for _, i in sorted((spans[i + 1][0] - spans[i][1], i) for i in range(len(spans) - 1)):
        if count <= most:
            break
        first, last = first_of[i], last_of[i + 1]
        if spans[last][1] - spans[first][0] > span_limit:
            continue
        last_of[first], first_of[last] = last, first
        count -= 1
    merged: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        merged.append((spans[i][0], spans[last_of[i]][1]))
        i = last_of[i] + 1
    return merged


class HubSource:
    """The `ByteSource` of a model from a Hub repo (module docstring).

    ``complete_download`` lets idle connections fetch the rest of every shard (after what the forward pass reads
    next), so each can be verified and committed to the cache.
    """

    def __init__(
        self,
        repo: HubRepo,
        local: dict[str, Path],
        remote: dict[str, RemoteFile],
        *,
        max_connections: int,
        complete_download: bool,
    ) -> None:
        self.repo = repo
        self.local_paths = dict(local)
        self._session = session = _Session(repo.repo_id, max_connections, complete_download)
        self.shard_sizes: dict[str, int] = {}
        self._finalizer = weakref.finalize(self, session.shutdown)
        try:
            sweep_committed(repo.storage_folder)
            for shard, remote_file in remote.items():
                stream = self._open_stream(remote_file)
                if stream is None:
                    self.local_paths[shard] = repo.pointer_path(shard)
                else:
                    session.streams[shard] = stream
                    self.shard_sizes[shard] = remote_file.size
        except BaseException:
            self.close()
            raise
        self._local = LocalFileSource(self.local_paths)
        for shard, path in self.local_paths.items():
            self.shard_sizes[shard] = os.path.getsize(path)

    def cached_whole(self) -> LocalFileSource | None:
        """The source of the cached files when every shard was in the cache at load: then the read paths of local
        files apply (``StreamConfig(io=...)``, the choice under a memory limit)."""
        return None if self._session.streams else self._local

    def _open_stream(self, remote: RemoteFile) -> ShardStream | None:
        """A stream for ``remote``, or None once it is in the cache (linked from the shared blob store, or a
        complete partial file committed now)."""
        repo = remote.repo
        if cache.link_from_shared_store(remote):
            return None
        label = {"repo_id": repo.repo_id, "filename": repo.path_in_repo(remote.shard), "commit": repo.commit}
        partial = PartialFile(repo.storage_folder / PARTIAL_FOLDER, remote.sha256, remote.size, label)
        blob = repo.blob_path(remote.sha256)
        if repo.force_download:  # fetch every byte again, then replace the blob
            partial.discard()
        recorded = partial.open(None if repo.force_download else blob)
        if recorded is None:
            cache.link_snapshot(repo, remote.shard, remote.sha256, new_blob=False)
            return None
        session = self._session
        stream = ShardStream(remote, partial, recorded, session.fetcher, session.stream_changed, session.recorder.poke)
        if recorded.covers(0, remote.size):  # a run that ended between its last record and the commit
            stream.commit()
            if stream.committed is not None:
                partial.close()
                return None
        return stream

    @property
    def streamed_shards(self) -> list[str]:
        return list(self._session.streams)

    def read_into(self, shard: str, offset: int, out: memoryview) -> None:
        stream = self._session.streams.get(shard)
        if stream is None:
            self._local.read_into(shard, offset, out)
            return
        self._session.read_into(stream, offset, out, engine_read=True)

    def read_many(self, shard: str, reads: list[tuple[int, memoryview]], table: tuple[int, int]) -> None:
        """Several small reads of one shard at once (the rows of an embedding lookup, in the tensor at bytes
        ``table``): missing bytes are fetched in one round of parallel requests, rows closer than ``ROW_GAP_BYTES``
        in one request, instead of one round trip per row. The head start's fetches of the table that hold little
        of these rows stop (`FetchScheduler.drop_guesses`)."""
        stream = self._session.streams.get(shard)
        if stream is None:
            for offset, out in reads:
                self._local.read_into(shard, offset, out)
            return
        rows = _coalesce([(offset, offset + len(out)) for offset, out in reads if len(out)], ROW_GAP_BYTES)
        if not rows:
            return
        session = self._session
        # By the rows, not the wave's merged spans below: those add up to 4 MiB of filler each.
        session.scheduler.drop_guesses(stream, *table, rows)
        spans = _fit_wave(rows, session.scheduler.connections, ROW_WAVE_SPAN_BYTES)
        fd, _ = session.ensure(stream, spans, None, engine_read=True)
        for offset, out in reads:
            pread_into(fd, offset, out, str(stream.partial.data_path))

    def map(self, shard: str, offset: int, length: int) -> torch.Tensor:
        """A uint8 tensor viewing the bytes in place (CPU execution, see `LocalFileSource.map`): a cached shard's
        blob, or a streamed shard's partial file once the range is on disk."""
        stream = self._session.streams.get(shard)
        if stream is None:
            return self._local.map(shard, offset, length)
        # The descriptor we hold: the partial file may be renamed into blobs/ meanwhile.
        fd, _ = self._session.ensure(stream, [(offset, offset + length)], None, engine_read=True)
        return map_range(fd, offset, length, str(stream.partial.data_path))

    def read(self, shard: str, offset: int, length: int) -> bytes:
        """Bytes of a shard; used for headers, before the engine's first read starts any background work. A read at
        byte 0 fetches ``HEADER_PROBE_BYTES`` at once, which holds nearly every safetensors header: one request per
        header."""
        out = bytearray(length)
        stream = self._session.streams.get(shard)
        if stream is None:
            self._local.read_into(shard, offset, memoryview(out))
            return bytes(out)
        if offset == 0:
            probe = min(stream.size, max(length, HEADER_PROBE_BYTES))
            fd, _ = self._session.ensure(stream, [(0, probe)], None, engine_read=False)
            pread_into(fd, 0, memoryview(out), str(stream.partial.data_path))
        else:
            self._session.read_into(stream, offset, memoryview(out), engine_read=False)
        return bytes(out)

    def forward_began(self) -> None:
        """A forward pass of the model computes from now on: complete shards wait for it to end to be verified.

        Bytes are checked when their file is complete, after the forward passes that read them: a file that failed
        its sha256 since the last pass stops this one with a `CheckpointError` (once), so the wrong outputs of
        earlier passes do not go unnoticed; the engine drops the weights it holds before raising it."""
        reports = []
        for stream in self._session.streams.values():
            report, stream.mismatch_report = stream.mismatch_report, None
            if report:
                reports.append(report)
        if reports:
            raise CheckpointError(" ".join(reports))
        self._session.recorder.may_verify.clear()

    def forward_ended(self) -> None:
        self._session.recorder.may_verify.set()

    def expect_reads(self, reads: list[tuple[str, int, int]]) -> None:
        """The (shard, offset, length) reads of one forward pass, in execution order: the readahead order."""
        with self._session.scheduler.lock:  # idle connections may be reading the head start's order
            self._session.background.expect_reads(reads)

    def start_ahead(self, reads: list[tuple[str, int, int]]) -> None:
        """Fetch ``reads`` now, on idle connections, before any forward pass (a head start; `expect_reads` and the
        engine's reads take over)."""
        _start_ahead(self._session, reads)

    def start_ahead_once_located(self, shard: str, upto: int) -> None:
        """Fetch the bytes of ``shard`` from the end of its header probe to ``upto`` as soon as the probe's resolve
        has answered where the file is (a redirect to the bridge), not after the probe's answer is read and parsed:
        one round trip sooner. Which tensors they hold is not known yet: the bytes right after a header are its
        first tensors, which the forward pass reads first. They go out on half the connections (as every head
        start's first read), so that the other half can send the requests of the head start the parsed header
        orders (`start_ahead`) while these still keep the link busy."""
        stream = self._session.streams.get(shard)
        end = min(stream.size, upto) if stream is not None else 0
        if stream is None or end <= HEADER_PROBE_BYTES:
            return
        # The session, not self: the session's threads reach the location, and a callback holding this source would
        # keep a dropped model's source (whose finalizer stops them) alive.
        session, reads = self._session, [(shard, HEADER_PROBE_BYTES, end - HEADER_PROBE_BYTES)]
        stream.remote.location.when_known(lambda: _start_ahead(session, reads))

    def wait_until_cached(self, timeout: float | None = None) -> dict[str, CachedShard]:
        """Fetch the rest of every shard now (even with ``complete_download=False``) and wait for all commits."""
        session = self._session
        deadline = None if timeout is None else time.monotonic() + timeout
        for stream in session.streams.values():
            stream.retry_after_failure()
        session.background.fill = True
        session.background.active = True
        session.recorder.may_verify.set()  # waited for: verify now, even if a forward pass is running
        if not session.progress.armed:
            session.progress.total = sum(s.missing_bytes() for s in session.streams.values())
            session.progress.armed = True
        session.stream_changed()
        with session.state:
            while True:
                pending = [s for s in session.streams.values() if s.committed is None]
                if not pending:
                    break
                failed = [s for s in pending if s.failure is not None]
                if failed:
                    raise CheckpointError(
                        f"Could not complete {failed[0].remote.describe()}: {failed[0].failure}"
                    ) from failed[0].failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    missing = sum(s.missing_bytes() for s in pending)
                    raise TimeoutError(
                        f"{len(pending)} shard(s) of {self.repo.repo_id} are not in the cache yet ({missing:,} bytes "
                        "to go); the download goes on in the background."
                    )
                session.state.wait(1.0 if remaining is None else min(1.0, remaining))
        result = {shard: cache.cached_shard(path) for shard, path in self.local_paths.items()}
        for shard, stream in session.streams.items():
            result[shard] = cache.cached_shard(
                self.repo.pointer_path(shard), stream.remote.sha256, stream.verified is not None
            )
        return result

    def close(self) -> None:
        """Stop fetching (what was fetched is recorded for the next run) and close the files."""
        self._finalizer()
        if hasattr(self, "_local"):
            self._local.close()


def _start_ahead(session: _Session, reads: list[tuple[str, int, int]]) -> None:
    with session.scheduler.lock:
        session.background.start_ahead([(s, o, n) for s, o, n in reads if s in session.streams])
    session.scheduler.poke()


def wait_until_cached(model: object, timeout: float | None = None) -> dict[str, CachedShard]:
    """Block until every shard of a model streamed from the Hub is complete, verified and in the Hub cache.

    ``model`` is a streamed model, its `StreamEngine` or its `HubSource`. Fetches what is missing now (also with
    ``complete_download=False``), then returns ``{shard: CachedShard}`` with the snapshot path, the repo's blob and
    the sha256 of every shard. For scripts that must leave a complete cache behind, and for tests. Raises
    ``TimeoutError`` after ``timeout`` seconds (the download continues in the background), and
    `StreamingRuntimeError` for a model that was not streamed from the Hub. ``hf_weightstream.wait_until_cached``
    is this function.
    """
    source = model
    if not isinstance(source, HubSource):
        # imported here: integration imports this package (through checkpoint), and engine imports transformers
        from ..engine import StreamEngine
        from ..integration import engine_of

        engine = source if isinstance(source, StreamEngine) else engine_of(source)
        engine.check_process()  # its fetch threads are not in a forked child
        checkpoint = getattr(engine, "checkpoint", None)  # set by from_pretrained; engine.source may be wrapped
        source = checkpoint.source if checkpoint is not None else engine.source
    if not isinstance(source, HubSource):
        raise StreamingRuntimeError(
            "This model was not streamed from the Hub (it was loaded from a local folder): nothing to wait for."
        )
    return source.wait_until_cached(timeout)
