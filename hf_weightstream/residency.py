"""The memory budget: which units are resident, which are evicted, and who waits for room.

A `WeightPool` owns one budget in bytes for one execution device. Every byte of weights on that device is
charged to it before it is read (resident units, units in flight, and recycled read buffers), so the budget is
really held, not approximated. Several models can share a pool (model switching); each model's `StreamEngine`
asks the pool for room and the pool picks victims:

* units of other models go first, least recently active model first (LRU across models);
* then the requesting model's own units: those already used this cycle, then those prefetched but not yet used,
  and last the units its schedule plan keeps resident; within a class the policy decides the order (``lru``:
  least recently used; ``schedule``: the one needed again farthest in the future).

A prefetch never waits and never evicts a unit that is needed sooner than itself; a demand load waits for other
threads to unpin units, and fails with a clear error when waiting could never succeed.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from .config import parse_size
from .errors import BudgetError

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .units import Unit


def _storage_unshared(buffer: torch.Tensor) -> bool:
    """True when no tensor but ``buffer`` itself still views its memory, so it can be recycled safely.

    A caller may have kept a reference to a weight (``w = model.lm_head.weight``); overwriting a buffer that
    such a tensor views would change their tensor behind their back, so we recycle only unshared buffers.
    ``torch._C._storage_Use_Count`` is private: if it is gone we simply never recycle.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return use_count(buffer.untyped_storage()._cdata) <= 2  # the buffer, and the temporary storage object


class Ledger:
    """Bytes one model holds in a pool, kept apart from the model so a finalizer can refund them."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class WeightPool:
    """One memory budget shared by every model streamed onto it.

    Args:
        budget: bytes (or a string such as ``"2GB"``) of weights that may be held on the device at once.
        device: the execution device of the models on this pool; a model on another device is refused.
        num_workers: background reader threads shared by the pool's models.
    """

    def __init__(self, budget: int | str, device: str | torch.device | None = None, num_workers: int = 4):
        self.budget = parse_size(budget)
        self.device = torch.device(device) if device is not None else None
        self.cond = threading.Condition(threading.RLock())
        self.executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="hf_weightstream")
        self._engines: weakref.WeakValueDictionary[int, StreamEngine] = weakref.WeakValueDictionary()
        self._ticks = itertools.count(1)
        self.held = 0  # resident + in-flight bytes
        self.pooled = 0  # free recycled buffers
        self.peak_held = 0
        self.peak_total = 0
        self._free_buffers: dict[int, list[torch.Tensor]] = {}
        self._waiting_threads: set[int] = set()

    # ----------------------------------------------------------------------------------------- registry
    def register(self, engine: StreamEngine) -> None:
        with self.cond:
            if self.device is None:
                self.device = engine.device
            elif engine.device != self.device:
                raise BudgetError(
                    f"This WeightPool serves {self.device}, but the model runs on {engine.device}. "
                    "Use one pool per device."
                )
            self._engines[id(engine)] = engine
            # The finalizer must not reference the engine (or its units, which do), or it would keep it alive.
            weakref.finalize(engine, self._forget, engine.ledger)

    def _forget(self, ledger: Ledger) -> None:
        # The model was garbage collected: its weights are gone, give their bytes back to the budget.
        with self.cond:
            self.held -= ledger.held
            ledger.held = 0
            self.cond.notify_all()

    def engines(self) -> list[StreamEngine]:
        return list(self._engines.values())

    def tick(self) -> int:
        return next(self._ticks)

    # ----------------------------------------------------------------------------------------- accounting
    def _note_peak(self) -> None:
        self.peak_held = max(self.peak_held, self.held)
        self.peak_total = max(self.peak_total, self.held + self.pooled)

    def _charge(self, unit: Unit, nbytes: int) -> None:
        self.held += nbytes
        unit.held_bytes += nbytes
        unit.engine.ledger.held += nbytes
        self._note_peak()

    def refund(self, unit: Unit, nbytes: int) -> None:
        self.held -= nbytes
        unit.held_bytes -= nbytes
        unit.engine.ledger.held -= nbytes
        self.cond.notify_all()

    # ----------------------------------------------------------------------------------------- buffers
    def give_buffer(self, unit: Unit, buffer: torch.Tensor) -> None:
        """Return a read buffer: kept for reuse if nothing else views it, else dropped."""
        nbytes = buffer.numel()
        with self.cond:
            self.refund(unit, nbytes)
            if _storage_unshared(buffer):
                self._free_buffers.setdefault(nbytes, []).append(buffer)
                self.pooled += nbytes
            self.cond.notify_all()

    def _drop_free_buffer(self, keep_size: int) -> bool:
        sizes = [s for s, bufs in self._free_buffers.items() if bufs and s != keep_size]
        if not sizes:
            sizes = [s for s, bufs in self._free_buffers.items() if bufs]
        if not sizes:
            return False
        size = max(sizes)
        self._free_buffers[size].pop()
        self.pooled -= size
        return True

    # ----------------------------------------------------------------------------------------- room
    def reserve(self, unit: Unit, nbytes: int, *, prefetch: bool, buffer_size: int = 0) -> bool:
        """Charge ``nbytes`` for ``unit``, evicting as needed. Call with ``self.cond`` held.

        ``buffer_size`` > 0 asks for a read buffer of that size in device memory: a recycled one is handed over
        in ``unit.buffer`` (its bytes move from ``pooled`` into the charge). Returns False when a prefetch finds
        no room.
        """
        requester = unit.engine
        me = threading.get_ident()
        while True:
            recycled = self._free_buffers.get(buffer_size) if buffer_size else None
            reusable = buffer_size if recycled else 0
            if self.held + self.pooled - reusable + nbytes <= self.budget:
                if recycled:
                    unit.buffer = recycled.pop()
                    self.pooled -= buffer_size
                self._charge(unit, nbytes)
                return True
            if self._drop_free_buffer(buffer_size):
                continue
            victim = self._choose_victim(requester, unit, prefetch)
            if victim is not None:
                victim.engine.evict(victim)
                continue
            if prefetch:
                return False
            if not self._someone_else_can_free(me):
                raise BudgetError(
                    f"The budget of {self.budget:,} bytes cannot hold unit {unit.name!r} ({nbytes:,} bytes) next to "
                    f"what is pinned now ({self.held:,} bytes held). Raise the budget to at least "
                    f"{self.minimum_budget():,} bytes (the sum of the largest unit of each model running at once)."
                )
            self._waiting_threads.add(me)
            try:
                self.cond.wait(timeout=1.0)
            finally:
                self._waiting_threads.discard(me)

    def _someone_else_can_free(self, me: int) -> bool:
        """Whether waiting can help: some unit is loading, or pinned by a thread that is not itself waiting."""
        for engine in self.engines():
            for unit in engine.units:
                if unit.state == "loading":
                    return True
                if any(t != me and t not in self._waiting_threads for t in unit.pin_threads):
                    return True
        return False

    def minimum_budget(self) -> int:
        return sum(max((u.charge_bytes for u in e.units), default=0) for e in self.engines())

    def _choose_victim(self, requester: StreamEngine, for_unit: Unit, prefetch: bool) -> Unit | None:
        best: tuple[Any, ...] | None = None
        victim = None
        for engine in self.engines():
            for unit in engine.units:
                if unit.state != "resident" or unit.pins or unit is for_unit:
                    continue
                if engine is requester:
                    cls = 2 if unit.name in engine.keep_resident else (1 if unit.prefetched else 0)
                    if prefetch and (cls > 0 or not engine.evictable_for_prefetch(unit, for_unit)):
                        continue
                    key: tuple[Any, ...] = (1, cls, engine.eviction_rank(unit))
                else:
                    if prefetch and unit.prefetched:
                        continue
                    key = (0, engine.last_active, unit.last_used)
                if best is None or key < best:
                    best, victim = key, unit
        return victim

    # ----------------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Per-model and total figures for everything on this pool."""
        with self.cond:
            models = {engine.label: engine.stats() for engine in self.engines()}
            return {
                "budget_bytes": self.budget,
                "held_bytes": self.held,
                "recycled_buffer_bytes": self.pooled,
                "peak_held_bytes": self.peak_held,
                "peak_total_bytes": self.peak_total,
                "models": models,
                "hits": sum(m["hits"] for m in models.values()),
                "misses": sum(m["misses"] for m in models.values()),
                "evictions": sum(m["evictions"] for m in models.values()),
            }

    def release_all(self) -> None:
        """Evict every unpinned unit of every model and drop recycled buffers."""
        with self.cond:
            for engine in self.engines():
                engine.release_all()
            while self._drop_free_buffer(-1):
                pass
            self.cond.notify_all()


_default_pool: WeightPool | None = None


def set_default_pool(pool: WeightPool | None) -> None:
    """Make ``pool`` the pool of every streamed model loaded without a budget or pool of its own."""
    global _default_pool
    _default_pool = pool


def get_default_pool() -> WeightPool | None:
    return _default_pool
