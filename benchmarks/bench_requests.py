"""CPU per range request of the direct reader (``hf_weightstream.hub.direct_http``), over HTTP and HTTPS.

What it answers: how much of a fetch thread's CPU one range request costs apart from its body's bytes. On a small
machine that CPU comes out of the forward pass streaming beside the downloads, and a model is fetched in a few
hundred requests (more through a mirror, where each one is a resolve call).

Setup: the project's local Hub (``hf_weightstream.testing.hub_server``, xet mode, no latency or bandwidth cap;
``tls=True`` for HTTPS, when the ``openssl`` command is there) serves a 16 MiB file in this process. One client
thread sends ``--requests`` GETs of 4 KiB ranges, one after another over one kept-alive connection, to the signed
bridge URL, and reads each body to its end. The client thread's own CPU time (``time.thread_time``) is divided by
the number of requests. Rows:

* ``direct``: `DirectConnections` as hf_weightstream uses it (the answer's headers read a packet at a time, the
  body one ``recv_into`` at a time);
* ``bare socket file``: the same, with the answer reading its headers from an unbuffered socket file (one byte
  per ``recv``), as the direct reader did before;
* ``http.client``: the standard library's own buffered reader, for reference (it cannot be used as is: a read
  that times out loses the body bytes it holds, see ``direct_http._Answer``).

Run from the repository root: ``python -m benchmarks.bench_requests`` (``--out NAME`` for the results file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import httpx2

from benchmarks.bench_core import git
from hf_weightstream.hub import direct_http
from hf_weightstream.testing.hub_server import HubServer

RESULTS = Path(__file__).resolve().parent / "results"
FILE_BYTES = 16 << 20
RANGE_BYTES = 4096


def _bare_socket_file(self: direct_http._Answer, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
    http.client.HTTPResponse.__init__(self, sock, *args, **kwargs)
    self.fp.close()
    self.fp = _BareReader(sock.makefile("rb", buffering=0))


class _BareReader:
    """The unbuffered socket file the direct reader read its answers from before: lines one byte per ``recv``."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def recv_into(self, b: memoryview) -> int:
        return self._raw.readinto(b)


def _stock(self: direct_http._Answer, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
    http.client.HTTPResponse.__init__(self, sock, *args, **kwargs)


def _stock_readinto(self: direct_http._Answer, b: memoryview) -> int:
    return http.client.HTTPResponse.readinto(self, b)


def measure(url: str, requests: int) -> float:
    """Client thread CPU seconds per request."""
    connections = direct_http.DirectConnections()
    cpu: list[float] = []

    def client() -> None:
        buffer = memoryview(bytearray(RANGE_BYTES))
        start = time.thread_time()
        for i in range(requests):
            offset = (i * RANGE_BYTES * 7) % (FILE_BYTES - RANGE_BYTES)
            answer = connections.get(url, {"Range": f"bytes={offset}-{offset + RANGE_BYTES - 1}"}, 10.0)
            got = 0
            while got < RANGE_BYTES:
                n = answer.stream.readinto(buffer[got:])
                if not n:
                    raise RuntimeError("the body ended early")
                got += n
            answer.close()
        cpu.append(time.thread_time() - start)

    thread = threading.Thread(target=client)
    thread.start()
    thread.join()
    connections.close()
    return cpu[0] / requests


def run(requests: int, rounds: int) -> dict[str, Any]:
    variants = {
        "direct": {},
        "bare socket file": {"__init__": _bare_socket_file},
        "http.client": {"__init__": _stock, "readinto": _stock_readinto},
    }
    schemes = ["http", "https"] if shutil.which("openssl") else ["http"]
    rows: dict[str, dict[str, list[float]]] = {v: {s: [] for s in schemes} for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "blob.bin").write_bytes(os.urandom(FILE_BYTES))
        (Path(folder) / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
        for scheme in schemes:
            with HubServer(mode="xet", tls=scheme == "https") as server:
                server.add_repo("bench/blob", folder)
                location = httpx2.head(f"{server.url}/bench/blob/resolve/main/blob.bin").headers["Location"]
                trust = {"SSL_CERT_FILE": str(server.ca_file)} if server.ca_file is not None else {}
                with mock.patch.dict(os.environ, trust):
                    for _ in range(rounds):  # interleaved: the machine's drift favours no variant
                        for name, patches in variants.items():
                            patched = mock.patch.multiple(direct_http._Answer, **patches) if patches else nullcontext()
                            with patched:
                                rows[name][scheme].append(measure(location, requests))
    return {"schemes": schemes, "rows": rows}


def render(report: dict[str, Any]) -> str:
    schemes = report["schemes"]
    lines = [
        f"# CPU per range request of the direct reader ({report['date']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['requests']} GETs of {RANGE_BYTES} B ranges over one kept-alive connection to the local Hub's "
        f"bridge, per variant and round; {report['rounds']} interleaved rounds, the least CPU kept. Machine: "
        f"{report['machine']}. Code: git {report['git_head']}.",
        "",
        "| reader | " + " | ".join(f"{s}: CPU ms per request (rounds)" for s in schemes) + " |",
        "| --- | " + " | ".join("---" for _ in schemes) + " |",
    ]
    for name, by_scheme in report["rows"].items():
        cells = []
        for scheme in schemes:
            values = by_scheme[scheme]
            cells.append(f"{min(values) * 1e3:.3f} ({', '.join(f'{v * 1e3:.3f}' for v in values)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant and round (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--out", help="results file stem in benchmarks/results/ (default requests_<date>)")
    args = parser.parse_args(argv)
    report = run(args.requests, args.rounds)
    date = dt.date.today().isoformat()
    report.update(
        date=date,
        requests=args.requests,
        rounds=args.rounds,
        command=" ".join(["python -m benchmarks.bench_requests", *(sys.argv[1:] if argv is None else argv)]),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        git_head=git("rev-parse", "--short", "HEAD"),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (args.out or f"requests_{date}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    markdown = render(report)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
