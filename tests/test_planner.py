"""The planner: resident set and read-ahead depth by predicted time per token, re-planned as timings move."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import StreamConfig, planner
from hf_weightstream.planner import Meter, Timing, fits, make_plan, plan, predict

PROMPT = torch.tensor([[1, 5, 9, 3, 7, 2]])


@dataclass(eq=False)
class FakeUnit:
    name: str
    raw_bytes: int

    @property
    def resident_bytes(self) -> int:
        return self.raw_bytes

    @property
    def charge_bytes(self) -> int:
        return self.raw_bytes


def decoder(layers: int = 10, layer: int = 100, head: int = 200) -> list[FakeUnit]:
    return [FakeUnit(f"layer{i}", layer) for i in range(layers)] + [FakeUnit("norm", 1), FakeUnit("head", head)]


def timing(schedule: list[FakeUnit], bandwidth: float, compute_per_unit: float, other: float = 0.0) -> Timing:
    return Timing(bandwidth, {u.name: compute_per_unit for u in schedule}, other)


def test_no_read_ahead_serialises_reads_and_compute() -> None:
    units = decoder()
    t = timing(units, bandwidth=100.0, compute_per_unit=0.5)  # a layer reads in 1 s, computes in 0.5 s
    p = predict(units, frozenset(), 0, t)
    assert p.seconds == pytest.approx(p.read_seconds + p.compute_seconds)
    assert p.overlap == pytest.approx(0.0)


def test_read_ahead_hides_reads_behind_compute() -> None:
    units = decoder()
    compute_bound = predict(units, frozenset(), 2, timing(units, bandwidth=1000.0, compute_per_unit=0.5))
    assert compute_bound.stall_seconds == pytest.approx(0.0) and compute_bound.overlap == 1.0
    assert compute_bound.seconds == pytest.approx(compute_bound.compute_seconds)
    io_bound = predict(units, frozenset(), 2, timing(units, bandwidth=100.0, compute_per_unit=0.1))
    assert io_bound.seconds == pytest.approx(io_bound.read_seconds)  # the disk never idles
    assert 0.0 < io_bound.overlap < 1.0
    # One unit ahead is not always enough: after the tiny norm, the disk idles while the norm computes.
    shallow = predict(units, frozenset(), 1, timing(units, bandwidth=100.0, compute_per_unit=0.1))
    assert io_bound.seconds < shallow.seconds <= io_bound.seconds + 0.1 + 1e-9


def test_plan_reads_ahead_when_that_beats_keeping_more() -> None:
    units = decoder()
    budget = 600  # the head (200) plus a 3-layer window, or more layers with a shorter window
    t = timing(units, bandwidth=100.0, compute_per_unit=0.9)
    chosen = plan(units, budget, 2, t)
    depth0 = make_plan(units, planner.largest_first(units, budget, 0), 0, t)
    assert chosen.depth > 0 and chosen.kept_bytes < depth0.kept_bytes
    assert chosen.prediction.seconds < depth0.prediction.seconds
    assert fits(units, chosen.keep, chosen.depth, budget)


def test_plan_keeps_the_most_when_nothing_can_overlap() -> None:
    units = decoder()
    chosen = plan(units, 600, 2, timing(units, bandwidth=100.0, compute_per_unit=0.0))
    assert chosen.depth == 0 and chosen.kept_bytes == 500  # head, four layers... and norm: the most bytes


def test_plan_with_a_budget_for_everything_reads_ahead_after_evictions() -> None:
    units = decoder()
    chosen = plan(units, 10_000, 2, timing(units, bandwidth=100.0, compute_per_unit=0.1))
    assert chosen.streamed_bytes == 0 and chosen.depth == 2
    assert chosen.prediction.read_seconds == 0.0 and chosen.prediction.overlap == 1.0


def test_a_unit_used_twice_per_cycle_counts_twice() -> None:
    embed_head = FakeUnit("tied", 300)
    units = [embed_head, *decoder(layers=3, head=0)[:3], embed_head]
    t = timing(units, bandwidth=100.0, compute_per_unit=0.0)
    assert make_plan(units, frozenset(), 0, t).streamed_bytes == 900
    assert make_plan(units, frozenset({"tied"}), 0, t).kept_bytes == 300


def test_timing_moves_by_a_factor() -> None:
    base = Timing(1e9, {"a": 0.01})
    assert not Timing(1.2e9, {"a": 0.011}).moved_from(base)
    assert Timing(3e8, {"a": 0.01}).moved_from(base)  # page cache warm -> cold
    assert Timing(1e9, {"a": 0.002}).moved_from(base)  # prefill -> decode


def test_meter_counts_parallel_reads_once_and_takes_medians() -> None:
    meter = Meter()
    assert meter.timing() is None
    meter.begin_pass(0.0)
    meter.read(100 << 20, 0.0, 1.0)
    meter.read(100 << 20, 0.5, 1.5)  # in parallel with the first: the disk was busy 1.5 s, not 2 s
    meter.compute("a", 2.0)
    meter.end_pass(4.0)
    t = meter.timing()
    assert t.read_bandwidth == pytest.approx((200 << 20) / 1.5)
    assert t.compute == {"a": 2.0} and t.other == pytest.approx(2.0)
    assert meter.overlap is None  # the first (tracing) pass is not counted
    for start in (10.0, 20.0):
        meter.begin_pass(start)
        meter.compute("a", 0.1)
        meter.stall(0.5)
        meter.read(1 << 20, start, start + 1.0)
        meter.end_pass(start + 1.0)
    assert meter.timing().compute["a"] == pytest.approx(0.1)  # the median of the last three passes
    assert meter.overlap == pytest.approx(0.5)
    meter.reset()
    assert meter.overlap is None


# ------------------------------------------------------------------------------------------------ in the engine
def _half_budget_model(checkpoints) -> tuple:
    """The tiny llama streamed at half its size (room for four units at once), reading two units ahead."""
    folder = checkpoints("llama")
    probe = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    units = probe._hf_weightstream.units
    budget = max(sum(u.resident_bytes for u in units) // 2, 4 * max(u.charge_bytes for u in units))
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(budget=budget, lookahead=2)
    )
    return model, budget


def test_engine_plans_from_measurements_and_prefetches_in_time(checkpoints) -> None:
    model, budget = _half_budget_model(checkpoints)
    engine = model._hf_weightstream
    # Make reads and compute take as long as a real model's (tiny layers read and compute in microseconds).
    slow = [m.register_forward_hook(lambda *a: time.sleep(0.01)) for m in model.model.layers]
    real_read = engine.reader.read

    def slow_read(ranges, buffer=None, cached=False):
        time.sleep(0.01)
        return real_read(ranges, buffer, cached)

    engine.reader.read = slow_read
    try:
        model.generate(PROMPT, max_new_tokens=2, do_sample=False)
        hf_weightstream.reset_stats(model)
        model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    finally:
        for handle in slow:
            handle.remove()
    stats = hf_weightstream.stats(model)
    assert engine.plan is not None and stats["depth"] == engine.plan.depth > 0
    assert stats["prefetch_hits"] > 0 and stats["predicted_overlap"] is not None
    assert stats["measured_overlap"] is not None and stats["measured_overlap"] > 0.5
    assert stats["predicted_seconds_per_token"] > 0 and stats["streamed_bytes_per_token"] > 0
    assert stats["peak_resident_bytes"] <= budget


def test_engine_replans_when_timings_move(checkpoints) -> None:
    model, budget = _half_budget_model(checkpoints)
    engine = model._hf_weightstream
    with torch.no_grad():
        model(PROMPT)
    first = engine.plan
    names = [u.name for u in engine.schedule]
    # Pretend reads became free and compute heavy, then the opposite: the plan follows the timings it sees.
    for bandwidth, compute in ((1e15, 1.0), (1e3, 0.0)):
        for _ in range(planner.WINDOW):
            engine.meter._passes.append((bandwidth, dict.fromkeys(names, compute), 0.0))
        with engine.pool.cond:
            engine._replan()
        assert engine.plan.timing.read_bandwidth == bandwidth
    assert engine.plan is not first
    assert engine.plan.depth == 0  # with nothing to overlap, keeping the most wins
    assert engine.keep_resident == set(engine.plan.keep)
