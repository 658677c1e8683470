"""The memory this process may really use, and the default budget that follows from it.

A container does not change ``/proc/meminfo``: inside a 1 GB Docker or Kubernetes limit it still shows the
host's 64 GB, and a budget taken from it gets the process OOM-killed. So the default budget looks at every
limit that can kill or starve the process and takes the tightest:

* **cgroup v2** ``memory.max`` minus ``memory.current``, and **cgroup v1** ``memory.limit_in_bytes`` minus
  ``memory.usage_in_bytes``, at the process's own cgroup *and every ancestor* (a limit set on a parent applies
  to all its children). The page cache counts against these limits, so usage is taken as charged, except page
  cache the kernel can drop without writing anything (clean file pages): that is room, not use.
* ``RLIMIT_AS``, minus the address space already mapped.
* On a GPU, the device's free memory (``torch.cuda.mem_get_info``).
* Then the host's ``MemAvailable``.

The default budget leaves part of that room for what is not weights: activations, the KV cache, allocator
slack, and (when weights are mapped from the page cache) the cache itself. Everything here reads plain files,
so it is tested on sample trees (``proc``/``cgroup`` folders) as well as on the machine it runs on.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Above this, a cgroup "limit" is the kernel's way of writing "no limit" (v1 prints 9223372036854771712).
_UNLIMITED = 1 << 60
# Share of the room the default budget takes for weights; the rest is for activations, KV cache and slack.
WEIGHT_SHARE = 0.6
# ... but never leave less than this much room for them.
MIN_RESERVE = 128 << 20
# What the streamed units kept in the page cache leave free of the room a limit has left after a few passes
# (activations and the KV cache of those passes are then in its usage). Smaller than MIN_RESERVE: past the limit
# the kernel takes clean page cache back, so an overshoot costs reads again, never the process.
PAGE_CACHE_SLACK = 64 << 20


@dataclass(frozen=True)
class Limit:
    """One bound on the memory this process may take, and how much of it is left."""

    kind: str  # "cgroup2", "cgroup1", "rlimit_as", "cuda", "host"
    where: str  # the cgroup folder, the device, or the file it came from
    limit: int  # the bound itself, in bytes
    used: int  # what already counts against it and cannot be dropped at once
    mapped: int = 0  # of the rest, file pages mapped into processes: mostly the code running

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def counts_page_cache(self) -> bool:
        """Whether file pages this process reads are charged here (then reads through the cache compete)."""
        return self.kind in ("cgroup1", "cgroup2")

    def describe(self) -> str:
        names = {
            "cgroup2": "cgroup v2 memory.max/memory.high",
            "cgroup1": "cgroup v1 memory.limit_in_bytes",
            "rlimit_as": "RLIMIT_AS",
            "cuda": "free memory on",
            "host": "host MemAvailable",
        }
        return (
            f"{names[self.kind]} {self.where}: {_mb(self.limit)} limit, {_mb(self.used)} in use, "
            f"{_mb(self.available)} available"
        )


@dataclass(frozen=True)
class MemoryLimits:
    """Every limit found for one execution device; the tightest one decides."""

    limits: tuple[Limit, ...]

    @property
    def tightest(self) -> Limit:
        return min(self.limits, key=lambda lim: lim.available)

    @property
    def available(self) -> int:
        return self.tightest.available

    def page_cache_room(self) -> int | None:
        """Bytes of page cache that can stay cached next to the process, or None when nothing bounds it here.

        Mapped file pages count as reclaimable in ``available`` (see `_reclaimable`), but the cache kept next to
        the process must not push out the pages of the code it runs.
        """
        bounded = [
            max(0, lim.available - lim.mapped) for lim in self.limits if lim.counts_page_cache or lim.kind == "host"
        ]
        return min(bounded) if bounded else None

    def describe(self) -> str:
        return "; ".join(lim.describe() for lim in self.limits)


@dataclass(frozen=True)
class DefaultBudget:
    """The budget picked when the user gave none, and why."""

    bytes: int
    limits: MemoryLimits

    def explain(self) -> str:
        tight = self.limits.tightest
        return f"default budget {_mb(self.bytes)} from {tight.describe()}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


# ------------------------------------------------------------------------------------------------- cgroups
def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


@dataclass(frozen=True)
class _Mount:
    version: int  # 1 or 2
    root: str  # the part of the hierarchy mounted here (not "/" inside some containers)
    mountpoint: Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _memory_mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.append(_Mount(2, _unescape(fields[3]), Path(_unescape(fields[4]))))
        elif fstype == "cgroup" and "memory" in options:
            mounts.append(_Mount(1, _unescape(fields[3]), Path(_unescape(fields[4]))))
    return mounts


def _membership(proc_cgroup: str) -> dict[int, str]:
    """Cgroup path per version: the v1 hierarchy that has the memory controller, and the v2 one."""
    paths: dict[int, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    return paths


def _folder(mount: _Mount, path: str) -> Path | None:
    """Where the process's cgroup lives under a mount (None when the mount does not show it)."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    relative = path[len(root) :].lstrip("/")
    folder = mount.mountpoint / relative
    return folder if folder.is_dir() else None


def _reclaimable(stat: dict[str, int], version: int) -> int:
    """Clean page cache: the kernel drops it when the cgroup needs room, without writing anything.

    Mapped file pages count too. In a fresh container they are mostly the shared libraries the process mapped
    (torch's alone are hundreds of MB, charged to the cgroup that first read them): only the pages the code
    runs stay hot, and the kernel takes the rest back under the limit. Counting them as used would leave
    streaming=True no room in exactly the containers it is for.
    """
    if version == 2:
        cache, shmem = stat.get("file", 0), stat.get("shmem", 0)
        dirty = stat.get("file_dirty", 0) + stat.get("file_writeback", 0)
    else:  # the hierarchical totals, since usage_in_bytes covers descendants too
        cache, shmem = stat.get("total_cache", 0), stat.get("total_shmem", 0)
        dirty = stat.get("total_dirty", 0) + stat.get("total_writeback", 0)
    return max(0, cache - shmem - dirty)


def cgroup_limits(proc: Path = Path("/proc")) -> list[Limit]:
    """Memory limits of the process's cgroups, v2 and v1, at its own level and every ancestor."""
    membership = _membership(_read(proc / "self" / "cgroup") or "")
    mounts = _memory_mounts(_read(proc / "self" / "mountinfo") or "")
    limits: list[Limit] = []
    for mount in mounts:
        path = membership.get(mount.version)
        folder = _folder(mount, path) if path is not None else None
        if folder is None:
            continue
        while True:
            limit = _level_limit(folder, mount.version)
            if limit is not None:
                limits.append(limit)
            if folder == mount.mountpoint:
                break
            if mount.version == 1 and _read_int(folder / "memory.use_hierarchy") == 0:
                break  # v1 without hierarchy: a parent's limit does not cover its children
            folder = folder.parent
    return limits


def _level_limit(folder: Path, version: int) -> Limit | None:
    if version == 2:
        limit = _read_int(folder / "memory.max")
        high = _read_int(folder / "memory.high")  # past memory.high the kernel throttles the cgroup hard
        if high is not None and (limit is None or high < limit):
            limit = high
        usage = _read_int(folder / "memory.current")
    else:
        limit = _read_int(folder / "memory.limit_in_bytes")
        usage = _read_int(folder / "memory.usage_in_bytes")
    if limit is None:
        return None
    stat = _stat(folder / "memory.stat")
    used = max(0, (usage or 0) - _reclaimable(stat, version))
    mapped = stat.get("file_mapped", 0) if version == 2 else stat.get("total_mapped_file", 0)
    return Limit(f"cgroup{version}", str(folder), limit, used, mapped)


# ------------------------------------------------------------------------------------------------- the rest
def rlimit_as_limit(proc: Path = Path("/proc"), rlimit: int | None = None) -> Limit | None:
    """``RLIMIT_AS`` minus the address space already mapped (``VmSize``), if a limit is set."""
    if rlimit is None:
        try:
            import resource
        except ImportError:  # Windows: no rlimits
            return None
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        rlimit = soft
    if rlimit < 0 or rlimit >= _UNLIMITED:  # RLIM_INFINITY is -1 (or huge) depending on the platform
        return None
    vm_size = _status_kb(proc / "self" / "status", "VmSize") or 0
    return Limit("rlimit_as", "soft limit", rlimit, vm_size)


def _status_kb(path: Path, key: str) -> int | None:
    for line in (_read(path) or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def host_limit(proc: Path = Path("/proc")) -> Limit:
    """The host's MemTotal and MemAvailable (psutil where there is no /proc)."""
    meminfo = proc / "meminfo"
    total, available = _status_kb(meminfo, "MemTotal"), _status_kb(meminfo, "MemAvailable")
    if total is None or available is None:
        import psutil  # macOS, Windows

        memory = psutil.virtual_memory()
        total, available = memory.total, memory.available
        meminfo = Path("psutil")
    return Limit("host", str(meminfo), total, total - available)


def cuda_limit(device: torch.device, mem_get_info: Callable[[torch.device], tuple[int, int]] | None = None) -> Limit:
    free, total = (mem_get_info or torch.cuda.mem_get_info)(device)
    return Limit("cuda", str(device), total, total - free)


def memory_limits(device: torch.device | str = "cpu", proc: Path = Path("/proc")) -> MemoryLimits:
    """Every limit that bounds weights on ``device``: the GPU's free memory, or the host's limits for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return MemoryLimits((cuda_limit(device),))
    found = cgroup_limits(proc)
    rlimit = rlimit_as_limit(proc)
    if rlimit is not None:
        found.append(rlimit)
    found.append(host_limit(proc))
    return MemoryLimits(tuple(found))


def default_budget(cap: int, limits: MemoryLimits) -> DefaultBudget:
    """Bytes of weights to allow when the user gave no budget.

    ``cap`` bounds it: the most the model could ever use. Of the room
    the tightest limit leaves, the weights get ``WEIGHT_SHARE`` and at least ``MIN_RESERVE`` stays free for
    activations, the KV cache, allocator slack and the page cache the reads go through.
    """
    room = limits.available
    budget = min(int(WEIGHT_SHARE * room), room - MIN_RESERVE)
    return DefaultBudget(max(0, min(budget, cap)), limits)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
FREED_AT_ONCE_BYTES = 64 << 10


@functools.cache
def return_freed_memory_promptly() -> bool:
    """Have the C allocator give blocks of 64 KiB and more back to the kernel as soon as they are freed (what
    ``MALLOC_MMAP_THRESHOLD_=65536`` does); True if it now does. Called when the model does not fit in the room
    a memory limit leaves.

    glibc keeps freed memory in its per-thread arenas, and the size from which a block gets a mapping of its own
    rises to 32 MiB as large blocks are freed: the temporaries of dequantizing FP8 experts in the reader threads
    (float32 copies, scale products) stayed in the process between live weights. The budget does not see that
    memory: an FP8 MoE (2.56 GB dequantized) under an 800 MB cgroup with the default budget reached the limit and
    was killed; with the threshold fixed, its peak was 582 MB (a helper's audit). glibc only; an explicit
    ``MALLOC_MMAP_THRESHOLD_`` is the user's choice and left alone.
    """
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, FREED_AT_ONCE_BYTES))
    except (OSError, AttributeError):
        return False
