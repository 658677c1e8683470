"""The memory budget: which units are resident, which are evicted, and who waits for room.

A `WeightPool` owns one budget in bytes for one execution device. Every byte of weights on that device is
charged to it before it is read (resident units and units in flight, including the raw bytes a unit needs
while it is cast or converted), so the budget is really held, not approximated. Several models can share a pool
(model switching); each model's `StreamEngine` asks the pool for room and the pool picks victims:

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
        self.num_workers = num_workers
        self.executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="hf_weightstream")
        self._engines: weakref.WeakValueDictionary[int, StreamEngine] = weakref.WeakValueDictionary()
        self._ticks = itertools.count(1)
        self.held = 0  # resident + in-flight bytes
        self.peak_held = 0
        self._waiting_threads: set[int] = set()

    # ----------------------------------------------------------------------------------------- registry
    def __deepcopy__(self, memo: dict) -> WeightPool:
        # transformers' Auto classes deep-copy from_pretrained kwargs (a stream_config dict naming a pool among
        # them): a pool is one budget shared by its models, never a value to copy.
        return self

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
    def _charge(self, unit: Unit, nbytes: int) -> None:
        self.held += nbytes
        unit.held_bytes += nbytes
        unit.engine.ledger.held += nbytes
        self.peak_held = max(self.peak_held, self.held)

    def refund(self, unit: Unit, nbytes: int) -> None:
        self.held -= nbytes
        unit.held_bytes -= nbytes
        unit.engine.ledger.held -= nbytes
        self.cond.notify_all()

    # ----------------------------------------------------------------------------------------- room
    def reserve(self, unit: Unit, nbytes: int, *, prefetch: bool) -> bool:
        """Charge ``nbytes`` for ``unit``, evicting as needed. Call with ``self.cond`` held.

        Returns False when a prefetch finds no room (a prefetch never waits).
        """
        requester = unit.engine
        me = threading.get_ident()
        while True:
            if self.held + nbytes <= self.budget:
                self._charge(unit, nbytes)
                return True
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
        """Whether waiting can help: some unit is loading, or pinned by a thread that is not itself waiting, or a
        model being garbage collected still holds bytes."""
        engines = self.engines()
        if self.held > sum(engine.ledger.held for engine in engines):
            # A collected model leaves the registry as its weakref is cleared, and gives its bytes back in its
            # finalizer (`_forget`), which the collecting thread runs a moment later: they are about to be free.
            return True
        for engine in engines:
            held = (h for h in engine.holdings() if h.transient and h.held_bytes)
            if any(h.owner != me and h.owner not in self._waiting_threads for h in held):
                return True  # gathered rows and stacked experts go at the end of their call
            for unit in engine.units:
                if unit.state == "loading" and unit.loader != me:
                    return True  # a read completes (not one this very thread is still to start)
                if any(t != me and t not in self._waiting_threads for t in unit.pin_threads):
                    return True
        return False

    def minimum_budget(self) -> int:
        return sum(e.minimum_budget() for e in self.engines())

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
                "resident_bytes": self.held,
                "peak_resident_bytes": self.peak_held,
                "models": models,
                "hits": sum(m["hits"] for m in models.values()),
                "misses": sum(m["misses"] for m in models.values()),
                "evictions": sum(m["evictions"] for m in models.values()),
            }

    def release_all(self) -> None:
        """Evict every unpinned unit of every model."""
        with self.cond:
            for engine in self.engines():
                engine.release_all()
            self.cond.notify_all()


_default_pool: WeightPool | None = None


def set_default_pool(pool: WeightPool | None) -> None:
    """Make ``pool`` the pool of every streamed model loaded without a budget or pool of its own."""
    global _default_pool
    _default_pool = pool


def get_default_pool() -> WeightPool | None:
    return _default_pool
