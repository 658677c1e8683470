"""Run a benchmark contender in a fresh process under a real memory limit, its model's files cold.

A machine with plenty of RAM hides what a container shows: under a cgroup memory limit the page cache counts
against the limit, so a loader that maps 1.4 GB of files in a 965 MB container makes the kernel reclaim pages
on every read, and one that allocates too much is OOM-killed. ``run_limited`` reproduces that for any
command (benchmarks of dense, MoE or quantized models all use it):

    from benchmarks.memlimit import run_limited
    run = run_limited([sys.executable, "-m", "my.worker", job], limit_bytes=965_000_000, cold_files=shards)
    run.killed, run.peak_bytes, run.limit_hits, run.result  # result: the worker's tagged JSON line

* The model's files are dropped from the page cache first (``POSIX_FADV_DONTNEED``), so every contender
  starts cold.
* A child cgroup with the limit is made next to the one this process is in (v2 ``memory.max``, else v1
  ``memory.limit_in_bytes``; swap is capped too where the kernel has it), the command joins it before it
  starts (``preexec_fn``, so not one byte is charged elsewhere), and the cgroup is removed afterwards, also
  when the command fails or is killed.
* Without root or a writable cgroup filesystem there is no limit to enforce: the command runs with its files
  evicted only, and ``method`` says so (the page cache is then not charged to it, and nothing kills it).

A worker reports by printing one line ``RESULT_TAG + json.dumps(result)`` on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "
NO_CGROUP = (
    "no cgroup (needs root and a writable cgroup filesystem): page-cache eviction only. The limit is NOT "
    "enforced and the page cache is not charged to the process, so loaders that would thrash or be killed "
    "in a container look better here than they would there."
)


def drop_from_page_cache(paths: Sequence[Path]) -> None:
    """Evict the files' clean pages from the page cache, so the next read of them comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class Cgroup:
    """A child memory cgroup of this process's own, with a limit."""

    path: Path
    version: int  # 1 or 2

    def join(self, pid: int | None = None) -> None:
        (self.path / "cgroup.procs").write_text(str(pid if pid is not None else os.getpid()))

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def _counter(self, name: str, key: str) -> int | None:
        for line in (self._read(name) or "").splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return None

    def peak_bytes(self) -> int | None:
        """The most memory (page cache included) the cgroup was charged at once."""
        text = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(text) if text and text.strip().isdigit() else None

    def limit_hits(self) -> int | None:
        """How often charging ran into the limit (v1 ``failcnt``; v2 ``memory.events`` max)."""
        if self.version == 1:
            text = self._read("memory.failcnt")
            return int(text) if text else None
        return self._counter("memory.events", "max")

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return self._counter(name, "oom_kill") or 0

    def describe(self) -> str:
        return f"cgroup v{self.version} {self.path}"


def _own_cgroup_folders() -> list[tuple[int, Path]]:
    """(version, folder) of this process's memory cgroups, v2 first, from /proc/self/cgroup and mountinfo."""
    membership: dict[int, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            membership[2] = path
        elif "memory" in controllers.split(","):
            membership[1] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        version = 2 if tail[0] == "cgroup2" else 1 if tail[0] == "cgroup" and "memory" in tail[2].split(",") else 0
        if not version or version not in membership:
            continue
        root, mountpoint, path = fields[3].rstrip("/"), Path(fields[4]), membership[version]
        if root and not (path == root or path.startswith(root + "/")):
            continue
        folder = mountpoint / path[len(root) :].lstrip("/")
        if folder.is_dir():
            found.append((version, folder))
    return sorted(found, key=lambda vf: -vf[0])


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Cgroup | None]:
    """A fresh child cgroup limited to ``limit_bytes``, removed on exit; None where none can be made."""
    made: Cgroup | None = None
    for version, parent in _own_cgroup_folders() if os.geteuid() == 0 else []:
        child = parent / f"hfws-bench-{uuid.uuid4().hex[:8]}"
        try:
            if version == 2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                (parent / "cgroup.subtree_control").write_text("+memory")  # EBUSY where processes sit here
            child.mkdir()
        except OSError:
            continue
        try:
            if version == 2:
                (child / "memory.max").write_text(str(limit_bytes))
                with contextlib.suppress(OSError):
                    (child / "memory.swap.max").write_text("0")
            else:
                (child / "memory.limit_in_bytes").write_text(str(limit_bytes))
                if _has_swap():  # (with no swap, a memsw limit only stops memory.failcnt from counting)
                    with contextlib.suppress(OSError):  # no swap accounting in this kernel: nothing to cap
                        (child / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError:
            _remove(child)
            continue
        made = Cgroup(child, version)
        break
    try:
        yield made
    finally:
        if made is not None:
            _remove(made.path)


def _has_swap() -> bool:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1]) > 0
    return False


def _remove(path: Path) -> None:
    """rmdir a cgroup once its processes are gone (killing stragglers of a command that timed out)."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"could not remove cgroup {path}: remove it by hand (rmdir) once its processes are gone")


@dataclass
class LimitedRun:
    """What happened to one command run under a memory limit."""

    command: list[str]
    limit_bytes: int | None
    method: str  # the cgroup used, or NO_CGROUP
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    result: dict[str, Any] | None  # the worker's RESULT_TAG line, parsed
    killed: bool  # OOM-killed (or killed by a signal)
    timed_out: bool = False
    peak_bytes: int | None = None  # the cgroup's peak charge, page cache included
    limit_hits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self) -> str | None:
        """Why there is no result, in one line (None when there is one)."""
        if self.result is not None:
            return None
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.killed:
            return "OOM-killed" if self.extra.get("oom_kills") else f"killed by signal {-self.returncode}"
        tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
        return f"exit {self.returncode}: " + " | ".join(tail)


def run_limited(
    command: Sequence[str],
    limit_bytes: int | None,
    cold_files: Sequence[Path] = (),
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 1800,
) -> LimitedRun:
    """Run ``command`` in a fresh process inside a cgroup limited to ``limit_bytes``, ``cold_files`` evicted.

    ``limit_bytes=None`` runs it without a cgroup (a reference row), so every row goes through one path.
    """
    drop_from_page_cache(cold_files)
    limiting = memory_cgroup(limit_bytes) if limit_bytes is not None else contextlib.nullcontext()
    with limiting as cgroup:
        preexec = (lambda: cgroup.join()) if cgroup is not None else None
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - start
        oom_kills = cgroup.oom_kills() if cgroup is not None else 0
        run = LimitedRun(
            command=list(command),
            limit_bytes=limit_bytes,
            method=cgroup.describe() if cgroup is not None else NO_CGROUP if limit_bytes is not None else "no limit",
            returncode=proc.returncode,
            seconds=seconds,
            stdout=stdout,
            stderr=stderr,
            result=_result(stdout),
            killed=proc.returncode < 0 and not timed_out,
            timed_out=timed_out,
            peak_bytes=cgroup.peak_bytes() if cgroup is not None else None,
            limit_hits=cgroup.limit_hits() if cgroup is not None else None,
            extra={"oom_kills": oom_kills},
        )
    return run


def _result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    return None


def report(result: dict[str, Any]) -> None:
    """Worker side: print the result line ``run_limited`` looks for."""
    print(RESULT_TAG + json.dumps(result), flush=True)
