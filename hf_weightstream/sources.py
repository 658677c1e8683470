"""Where weight bytes come from: local files today, HTTP ranges from the Hub for lazy streaming.

A source answers one question, "copy bytes [offset, offset+len) of shard S into this buffer", from any thread.
Local files use ``os.preadv`` into the caller's buffer: positional reads need no seek lock, release the GIL,
land directly in the (reusable, possibly pinned) buffer, and never map the whole file, so the page cache, not
the process, holds what the OS decides to keep.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from .errors import CheckpointError
from .index import FIX_HINT


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
