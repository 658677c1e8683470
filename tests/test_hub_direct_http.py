"""Range bodies read straight into our buffer (hf_weightstream/hub/direct_http.py): used for the ranges sent to a
file's known location, never where it would leave differently from huggingface_hub's own client, and as careful
with connections as httpx2 is. The fault tests of test_hub_today.py run through it too (it is the default)."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx2
import pytest
from hubtools import (
    assert_cache_verified,
    assert_each_byte_once,
    fetched,
    generate,
    make_tiny_llama,
    reference_tokens,
    served,
    shard_sizes,
    stream,
    streaming_defaults,
)
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import _http

from hf_weightstream import StreamingRuntimeError, hub, wait_until_cached
from hf_weightstream.hub import direct_http
from hf_weightstream.hub.remote import RangeFetchError
from hf_weightstream.testing import hub_server
from hf_weightstream.testing.hub_server import Fault

streaming = pytest.fixture(autouse=True)(streaming_defaults)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the TLS bridge's certificate needs openssl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs `DirectConnections.get` was called with (it still does its work)."""
    calls: list[str] = []
    real = direct_http.DirectConnections.get

    def spy(self, url, headers, timeout):
        calls.append(url)
        return real(self, url, headers, timeout)

    monkeypatch.setattr(direct_http.DirectConnections, "get", spy)
    return calls


def test_ranges_to_a_known_location_are_read_directly_over_kept_connections(
    tiny: Path, tmp_path: Path, monkeypatch, direct_calls: list[str]
) -> None:
    monkeypatch.setattr(hub.schedule, "MIN_DEMAND_PIECE_BYTES", 2048)  # several requests per shard
    monkeypatch.setattr(hub.schedule, "READAHEAD_CHUNK_BYTES", 2048)
    with served(tiny, tmp_path) as server:
        model = stream(max_connections=3)
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=60)
        log = [r for r in server.log if r.file and r.file.endswith(".safetensors") and r.method == "GET"]
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)
    bridge = [r for r in log if r.origin == "bridge"]
    assert len(bridge) == len(log), "every range went to the bridge the shard's HEAD (through httpx2) pointed to"
    assert len(direct_calls) == len(bridge), "every range sent to the bridge was read directly"
    assert all("/xet-bridge" in url for url in direct_calls)
    peers = {r.peer for r in bridge}
    assert len(peers) < len(bridge), "connections are kept for the next request"


def test_a_client_factory_set_by_the_user_carries_every_range_request(
    tiny: Path, tmp_path: Path, direct_calls: list[str]
) -> None:
    seen: list[str] = []

    def factory() -> httpx2.Client:  # what a user behind a corporate proxy might set
        client = _http.default_client_factory()
        client.event_hooks["request"].append(lambda request: seen.append(str(request.url)))
        return client

    set_client_factory(factory)
    try:
        with served(tiny, tmp_path) as server:
            model = stream(complete_download=False)
            assert generate(model) == reference_tokens(tiny)
            ranged = [r for r in server.log if r.range and r.file and r.file.endswith(".safetensors")]
    finally:
        set_client_factory(_http.default_client_factory)
    assert not direct_calls
    assert len([u for u in seen if "/xet-bridge" in u]) == len([r for r in ranged if r.origin == "bridge"])


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("https://cdn.example/x?sig=1", {}, True),
        ("https://cdn.example/x", {"HTTPS_PROXY": "http://127.0.0.1:9"}, False),
        ("https://cdn.example/x", {"ALL_PROXY": "http://127.0.0.1:9"}, False),
        ("https://cdn.example/x", {"HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "cdn.example"}, True),
        ("http://cdn.example/x", {"HTTPS_PROXY": "http://127.0.0.1:9"}, True),
        ("ftp://cdn.example/x", {}, False),
    ],
)
def test_direct_reads_only_where_huggingface_hub_would_connect_the_same_way(
    monkeypatch: pytest.MonkeyPatch, url: str, env: dict[str, str], expected: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert direct_http.usable(url) is expected
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not direct_http.usable(url)


@pytest.mark.parametrize("tls", [False, pytest.param(True, marks=needs_openssl)], ids=["http", "https"])
def test_a_kept_connection_the_server_closed_meanwhile_is_replaced(tmp_path: Path, monkeypatch, tls: bool) -> None:
    """Over TLS too: the server's close shows as an SSL EOF or a reset, not only as an empty answer."""
    monkeypatch.setattr(hub_server._Handler, "timeout", 0.3)  # the server closes idle connections after 0.3 s
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)  # an LFS file: the xet bridge serves it
    with hub_server.HubServer(mode="xet" if tls else "mirror", tls=tls) as server:
        server.add_repo("org/blob", tmp_path)
        url = f"{server.url}/org/blob/resolve/main/blob.bin"
        if tls:
            monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
            url = httpx2.head(url).headers["Location"]
            assert url.startswith("https://")
        server.clear_log()
        connections = direct_http.DirectConnections()
        bodies = []
        for pause in (0.0, 0.0, 0.6):
            time.sleep(pause)
            answer = connections.get(url, {"Range": "bytes=10-19"}, timeout=10)
            bodies.append((answer.status_code, answer.read()))
            answer.close()
        connections.close()
        peers = [r.peer for r in server.log]
    assert bodies == [(206, bytes(range(10, 20)))] * 3
    assert peers[0] == peers[1] != peers[2], "kept, then replaced once the server had closed it"


def test_a_body_not_read_to_its_end_closes_its_connection(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 64)
    with hub_server.HubServer() as server:
        server.add_repo("org/blob", tmp_path)
        url = f"{server.url}/org/blob/resolve/main/blob"
        connections = direct_http.DirectConnections()
        answer = connections.get(url, {"Range": "bytes=0-9999"}, timeout=10)
        piece = bytearray(100)
        assert answer.stream.readinto(memoryview(piece)) > 0
        answer.close()  # 9,900 bytes left unread: the connection cannot carry the next answer
        again = connections.get(url, {"Range": "bytes=0-3"}, timeout=10)
        assert again.read() == bytes(range(4))
        again.close()
        connections.close()
        peers = [r.peer for r in server.log]
    assert peers[0] != peers[1]


def _serve_once(listener: socket.socket, packets: list[bytes], release: threading.Event) -> threading.Thread:
    """Answer one request on ``listener`` with ``packets``, each sent on its own a moment after the one before."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.recv(65536)
            for packet in packets:
                conn.sendall(packet)
                time.sleep(0.02)
            release.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("length", ["Content-Length: 100000", "Connection: close"], ids=["length", "until-close"])
def test_body_bytes_that_came_with_the_headers_are_kept_when_the_body_then_stalls(length: str) -> None:
    """Headers and the first 700 body bytes in one packet, then silence: a read that times out must have returned
    those 700 bytes first (a buffered reader would hold them while it waits for more, and lose them), whether the
    body's length is given or it ends with the connection."""
    head = b"HTTP/1.1 206 Partial Content\r\n%s\r\nContent-Range: bytes 0-99999/100000\r\n\r\n" % length.encode()
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    _serve_once(listener, [head + b"x" * 700], release)  # one send: the bytes arrive with the headers
    connections = direct_http.DirectConnections()
    try:
        answer = connections.get(f"http://127.0.0.1:{listener.getsockname()[1]}/f", {"Range": "bytes=0-99999"}, 0.3)
        buffer = bytearray(1 << 20)
        got = 0
        with pytest.raises(httpx2.ReadTimeout), memoryview(buffer) as view:
            while True:
                got += answer.stream.readinto(view[got:])
        answer.close()
    finally:
        release.set()
        connections.close()
        listener.close()
    assert got == 700 and buffer[:700] == b"x" * 700


def test_an_answers_headers_are_read_a_packet_at_a_time(monkeypatch) -> None:
    """A status line, ten header lines and a short body in one packet take one or two reads of the socket, not a
    read per byte of the headers (the CPU a fetch thread takes from the forward pass, per request)."""
    reads = []
    real = socket.SocketIO.readinto

    def counted(self, b):
        n = real(self, b)
        reads.append(n)
        return n

    monkeypatch.setattr(socket.SocketIO, "readinto", counted)
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\nContent-Range: bytes 0-99/1000\r\n"
    head += b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 40) for i in range(8)) + b"\r\n"
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    _serve_once(listener, [head + bytes(range(100))], release)
    connections = direct_http.DirectConnections()
    try:
        answer = connections.get(f"http://127.0.0.1:{listener.getsockname()[1]}/f", {"Range": "bytes=0-99"}, 5.0)
        assert answer.status_code == 206 and answer.headers["x-header-7"] == "v" * 40
        assert answer.read() == bytes(range(100))
        answer.close()
    finally:
        release.set()
        connections.close()
        listener.close()
    assert len(reads) <= 2, f"{len(reads)} reads of the socket for {len(head) + 100} bytes"


def test_a_chunked_answer_split_across_packets_is_read_whole() -> None:
    """Chunk sizes, chunk data and their line ends in separate packets: every read ``http.client`` makes of an exact
    length gets that length, not what the first packet held."""
    body = [b"hello ", b"direct ", b"world"]
    packets = [b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"]
    for chunk in body:
        packets += [b"%x\r\n" % len(chunk), chunk[:2], chunk[2:], b"\r", b"\n"]
    packets.append(b"0\r\n\r\n")
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    _serve_once(listener, packets, release)
    connections = direct_http.DirectConnections()
    try:
        answer = connections.get(f"http://127.0.0.1:{listener.getsockname()[1]}/f", {"Range": "bytes=0-99"}, 5.0)
        assert answer.status_code == 403
        assert answer.read() == b"".join(body)
        answer.close()
    finally:
        release.set()
        connections.close()
        listener.close()


def test_https_locations_are_verified_with_httpx2s_certificate_settings() -> None:
    connections = direct_http.DirectConnections()
    connection, reused = connections._connection("https", "cdn.example", None, 5.0)  # not connected yet
    try:
        assert isinstance(connection, http.client.HTTPSConnection) and not reused
        context = connection._context
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert (connection.host, connection.port) == ("cdn.example", 443)
    finally:
        connections.close()


# -- the bridge over HTTPS, as the real one is -------------------------------------------------------------------


@needs_openssl
def test_a_bridge_over_https_is_read_directly_through_stalls_and_refusals(
    tiny: Path, tmp_path: Path, monkeypatch, direct_calls: list[str]
) -> None:
    """TLS under the direct reader: a read that times out on an encrypted stream keeps what it decrypted, and the
    storage's chunked 403 documents are read whole."""
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)  # a stall longer than this is a cut
    with served(tiny, tmp_path, tls=True) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
        model = stream(max_connections=2)
        stall = server.add_fault(Fault(origin="bridge", ranged_only=True, stall=3.0, stall_after=700, times=2))
        refused = server.add_fault(Fault(origin="bridge", ranged_only=True, status=403, every=2, times=2))
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert stall.fired == 2 and refused.fired == 2
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
        bridge = server.bridge_url
    assert bridge.startswith("https://localhost:")
    assert direct_calls and all(url.startswith(f"{bridge}/") for url in direct_calls)
    assert_cache_verified(tmp_path, tiny)


@needs_openssl
@pytest.mark.parametrize("client", ["direct", "user-factory"])
def test_an_untrusted_certificate_is_reported_at_once_with_the_fix(
    tiny: Path, tmp_path: Path, monkeypatch, direct_calls: list[str], client: str
) -> None:
    """No retry passes a certificate check: each read ends at its first attempt (it used to retry with backoff
    for a minute), and the error says which setting trusts the certificate."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    calls = {"fetch": 0, "attempt": 0}
    for name in calls:
        real = getattr(hub.remote.RangeFetcher, f"_{name}" if name == "attempt" else name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(hub.remote.RangeFetcher, f"_{name}" if name == "attempt" else name, counted)
    if client == "user-factory":
        set_client_factory(lambda: _http.default_client_factory())  # a user's own: ranges go through httpx2
    try:
        with served(tiny, tmp_path, tls=True), pytest.raises((StreamingRuntimeError, RangeFetchError)) as caught:
            generate(stream(complete_download=False, max_connections=2))
    finally:
        set_client_factory(_http.default_client_factory)
    error = caught.value if isinstance(caught.value, RangeFetchError) else caught.value.__cause__
    assert isinstance(error, RangeFetchError)
    message = str(error)
    assert "TLS certificate of localhost is not trusted" in message and "SSL_CERT_FILE" in message
    assert calls["fetch"] >= 1 and calls["attempt"] == calls["fetch"], calls
    assert bool(direct_calls) == (client == "direct")
