"""The per-model streaming engine: execution-order tracing, prefetch, loading and installing weights.

Life of a unit, as seen from the hooks:

1. ``acquire`` (pre-forward) pins the unit; if it is resident this is a hit, if a prefetch is still reading it
   we wait only for that read, otherwise we read it now (a miss). Its tensors are then attached to the model.
   The next ``lookahead`` units of the learned schedule are handed to background readers.
2. ``release`` (post-forward) unpins it; it stays resident until the pool needs room.

The schedule is the order of ``acquire`` calls in the first complete forward pass (the way diffusers' group
offloading traces execution order); later passes follow it cyclically, so the head of token t prefetches the
first blocks of token t+1.

Embedding lookups are the exception: an embedding whose table is not resident reads only the rows of the ids it
is given (``gather``), so an untied table never loads whole and a tied one loads once per token, for the head.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import BudgetError, StreamingRuntimeError
from .residency import Ledger
from .sources import read_many
from .units import full_bytes, measure

if TYPE_CHECKING:
    from .residency import WeightPool
    from .sources import ByteSource
    from .units import Unit

_EVENT_LOG_SIZE = 20_000


def _view(buffer: torch.Tensor, position: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    raw = buffer[position : position + nbytes]
    try:
        typed = raw.view(dtype)
    except RuntimeError:  # misaligned for this dtype: copy out (rare; safetensors aligns tensors)
        typed = raw.clone().view(dtype)
    return typed.view(shape)


class StreamEngine:
    """Streams one model's units through a `WeightPool`."""

    def __init__(
        self,
        model: nn.Module,
        units: list[Unit],
        source: ByteSource,
        pool: WeightPool,
        device: torch.device,
        policy: str,
        lookahead: int,
        label: str,
    ):
        self.model = model
        self.units = units
        self.source = source
        self.pool = pool
        self.device = device
        self.policy = policy
        self.lookahead = lookahead
        self.label = label
        self.ledger = Ledger()
        self.keep_resident: set[str] = set()
        self.schedule: list[Unit] = []
        self._position: dict[int, list[int]] = {}
        self._trace: list[Unit] | None = None
        self._pos = -1
        self.last_active = 0
        self.forward_lock = threading.RLock()
        self._depth = 0
        self._streams = threading.local()
        self.counters = collections.Counter()
        self.stall_seconds = 0.0
        self.read_seconds = 0.0
        self.events: collections.deque[tuple[str, str, float, float, str]] = collections.deque(maxlen=_EVENT_LOG_SIZE)
        self._compute_start: dict[int, float] = {}
        # Off the CPU, reads land in (pinned) host staging buffers, then are copied to the device.
        self.copy_to_device = device.type != "cpu"
        self._staging: dict[int, list[torch.Tensor]] = {}
        self._staging_lock = threading.Lock()
        self.staging_bytes = 0
        for unit in units:
            unit.engine = self
            if unit.rows is not None:
                unit.rows.engine = self
                if not hasattr(source, "map"):  # row lookups are for local files; a remote table streams whole
                    unit.gather_from, unit.gather, unit.rows = None, False, None
                    measure(unit)
        self.model_bytes = sum(full_bytes(unit) for unit in units)
        self._check_budget()
        pool.register(self)

    def _check_budget(self) -> None:
        biggest = max(self.units, key=lambda u: u.charge_bytes)
        if biggest.charge_bytes > self.pool.budget:
            raise BudgetError(
                f"The budget ({self.pool.budget:,} bytes) is smaller than unit {biggest.name!r}, which needs "
                f"{biggest.charge_bytes:,} bytes on {self.device} while it loads. Use a budget of at least "
                f"{biggest.charge_bytes:,} bytes, ideally a few times more so reads can run ahead."
            )

    # ------------------------------------------------------------------------------------ forward sessions
    def begin_forward(self) -> None:
        """Root module pre-forward: serialise callers of this model and start tracing if needed."""
        self.forward_lock.acquire()
        self._depth += 1
        if self._depth == 1 and not self.schedule:
            self._trace = []

    def end_forward(self) -> None:
        """Root module post-forward (also when the forward raised): clear stale pins, learn the schedule."""
        try:
            self._depth -= 1
            if self._depth:
                return
            with self.pool.cond:
                me = threading.get_ident()
                for unit in self.units:
                    stale = unit.pin_threads.pop(me, 0)
                    if stale:  # the forward raised between a unit's pre- and post-forward
                        unit.pins -= stale
                    if unit.rows is not None and unit.rows.installed:
                        self._drop_rows(unit)
                self.pool.cond.notify_all()
            if self._trace is not None:
                trace, self._trace = self._trace, None
                if trace and all(u.pins == 0 for u in self.units):
                    with self.pool.cond:
                        self._set_schedule(trace)
                        self._prefetch_ahead()  # the next pass starts with these
        finally:
            self.forward_lock.release()

    def _set_schedule(self, trace: list[Unit]) -> None:
        self.schedule = trace
        self._position = {}
        for i, unit in enumerate(trace):
            self._position.setdefault(id(unit), []).append(i)
        self._pos = len(trace) - 1
        self.keep_resident = (
            plan_resident_set(trace, self.pool.budget, self.lookahead) if (self.policy == "schedule") else set()
        )
        self.counters["schedule_length"] = len(trace)

    def _advance(self, unit: Unit) -> None:
        if self._trace is not None:
            self._trace.append(unit)
            return
        positions = self._position.get(id(unit))
        if not positions:
            return
        n = len(self.schedule)
        self._pos = min(positions, key=lambda p: (p - self._pos - 1) % n)

    def _next_use(self, unit: Unit) -> int:
        """Steps until ``unit`` is needed again by the schedule (a large number if never)."""
        positions = self._position.get(id(unit))
        if not positions:
            return 1 << 30
        n = len(self.schedule)
        return min((p - self._pos - 1) % n for p in positions)

    # ------------------------------------------------------------------------------------ eviction policy
    def eviction_rank(self, unit: Unit) -> float:
        """Lower is evicted first (the pool compares ranks among this model's units)."""
        if self.policy == "lru" or not self.schedule:
            return unit.last_used
        return -self._next_use(unit)

    def evictable_for_prefetch(self, victim: Unit, for_unit: Unit) -> bool:
        """A prefetch may only evict what is needed later than the unit it fetches."""
        if not self.schedule:
            return True
        return self._next_use(victim) > self._next_use(for_unit)

    def evict(self, unit: Unit) -> None:
        """Drop a resident, unpinned unit (pool lock held)."""
        if unit.installed:
            self._uninstall(unit)
        unit.tensors = None
        unit.chunks = None  # the last views of mapped ranges go: they are unmapped
        unit.state = "absent"
        unit.prefetched = False
        if unit.held_bytes:
            self.pool.refund(unit, unit.held_bytes)
        self.counters["evictions"] += 1

    def release_all(self) -> None:
        """Evict every unpinned unit of this model (its memory goes back to the pool)."""
        with self.pool.cond:
            for unit in self.units:
                if unit.state == "resident" and not unit.pins:
                    self.evict(unit)

    # ------------------------------------------------------------------------------------ acquire/release
    def acquire(self, unit: Unit) -> None:
        start = time.perf_counter()
        me = threading.get_ident()
        cond = self.pool.cond
        demand = False
        with cond:
            self.last_active = self.pool.tick()
            unit.pins += 1
            unit.pin_threads[me] = unit.pin_threads.get(me, 0) + 1
            try:
                self._advance(unit)
                waited = unit.state != "resident"
                if not waited:
                    self.counters["hits"] += 1
                elif unit.state == "loading":
                    self.counters["late_prefetches"] += 1
                else:
                    self.counters["misses"] += 1
                    demand = self._start_load(unit, prefetch=False)
                self._prefetch_ahead()
            except BaseException:
                self._unpin(unit, me)
                raise
        if demand:
            self._load(unit)
        with cond:
            while unit.state == "loading":
                cond.wait()
            if unit.state != "resident":
                self._unpin(unit, me)
                error = unit.error
                raise StreamingRuntimeError(f"Could not load weights of {unit.name!r}: {error}") from error
            if not unit.installed:
                self._install(unit)
            unit.prefetched = False
            unit.last_used = self.pool.tick()
        now = time.perf_counter()
        if waited:  # compute stood still while this unit was read
            self.stall_seconds += now - start
        self._compute_start[id(unit)] = now

    def release(self, unit: Unit) -> None:
        me = threading.get_ident()
        with self.pool.cond:
            self._unpin(unit, me)
            unit.last_used = self.pool.tick()
        start = self._compute_start.pop(id(unit), None)
        if start is not None:
            self.events.append(("compute", unit.name, start, time.perf_counter(), threading.current_thread().name))

    # ------------------------------------------------------------------------------------ embedding rows
    def gather(self, unit: Unit, ids: torch.Tensor) -> torch.Tensor:
        """Install only the table rows ``ids`` looks up; returns the ids renumbered into those rows.

        ``F.embedding(inverse, rows)`` equals ``F.embedding(ids, table)`` bit for bit (a lookup is a copy), so a
        decode step reads one row instead of the whole table (131 MB for a 32k x 1024 fp32 vocabulary), and a
        tied table is read once per token, for the head, instead of twice.
        """
        (spec,) = unit.specs
        entry, rows_state, module = spec.source, unit.rows, unit.gather_from
        vocab, width = entry.shape
        unique, inverse = torch.unique(ids.detach().cpu(), return_inverse=True)
        if unique.numel() and (unique[0] < 0 or unique[-1] >= vocab):
            raise IndexError(f"index out of range in self: ids must be in [0, {vocab}) for {unit.name}")
        row_bytes = width * entry.dtype.itemsize
        rows_bytes = unique.numel() * row_bytes
        charge = rows_bytes + (unique.numel() * width * spec.dtype.itemsize if spec.dtype != entry.dtype else 0)
        start = time.perf_counter()
        with self.pool.cond:
            self.last_active = self.pool.tick()
            self.pool.reserve(rows_state, charge, prefetch=False)
        try:
            raw = torch.empty(rows_bytes, dtype=torch.uint8)
            view = memoryview(raw.numpy())
            rows_at = [(entry.offset + row * row_bytes, view[i * row_bytes : (i + 1) * row_bytes])
                       for i, row in enumerate(unique.tolist())]  # fmt: skip
            read_many(self.source, entry.shard, rows_at)
            rows = raw.view(entry.dtype).view(unique.numel(), width).to(device=self.device, dtype=spec.dtype)
        except BaseException:
            with self.pool.cond:
                self._drop_rows(unit)
            raise
        end = time.perf_counter()
        with self.pool.cond:
            module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
            # padding_idx only shapes gradients, but F.embedding checks it against the (now few) rows.
            rows_state.padding_idx, module.padding_idx = module.padding_idx, None
            rows_state.installed = True
            self.counters["gathered_rows"] += unique.numel()
            self.counters["bytes_read"] += rows_bytes
            self.counters["reads"] += unique.numel()
            self.read_seconds += end - start
            self.stall_seconds += end - start
        self.events.append(("read", rows_state.name, start, end, threading.current_thread().name))
        return inverse.view(ids.shape).to(ids.device)

    def end_gather(self, unit: Unit) -> None:
        with self.pool.cond:
            self._drop_rows(unit)

    def _drop_rows(self, unit: Unit) -> None:
        rows_state, module = unit.rows, unit.gather_from
        if rows_state.installed:
            slot = next(slot for slot in unit.specs[0].slots if slot.module is module)
            module._parameters["weight"] = slot.placeholder
            module.padding_idx = rows_state.padding_idx
            rows_state.installed = False
        if rows_state.held_bytes:
            self.pool.refund(rows_state, rows_state.held_bytes)

    def _unpin(self, unit: Unit, thread: int) -> None:
        count = unit.pin_threads.get(thread, 0)
        if count:
            unit.pins -= 1
            if count == 1:
                del unit.pin_threads[thread]
            else:
                unit.pin_threads[thread] = count - 1
        self.pool.cond.notify_all()

    def _prefetch_ahead(self) -> None:
        if not self.schedule or not self.lookahead or self._trace is not None:
            return
        n = len(self.schedule)
        for step in range(1, min(self.lookahead, n - 1) + 1):
            nxt = self.schedule[(self._pos + step) % n]
            if nxt.state == "absent" and not self._start_load(nxt, prefetch=True):
                break

    # ------------------------------------------------------------------------------------ loading
    def _start_load(self, unit: Unit, prefetch: bool) -> bool:
        """Reserve room and mark the unit loading (pool lock held). Prefetches are submitted here."""
        if not self.pool.reserve(unit, unit.charge_bytes, prefetch=prefetch):
            return False
        unit.state = "loading"
        unit.prefetched = prefetch
        unit.error = None
        if prefetch:
            self.counters["prefetches"] += 1
            self.pool.executor.submit(self._load, unit)
        return True

    def _load(self, unit: Unit) -> None:
        """Read and materialise a unit (no lock held during I/O); always leaves it resident or absent."""
        start = time.perf_counter()
        try:
            tensors = self._read_and_materialize(unit)
        except BaseException as err:  # noqa: BLE001 - re-raised in the thread that needs the unit
            with self.pool.cond:
                unit.error = err
                unit.state = "absent"
                unit.prefetched = False
                unit.chunks = None
                if unit.held_bytes:
                    self.pool.refund(unit, unit.held_bytes)
                self.pool.cond.notify_all()
            return
        end = time.perf_counter()
        with self.pool.cond:
            unit.tensors = tensors
            extra = unit.held_bytes - unit.resident_bytes
            if extra > 0:  # the raw bytes were only needed to cast or convert: they are gone now
                self.pool.refund(unit, extra)
            unit.state = "resident"
            self.counters["loads"] += 1
            self.counters["bytes_read"] += unit.raw_bytes
            self.counters["reads"] += len(unit.ranges)
            self.read_seconds += end - start
            self.events.append(("read", unit.name, start, end, threading.current_thread().name))
            self.pool.cond.notify_all()

    def _read(self, unit: Unit, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Read every range of the unit into one buffer; returns the per-range slices."""
        view = memoryview(buffer.numpy())
        chunks = []
        for rng in unit.ranges:
            end = rng.buffer_offset + rng.length
            self.source.read_into(rng.shard, rng.offset, view[rng.buffer_offset : end])
            chunks.append(buffer[rng.buffer_offset : end])
        return chunks

    def _read_and_materialize(self, unit: Unit) -> dict[str, torch.Tensor]:
        if not self.copy_to_device:  # CPU execution: the bytes read are the weights
            if hasattr(self.source, "map"):
                chunks = [self.source.map(r.shard, r.offset, r.length) for r in unit.ranges]
            else:
                chunks = self._read(unit, torch.empty(unit.raw_bytes, dtype=torch.uint8))
            tensors = self._materialize(unit, chunks)
            if unit.views_only:
                unit.chunks = chunks
            return tensors
        staging = self._take_staging(unit.raw_bytes)
        try:
            self._read(unit, staging)
            if self.device.type == "cuda":
                stream = self._side_stream()
                with torch.cuda.stream(stream):
                    data = staging.to(self.device, non_blocking=True)
                    tensors = self._materialize(unit, self._slices(unit, data))
                    event = torch.cuda.Event()
                    event.record(stream)
                event.synchronize()  # the reader thread waits for its copy, never the compute stream
            else:
                data = staging.to(self.device, copy=True)
                tensors = self._materialize(unit, self._slices(unit, data))
        finally:
            self._give_staging(staging)
        return tensors

    @staticmethod
    def _slices(unit: Unit, data: torch.Tensor) -> list[torch.Tensor]:
        return [data[r.buffer_offset : r.buffer_offset + r.length] for r in unit.ranges]

    def _take_staging(self, nbytes: int) -> torch.Tensor:
        """A host buffer for device copies: pinned on CUDA, reused across units of the same size."""
        with self._staging_lock:
            free = self._staging.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def _give_staging(self, buffer: torch.Tensor) -> None:
        # Keep at most one buffer per reader that can run at once (lookahead + the demand read).
        with self._staging_lock:
            kept = sum(len(b) for b in self._staging.values())
            if kept < self.lookahead + 1:
                self._staging.setdefault(buffer.numel(), []).append(buffer)
                self.staging_bytes = max(self.staging_bytes, sum(k * len(b) for k, b in self._staging.items()))

    def _side_stream(self) -> torch.cuda.Stream:
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream

    def _materialize(self, unit: Unit, chunks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raw = {}
        for key, entry in unit.entries.items():
            index, position = unit.locate(entry)
            raw[key] = _view(chunks[index], position, entry.nbytes, entry.dtype, entry.shape)
        out: dict[str, torch.Tensor] = {}
        for spec in unit.specs:
            if spec.source is not None:
                tensor = raw[spec.source.key]
                out[spec.name] = tensor if tensor.dtype == spec.dtype else tensor.to(spec.dtype)
        specs = {spec.name: spec for spec in unit.specs}
        for group in unit.groups:
            dtype = specs[group.first_target].dtype
            inputs = {key: raw[key].to(dtype) for key, _ in group.sources}
            for name, tensor in group.convert(inputs, self.model).items():
                if name not in specs:
                    continue
                if tuple(tensor.shape) != specs[name].shape:
                    raise StreamingRuntimeError(
                        f"transformers' converter produced {name} with shape {list(tensor.shape)}, but the model "
                        f"expects {list(specs[name].shape)}: the checkpoint does not match the config."
                    )
                out[name] = tensor.to(specs[name].dtype)
        if not unit.views_only:
            bases = {chunk.untyped_storage().data_ptr() for chunk in chunks}
            for name, tensor in out.items():
                if tensor.numel() and tensor.untyped_storage().data_ptr() in bases:
                    out[name] = tensor.clone()  # converters may return views; the raw bytes are released
        missing = [spec.name for spec in unit.specs if spec.name not in out]
        if missing:
            raise StreamingRuntimeError(f"Unit {unit.name!r} produced no tensor for {missing}.")
        return out

    # ------------------------------------------------------------------------------------ attach/detach
    def _install(self, unit: Unit) -> None:
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for spec in unit.specs:
            tensor = unit.tensors[spec.name]
            if stream is not None:
                tensor.record_stream(stream)
            value: torch.Tensor = nn.Parameter(tensor, requires_grad=False) if spec.slots[0].is_param else tensor
            for slot in spec.slots:
                (slot.module._parameters if slot.is_param else slot.module._buffers)[slot.attr] = value
        unit.installed = True

    def _uninstall(self, unit: Unit) -> None:
        for spec in unit.specs:
            for slot in spec.slots:
                (slot.module._parameters if slot.is_param else slot.module._buffers)[slot.attr] = slot.placeholder
        unit.installed = False

    # ------------------------------------------------------------------------------------ retarget
    def retarget(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Compute on another device and/or dtype from now on; resident weights are dropped, not moved."""
        if device is not None and device.type == "cuda":
            if not torch.cuda.is_available():
                raise StreamingRuntimeError(f"Cannot run on {device}: CUDA is not available on this machine.")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        with self.forward_lock, self.pool.cond:
            if any(u.pins for u in self.units):
                raise StreamingRuntimeError("Cannot move a streamed model while it is running a forward pass.")
            while any(u.state == "loading" for u in self.units):
                self.pool.cond.wait()
            self.release_all()
            if device is not None and device != self.device:
                if any(e is not self for e in self.pool.engines()):
                    raise BudgetError(
                        f"This model shares a WeightPool on {self.device} with other models; a pool serves one "
                        f"device. Load it with its own pool to run it on {device}."
                    )
                self.pool.device = self.device = device
                self.copy_to_device = device.type != "cpu"
            if dtype is not None:
                for unit in self.units:
                    for spec in unit.specs:
                        if spec.dtype.is_floating_point and spec.dtype != dtype:
                            spec.dtype = dtype
                            meta = torch.empty(spec.shape, dtype=dtype, device="meta")
                            placeholder = nn.Parameter(meta, requires_grad=False) if spec.slots[0].is_param else meta
                            for slot in spec.slots:
                                slot.placeholder = placeholder
                                target = slot.module._parameters if slot.is_param else slot.module._buffers
                                target[slot.attr] = placeholder
                    measure(unit)
                self.model_bytes = sum(full_bytes(unit) for unit in self.units)
                self._check_budget()
                if self.schedule:
                    self._set_schedule(self.schedule)

    # ------------------------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        with self.pool.cond:
            resident = sum(u.held_bytes for u in self.units)
            accesses = self.counters["hits"] + self.counters["misses"] + self.counters["late_prefetches"]
            return {
                "units": len(self.units),
                "model_bytes": self.model_bytes,
                "budget_bytes": self.pool.budget,
                "policy": self.policy,
                "lookahead": self.lookahead,
                "device": str(self.device),
                "resident_bytes": resident,
                "resident_units": sum(u.state == "resident" for u in self.units),
                "kept_resident_units": len(self.keep_resident),
                "peak_resident_bytes": self.pool.peak_held,
                "bytes_read": self.counters["bytes_read"],
                "reads": self.counters["reads"],
                "loads": self.counters["loads"],
                "hits": self.counters["hits"],
                "misses": self.counters["misses"],
                "late_prefetches": self.counters["late_prefetches"],
                "prefetches": self.counters["prefetches"],
                "evictions": self.counters["evictions"],
                "hit_rate": self.counters["hits"] / accesses if accesses else 0.0,
                "stall_seconds": self.stall_seconds,
                "read_seconds": self.read_seconds,
                "read_bandwidth_bytes_per_s": (
                    self.counters["bytes_read"] / self.read_seconds if self.read_seconds else 0.0
                ),
                "schedule_length": len(self.schedule),
                "staging_bytes": self.staging_bytes,
                "gathered_rows": self.counters["gathered_rows"],
            }

    def reset_stats(self) -> None:
        with self.pool.cond:
            self.counters = collections.Counter()
            self.stall_seconds = 0.0
            self.read_seconds = 0.0
            self.events.clear()
            self.pool.peak_held = self.pool.held


def plan_resident_set(schedule: list[Unit], budget: int, lookahead: int) -> set[str]:
    """Units to keep resident so that the rest can stream through a look-ahead window within the budget.

    A decoder visits its units in the same cycle every token. With a budget below the model size, LRU evicts
    exactly the unit needed next and never hits; keeping a fixed set resident is optimal for such a cycle
    (Belady). We keep the largest units that fit next to the streaming window, greedily.

    Every byte not kept is read again each token, which sets the floor on time per token, so the window is
    sized for the depth (0..lookahead) that keeps the most bytes resident (the deepest among equals). Prefetch
    still looks ``lookahead`` units ahead, but only into room that evicts no kept unit.
    """
    unique = list({id(u): u for u in schedule}.values())

    def fits(candidate: set[str], depth: int) -> bool:
        kept_bytes = sum(u.resident_bytes for u in unique if u.name in candidate)
        streamed = [u for u in schedule if u.name not in candidate]
        window = 0
        for i in range(len(streamed)):
            span = {id(u): u for u in (streamed[(i + j) % len(streamed)] for j in range(depth + 1))}
            window = max(window, sum(u.charge_bytes for u in span.values()))
        return kept_bytes + window <= budget

    def kept_bytes(names: set[str]) -> int:
        return sum(u.resident_bytes for u in unique if u.name in names)

    best: set[str] | None = None
    for depth in range(lookahead, -1, -1):
        kept: set[str] = set()
        for unit in sorted(unique, key=lambda u: -u.resident_bytes):
            if fits(kept | {unit.name}, depth):
                kept.add(unit.name)
        if best is None or kept_bytes(kept) > kept_bytes(best):
            best = kept
    return best
