"""The per-model streaming engine: execution-order tracing, prefetch, loading and installing weights.

Life of a unit, as seen from the hooks:

1. ``acquire`` (pre-forward) pins the unit; if it is resident this is a hit, if a prefetch is still reading it
   we wait only for that read, otherwise we read it now (a miss). Its tensors are then attached to the model.
   The next ``lookahead`` units of the learned schedule are handed to background readers.
2. ``release`` (post-forward) unpins it; it stays resident until the pool needs room.

The schedule is the order of ``acquire`` calls in the first complete forward pass (the way diffusers' group
offloading traces execution order); later passes follow it cyclically, so the head of token t prefetches the
first blocks of token t+1. What stays resident and how deep to read ahead is the planner's choice
(``planner.py``), from the read bandwidth and compute times measured on the passes so far; how bytes are read
(mapped page cache or ``O_DIRECT``) is the reader's (``sources.py``).

Embedding lookups are the exception: an embedding whose table is not resident reads only the rows of the ids it
is given (``gather``), so an untied table never loads whole and a tied one loads once per token, for the head.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import experts as moe
from . import log, placeholders, planner
from .errors import BudgetError, StreamingRuntimeError
from .limits import PAGE_CACHE_SLACK, memory_limits
from .residency import Ledger
from .sources import CopyReader, MappedReader, read_many
from .units import Holding, full_bytes, measure

if TYPE_CHECKING:
    from .experts import ExpertLayer
    from .residency import WeightPool
    from .sources import ByteSource, Reader
    from .units import Slot, TensorSpec, Unit

_EVENT_LOG_SIZE = 20_000
TOGETHER_BYTES = 64 << 20  # one reader's share of a run of adjacent units read together
_NEXT_GENERATE = 1 << 20  # steps to an encoder unit from inside the decoder's cycle: far, but not never


def _view(buffer: torch.Tensor, position: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    raw = buffer[position : position + nbytes]
    try:
        typed = raw.view(dtype)
    except RuntimeError:  # misaligned for this dtype: copy out (rare; safetensors aligns tensors)
        typed = raw.clone().view(dtype)
    return typed.view(shape)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; None for a tensor read under ``torch.inference_mode``, which has none
    (and which torch itself refuses to change outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


def _half_evicted(unit: Unit) -> bool:
    """Stopped inside `StreamEngine._drop`, which forgets the tensors before it marks the unit absent."""
    return unit.state == "resident" and unit.tensors is None


def _load_error(unit: Unit) -> BaseException:
    """What a failed load raises in the thread that needed the unit: a Ctrl-C (or any other non-``Exception``) that
    interrupted the read as itself, so that ``except KeyboardInterrupt`` and the shell's exit status see it."""
    error = unit.error
    if error is not None and not isinstance(error, Exception):
        return error
    wrapped = StreamingRuntimeError(f"Could not load weights of {unit.name!r}: {error}")
    wrapped.__cause__ = error
    return wrapped


FORKED_MESSAGE = (
    "This streamed model was loaded in another process, and this one was forked from it: the threads that read its "
    "weights do not exist here, so it cannot read them. Load the model in this process (e.g. in the worker's "
    "initializer), or start workers with the 'spawn' method (multiprocessing.get_context('spawn'))."
)
_engines: weakref.WeakSet[StreamEngine] = weakref.WeakSet()


def _forked_child() -> None:
    for engine in list(_engines):
        engine.forked = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked_child)


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
        expert_layers: list[ExpertLayer] | None = None,
    ):
        """The budget is not checked here: the caller may size the pool from `minimum_budget` first, then calls
        `check_budget`; likewise it may replace the default reader with `sources.choose_reader`'s."""
        self.model = model
        self.expert_layers = list(expert_layers or [])
        self.units = units + [unit for layer in self.expert_layers for unit in layer.units]
        self.source = source
        self.pool = pool
        self.device = device
        self.policy = policy
        self.lookahead = lookahead
        self.label = label
        self.ledger = Ledger()
        # How CPU tensors get their bytes (mapped page cache, O_DIRECT buffers, copies); see sources.choose_reader.
        self.reader: Reader = MappedReader(source) if hasattr(source, "map") else CopyReader(source)
        self.io_reason = ""
        self._buffers: dict[int, torch.Tensor] = {}  # unit id -> a recycled buffer its next read lands in
        self._recycled: list[torch.Tensor] | None = None  # buffers of units evicted to make room, while reserving
        # The plan (planner.py): units kept resident, read-ahead depth, predicted cost; re-made as timings move.
        self.meter = planner.Meter()
        self.plan: planner.Plan | None = None
        self.depth = lookahead
        self.keep_resident: set[str] = set()
        # Streamed units the page cache keeps from one token to the next, in the room a memory limit leaves
        # beyond the budget (see _choose_page_cached): read through the cache and left there.
        self.page_cached: set[str] = set()
        self._page_cache_room: int | None = None  # measured once the read mode is settled...
        self._page_cache_mode: str | None = None  # ... for this mode (measured again if a re-check changes it)
        self.memory_limits = lambda: memory_limits(device)  # what the process may use, read when asked
        self.schedule: list[Unit] = []
        self._position: dict[int, list[int]] = {}
        self._trace: list[Unit] | None = None
        self._traced_prefix = 0  # units an encoder session traced before the decoder's (see end_forward)
        self._cycle_start = 0  # schedule[:_cycle_start] runs once per generate, the rest every token
        self.traced_pinned_bytes = 0  # most bytes pinned at once during the tracing pass
        self._pos = -1
        self.last_active = 0
        self.forward_lock = threading.RLock()
        self.forked = False  # set in a child process forked after the load (`_forked_child`)
        _engines.add(self)
        self._depth = 0
        self._pass_failed = False  # a nested session of the current pass raised (see end_forward)
        self._warned_grad = False
        self._log_start: tuple[collections.Counter[str], float] | None = None
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
        self._moe_trace: list[ExpertLayer] = []
        # The model's real buffers as loaded, so that dtype changes cast from them (integration._move_real_tensors).
        self.buffer_origins: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.quantization: dict[str, Any] = {}  # the checkpoint's format, set by the loader (quantization.describe)
        owner = {id(sub): unit for unit in units for module in unit.modules for sub in module.modules()}
        for layer in self.expert_layers:
            layer.block = owner.get(id(layer.module))
            layer.stack = Holding(f"{layer.name} (stacked experts)", self)
            layer.router_holding = Holding(f"{layer.name} (router copy)", self, transient=False)
        for unit in self.units:
            unit.engine = self
            if unit.rows is not None:
                unit.rows.engine = self
                if not hasattr(source, "map"):  # row lookups are for local files; a remote table streams whole
                    unit.gather_from, unit.gather, unit.rows = None, False, None
                    measure(unit)
        self.model_bytes = sum(full_bytes(unit) for unit in self.units)
        placeholders.install(self.units, device)  # weights read outside their module's forward are served, not meta
        placeholders.install_experts(self.expert_layers, device)
        pool.register(self)

    def required_budget(self) -> tuple[int, Unit]:
        """The smallest budget that runs the model, and the unit that sets it.

        A unit loads while the units whose modules enclose it are pinned (BERT's head runs its transform inside).
        """

        def needs(unit: Unit) -> int:
            return unit.charge_bytes + sum(e.charge_bytes for e in unit.enclosing)

        biggest = max(self.units, key=needs)
        return needs(biggest), biggest

    def check_budget(self) -> None:
        needed, biggest = self.required_budget()
        if needed > self.pool.budget:
            chain = " inside ".join(u.name for u in [biggest, *biggest.enclosing])
            raise BudgetError(
                f"The budget ({self.pool.budget:,} bytes) is smaller than unit {chain!r}, which needs "
                f"{needed:,} bytes on {self.device} while it loads. Use a budget of at least "
                f"{self.minimum_budget():,} bytes (what every forward pass of this model fits in), ideally a few "
                "times more so reads can run ahead."
            )
        for layer in self.expert_layers:
            routed = min(layer.top_k or 1, layer.num_experts)
            need = self.experts_call_bytes(layer, routed)
            if need > self.pool.budget:
                raise BudgetError(
                    f"The budget ({self.pool.budget:,} bytes) cannot run one decode step of {layer.name!r}: its block "
                    f"and the {routed} experts a token is routed to need {need:,} bytes at once. Use a budget of at "
                    f"least {self.minimum_budget():,} bytes (what a long prompt that routes to every expert needs)."
                )

    def experts_call_bytes(self, layer: ExpertLayer, routed: int) -> int:
        """Held at once by a call routed to ``routed`` experts: its block, their stacked copy, one more expert read,
        and the routers' copies."""
        # The block runs the call, pinned with the units enclosing it (a root-level unit such as Zaya's).
        block = layer.block.charge_bytes + sum(e.charge_bytes for e in layer.block.enclosing) if layer.block else 0
        expert = max(u.out_bytes for u in layer.units)
        routers = sum(other.router_bytes for other in self.expert_layers)  # kept for predictions
        return block + routed * expert + max(u.charge_bytes for u in layer.units) + routers

    def minimum_budget(self) -> int:
        """The smallest budget any forward fits in: the largest unit (with those enclosing it), or an MoE call routed
        to every expert."""
        # Statically nested units next to the MoE router copies (held once captured), and what the first pass saw
        # pinned at once (a module calling another's).
        routers = sum(layer.router_bytes for layer in self.expert_layers)
        need = max(self.required_budget()[0] + routers, self.traced_pinned_bytes)
        for layer in self.expert_layers:
            need = max(need, self.experts_call_bytes(layer, layer.num_experts))
        return need

    def load_whole(self, unit: Unit) -> None:
        """An embedding table read other than by its own lookups streams whole from now on (placeholders.serve)."""
        with self.pool.cond:
            unit.gather = False
            measure(unit)
        self.check_budget()

    # ------------------------------------------------------------------------------------ forward sessions
    def check_process(self) -> None:
        """Refuse to read in a process forked after the load: the threads that read (and for a Hub source fetch)
        do not exist there, and a read would wait for them forever."""
        if self.forked:
            raise StreamingRuntimeError(FORKED_MESSAGE)

    def begin_forward(self) -> None:
        """Root (or encoder) module pre-forward: serialise callers of this model and start tracing if needed."""
        self.check_process()
        self.forward_lock.acquire()
        self._depth += 1
        if self._depth == 1:
            if hasattr(self.source, "forward_began"):  # a Hub source verifies complete shards between passes
                try:
                    self.source.forward_began()
                except BaseException:  # a shard failed its sha256: what was read from it goes, then we say so
                    self.release_all()
                    self._depth -= 1
                    self.forward_lock.release()
                    raise
            self._log_start = log.forward_snapshot(self)
            self.meter.begin_pass(time.perf_counter())
            if not self.schedule and self._trace is None:
                self._trace = []

    def note_grad_forward(self) -> None:
        """Say once per model that a forward with gradients enabled runs without them."""
        if not self._warned_grad:
            self._warned_grad = True
            warnings.warn(
                "hf_weightstream: streamed models are for inference. This forward ran with gradients enabled, so it "
                "ran as under torch.no_grad() (autograd would keep every streamed weight alive past the budget): "
                "backward() through its outputs raises. Load the model without "
                "device_map='stream' to train or to take gradients.",
                UserWarning,
                stacklevel=4,
            )

    def end_forward(self, encoder: bool = False, failed: bool = False) -> None:
        """Root module post-forward (also when the forward raised): clear stale pins, learn the schedule.

        A traced pass that ``failed`` (a bad input, a Ctrl-C during the slow first pass) saw only the units before
        the failure: its trace is dropped and the next pass traces again. Adopted, it was the schedule for good: the
        units after the failure point were never read ahead nor kept resident.

        An encoder-decoder's ``generate`` calls the encoder once, then the model once per token. An ``encoder``
        session that ends keeps the trace open: the schedule is then the encoder's units once (a prefix),
        followed by the decoder's cycle, so the encoder's last units prefetch the decoder's first.
        """
        try:
            self._depth -= 1
            self._pass_failed = self._pass_failed or failed
            if self._depth:
                return
            failed, self._pass_failed = self._pass_failed, False
            if hasattr(self.source, "forward_ended"):
                self.source.forward_ended()
            with self.pool.cond:
                me = threading.get_ident()
                for unit in self.units:
                    stale = unit.pin_threads.pop(me, 0)
                    if stale:  # the forward raised between a unit's pre- and post-forward
                        unit.pins -= stale
                    self._settle_interrupted(unit, me)
                    if unit.rows is not None and unit.rows.installed:
                        self._drop_rows(unit)
                for layer in self.expert_layers:  # the forward raised inside an experts call
                    self.end_experts(layer)
                for other in self.pool.engines():  # this call's evictions of other models' units, on a shared pool
                    if other is not self:
                        for unit in other.units:
                            other._settle_evicted(unit)
                self.meter.end_pass(time.perf_counter())
                if self.schedule and getattr(self.reader, "settled", False) and self.reader.io != self._page_cache_mode:
                    # Buffered reads pass through the page cache: their pieces in flight take some of that room.
                    self._page_cache_room = max(0, self._spare_page_cache() - self.reader.cache_in_flight)
                    self._page_cache_mode = self.reader.io
                    self._choose_page_cached()
                if self.schedule:
                    self._replan()
                self.pool.cond.notify_all()
            if self._trace is not None and failed:
                self._trace, self._traced_prefix, self._moe_trace = None, 0, []  # traced again by the next pass
            elif self._trace is not None and encoder:
                self._traced_prefix = len(self._trace)
            elif self._trace is not None:
                trace, self._trace = self._trace, None
                prefix, self._traced_prefix = self._traced_prefix, 0
                if trace and all(u.pins == 0 for u in self.units):
                    with self.pool.cond:
                        for earlier, later in zip(self._moe_trace, self._moe_trace[1:], strict=False):
                            earlier.next = later  # whose router predicts the next layer's experts
                        self._set_schedule(trace, cycle_start=prefix if prefix < len(trace) else 0)
                        try:
                            self._prefetch_ahead()  # the next pass starts with these
                        except BaseException:  # a Ctrl-C as a read was handed on: this call's units are settled
                            me = threading.get_ident()
                            for unit in self.units:
                                self._settle_interrupted(unit, me)
                            raise
                    log.log_schedule(self)
            log.log_forward(self, self._log_start)
        finally:
            self.forward_lock.release()

    def _settle_interrupted(self, unit: Unit, me: int) -> None:
        """Finish what a Ctrl-C (an asynchronous exception, which can land between any two lines) left half-done
        in this thread (pool lock held, the session over): an eviction stopped before its refund kept the unit's
        bytes charged for good, and a demand read stopped before it settled the unit (or never started) left it
        'loading' forever, so the next call waited for it forever. Outside those windows an absent unit holds no
        bytes, and a unit is 'loading' for this thread only while it reads it."""
        mine = unit.state == "loading" and unit.loader == me  # this thread's own read, stopped or never started
        if mine or unit.state == "absent" or _half_evicted(unit):
            unit.loader = 0
            self._drop(unit)  # as an eviction drops it: uninstalled, forgotten, its bytes given back

    def _settle_evicted(self, unit: Unit) -> None:
        """`_settle_interrupted` for an eviction another model's call made of this model's unit (pool lock held).
        Only the eviction's windows: this model's own reads, and its calls in other threads, are left alone (an
        absent unit holds no bytes outside an eviction: a read charges them as it marks the unit loading)."""
        if (unit.state == "absent" and unit.held_bytes) or _half_evicted(unit):
            self._drop(unit)

    def _set_schedule(self, trace: list[Unit], cycle_start: int = 0) -> None:
        self.schedule = trace
        self._cycle_start = cycle_start
        self._position = {}
        for i, unit in enumerate(trace):
            self._position.setdefault(id(unit), []).append(i)
        self._pos = len(trace) - 1
        self.plan = None
        self._replan()
        self.counters["schedule_length"] = len(trace)
        if getattr(self.reader, "trial", None) is not None:  # reads now run ahead: time the read modes on them
            self.reader.trial.start()

    def _replan(self) -> None:
        """Choose what stays resident and how deep to read ahead, again when timings moved (pool lock held).

        A new plan replaces the current one only if it is predicted clearly faster: switching costs reads.
        """
        if self.policy != "schedule":  # lru: no resident set; read ahead as configured
            self.keep_resident, self.depth = set(), self.lookahead
            return
        timing = self.meter.timing() or planner.Timing(planner.DEFAULT_BANDWIDTH)
        current = self.plan
        if current is not None and not timing.moved_from(current.timing):
            return
        # Routed experts are acquired per call, outside the cycle: plan the cycle in what their calls leave.
        budget = max(0, self.pool.budget - self.experts_reserve())
        cycle = self.schedule[self._cycle_start :]  # what repeats every token (an encoder prefix runs once)
        best = planner.plan(cycle, budget, self.lookahead, timing)
        if current is not None:
            kept = planner.make_plan(cycle, current.keep, current.depth, timing)
            if best.prediction.seconds > kept.prediction.seconds * (1 - planner.SWITCH_GAIN):
                self.plan = kept  # the same plan, predicted from the new timings
                return
            self.counters["replans"] += 1
        self.plan = best
        self.keep_resident, self.depth = set(best.keep), best.depth
        self._choose_page_cached()

    def _spare_page_cache(self) -> int:
        """Page cache the memory limit has room for beyond some slack and the budget still to fill (pool lock held).

        Measured once the read mode is settled (a few passes in), so what the forward holds is in the usage. The
        limit counts page cache as reclaimable room, so what other models of the pool keep there is taken off.
        """
        room = self.memory_limits().page_cache_room()
        if room is None:
            return 0
        others = sum(engine.page_cached_bytes() for engine in self.pool.engines() if engine is not self)
        return max(0, room - PAGE_CACHE_SLACK - max(0, self.pool.budget - self.pool.held) - others)

    def page_cached_bytes(self) -> int:
        return sum(u.raw_bytes for u in self.units if u.name in self.page_cached)

    def _choose_page_cached(self) -> None:
        """Which streamed units stay in the page cache between tokens (pool lock held).

        Reads into buffers of our own (direct or buffered, under a memory limit below the model) keep streamed
        bytes out of the page cache, and the room the limit leaves beyond the budget would sit idle. Units read
        through the cache and left there cost a memory copy on the next token instead of a disk read. The
        kernel may still reclaim them (they are clean pages) if something else needs the room; they then come
        from disk again, and the process is never pushed past its limit for them.
        """
        room, chosen = self._page_cache_room or 0, set()
        streamed = {u.name: u for u in self.schedule[self._cycle_start :] if u.name not in self.keep_resident}
        for unit in sorted(streamed.values(), key=lambda u: -u.raw_bytes):
            if 0 < unit.raw_bytes <= room:
                chosen.add(unit.name)
                room -= unit.raw_bytes
        self.page_cached = chosen

    def _steps(self, p: int) -> int:
        """Steps from the current position to schedule index ``p``.

        The schedule is a cycle, or (encoder-decoder) a prefix run once followed by a cycle: from inside the cycle,
        a prefix unit is next needed by the next ``generate`` only, counted as far but not never.
        """
        n, start, pos = len(self.schedule), self._cycle_start, self._pos
        if start == 0:
            return (p - pos - 1) % n
        if p >= start:
            return p - pos - 1 if pos < start else (p - pos - 1) % (n - start)
        return p - pos - 1 if pos < p else _NEXT_GENERATE

    def _successor(self, i: int) -> int:
        return i + 1 if i + 1 < len(self.schedule) else self._cycle_start

    def _advance(self, unit: Unit) -> None:
        if self._trace is not None:
            self._trace.append(unit)
            return
        positions = self._position.get(id(unit))
        if not positions:
            return
        if self._cycle_start and all(p < self._cycle_start for p in positions) and self._pos >= self._cycle_start:
            self._pos = -1  # the encoder runs again: a new generate starts at the top of the prefix
        self._pos = min(positions, key=self._steps)

    def _next_use(self, unit: Unit) -> int:
        """Steps until ``unit`` is needed again by the schedule (a large number if never).

        An expert is needed when its layer's block runs and the router picks it: with probability p per call
        (its decayed routing frequency, or 1 once the previous layer predicted it), the expected distance is the
        block's distance plus (1 - p) / p whole cycles.
        """
        layer = unit.expert
        if layer is not None:
            n = len(self.schedule)
            if not n:
                return 1 << 30
            first = self._next_use(layer.block) if layer.block is not None else 0
            p = 1.0 if unit.expert_id in layer.predicted else max(float(layer.frequency[unit.expert_id]), 1e-4)
            return first + int(n * (1.0 - p) / p)
        positions = self._position.get(id(unit))
        if not positions:
            return 1 << 30
        return min(self._steps(p) for p in positions)

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
        chunks = self._drop(unit)
        if chunks and self._recycled is not None and self.reader.recycles:
            buffer = self.reader.reclaim(chunks)  # the read we are making room for can land in this buffer
            if buffer is not None:
                self._recycled.append(buffer)
        self.counters["evictions"] += 1

    def _drop(self, unit: Unit) -> list | None:
        """Make ``unit`` absent: its weights uninstalled and forgotten, its bytes given back (pool lock held).
        Returns its chunks, for the caller to recycle. ``tensors`` goes before ``state``: a unit found resident
        without tensors was stopped half-way here (see `_settle_interrupted`)."""
        if unit.installed:
            self._uninstall(unit)
        unit.tensors = None
        chunks, unit.chunks = unit.chunks, None  # the last views of mapped ranges go: they are unmapped
        unit.state = "absent"
        unit.prefetched = False
        if unit.held_bytes:
            self.pool.refund(unit, unit.held_bytes)
        return chunks

    def release_all(self) -> None:
        """Evict every unpinned unit of this model (its memory goes back to the pool).

        Reads still in flight (the prefetches a forward pass leaves for the next one) are waited for first: they
        would otherwise land after the release, and keep the engine and its memory alive past ``del model``.
        """
        with self.pool.cond:
            while any(unit.state == "loading" and not unit.pins for unit in self.units):
                self.pool.cond.wait(timeout=1.0)
            for unit in self.units:
                if unit.state == "resident" and not unit.pins:
                    self.evict(unit)

    # ------------------------------------------------------------------------------------ acquire/release
    def acquire(self, unit: Unit) -> None:
        self.check_process()
        if unit.gather:  # asked for whole (a read outside its lookups): charged as a whole table from now on
            self.load_whole(unit)
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
                    self.counters["prefetch_hits"] += unit.prefetched  # read ahead, and in time
                elif unit.state == "loading":
                    self.counters["late_prefetches"] += 1
                else:
                    self.counters["misses"] += 1
                    unit.loader = me  # read below by this very thread (see _settle_interrupted)
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
                raise _load_error(unit)
            self._refuse_written(unit, me)
            if not unit.installed:
                self._install(unit)
            unit.prefetched = False
            unit.last_used = self.pool.tick()
            if self._trace is not None:  # the first pass learns what is pinned at once (see minimum_budget)
                pinned = sum(u.held_bytes for u in self.units if u.pins)
                self.traced_pinned_bytes = max(self.traced_pinned_bytes, pinned)
        now = time.perf_counter()
        if waited:  # compute stood still while this unit was read
            self.stall_seconds += now - start
            self.meter.stall(now - start)
        self._compute_start[id(unit)] = now

    def _refuse_written(self, unit: Unit, me: int) -> None:
        """Raise if a weight of this resident unit was written in place since it was read (pool lock held): its
        values are no longer the checkpoint's, and the change would vanish at its next eviction, so outputs would
        depend on what happened to be resident. The unit is dropped, so the next call computes with the checkpoint's
        values again."""
        written = self._written(unit)
        if written and unit.installed:
            # ``weight.data = t`` on an installed weight keeps its version counter, shared with ours: a write into
            # the user's tensor then looks like one into ours until that slot is adopted (found here, off the path of
            # every call, as at the next eviction).
            self._adopt_replaced(unit)
            written = self._written(unit)
        if not written:
            return
        self._unpin(unit, me)
        if not unit.pins:
            self.evict(unit)
        raise StreamingRuntimeError(
            f"{', '.join(written)} of {unit.name!r} changed in place since it was read (a write into a streamed "
            "weight): streamed weights are read from the checkpoint and are read-only, and this call was stopped "
            "before computing with the changed values, which are dropped. Load the model without "
            "device_map='stream' to modify its weights."
        )

    @staticmethod
    def _written(unit: Unit) -> list[str]:
        """The resident tensors of ``unit`` changed in place since read; weights the user took over aside (adopt)."""
        adopted = {spec.name for spec in unit.specs if not spec.slots}
        return [
            name
            for name, tensor in (unit.tensors or {}).items()
            if name not in adopted and _version(tensor) != unit.versions.get(name)
        ]

    def release(self, unit: Unit) -> None:
        me = threading.get_ident()
        with self.pool.cond:
            self._unpin(unit, me)
            unit.last_used = self.pool.tick()
        start = self._compute_start.pop(id(unit), None)
        if start is not None:
            end = time.perf_counter()
            self.events.append(("compute", unit.name, start, end, threading.current_thread().name))
            with self.pool.cond:
                self.meter.compute(unit.name, end - start)

    # ------------------------------------------------------------------------------------ embedding rows
    def gather(self, unit: Unit, ids: torch.Tensor) -> torch.Tensor | None:
        """Install only the table rows ``ids`` looks up; returns the ids renumbered into those rows.

        ``F.embedding(inverse, rows)`` equals ``F.embedding(ids, table)`` bit for bit (a lookup is a copy), so a
        decode step reads one row instead of the whole table (131 MB for a 32k x 1024 fp32 vocabulary), and a
        tied table is read once per token, for the head, instead of twice.

        Returns None when the ids cover most of the table (Whisper's encoder looks up every position each call):
        the table is then read whole, as a unit, from now on.
        """
        self.check_process()
        (spec,) = unit.specs
        entry, rows_state, module = spec.source, unit.rows, unit.gather_from
        vocab, width = entry.shape
        unique, inverse = torch.unique(ids.detach().cpu(), return_inverse=True)
        if unique.numel() and (unique[0] < 0 or unique[-1] >= vocab):
            names = zip(unit.module_names, unit.modules, strict=True)
            looked_up = next((n for n, m in names if m is module), unit.name)  # a tied table's unit is the head's
            raise IndexError(f"index out of range in self: ids must be in [0, {vocab}) for {looked_up}")
        if 2 * unique.numel() > vocab:
            if unit.gather:
                self.load_whole(unit)
            return None
        row_bytes = width * entry.dtype.itemsize
        rows_bytes = unique.numel() * row_bytes
        charge = rows_bytes + (unique.numel() * width * spec.dtype.itemsize if spec.dtype != entry.dtype else 0)
        start = time.perf_counter()
        with self.pool.cond:
            self.last_active = self.pool.tick()
            rows_state.owner = threading.get_ident()
            self.pool.reserve(rows_state, charge, prefetch=False)
        try:
            raw = torch.empty(rows_bytes, dtype=torch.uint8)
            view = memoryview(raw.numpy())
            rows_at = [(entry.offset + row * row_bytes, view[i * row_bytes : (i + 1) * row_bytes])
                       for i, row in enumerate(unique.tolist())]  # fmt: skip
            read_many(self.source, entry.shard, rows_at, (entry.offset, entry.offset + entry.nbytes))
            rows = raw.view(entry.dtype).view(unique.numel(), width).to(device=self.device, dtype=spec.dtype)
        except BaseException:
            with self.pool.cond:
                self._drop_rows(unit)
            raise
        end = time.perf_counter()
        with self.pool.cond:
            module._parameters["weight"] = nn.Parameter(rows, requires_grad=_requires_grad(spec, rows))
            # padding_idx only shapes gradients, but F.embedding checks it against the (now few) rows.
            rows_state.padding_idx, module.padding_idx = module.padding_idx, None
            rows_state.installed = True
            self.counters["gathered_rows"] += unique.numel()
            self.counters["bytes_read"] += rows_bytes
            self.counters["reads"] += unique.numel()
            self.read_seconds += end - start
            self.stall_seconds += end - start  # not planned: to the meter, time outside the scheduled units
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

    # ------------------------------------------------------------------------------------ routed experts
    def holdings(self) -> list[Holding]:
        """Bytes this model holds outside its units: gathered rows, stacked experts, router copies."""
        out: list[Holding] = [unit.rows for unit in self.units if unit.rows is not None]
        for layer in self.expert_layers:
            out += [layer.stack, layer.router_holding]
        return out

    def experts_reserve(self) -> int:
        """Room a decode call of the largest MoE layer needs: its routed experts resident plus their stacked copy."""
        need = 0
        for layer in self.expert_layers:
            routed = layer.top_k or max(1, layer.num_experts // 4)
            need = max(need, 2 * min(routed, layer.num_experts) * layer.expert_bytes)
        return need

    def run_experts(
        self, layer: ExpertLayer, used: torch.Tensor, hidden_states: torch.Tensor, routing: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Make experts ``used`` (ascending ids) resident and return their parameters stacked for one call.

        The stacked copy is charged to the pool until `end_experts`. The experts are copied into it a window at a
        time and unpinned once copied, so they stay cached where the budget has room but a call never needs its
        routed experts twice over: the least a call needs is its stack plus one expert in flight.
        """
        ids = used.tolist()
        units = [layer.units[e] for e in ids]
        cond = self.pool.cond
        with cond:
            self.last_active = self.pool.tick()
            if self._trace is not None and layer not in self._moe_trace:
                self._moe_trace.append(layer)
            self._learn_routing(layer, ids, routing)
            if layer.router_copy is None:
                layer.router_copy = moe.capture_router(layer)
                if layer.router_copy is not None:
                    nbytes = sum(t.nbytes for t in layer.router_copy if t is not None)
                    self.pool.reserve(layer.router_holding, nbytes, prefetch=False)
        self._predict_next(layer, hidden_states)
        specs = {spec.name: spec for spec in units[0].specs}
        stacks = {
            attr: moe.stack_buffer(layer, attr, (len(units), *specs[full].shape[1:]), specs[full].dtype, self.device)
            for attr, full in layer.full_names.items()
        }
        need = self.experts_call_bytes(layer, len(units))
        if need > self.pool.budget:
            raise self._experts_budget_error(layer, len(units), need)
        layer.stack.owner = threading.get_ident()
        try:
            with cond:  # the stack first: cached experts already copied may then make room for the next reads
                self.pool.reserve(layer.stack, sum(t.nbytes for t in stacks.values()), prefetch=False)
        except BudgetError as err:
            raise self._experts_budget_error(layer, len(units), need) from err
        position = 0
        while position < len(units):
            window = units[position : position + self._experts_window(units[position:])]
            self.acquire_many(window, layer)
            try:
                for i, unit in enumerate(window, start=position):
                    for attr, full in layer.full_names.items():
                        stacks[attr][i].copy_(unit.tensors[full][0])
            finally:
                self.release_many(window)
            position += len(window)
        return stacks

    def _experts_window(self, units: list[Unit]) -> int:
        """How many of ``units`` to pin at once: what the budget leaves next to everything pinned and every holding
        (router copies included), counting what each unit will hold once pinned (its charge while it loads; what it
        already holds when it is resident or loading). All of them when it can: adjacent ones are then read
        together."""
        with self.pool.cond:
            pinned = sum(u.held_bytes for e in self.pool.engines() for u in e.units if u.pins)
            held = sum(h.held_bytes for e in self.pool.engines() for h in e.holdings())
            room = self.pool.budget - pinned - held
            count = 0
            for unit in units:
                cost = unit.held_bytes if unit.state in ("resident", "loading") else unit.charge_bytes
                if count and cost > room:
                    break
                room -= cost
                count += 1
        return max(1, count)

    def _experts_budget_error(self, layer: ExpertLayer, routed: int, need: int) -> BudgetError:
        return BudgetError(
            f"This call of {layer.name!r} is routed to {routed} of its {layer.num_experts} experts (each token goes "
            f"to {layer.top_k or 'k'}), which transformers' kernels need resident together: {need:,} bytes with its "
            f"block, more than the budget of {self.pool.budget:,} bytes allows next to what else is held. Raise the "
            f"budget to at least {self.minimum_budget():,} bytes (every expert of one layer), or send shorter prompts "
            "(fewer tokens route to fewer experts)."
        )

    def end_experts(self, layer: ExpertLayer) -> None:
        """After an experts call (or a forward that raised in one): full-size placeholders back, stack refunded."""
        module = layer.module
        for attr, placeholder in layer.placeholders.items():
            module._parameters[attr] = placeholder
        module.num_experts = layer.num_experts
        with self.pool.cond:
            if layer.stack.held_bytes:
                self.pool.refund(layer.stack, layer.stack.held_bytes)

    def _learn_routing(self, layer: ExpertLayer, ids: list[int], routing: torch.Tensor) -> None:
        """Routing frequency (for the cache's ranks) and how well the previous layer predicted this call."""
        counters = layer.counters
        counters["calls"] += 1
        layer.frequency.mul_(moe.FREQUENCY_DECAY)
        layer.frequency[ids] += 1.0 - moe.FREQUENCY_DECAY
        if layer.prediction is not None:
            counters["routed"] += len(ids)
            counters["prefetched"] += len(layer.predicted)
            counters["prefetched_used"] += len(layer.predicted.intersection(ids))
        moe.score_prediction(layer, routing)
        layer.predicted = frozenset()

    def _predict_next(self, layer: ExpertLayer, hidden_states: torch.Tensor) -> None:
        """Guess the next MoE layer's experts from this hidden state; read ahead the guesses of trusted ranks."""
        nxt = layer.next
        if nxt is None or not self.lookahead:
            return
        guesses = moe.predict(nxt, hidden_states)
        with self.pool.cond:
            nxt.prediction = guesses
            if guesses is None:
                return
            wanted = moe.worth_reading(nxt, guesses)
            nxt.predicted = frozenset(wanted)
            for e in wanted:
                unit = nxt.units[e]
                if unit.state == "absent":
                    if not self._start_load(unit, prefetch=True):
                        break  # no room that a sooner need does not hold: the rest would not fit either
                    self.counters["expert_prefetches"] += 1

    def acquire_many(self, units: list[Unit], layer: ExpertLayer | None = None) -> None:
        """Pin ``units`` and wait until all are resident; the missing ones are read in parallel."""
        self.check_process()
        start = time.perf_counter()
        me = threading.get_ident()
        cond = self.pool.cond
        hits = late = misses = 0
        started: list[Unit] = []
        with cond:
            for unit in units:
                unit.pins += 1
                unit.pin_threads[me] = unit.pin_threads.get(me, 0) + 1
            try:
                for unit in units:
                    if unit.state == "resident":
                        hits += 1
                    elif unit.state == "loading":
                        late += 1
                    else:
                        misses += 1
                        unit.loader = me  # read below by this thread: waiting for it cannot make room
                        self._start_load(unit, prefetch=False)
                        started.append(unit)
            except BaseException:
                self._load_failed(started, StreamingRuntimeError("the call that was to read it failed"))
                for unit in units:
                    self._unpin(unit, me)
                raise
            finally:
                self._submit_together(started)
            while any(unit.state == "loading" for unit in units):
                cond.wait()
            failed = next((unit for unit in units if unit.state != "resident"), None)
            if failed is not None:
                for unit in units:
                    self._unpin(unit, me)
                raise _load_error(failed)
            tick = self.pool.tick()
            for unit in units:
                unit.prefetched = False
                unit.last_used = tick
            self.counters["expert_hits"] += hits
            self.counters["expert_misses"] += misses
            self.counters["expert_late"] += late
            if layer is not None:
                layer.counters["hits"] += hits
                layer.counters["misses"] += misses
                layer.counters["late"] += late
        if misses or late:
            self.stall_seconds += time.perf_counter() - start

    def _submit_together(self, units: list[Unit]) -> None:
        """Hand demand reads to the readers; units whose bytes touch in the file (the experts a prefill routes to,
        laid out one after another in each tensor) are read together, one mapping per contiguous run."""
        loading = [unit for unit in units if unit.state == "loading"]
        group = {id(unit): i for i, unit in enumerate(loading)}

        def root(i: int) -> int:
            while group_of[i] != i:
                group_of[i] = group_of[group_of[i]]
                i = group_of[i]
            return i

        group_of = list(range(len(loading)))
        ordered = sorted((r.shard, r.offset, r.offset + r.length, group[id(u)]) for u in loading for r in u.ranges)
        for (shard, _start, end, i), (next_shard, next_start, _end, j) in zip(ordered, ordered[1:], strict=False):
            if shard == next_shard and next_start <= end:
                group_of[root(j)] = root(i)
        runs: dict[int, list[Unit]] = {}
        for i, unit in enumerate(loading):
            runs.setdefault(root(i), []).append(unit)
        together = hasattr(self.source, "map") and not self.copy_to_device
        for run in runs.values():
            if not together or len(run) == 1:
                for unit in run:
                    self._hand_to_readers(self._load, unit, [unit])
                continue
            job: list[Unit] = []  # a long run is cut so that the readers share it
            for unit in run:
                job.append(unit)
                if sum(u.raw_bytes for u in job) >= TOGETHER_BYTES:
                    self._hand_to_readers(self._load_together, job, job)
                    job = []
            if job:
                self._hand_to_readers(self._load_together, job, job)

    def _hand_to_readers(self, read: Callable[[Any], None], what: Any, units: list[Unit]) -> None:
        """Submit ``read(what)`` to the reader threads. Its units are this thread's until ``submit`` returns: a
        Ctrl-C landing in it left them 'loading' with no reader, and the next call waited for them forever; so
        marked, the end of the call settles them (`_settle_interrupted`)."""
        me = threading.get_ident()
        for unit in units:
            unit.loader = me
        self.pool.executor.submit(read, what)
        for unit in units:
            unit.loader = 0  # a reader's now

    def release_many(self, units: list[Unit]) -> None:
        me = threading.get_ident()
        with self.pool.cond:
            tick = self.pool.tick()
            for unit in units:
                self._unpin(unit, me)
                unit.last_used = tick

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
        """Have the next ``depth`` units that are not resident read (or being read) in the background."""
        if not self.schedule or not self.depth or self._trace is not None:
            return
        index, wanted = self._pos, self.depth
        for _step in range(len(self.schedule) - 1):
            index = self._successor(index)
            nxt = self.schedule[index]
            if nxt.state == "resident":  # kept resident, or still resident: nothing to read
                continue
            if nxt.state == "absent" and not self._start_load(nxt, prefetch=True):
                break
            wanted -= 1
            if not wanted:
                break

    # ------------------------------------------------------------------------------------ loading
    def _start_load(self, unit: Unit, prefetch: bool) -> bool:
        """Reserve room and mark the unit loading (pool lock held). Prefetches are submitted here."""
        recycled = self._recycled = []
        try:
            if not self.pool.reserve(unit, unit.charge_bytes, prefetch=prefetch):
                return False
            # Hand the read a buffer that an eviction just freed (the rest are unmapped as this list goes).
            buffer = self.reader.reuse(recycled, unit.ranges) if recycled else None
            if buffer is not None:
                self._buffers[id(unit)] = buffer
        finally:
            self._recycled = None
        unit.state = "loading"
        unit.prefetched = prefetch
        unit.error = None
        if prefetch:
            self.counters["prefetches"] += 1
            self._hand_to_readers(self._load, unit, [unit])
        return True

    def _load(self, unit: Unit) -> None:
        """Read and materialise a unit (no lock held during I/O); always leaves it resident or absent."""
        start = time.perf_counter()
        try:
            tensors = self._read_and_materialize(unit)
        except BaseException as err:  # noqa: BLE001 - re-raised in the thread that needs the unit
            self._load_failed([unit], err)
            return
        self._loaded(unit, tensors, start, len(unit.ranges))

    def _load_failed(self, units: list[Unit], err: BaseException) -> None:
        with self.pool.cond:
            for unit in units:
                self._buffers.pop(id(unit), None)  # a recycled buffer its read was to land in
                if unit.state != "loading":
                    continue
                unit.error = err
                unit.state = "absent"
                unit.prefetched = False
                unit.chunks = None
                if unit.held_bytes:
                    self.pool.refund(unit, unit.held_bytes)
            self.pool.cond.notify_all()

    def _loaded(self, unit: Unit, tensors: dict[str, torch.Tensor], start: float, reads: int) -> None:
        end = time.perf_counter()
        with self.pool.cond:
            if unit.state != "loading":  # given up (a Ctrl-C as the read was handed over): its bytes went back
                self.pool.cond.notify_all()
                return
            unit.tensors = tensors
            unit.versions = {name: _version(tensor) for name, tensor in tensors.items()}
            extra = unit.held_bytes - unit.resident_bytes
            if extra > 0:  # the raw bytes were only needed to cast or convert: they are gone now
                self.pool.refund(unit, extra)
            unit.state = "resident"
            self.counters["loads"] += 1
            self.counters["bytes_read"] += unit.raw_bytes
            self.counters["reads"] += reads
            self.read_seconds += end - start
            self.meter.read(unit.raw_bytes, start, end)
            self.events.append(("read", unit.name, start, end, threading.current_thread().name))
            self.pool.cond.notify_all()

    def _load_together(self, units: list[Unit]) -> None:
        """Read adjacent units (a prefill's experts, laid out one after another) with one mapping per shard run.

        Each unit is materialised from its slice of the shared read and made resident on its own. Tensors that
        would only view the shared mapping are copied out, so evicting one unit frees its memory as its
        budget charge says, instead of keeping the whole run mapped.
        """
        start = time.perf_counter()
        for unit in units:  # mapped, not read into buffers: a recycled one handed to a unit goes (unmapped)
            self._buffers.pop(id(unit), None)
        try:
            runs: list[tuple[str, int, int]] = []
            for rng in sorted((r for u in units for r in u.ranges), key=lambda r: (r.shard, r.offset)):
                last = runs[-1] if runs else None
                if last and last[0] == rng.shard and rng.offset <= last[1] + last[2]:
                    runs[-1] = (last[0], last[1], max(last[2], rng.offset + rng.length - last[1]))
                else:
                    runs.append((rng.shard, rng.offset, rng.length))
            mapped = [(shard, offset, self.source.map(shard, offset, length)) for shard, offset, length in runs]
        except BaseException as err:  # noqa: BLE001 - re-raised in the threads that need the units
            self._load_failed(units, err)
            return
        reads = len(runs)
        for unit in units:
            try:
                chunks = []
                for rng in unit.ranges:
                    shard, offset, data = next(m for m in reversed(mapped) if m[0] == rng.shard and m[1] <= rng.offset)
                    chunks.append(data[rng.offset - offset : rng.offset - offset + rng.length])
                tensors = self._materialize(unit, chunks)
                if unit.views_only:
                    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
            except BaseException as err:  # noqa: BLE001
                self._load_failed([unit], err)
                continue
            self._loaded(unit, tensors, start, reads)
            start, reads = time.perf_counter(), 0  # the read itself is counted once, with the first unit

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
            cached = unit.name in self.page_cached
            chunks = self.reader.read(unit.ranges, self._buffers.pop(id(unit), None), cached=cached)
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
            target = specs[group.first_target].dtype
            inputs = {}
            for key, _ in group.sources:
                tensor = raw[key]
                dtype = group.input_dtype(tensor.dtype, target)  # None: the converter dequantizes stored bytes
                inputs[key] = tensor if dtype is None else tensor.to(dtype)
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
        self._adopt_replaced(unit)
        try:
            for spec in unit.specs:
                if not spec.slots:  # every place of it now holds the user's own tensor
                    continue
                tensor = unit.tensors[spec.name]
                if stream is not None:
                    tensor.record_stream(stream)
                first = spec.slots[0]
                if first.is_param and first.store.get(first.attr) is first.placeholder:
                    spec.requires_grad = first.placeholder.requires_grad  # `requires_grad_` while not resident
                value: torch.Tensor = (
                    nn.Parameter(tensor, requires_grad=_requires_grad(spec, tensor)) if first.is_param else tensor
                )
                for slot in spec.slots:
                    slot.store[slot.attr] = value
        except BaseException:
            # All or nothing: a weight left in place by a unit not installed (a Ctrl-C between two of its tensors)
            # would later be taken for one the user put there, and held outside the budget for good.
            for spec in unit.specs:
                for slot in spec.slots:
                    slot.store[slot.attr] = slot.placeholder
            raise
        unit.installed = True

    def _uninstall(self, unit: Unit) -> None:
        self._adopt_replaced(unit)
        for spec in unit.specs:
            for slot in spec.slots:
                current = slot.store.get(slot.attr)
                if slot.is_param and current is not slot.placeholder and isinstance(current, torch.Tensor):
                    spec.requires_grad = current.requires_grad  # `requires_grad_` while it was resident
                    slot.placeholder.requires_grad_(current.requires_grad)
                slot.store[slot.attr] = slot.placeholder
        unit.installed = False

    # ------------------------------------------------------------------------------------ the user's own tensors
    def _replaced(self, unit: Unit, spec: TensorSpec, slot: Slot) -> bool:
        """Whether ``slot`` holds a tensor the user put there instead of the streamed weight: ``module.weight =
        ...``, or ``weight.data = ...`` on the installed weight (what ``resize_token_embeddings`` does)."""
        current = slot.store.get(slot.attr)
        if current is slot.placeholder:
            return False
        if unit.rows is not None and unit.rows.installed and slot.module is unit.gather_from:
            return False  # a call's looked-up rows, put there by the engine
        if unit.installed and unit.tensors is not None and isinstance(current, torch.Tensor):
            ours = unit.tensors[spec.name]
            return (current.data_ptr(), current.shape, current.dtype) != (ours.data_ptr(), ours.shape, ours.dtype)
        return True

    def fills(self, unit: Unit, spec: TensorSpec, slot: Slot, value: Any) -> bool:
        """Whether ``value``, found at ``slot``, is what the engine put there (the weight or its placeholder), not a
        tensor of the user's own."""
        with self.pool.cond:
            if value is None or not any(s is slot for s in spec.slots):
                return False
            return not self._replaced(unit, spec, slot)

    def _adopt_replaced(self, unit: Unit) -> None:
        """Stop streaming the places of ``unit`` where the user put tensors of their own (pool lock held)."""
        for spec in unit.specs:
            replaced = [slot for slot in spec.slots if self._replaced(unit, spec, slot)]
            if replaced:
                self.adopt(unit, spec, replaced)

    def adopt(self, unit: Unit, spec: TensorSpec, slots: list[Slot]) -> None:
        """Leave ``slots`` to the tensors the user put there, as a plain model would keep them: they stay in memory,
        outside the budget, and are never replaced by the checkpoint's values again.

        A weight whose every place was replaced is still read with its unit (a read plan is fixed once made) but
        installed nowhere. An embedding that looked up rows from the checkpoint stops doing so: its table is the
        user's now.
        """
        for slot in slots:
            spec.slots.remove(slot)
        if unit.gather_from is not None and any(slot.module is unit.gather_from for slot in slots):
            unit.gather_from, unit.gather, unit.rows = None, False, None
            measure(unit)
        names = ", ".join(f"{type(slot.module).__name__}.{slot.attr}" for slot in slots)
        log.logger.info("%s: %s now holds a tensor of your own; it is no longer streamed", spec.name, names)

    def take_data(self, placeholder: torch.Tensor, value: torch.Tensor) -> None:
        """``weight.data = value`` on a weight that is not resident: ``value`` takes every place that weight fills
        (see `adopt`)."""
        unit, spec = placeholder.unit, placeholder.spec
        with self.pool.cond:
            slots = [slot for slot in spec.slots if slot.store.get(slot.attr) is placeholder]
            if not slots:
                return
            held = nn.Parameter(value, requires_grad=placeholder.requires_grad) if slots[0].is_param else value
            for slot in slots:
                slot.store[slot.attr] = held
            self.adopt(unit, spec, slots)

    def adopt_all_replaced(self) -> None:
        """Find every streamed place the user replaced (before saving: what is saved is what the model holds)."""
        with self.pool.cond:
            for unit in self.units:
                self._adopt_replaced(unit)

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
            self.adopt_all_replaced()  # placeholders are made anew below: a slot the user replaced must keep theirs
            if device is not None and device != self.device:
                if any(e is not self for e in self.pool.engines()):
                    raise BudgetError(
                        f"This model shares a WeightPool on {self.device} with other models; a pool serves one "
                        f"device. Load it with its own pool to run it on {device}."
                    )
                self.pool.device = self.device = device
                self.copy_to_device = device.type != "cpu"
            if dtype is not None:
                before = [spec.dtype for unit in self.units for spec in unit.specs]
                self._set_spec_dtypes([dtype if old.is_floating_point else old for old in before])
                try:
                    self.check_budget()
                except BudgetError:  # refused as a whole: the model still computes as before
                    self._set_spec_dtypes(before)
                    raise
                if self.schedule:
                    self._set_schedule(self.schedule, self._cycle_start)
            placeholders.install(self.units, self.device)  # the new device and dtype
            placeholders.install_experts(self.expert_layers, self.device, dtype)

    def _set_spec_dtypes(self, dtypes: list[torch.dtype]) -> None:
        """Every spec's dtype, in the order of the units and their specs; what each unit takes is measured again."""
        given = iter(dtypes)
        for unit in self.units:
            for spec in unit.specs:
                spec.dtype = next(given)
            measure(unit)
        self.model_bytes = sum(full_bytes(unit) for unit in self.units)

    # ------------------------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        with self.pool.cond:
            resident = sum(u.held_bytes for u in self.units)
            accesses = self.counters["hits"] + self.counters["misses"] + self.counters["late_prefetches"]
            return {
                "units": len(self.units),
                "model_bytes": self.model_bytes,
                "checkpoint_bytes": sum(u.raw_bytes for u in self.units),
                "quantization": dict(self.quantization),
                "budget_bytes": self.pool.budget,
                "policy": self.policy,
                "lookahead": self.lookahead,
                "depth": self.depth,
                "device": str(self.device),
                "io": self.reader.io if not self.copy_to_device else "staging",
                "io_reason": "; ".join(filter(None, [self.io_reason, getattr(self.reader, "measured", None)])),
                "io_fallback": getattr(self.reader, "fallback", None),
                "resident_bytes": resident,
                "resident_units": sum(u.state == "resident" for u in self.units),
                "kept_resident_units": len(self.keep_resident),
                "kept_resident_bytes": self.plan.kept_bytes if self.plan else 0,
                "page_cached_units": len(self.page_cached),
                "page_cached_bytes": self.page_cached_bytes(),
                "replans": self.counters["replans"],
                "peak_resident_bytes": self.pool.peak_held,
                "bytes_read": self.counters["bytes_read"],
                "reads": self.counters["reads"],
                "loads": self.counters["loads"],
                "hits": self.counters["hits"],
                "misses": self.counters["misses"],
                "late_prefetches": self.counters["late_prefetches"],
                "prefetches": self.counters["prefetches"],
                "prefetch_hits": self.counters["prefetch_hits"],
                "evictions": self.counters["evictions"],
                "hit_rate": self.counters["hits"] / accesses if accesses else 0.0,
                "stall_seconds": self.stall_seconds,
                "read_seconds": self.read_seconds,
                "read_bandwidth_bytes_per_s": (
                    self.counters["bytes_read"] / self.read_seconds if self.read_seconds else 0.0
                ),
                "measured_overlap": self.meter.overlap,
                **self._plan_stats(),
                "schedule_length": len(self.schedule),
                "staging_bytes": self.staging_bytes,
                "gathered_rows": self.counters["gathered_rows"],
                **self._expert_stats(),
            }

    def _expert_stats(self) -> dict[str, Any]:
        """Expert cache and speculative prefetch figures, overall and per MoE layer (empty for dense models)."""
        if not self.expert_layers:
            return {}
        c = self.counters
        accesses = c["expert_hits"] + c["expert_misses"] + c["expert_late"]
        totals = collections.Counter()
        per_layer = {}
        for layer in self.expert_layers:
            lc = layer.counters
            totals.update(lc)
            layer_accesses = lc["hits"] + lc["misses"] + lc["late"]
            per_layer[layer.name] = {
                "calls": lc["calls"],
                "hit_rate": lc["hits"] / layer_accesses if layer_accesses else 0.0,
                "prediction_accuracy": lc["guesses_right"] / lc["guesses"] if lc["guesses"] else 0.0,
                "prefetch_recall": lc["prefetched_used"] / lc["routed"] if lc["routed"] else 0.0,
                "prefetch_precision": lc["prefetched_used"] / lc["prefetched"] if lc["prefetched"] else 0.0,
                "resident_experts": sum(u.state == "resident" for u in layer.units),
            }
        return {
            "expert_layers": len(self.expert_layers),
            "expert_hits": c["expert_hits"],
            "expert_misses": c["expert_misses"],
            "expert_late_prefetches": c["expert_late"],
            "expert_hit_rate": c["expert_hits"] / accesses if accesses else 0.0,
            "expert_prefetches": c["expert_prefetches"],
            "prediction_accuracy": totals["guesses_right"] / totals["guesses"] if totals["guesses"] else 0.0,
            "prefetch_recall": totals["prefetched_used"] / totals["routed"] if totals["routed"] else 0.0,
            "prefetch_precision": totals["prefetched_used"] / totals["prefetched"] if totals["prefetched"] else 0.0,
            "experts": per_layer,
        }

    def _plan_stats(self) -> dict[str, Any]:
        prediction = self.plan.prediction if self.plan else None
        timing = self.plan.timing if self.plan else None
        return {
            "predicted_seconds_per_token": prediction.seconds if prediction else None,
            "predicted_read_seconds_per_token": prediction.read_seconds if prediction else None,
            "predicted_overlap": prediction.overlap if prediction else None,
            "streamed_bytes_per_token": self.plan.streamed_bytes if self.plan else None,
            "planned_read_bandwidth_bytes_per_s": timing.read_bandwidth if timing else None,
        }

    def reset_stats(self) -> None:
        with self.pool.cond:
            self.meter.reset()
            self.counters = collections.Counter()
            for layer in self.expert_layers:
                layer.counters = dict.fromkeys(layer.counters, 0)
            self.stall_seconds = 0.0
            self.read_seconds = 0.0
            self.events.clear()
            self.pool.peak_held = self.pool.held


def _requires_grad(spec: TensorSpec, tensor: torch.Tensor) -> bool:
    """The flag a normal load gives (floating point -> True, unless the model's init froze it: torch picks kernels
    by it), or the one the user set since (``model.requires_grad_(False)``): kept through evictions."""
    return spec.requires_grad if spec.requires_grad is not None else tensor.is_floating_point()
