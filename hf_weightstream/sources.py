"""Where weight bytes come from: local files today, HTTP ranges from the Hub for lazy streaming.

A source answers one question, "copy bytes [offset, offset+len) of shard S into this buffer", from any thread.
Local files use ``os.preadv``: positional reads need no seek lock, release the GIL and land directly in the
caller's (pinned, reused) staging buffer on the way to a GPU.

For CPU execution a local source can do better than copying: `LocalFileSource.map` maps just the byte range of
one unit (never a whole file) and populates it in the calling (background) thread, so the weights are used in
place from the page cache: no memcpy, no fresh anonymous pages to fault in and zero. Dropping the last tensor
that views the range unmaps it, so what a process holds is exactly what the budget charged.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ._torch_compat import storage_users
from .errors import CheckpointError
from .index import FIX_HINT
from .limits import MIN_RESERVE
from .planner import BusyClock

if TYPE_CHECKING:
    from .limits import MemoryLimits

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux value; Python < 3.13 lacks the name


def map_range(fd: int, offset: int, length: int, name: str) -> torch.Tensor:
    """Map bytes [offset, offset+length) of an open file and page them in now, in the calling (reader) thread."""
    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    if os.fstat(fd).st_size < offset + length:  # mapping past the end would kill the process (SIGBUS)
        raise CheckpointError(
            f"{name}: the file shrank after it was indexed (bytes up to {offset + length} are gone). {FIX_HINT}"
        )
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    # ACCESS_COPY (a private mapping) gives a writable buffer, which torch wants; nothing ever writes to it.
    mapping = mmap.mmap(fd, offset + length - start, offset=start, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except AttributeError:  # no madvise on this platform: touch one byte per page
        data[:: mmap.PAGESIZE].sum()
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14; anything else is a read error
            raise CheckpointError(f"{name}: reading bytes {offset}-{offset + length} failed: {err}") from err
        data[:: mmap.PAGESIZE].sum()
    return data[offset - start :]


def read_many(source: ByteSource, shard: str, reads: list[tuple[int, memoryview]], table: tuple[int, int]) -> None:
    """Several small reads of one shard (embedding rows, of the tensor at bytes ``table`` = (start, end)): in one
    round of parallel requests when the source can (a Hub source; one round trip per row would cost far more than
    the rows), else one read each."""
    many = getattr(source, "read_many", None)
    if many is not None:
        many(shard, reads, table)
        return
    for offset, out in reads:
        source.read_into(shard, offset, out)


class ByteSource(Protocol):
    """Anything that can fill a buffer with a byte range of a shard."""

    def read_into(self, shard: str, offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


class LocalFileSource:
    """Positional reads from safetensors files on a local disk (a folder or the Hub cache)."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                try:
                    fd = os.open(self.paths[shard], os.O_RDONLY)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"Shard {shard} is gone from {self.paths[shard]}: it was deleted after the model was "
                        "loaded. Load the model again."
                    ) from None
                self._fds[shard] = fd
            return fd

    def read_into(self, shard: str, offset: int, out: memoryview) -> None:
        fd = self._fd(shard)
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{self.paths[shard]}: unexpected end of file at byte {offset + done} (the file shrank "
                    f"after it was indexed). {FIX_HINT}"
                )
            done += n

    def map(self, shard: str, offset: int, length: int) -> torch.Tensor:
        """A uint8 tensor viewing bytes [offset, offset+length) of ``shard`` in place, already paged in."""
        return map_range(self._fd(shard), offset, length, str(self.paths[shard]))

    def read(self, shard: str, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(shard, offset, memoryview(out))
        return bytes(out)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ read paths
# How a unit's bytes become CPU tensors. The engine holds one reader per model and asks it for the bytes of a
# unit's ranges; which reader is right depends on whether the page cache can hold what is read every token.

ALIGNMENT = 4096  # O_DIRECT wants file offsets, lengths and buffer addresses aligned; a page satisfies every disk
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_SLACK = 4 * ALIGNMENT  # a recycled buffer may be this much (plus 1/64) larger than the read that reuses it


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """Page-aligned anonymous memory, faulted in now, given back to the OS as soon as its last view goes.

    torch's allocator would do for alignment to 64 bytes only, and glibc keeps freed blocks below 32 MB in its
    heap; a mapping of our own is aligned for O_DIRECT and really returns its memory, so the process holds what
    the budget charged.
    """
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | _MAP_POPULATE
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, ALIGNMENT), flags=flags), dtype=torch.uint8)


class MappedReader:
    """Each range of a local file mapped in place from the page cache (see `LocalFileSource.map`)."""

    io = "mmap"
    recycles = False

    def __init__(self, source: ByteSource):
        self.source = source

    def read(self, ranges: list, buffer: torch.Tensor | None = None, cached: bool = False) -> list[torch.Tensor]:
        return [self.source.map(r.shard, r.offset, r.length) for r in ranges]

    def close(self) -> None:
        pass


class CopyReader:
    """Ranges copied into one buffer with ``read_into``: for sources that cannot map (remote ranges)."""

    io = "pread"
    recycles = False

    def __init__(self, source: ByteSource):
        self.source = source

    def read(self, ranges: list, buffer: torch.Tensor | None = None, cached: bool = False) -> list[torch.Tensor]:
        out = torch.empty(sum(r.length for r in ranges), dtype=torch.uint8)
        view, chunks, position = memoryview(out.numpy()), [], 0
        for r in ranges:
            self.source.read_into(r.shard, r.offset, view[position : position + r.length])
            chunks.append(out[position : position + r.length])
            position += r.length
        return chunks

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Span:
    """One range as an aligned read: file bytes [start, start+length) land at ``position`` of the buffer."""

    shard: str
    start: int
    length: int
    position: int
    skip: int  # where the range's own bytes begin inside the aligned read
    size: int  # the range's own length


# What the "auto" read path measures before it settles: phases alternate between O_DIRECT and buffered reads,
# each lasting this many bytes, ...
TRIAL_PHASE_BYTES = 256 << 20
TRIAL_PHASES = 4
# Once settled, the kept mode's speed is checked over stretches of this many bytes.
RECHECK_BYTES = 2 * TRIAL_PHASE_BYTES
# ... and buffered reads win only if clearly faster: they touch the page cache the limit charges.
BUFFERED_GAIN = 1.1
READ_MODES = ("direct", "buffered")


class ModeTrial:
    """Which of ``O_DIRECT`` and buffered reads is faster on this disk, measured on the unit reads themselves.

    Which wins depends on the device and not on anything a process can ask it: on a local NVMe drive
    ``O_DIRECT`` saves a copy and the kernel's bookkeeping, but a virtual disk may serve the kernel's large
    read-ahead requests far faster than the same bytes in direct pieces (1.33 against 0.63 GB/s, cold, on the
    virtual disk this project is developed on), and the order can flip from one minute to the next. So both
    are timed on the model's own reads, in alternating phases so that a disk whose speed drifts favours
    neither, and the faster is kept. Bandwidth counts the time *some* read of a
    mode was in flight, so parallel reads are not counted twice.

    Timing starts at `start`: the engine calls it once the schedule is known and reads run ahead of compute,
    several at once. The first pass's demand reads, one unit at a time, rank the modes differently.

    Once settled, the kept mode is still timed, ``recheck_bytes`` at a time: a stretch slower than the other mode
    measured means the order may have flipped, and the trial runs again (on that virtual disk, the 1.4 GB model
    of ``bench_memory`` streamed with ``O_DIRECT`` at 585 ms a token in one minute and 1,580 ms a few minutes
    later, while buffered reads held about 850 ms).
    """

    def __init__(
        self, phase_bytes: int = TRIAL_PHASE_BYTES, phases: int = TRIAL_PHASES, recheck_bytes: int = RECHECK_BYTES
    ):
        self.phase_bytes, self.phases, self.recheck_bytes = phase_bytes, phases, recheck_bytes
        self._clocks = {mode: BusyClock() for mode in READ_MODES}
        self.started = False
        self.rechecks = 0  # times the trial ran again because the kept mode slowed down
        self._restart(None)

    def _restart(self, why: str | None) -> None:
        self.phase = 0
        self._phase_read = 0
        self.bytes = dict.fromkeys(READ_MODES, 0)
        self.seconds = dict.fromkeys(READ_MODES, 0.0)
        self._stretch_bytes, self._stretch_seconds = 0, 0.0  # once settled: the kept mode since the last check
        self.outcome: str | None = None  # the choice and the numbers behind it, once made
        self.why_again = why

    def start(self) -> None:
        self.started = True

    @property
    def mode(self) -> str:
        """The mode the next read uses."""
        if self.outcome is not None:
            return self.winner
        return READ_MODES[self.phase % 2] if self.started else "direct"

    @property
    def winner(self) -> str:
        return _faster(*(self.bandwidth(m) for m in READ_MODES))

    def bandwidth(self, mode: str) -> float:
        return self.bytes[mode] / self.seconds[mode] if self.seconds[mode] > 0 else 0.0

    def record(self, mode: str, nbytes: int, start: float, end: float) -> None:
        """One read of ``nbytes`` in ``mode`` that ran from ``start`` to ``end`` (seconds, one clock)."""
        if not self.started:
            return
        busy = self._clocks[mode].add(start, end)
        if self.outcome is not None:
            self._check(mode, nbytes, busy)
            return
        self.seconds[mode] += busy
        self.bytes[mode] += nbytes
        if mode != self.mode:
            return  # begun in the previous phase
        self._phase_read += nbytes
        if self._phase_read < self.phase_bytes:
            return
        self.phase, self._phase_read = self.phase + 1, 0
        if self.phase >= self.phases:
            direct, buffered = (self.bandwidth(m) for m in READ_MODES)
            self.outcome = (
                f"measured {direct / 1e9:.2f} GB/s with O_DIRECT and {buffered / 1e9:.2f} GB/s buffered over "
                f"{self.bytes['direct'] / 1e6:,.0f} and {self.bytes['buffered'] / 1e6:,.0f} MB of reads: "
                f"{self.winner} kept" + (f" (measured again: {self.why_again})" if self.why_again else "")
            )

    def _check(self, mode: str, nbytes: int, busy: float) -> None:
        """Time the kept mode after the choice; run the trial again if a stretch of it would lose to the other."""
        kept = self.winner
        if mode != kept:
            return  # begun before the choice
        self._stretch_bytes += nbytes
        self._stretch_seconds += busy
        if self._stretch_bytes < self.recheck_bytes or self._stretch_seconds <= 0:
            return
        now = self._stretch_bytes / self._stretch_seconds
        self._stretch_bytes, self._stretch_seconds = 0, 0.0
        other = next(m for m in READ_MODES if m != kept)
        had = self.bandwidth(other)
        if _faster(**{kept: now, other: had}) != kept:
            self.rechecks += 1
            self._restart(f"{kept} slowed to {now / 1e9:.2f} GB/s, below the {had / 1e9:.2f} GB/s {other} had")


def _faster(direct: float, buffered: float) -> str:
    return "buffered" if buffered > direct * BUFFERED_GAIN else "direct"


class DirectReader:
    """``O_DIRECT`` reads into page-aligned buffers, several pieces in flight, no page cache in between.

    When the budget is below the model and the machine (or the cgroup, which charges the page cache to the
    process) cannot keep the streamed bytes cached until the next token, every token reads them from disk. Read
    through the page cache, each read then first makes the kernel reclaim older cache pages, under the cgroup
    limit, in the middle of the read. ``O_DIRECT`` skips the cache: the disk writes straight into our buffer.

    * Each range is widened to ``ALIGNMENT`` and read in pieces of ``piece_bytes`` by ``max_in_flight`` threads,
      so the disk's queue holds several requests even for one unit. Buffered reads instead walk each range's
      pieces in order in one thread (ranges, and units read ahead, still run in parallel): pieces of one file read
      at once by several threads look random to the kernel, which then stops reading ahead, and a sequential
      stream is what its read-ahead serves fastest (1.6 against 0.9 GB/s on this project's virtual disk, whose
      ``read_ahead_kb`` is 8 MiB, for 48 MiB ranges in 16 MiB pieces).
    * The buffer is the unit's storage while it is resident (its tensors view it), charged to the budget like
      any unit; when the unit is evicted to make room for the next read, its buffer is handed to that read
      (`reclaim`/`reuse`) instead of unmapping one and faulting in a new one.
    * ``mode="buffered"`` reads the same pieces through the page cache, so the kernel's read-ahead works for
      us, and drops each piece from the cache once copied (``POSIX_FADV_DONTNEED``): the cache the limit
      charges holds only what is in flight. ``mode="auto"`` times both (`ModeTrial`) and keeps the faster.
    * Where ``O_DIRECT`` is refused (``EINVAL`` when opening or reading: some filesystems), the reads are
      buffered, and ``fallback`` says why.
    """

    recycles = True

    def __init__(
        self, source: LocalFileSource, max_in_flight: int = 4, piece_bytes: int = 16 << 20, mode: str = "direct"
    ):
        if mode not in (*READ_MODES, "auto"):
            raise ValueError(f"mode must be one of {(*READ_MODES, 'auto')}, not {mode!r}")
        self.source = source
        self.trial = ModeTrial() if mode == "auto" else None
        self._mode = mode
        self.max_in_flight = max_in_flight
        self.piece_bytes = max(ALIGNMENT, piece_bytes - piece_bytes % ALIGNMENT)
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="hf_weightstream_io")
        self._fds: dict[str, int | None] = {}
        self._refused: list[int] = []  # O_DIRECT descriptors whose reads were refused
        # Buffers this reader allocated, by id (tensors compare elementwise, so no WeakSet).
        self._made: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.fallback: str | None = None  # why some reads went through the page cache, if any did

    # --------------------------------------------------------------------------------------- layout
    @staticmethod
    def layout(ranges: list) -> tuple[list[_Span], int]:
        spans, position = [], 0
        for r in ranges:
            start = r.offset - r.offset % ALIGNMENT
            end = -(-(r.offset + r.length) // ALIGNMENT) * ALIGNMENT
            spans.append(_Span(r.shard, start, end - start, position, r.offset - start, r.length))
            position += end - start
        return spans, position

    # --------------------------------------------------------------------------------------- buffers
    def reclaim(self, chunks: list[torch.Tensor]) -> torch.Tensor | None:
        """The buffer behind an evicted unit's ``chunks``, if nothing else views it any more (else None).

        ``chunks`` is emptied: after this call only the returned buffer holds the memory.
        """
        base = chunks[0]._base if chunks else None
        chunks.clear()
        if base is None or self._made.get(id(base)) is not base or storage_users(base) != 1:
            return None  # someone kept a tensor of the evicted unit: the memory is theirs now, never reused
        return base

    def reuse(self, candidates: list[torch.Tensor], ranges: list) -> torch.Tensor | None:
        """The smallest buffer among ``candidates`` that ``ranges`` fit in with little to spare (removed from the
        list), or None. Units of one kind differ by a page or two once aligned (where their bytes start in a
        page), so a little slack is allowed; a much larger buffer would hold memory the budget did not charge.
        """
        _spans, total = self.layout(ranges)
        fitting = [i for i, b in enumerate(candidates) if total <= b.numel() <= total + _SLACK + total // 64]
        if not fitting:
            return None
        return candidates.pop(min(fitting, key=lambda i: candidates[i].numel()))

    @property
    def io(self) -> str:
        """The read mode in use now (``auto`` tries both first)."""
        return self.trial.mode if self.trial is not None else self._mode

    @property
    def cache_in_flight(self) -> int:
        """Page cache this reader's own reads take at once: buffered pieces stay cached until copied."""
        return self.max_in_flight * self.piece_bytes if self.io == "buffered" else 0

    @property
    def settled(self) -> bool:
        """Whether the read mode is fixed (asked for, or measured): the page cache it leaves can then be shared."""
        return self.trial is None or self.trial.outcome is not None

    @property
    def measured(self) -> str | None:
        """With ``mode="auto"``: the measurement that chose the mode, once made (or why it is being made again)."""
        if self.trial is None:
            return None
        return self.trial.outcome or (f"measuring again: {self.trial.why_again}" if self.trial.why_again else None)

    # --------------------------------------------------------------------------------------- reading
    def read(self, ranges: list, buffer: torch.Tensor | None = None, cached: bool = False) -> list[torch.Tensor]:
        """The ranges' bytes, in ``buffer`` if given (else a new one); ``cached``: read through the page cache
        and leave them there (the engine's `page-cached units <StreamEngine.page_cached>`)."""
        mode = "cached" if cached else self.io
        start = time.perf_counter()
        spans, total = self.layout(ranges)
        if buffer is None or buffer.numel() < total:
            buffer = aligned_buffer(total)
            self._made[id(buffer)] = buffer
        view = memoryview(buffer.numpy())
        jobs = []
        for span in spans:
            pieces = []
            for at in range(0, span.length, self.piece_bytes):
                n = min(self.piece_bytes, span.length - at)
                needed = min(n, max(0, span.skip + span.size - at))  # the rest is alignment past the range
                pieces.append((span.shard, span.start + at, view[span.position + at : span.position + at + n], needed))
            if mode == "buffered":  # one sequential stream per range: the kernel reads ahead of it
                jobs.append(self._executor.submit(self._read_in_order, pieces, mode))
            else:
                jobs += [self._executor.submit(self._read_piece, *piece, mode) for piece in pieces]
        wait(jobs)
        for future in jobs:
            future.result()  # the first failure, once every piece has stopped writing into the buffer
        if self.trial is not None and not cached:
            with self._lock:
                self.trial.record(mode, total, start, time.perf_counter())
        return [buffer[s.position + s.skip : s.position + s.skip + s.size] for s in spans]

    def _direct_fd(self, shard: str) -> int | None:
        with self._lock:
            if shard not in self._fds:
                try:
                    self._fds[shard] = os.open(self.source.paths[shard], os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise CheckpointError(f"Cannot open {self.source.paths[shard]}: {err}") from err
                    self._fds[shard] = None
                    self.fallback = f"O_DIRECT refused by the filesystem of {self.source.paths[shard]}"
            return self._fds[shard]

    def _read_in_order(self, pieces: list[tuple[str, int, memoryview, int]], mode: str) -> None:
        for piece in pieces:
            self._read_piece(*piece, mode)

    def _read_piece(self, shard: str, offset: int, out: memoryview, needed: int, mode: str) -> None:
        fd = self._direct_fd(shard) if mode == "direct" else None
        got = None
        if fd is not None:
            try:
                got = _pread_full(fd, out, offset)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise CheckpointError(f"{self.source.paths[shard]}: reading at {offset} failed: {err}") from err
                with self._lock:
                    if self._fds.get(shard) is not None:  # other pieces may be reading with it: close it at close()
                        self._refused.append(self._fds[shard])
                    self._fds[shard] = None
                    self.fallback = f"O_DIRECT reads refused for {self.source.paths[shard]} ({err.strerror})"
        if got is None:  # through the page cache, then out of it again unless it is to stay
            buffered = self.source._fd(shard)
            got = _pread_full(buffered, out, offset)
            if mode != "cached":
                os.posix_fadvise(buffered, offset, len(out), os.POSIX_FADV_DONTNEED)
        if got < needed:
            raise CheckpointError(
                f"{self.source.paths[shard]}: unexpected end of file at byte {offset + got} (the file shrank "
                f"after it was indexed). {FIX_HINT}"
            )

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        with self._lock:
            for fd in [*self._fds.values(), *self._refused]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._refused.clear()

    def __del__(self) -> None:
        if hasattr(self, "_executor"):  # not when __init__ refused its arguments
            self.close()


def _pread_full(fd: int, out: memoryview, offset: int) -> int:
    """Read until ``out`` is full or the file ends; the number of bytes read."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


Reader = MappedReader | CopyReader | DirectReader


def local_files(source: ByteSource) -> LocalFileSource | None:
    """The source's files on a local disk: a folder's, or those of a Hub repo already whole in the cache, whose read
    paths are a folder's (`HubSource.cached_whole`); None while shards stream from the Hub."""
    if isinstance(source, LocalFileSource):
        return source
    cached_whole = getattr(source, "cached_whole", None)
    return cached_whole() if cached_whole is not None else None


def choose_reader(
    source: ByteSource,
    io: str,
    *,
    device: torch.device,
    budget: int,
    model_bytes: int,
    limits: MemoryLimits | None,
    max_in_flight: int = 4,
) -> tuple[Reader | None, str]:
    """The read path for CPU execution and why it was chosen (None: reads go to device staging buffers).

    ``auto`` maps the page cache while it can keep the whole model cached next to the process: then reads are
    memory copies after the first pass, and a mapping costs no copy at all. When it cannot (a cgroup limit
    below the model, which charges the page cache to the process), the bytes streamed each token come from
    disk anyway, and reading them into buffers of our own, with ``O_DIRECT`` or buffered and dropped at once
    (whichever `ModeTrial` measures faster), keeps the kernel from reclaiming cache in the middle of every
    read.
    """
    if device.type != "cpu":
        return None, f"{device}: reads go through pinned staging buffers"
    local = local_files(source)
    if local is None:
        if hasattr(source, "map"):
            return MappedReader(source), "Hub source: ranges are mapped in place once fetched"
        return CopyReader(source), "the source cannot map its files"
    source = local
    if io == "mmap":
        return MappedReader(source), "io='mmap' asked for"
    if io in READ_MODES:
        return DirectReader(source, max_in_flight, mode=io), f"io={io!r} asked for"
    if budget >= model_bytes:
        return MappedReader(source), "the budget holds the whole model: every byte is read once"
    room = limits.page_cache_room() if limits is not None else None
    if room is None or room >= model_bytes + MIN_RESERVE:
        return MappedReader(source), "the page cache can keep the model cached next to the budget"
    if limits is not None and budget > limits.available - MIN_RESERVE:
        # O_DIRECT buffers are anonymous memory: past the limit they get the process killed, where mapped page
        # cache is reclaimed (slowly, but the process lives).
        return MappedReader(source), (
            f"the budget leaves too little of the {limits.available / 1e6:,.0f} MB available for buffers of its own, "
            "so weights stay page cache the kernel can reclaim"
        )
    return DirectReader(source, max_in_flight, mode="auto"), (
        f"the page cache cannot keep the model cached ({room / 1e6:,.0f} MB of room for "
        f"{model_bytes / 1e6:,.0f} MB): streamed bytes come from disk every token, into buffers of our own"
    )
