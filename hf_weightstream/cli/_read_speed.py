"""How fast the shard files read here: a timed sample, and whether it came from the page cache or the disk.

Used by ``inspect`` to turn the bytes a plan streams per token into a predicted reading time per token.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

# Enough of the shards to see the disk or page cache speed, quick either way.
BANDWIDTH_SAMPLE_BYTES = 256 * 10**6
_READ_CHUNK = 16 * 2**20


def page_cache_fraction(path: Path, length: int) -> float | None:
    """Share of the first ``length`` bytes of ``path`` already in the page cache (``mincore``).

    None where libc or ``mincore`` is not available (Windows). Mapping the file only to ask: nothing is read.
    """
    if length <= 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        map_file, mincore, unmap = libc.mmap, libc.mincore, libc.munmap
        prot_read, map_shared = mmap.PROT_READ, mmap.MAP_SHARED
    except (OSError, AttributeError):
        return None
    map_file.restype = ctypes.c_void_p
    map_file.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with open(path, "rb") as file:
        address = map_file(None, length, prot_read, map_shared, file.fileno(), 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-length // mmap.PAGESIZE)
        resident = (ctypes.c_ubyte * pages)()
        if mincore(address, length, resident) != 0:
            return None
        return sum(flag & 1 for flag in resident) / pages
    finally:
        unmap(address, length)


@dataclass
class ReadSample:
    """A timed sequential read of the shard files, as the engine reads them (``os.preadv``, one buffer)."""

    nbytes: int
    seconds: float
    cached_before: float | None  # share of those bytes in the page cache before reading, if known

    @property
    def bandwidth(self) -> float:
        return self.nbytes / self.seconds if self.seconds else 0.0


def measure_read_bandwidth(paths: list[Path], limit: int = BANDWIDTH_SAMPLE_BYTES) -> ReadSample:
    """Read up to ``limit`` bytes of ``paths`` in order, as the engine reads (``os.preadv`` into one buffer)."""
    spans = []
    left = limit
    for path in paths:
        if left <= 0:
            break
        span = min(path.stat().st_size, left)
        spans.append((path, span))
        left -= span
    fractions = [(page_cache_fraction(path, span), span) for path, span in spans]
    known = [(f, span) for f, span in fractions if f is not None]
    cached = sum(f * span for f, span in known) / sum(span for _, span in known) if known else None
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path, span in spans:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < span:
                n = os.preadv(fd, [view[: min(_READ_CHUNK, span - offset)]], offset)
                if n == 0:
                    break
                offset += n
            total += offset
        finally:
            os.close(fd)
    return ReadSample(total, time.perf_counter() - start, cached)


def cache_state(cached: float | None) -> str:
    if cached is None:
        return "page cache state unknown on this system"
    if cached >= 0.9:
        return (
            f"page cache warm ({cached:.0%} of it was cached), so this is memory speed; a cold start "
            "reads at disk speed"
        )
    if cached <= 0.1:
        return f"page cache cold ({cached:.0%} was cached), so this is disk speed"
    return f"page cache partly warm ({cached:.0%} was cached): between disk and memory speed"
