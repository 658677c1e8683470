"""What stays resident and how far ahead to read, chosen by predicted time per token.

A decoder runs the same cycle of units every token. Under a budget below the model, a fixed set of units stays
resident and the rest stream through a window of ``depth + 1`` units: the one computing and ``depth`` being
read ahead. Both choices trade against each other inside one budget:

* every byte kept resident is a byte not read again each token (the I/O floor of a token is the streamed
  bytes over the read bandwidth);
* every unit of read-ahead depth is room taken from the resident set, but lets reads run while the compute
  thread works, instead of after it.

Keeping the most bytes resident nearly always means depth 0: no room to read ahead, so every read stalls the
compute and the disk idles while the compute runs. Instead the planner *predicts the time per token* of each
candidate (for every depth up to the configured look-ahead, the largest units that fit next to that depth's
window) with a small simulation of one cycle: a compute thread walking the schedule and a disk serving the
reads in the order the engine issues them, at the read bandwidth measured so far, with the compute time of
each unit measured on the first passes. The fastest plan wins; near-ties go to the plan that reads less.

Measurements move: the first pass is a prefill (far more compute per unit than a decode step), and the page
cache can be warm (memory speed) or cold (disk speed). `Meter` keeps the recent passes and the engine plans
again when the estimates it planned with have moved by more than ``REPLAN_CHANGE``.

Only the cyclic schedule is planned. A unit used irregularly (say, one expert of a mixture of experts) is not
part of the cycle and is left to the pool's eviction order.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .units import Unit

# Plan again when the read bandwidth or the compute per pass moved by more than this factor...
REPLAN_CHANGE = 1.3
# ... and switch plans only if the new one is predicted faster by this share (a switch costs reads).
SWITCH_GAIN = 0.05
# Plans within this share of the fastest count as ties; the one that reads the fewest bytes wins.
TIE = 0.02
# Passes a measurement is taken over (the median, so one noisy pass does not move the plan).
WINDOW = 3
# Read bandwidth assumed before any read was timed (a local NVMe/SATA SSD is in the 0.5-7 GB/s range).
DEFAULT_BANDWIDTH = 1e9


@dataclass(frozen=True)
class Timing:
    """What a prediction is made from."""

    read_bandwidth: float  # bytes per second, over the time some read was in flight
    compute: dict[str, float] = field(default_factory=dict)  # seconds per use of each unit (by name)
    other: float = 0.0  # seconds per cycle spent outside every unit (sampling, the loop between tokens)

    @property
    def compute_total(self) -> float:
        return sum(self.compute.values())

    def moved_from(self, other: Timing) -> bool:
        """Whether these estimates differ enough from ``other`` to plan again."""

        def far(a: float, b: float) -> bool:
            low, high = sorted((max(a, 1e-9), max(b, 1e-9)))
            return high / low > REPLAN_CHANGE

        return far(self.read_bandwidth, other.read_bandwidth) or far(self.compute_total, other.compute_total)


@dataclass(frozen=True)
class Prediction:
    """One cycle (a token, for a decoder) in steady state, as the simulation sees it."""

    seconds: float  # wall time per cycle
    read_seconds: float  # time the disk is busy per cycle
    compute_seconds: float  # compute per cycle, every unit plus the time outside units
    stall_seconds: float  # time the compute waits for a read per cycle

    @property
    def overlap(self) -> float:
        """Share of the read time hidden behind compute (1.0 when nothing is read)."""
        if self.read_seconds <= 0:
            return 1.0
        return max(0.0, min(1.0, 1.0 - self.stall_seconds / self.read_seconds))


@dataclass(frozen=True)
class Plan:
    """Units kept resident, read-ahead depth, and what that is predicted to cost."""

    keep: frozenset[str]
    depth: int
    kept_bytes: int
    streamed_bytes: int  # read per cycle
    prediction: Prediction
    timing: Timing  # the estimates the plan was made with


def cyclic_units(schedule: Sequence[Unit]) -> list[Unit]:
    """Each unit of the schedule once, in order of first use."""
    return list({id(u): u for u in schedule}.values())


def fits(schedule: Sequence[Unit], keep: set[str] | frozenset[str], depth: int, budget: int) -> bool:
    """Whether the kept units plus the largest window of ``depth + 1`` consecutive streamed units fit."""
    kept_bytes = sum(u.resident_bytes for u in cyclic_units(schedule) if u.name in keep)
    if kept_bytes > budget:
        return False
    streamed = [u for u in schedule if u.name not in keep]
    window = 0
    for i in range(len(streamed)):
        span = {id(u): u for u in (streamed[(i + j) % len(streamed)] for j in range(depth + 1))}
        window = max(window, sum(u.charge_bytes for u in span.values()))
    return kept_bytes + window <= budget


def largest_first(schedule: Sequence[Unit], budget: int, depth: int) -> frozenset[str] | None:
    """The largest units that fit next to a window of ``depth`` (greedy); None if the window alone does not."""
    if not fits(schedule, frozenset(), depth, budget):
        return None
    kept: set[str] = set()
    for unit in sorted(cyclic_units(schedule), key=lambda u: -u.resident_bytes):
        if fits(schedule, kept | {unit.name}, depth, budget):
            kept.add(unit.name)
    return frozenset(kept)


def predict(schedule: Sequence[Unit], keep: frozenset[str], depth: int, timing: Timing) -> Prediction:
    """Simulate the engine's cycle: reads issued ``depth`` streamed units ahead, served in order by one disk."""
    bandwidth = timing.read_bandwidth or DEFAULT_BANDWIDTH
    # Time outside units (Python between layers, masks, rotary tables) is spread over the positions: it
    # happens between units, not in one lump.
    between = timing.other / len(schedule) if schedule else 0.0
    steps = [
        (None if u.name in keep else u.raw_bytes / bandwidth, timing.compute.get(u.name, 0.0) + between)
        for u in schedule
    ]
    return _simulate(steps, depth)


def _simulate(steps: list[tuple[float | None, float]], depth: int, cycles: int = 3) -> Prediction:
    """``steps``: (read seconds, or None for a resident unit; compute seconds) per position of the cycle.

    The engine, arriving at a position, reads it now if it is not resident and not already being read, and
    hands the next ``depth`` streamed positions (across the cycle boundary too) to background readers. The
    disk serves reads one after the other at the measured bandwidth (parallel reads share it). The last of
    ``cycles`` cycles is reported: by then the pipeline is in its steady state.
    """
    n = len(steps)
    compute = sum(c for _, c in steps)
    read = sum(r for r, _ in steps if r is not None)
    streamed = [k for k in range(n) if steps[k][0] is not None]
    if not n or not streamed:
        return Prediction(compute, 0.0, compute, 0.0)
    sequence = [cycle * n + k for cycle in range(cycles) for k in streamed]
    ready: dict[int, float] = {}
    issued = 0
    disk = now = 0.0
    start = stall = 0.0
    for k in range(cycles * n):
        if k % n == 0:
            start, stall = now, 0.0
        seconds, work = steps[k % n]
        target = min(len(sequence), bisect.bisect_right(sequence, k) + depth)
        while issued < target:  # the demand read (if any) first, then the look-ahead, in schedule order
            position = sequence[issued]
            disk = max(disk, now) + steps[position % n][0]
            ready[position] = disk
            issued += 1
        if seconds is not None:
            waited = max(0.0, ready[k] - now)
            stall += waited
            now += waited
        now += work
    return Prediction(now - start, read, compute, stall)


def plan(schedule: Sequence[Unit], budget: int, max_depth: int, timing: Timing) -> Plan:
    """The plan predicted fastest among every depth up to ``max_depth`` (near-ties: fewest bytes read, deepest)."""
    candidates = []
    for depth in range(max_depth + 1):
        keep = largest_first(schedule, budget, depth)
        if keep is None:
            continue
        candidates.append(make_plan(schedule, keep, depth, timing))
    if not candidates:  # not even one unit streams within the budget: the pool will say so on first use
        return make_plan(schedule, frozenset(), 0, timing)
    fastest = min(p.prediction.seconds for p in candidates)
    close = [p for p in candidates if p.prediction.seconds <= fastest * (1 + TIE)]
    # Equal reads: the deeper plan, which costs nothing in steady state and reads ahead after an eviction.
    return min(close, key=lambda p: (p.streamed_bytes, -p.depth))


def make_plan(schedule: Sequence[Unit], keep: frozenset[str], depth: int, timing: Timing) -> Plan:
    units = cyclic_units(schedule)
    return Plan(
        keep=keep,
        depth=depth,
        kept_bytes=sum(u.resident_bytes for u in units if u.name in keep),
        streamed_bytes=sum(u.raw_bytes for u in schedule if u.name not in keep),
        prediction=predict(schedule, keep, depth, timing),
        timing=timing,
    )


class BusyClock:
    """Time some read was in flight: reads that overlap count once, so bytes over it is what they got together.

    Reads are reported as they end, not in start order; an overlap with an earlier-ending read is what it leaves.
    """

    def __init__(self) -> None:
        self.until = 0.0

    def add(self, start: float, end: float) -> float:
        """The seconds a read from ``start`` to ``end`` adds to the busy time."""
        busy = max(0.0, end - max(start, self.until))
        self.until = max(self.until, end)
        return busy


class Meter:
    """Read bandwidth and compute per unit, over the last ``WINDOW`` passes.

    The engine reports every read (bytes, start, end), every unit's compute and the end of each pass. The
    bandwidth counts the time *some* read was in flight, so reads running in parallel are not counted twice.
    Not thread-safe: the engine calls it under its pool's lock.
    """

    def __init__(self) -> None:
        self._passes: deque[tuple[float | None, dict[str, float], float | None]] = deque(maxlen=WINDOW)
        self._bytes = 0
        self._busy = 0.0
        self._clock = BusyClock()
        self._compute: dict[str, list[float]] = {}
        self._compute_sum = 0.0
        self._stall = 0.0
        self._begin: float | None = None
        self._traced = False
        # Passes after the first (which traces the schedule, so nothing can be read ahead), since the last reset:
        self.busy_seconds = 0.0  # time some read was in flight
        self.stall_seconds = 0.0  # time the compute waited for a read

    def read(self, nbytes: int, start: float, end: float) -> None:
        self._bytes += nbytes
        self._busy += self._clock.add(start, end)

    def compute(self, name: str, seconds: float) -> None:
        self._compute.setdefault(name, []).append(seconds)
        self._compute_sum += seconds

    def stall(self, seconds: float) -> None:
        self._stall += seconds

    def begin_pass(self, now: float) -> None:
        self._begin = now

    def end_pass(self, now: float) -> None:
        """Fold one forward pass into the estimates.

        The time between passes (sampling, or a user typing the next prompt) is not counted: it cannot be
        told apart from idling, so the prediction leaves it out and is pessimistic by that much.
        """
        bandwidth = self._bytes / self._busy if self._bytes and self._busy > 0 else None
        compute = {name: statistics.fmean(times) for name, times in self._compute.items()}
        other = None
        if self._begin is not None:  # wall time of the pass minus what units and reads explain
            other = max(0.0, now - self._begin - self._compute_sum - self._stall)
        self._passes.append((bandwidth, compute, other))
        if self._traced:
            self.busy_seconds += self._busy
            self.stall_seconds += self._stall
        self._traced = True
        self._begin = None
        self._bytes, self._busy, self._compute, self._compute_sum, self._stall = 0, 0.0, {}, 0.0, 0.0

    def timing(self) -> Timing | None:
        """The median of the recent passes; None before the first pass ended."""
        if not self._passes:
            return None
        bandwidths = [b for b, _, _ in self._passes if b is not None]
        names = {name for _, compute, _ in self._passes for name in compute}
        compute = {name: statistics.median(c[name] for _, c, _ in self._passes if name in c) for name in sorted(names)}
        others = [o for _, _, o in self._passes if o is not None]
        return Timing(
            read_bandwidth=statistics.median(bandwidths) if bandwidths else DEFAULT_BANDWIDTH,
            compute=compute,
            other=statistics.median(others) if others else 0.0,
        )

    @property
    def overlap(self) -> float | None:
        """Share of the read time that compute did not wait for, over the passes since the last reset."""
        if self.busy_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.stall_seconds / self.busy_seconds)

    def reset(self) -> None:
        self.busy_seconds = self.stall_seconds = 0.0
