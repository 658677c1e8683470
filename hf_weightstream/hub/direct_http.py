"""Range bodies read straight into our buffer: the standard library's HTTP/1.1 client, one connection per thread.

Why not httpx2 for these: a body read through it is copied four times on its way to us (the socket read allocates
a bytes object, h11 appends it to its receive buffer and slices it out again, we copy it into our buffer), in
64 KiB pieces with Python work for each. Receiving bench_hub's 608 MB model that way cost the fetch threads
2.2-2.5 CPU-seconds (0.6-0.8 per 192 MB shard, against 0.1-0.2 with ``http.client``'s ``readinto``: measured with
the local Hub's pacing on). On a 2-core machine the forward pass, which streams while the bytes arrive, lost that
time: the link must not take the CPU the compute needs.

So only the bulk of the traffic comes here: range requests to a file's known location (the signed bridge URL, or
a mirror's ``/resolve/`` URL once it answered a range itself). Every other request, and all of them where this
would not behave as huggingface_hub's own client does (`usable`: a client factory the user set with
``set_client_factory``, a proxy from the environment, offline mode), stays on httpx2. The answer is handed back as
an ``httpx2.Response`` whose stream reads from ``http.client``, so every check of ``remote.py`` reads it as any
other answer, and errors are raised as httpx2's transport errors, so its retry rules apply unchanged.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants

from . import _hf_compat as compat

_READ_BYTES = 1 << 20  # a body drained whole (an error's text) is read this much at a time
_LINE_READ_BYTES = 8 << 10  # a status line and headers: one packet's worth, usually all of them


def usable(url: str) -> bool:
    """Whether a request to ``url`` would leave the same way through huggingface_hub's client: its default factory
    (no proxies or certificates configured in code), no proxy for the URL in the environment, not offline."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or constants.is_offline_mode():
        return False
    if not compat.default_http_client_factory():
        return False
    proxies = urllib.request.getproxies()
    proxied = bool(proxies.get(parts.scheme) or proxies.get("all"))
    return not proxied or bool(urllib.request.proxy_bypass(parts.hostname))


class _SocketReader(io.RawIOBase):
    """The socket as an answer reads it: lines from a small buffer, body bytes straight from the socket.

    A bare ``SocketIO`` reads a line one byte per ``recv`` (with a ``poll`` before each, the socket having a
    timeout): hundreds of system calls and Python calls per answer's headers, 1.3 ms of a fetch thread's CPU per
    request against 0.3 ms this way (``benchmarks/bench_requests.py``). A buffered reader reads ahead, and a read
    that times out loses the body bytes it holds (see `_Answer`). So lines are read a packet at a time into
    ``_pending``; `recv_into`, the body's fast path, hands out what is pending before it asks the socket, so what
    arrived is never held while waiting for more. Everything ``http.client`` reads itself gets a buffered reader's
    full reads.
    """

    def __init__(self, raw: socket.SocketIO) -> None:
        super().__init__()
        self._raw = raw
        self._pending = bytearray()

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readline(self, limit: int | None = -1) -> bytes:
        limit = -1 if limit is None else limit
        while True:
            end = self._pending.find(b"\n", 0, limit if limit >= 0 else None) + 1
            if not end and 0 <= limit <= len(self._pending):
                end = limit
            if end:
                line = bytes(self._pending[:end])
                del self._pending[:end]
                return line
            more = self._raw.read(_LINE_READ_BYTES)
            if not more:
                line, self._pending = bytes(self._pending), bytearray()
                return line
            self._pending += more

    def recv_into(self, b: memoryview) -> int:
        """What is pending, else one ``recv_into``: what has arrived (at least one byte, waiting if none has)."""
        if self._pending:
            n = min(len(b), len(self._pending))
            b[:n] = self._pending[:n]
            del self._pending[:n]
            return n
        return self._raw.readinto(b) or 0

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        """``len(b)`` bytes, fewer only at the end of the stream: ``http.client`` reads chunk data and error bodies
        so, and takes a short read for a cut-off body (``IncompleteRead``)."""
        with memoryview(b) as view:
            filled = 0
            while filled < len(view) and (n := self.recv_into(view[filled:])):
                filled += n
            return filled

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            buffer = bytearray(size)
            return bytes(buffer[: self.readinto(memoryview(buffer))])
        out, piece = bytearray(), bytearray(_READ_BYTES)
        with memoryview(piece) as view:
            while n := self.recv_into(view):
                out += view[:n]
        return bytes(out)

    def close(self) -> None:
        self._pending = bytearray()
        self._raw.close()
        super().close()


class _Answer(http.client.HTTPResponse):
    """An answer read from the socket itself: ``readinto`` of a body that is not chunked is one ``recv_into`` (what
    has arrived, at least one byte), so the bytes received before a stall are ours when the read times out.
    (Through the buffered reader ``http.client`` puts in between, body bytes that came with the headers sit in its
    buffer, and its ``readinto1`` copies them out, then blocks for more: a timeout there loses them.)"""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the buffered reader over the socket, unused yet (the socket stays open)
        self.fp = _SocketReader(sock.makefile("rb", buffering=0))

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if self.fp is None or self.chunked:  # chunked: http.client reads the sizes and the data in between
            return super().readinto(b)
        if self.length is not None and len(b) > self.length:
            b = b[: self.length]
        n = self.fp.recv_into(b) if len(b) else 0
        if self.length is None:  # the body ends when the connection does
            if not n and len(b):
                self.close()
            return n
        if not n and len(b):
            self.close()
            raise http.client.IncompleteRead(b"", self.length)
        self.length -= n
        if not self.length:
            self.close()  # the body is complete: the connection can take the next request
        return n


class DirectBody(httpx2.SyncByteStream):
    """The body of one answer; `readinto` is the fast path, iteration the one httpx2's ``read()`` uses."""

    def __init__(self, connections: DirectConnections, connection: http.client.HTTPConnection,
                 answer: http.client.HTTPResponse) -> None:  # fmt: skip
        self._connections = connections
        self._connection = connection
        self._answer = answer

    def readinto(self, view: memoryview) -> int:
        """Read what the socket has into ``view`` (at least one byte, waiting if none came yet); 0 at the end."""
        try:
            return self._answer.readinto(view)
        except TimeoutError as err:
            raise httpx2.ReadTimeout(f"no body bytes for {self._connection.timeout} s") from err
        except (OSError, http.client.HTTPException) as err:  # reset, cut short (IncompleteRead)
            raise httpx2.ReadError(f"{type(err).__name__}: {err}") from err

    def __iter__(self) -> Iterator[bytes]:
        buffer = bytearray(_READ_BYTES)
        with memoryview(buffer) as view:
            while n := self.readinto(view):
                yield bytes(view[:n])

    def close(self) -> None:
        """Keep the connection for the next request if this body was read to its end; close it otherwise (the
        rest of the body would be read as the next answer)."""
        if self._answer.isclosed() and not self._answer.will_close:
            self._connections.keep(self._connection)
        else:
            self._answer.close()
            self._connections.drop(self._connection)


class DirectConnections:
    """Keep-alive connections, one per thread and origin (the fetch threads are long-lived: a pool in effect)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[http.client.HTTPConnection] = set()
        self._ssl: ssl.SSLContext | None = None

    def get(self, url: str, headers: dict[str, str], timeout: float | None) -> httpx2.Response:
        """Send ``GET url`` and return its answer, body not read yet (``close`` it)."""
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = httpx2.Request("GET", url, headers=headers)
        for attempt in (0, 1):
            connection, reused = self._connection(parts.scheme, parts.hostname or "", parts.port, timeout)
            try:
                connection.request("GET", target, headers=headers)
                answer = connection.getresponse()
            except (OSError, http.client.HTTPException) as err:
                self.drop(connection)
                if reused and attempt == 0 and not isinstance(err, TimeoutError):
                    continue  # the server closed an idle keep-alive connection: once more on a new one
                if isinstance(err, TimeoutError):
                    raise httpx2.ConnectTimeout(f"{parts.netloc}: {err}", request=request) from err
                raise httpx2.ConnectError(f"{parts.netloc}: {type(err).__name__}: {err}", request=request) from err
            break
        return httpx2.Response(
            answer.status,
            headers=answer.getheaders(),
            stream=DirectBody(self, connection, answer),
            request=request,
        )

    def keep(self, connection: http.client.HTTPConnection) -> None:
        pool = self._pool()
        key = (type(connection), connection.host, connection.port)
        if key in pool and pool[key] is not connection:
            self.drop(pool[key])
        pool[key] = connection

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, set()
        for connection in connections:
            connection.close()

    def _pool(self) -> dict[tuple, http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _connection(
        self, scheme: str, host: str, port: int | None, timeout: float | None
    ) -> tuple[http.client.HTTPConnection, bool]:
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        pool = self._pool()
        connection = pool.pop((kind, host, port or kind.default_port), None)
        if connection is not None:
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            return connection, True
        if kind is http.client.HTTPSConnection:
            if self._ssl is None:
                self._ssl = httpx2.create_ssl_context()  # httpx2's defaults: its CA bundle, SSL_CERT_FILE/DIR
            connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.response_class = _Answer
        with self._lock:
            self._all.add(connection)
        return connection, False

    def drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        with self._lock:
            self._all.discard(connection)
