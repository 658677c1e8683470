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
from pathlib import Path
from typing import Protocol

import torch

from .errors import CheckpointError
from .index import FIX_HINT

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


def read_many(source: ByteSource, shard: str, reads: list[tuple[int, memoryview]]) -> None:
    """Several small reads of one shard (embedding rows): in one round of parallel requests when the source can
    (a Hub source; one round trip per row would cost far more than the rows), else one read each."""
    many = getattr(source, "read_many", None)
    if many is not None:
        many(shard, reads)
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
