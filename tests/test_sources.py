"""Read paths: O_DIRECT and buffered reads into aligned, recycled buffers (with their fallbacks), the measured
choice between the two, and the automatic choice of a path."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import StreamConfig, sources
from hf_weightstream.errors import CheckpointError, StreamConfigError
from hf_weightstream.limits import PAGE_CACHE_SLACK, Limit, MemoryLimits
from hf_weightstream.sources import (
    ALIGNMENT,
    DirectReader,
    LocalFileSource,
    MappedReader,
    ModeTrial,
    choose_reader,
)

MB = 10**6
PROMPT = torch.tensor([[1, 5, 9, 3, 7, 2]])


@dataclass
class Range:
    shard: str
    offset: int
    length: int


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[LocalFileSource, bytes]:
    data = os.urandom(3 * ALIGNMENT * 7 + 123)  # not a multiple of the alignment: the last read is short
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    return LocalFileSource({"s": path}), data


RANGES = [Range("s", 0, 10), Range("s", 5000, 9000), Range("s", ALIGNMENT * 3 + 7, ALIGNMENT * 10), Range("s", 1, 1)]


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_reads_unaligned_ranges_exactly(data_file, mode) -> None:
    source, data = data_file
    tail = Range("s", len(data) - 77, 77)  # ends at the end of the file, inside an aligned block
    reader = DirectReader(source, max_in_flight=3, piece_bytes=2 * ALIGNMENT, mode=mode)  # many pieces per range
    assert reader.io == mode
    chunks = reader.read([*RANGES, tail])
    for rng, chunk in zip([*RANGES, tail], chunks, strict=True):
        assert bytes(chunk.numpy()) == data[rng.offset : rng.offset + rng.length]
    base = chunks[0]._base
    assert base.data_ptr() % ALIGNMENT == 0  # what O_DIRECT needs
    assert reader.fallback is None or "O_DIRECT" in reader.fallback  # tmpfs may refuse O_DIRECT
    reader.close()


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_buffered_reads_walk_each_range_in_order_in_one_thread(data_file, mode) -> None:
    source, data = data_file
    reader = DirectReader(source, max_in_flight=4, piece_bytes=ALIGNMENT, mode=mode)
    seen: list[tuple[int, int]] = []  # (thread, offset) per piece, as read
    real_read_piece = reader._read_piece

    def recording(shard, offset, out, needed, piece_mode):
        seen.append((threading.get_ident(), offset))
        time.sleep(0.01)  # long enough that idle workers would take the next pieces
        return real_read_piece(shard, offset, out, needed, piece_mode)

    reader._read_piece = recording
    ranges = [Range("s", 0, 6 * ALIGNMENT), Range("s", 8 * ALIGNMENT, 6 * ALIGNMENT)]
    chunks = reader.read(ranges)
    assert [bytes(c.numpy()) for c in chunks] == [data[r.offset : r.offset + r.length] for r in ranges]
    by_range = [[(t, o) for t, o in seen if r.offset <= o < r.offset + r.length] for r in ranges]
    assert all(len(pieces) == 6 for pieces in by_range)
    for pieces in by_range:
        threads, offsets = {t for t, _ in pieces}, [o for _, o in pieces]
        if mode == "buffered":  # one sequential stream per range, the two ranges side by side
            assert len(threads) == 1 and offsets == sorted(offsets)
        else:  # pieces spread over the workers, so the disk's queue holds several
            assert len(threads) > 1
    if mode == "buffered":
        assert {t for t, _ in by_range[0]} != {t for t, _ in by_range[1]}
    reader.close()


def test_buffered_reads_never_open_with_o_direct(data_file, monkeypatch) -> None:
    source, data = data_file
    real_open = os.open
    flags_seen = []

    def recording_open(path, flags, *args):
        flags_seen.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(sources.os, "open", recording_open)
    reader = DirectReader(source, mode="buffered")
    chunks = reader.read(RANGES)
    assert [bytes(c.numpy()) for c in chunks] == [data[r.offset : r.offset + r.length] for r in RANGES]
    assert not any(f & getattr(os, "O_DIRECT", 0) for f in flags_seen) and reader.fallback is None
    reader.close()


def test_an_unknown_read_mode_is_refused(data_file) -> None:
    with pytest.raises(ValueError, match="not 'odirect'"):
        DirectReader(data_file[0], mode="odirect")


# ------------------------------------------------------------------------------------------------ measured mode
def test_the_trial_alternates_phases_and_keeps_the_clearly_faster_mode() -> None:
    trial, clock, modes = ModeTrial(phase_bytes=100, phases=4), 0.0, []
    trial.record("buffered", 10**9, 0.0, 1.0)  # before start (the traced pass): direct, and not counted
    assert trial.mode == "direct" and trial.bytes["buffered"] == 0
    trial.start()
    seconds_per_read = {"direct": 2.0, "buffered": 1.0}  # buffered twice as fast
    while trial.outcome is None:
        mode = trial.mode
        modes.append(mode)
        trial.record(mode, 50, clock, clock + seconds_per_read[mode])
        clock += seconds_per_read[mode]
    assert modes == ["direct"] * 2 + ["buffered"] * 2 + ["direct"] * 2 + ["buffered"] * 2
    assert trial.mode == "buffered" and "buffered kept" in trial.outcome
    assert trial.bandwidth("buffered") == pytest.approx(2 * trial.bandwidth("direct"))
    trial.record("direct", 10**9, clock, clock + 1e-9)  # decided: later reads do not move it
    assert trial.mode == "buffered"


def settle(trial: ModeTrial, seconds_per_read: dict[str, float], clock: float = 0.0, nbytes: int = 50) -> float:
    """Feed reads of ``nbytes`` at the given speeds until the trial settles; the clock after them."""
    while trial.outcome is None:
        mode = trial.mode
        trial.record(mode, nbytes, clock, clock + seconds_per_read[mode])
        clock += seconds_per_read[mode]
    return clock


def test_a_kept_mode_that_slows_below_the_other_is_measured_again() -> None:
    trial = ModeTrial(phase_bytes=100, phases=4, recheck_bytes=200)
    trial.start()
    clock = settle(trial, {"direct": 1.0, "buffered": 2.0})  # direct twice as fast
    assert trial.mode == "direct" and trial.rechecks == 0
    for _ in range(8):  # direct holds its speed (and a little less): kept, stretch after stretch
        trial.record("direct", 50, clock, clock + 1.2)
        clock += 1.2
    assert trial.outcome is not None and trial.rechecks == 0
    trial.record("buffered", 50, clock, clock + 0.1)  # begun before the choice: not the kept mode's speed
    for _ in range(4):  # then direct reads at a quarter of its speed: slower than buffered was
        assert trial.outcome is not None
        trial.record("direct", 50, clock, clock + 4.0)
        clock += 4.0
    assert trial.outcome is None and trial.rechecks == 1
    modes = []
    while trial.outcome is None:  # the trial again, from direct, alternating
        mode = trial.mode
        modes.append(mode)
        seconds = {"direct": 4.0, "buffered": 2.0}[mode]
        trial.record(mode, 50, clock, clock + seconds)
        clock += seconds
    assert modes == ["direct"] * 2 + ["buffered"] * 2 + ["direct"] * 2 + ["buffered"] * 2
    assert trial.mode == "buffered"
    assert "buffered kept (measured again: direct slowed to" in trial.outcome


def test_an_auto_reader_says_while_it_measures_again(data_file) -> None:
    source, _data = data_file
    reader = DirectReader(source, max_in_flight=2, piece_bytes=2 * ALIGNMENT, mode="auto")
    reader.trial = ModeTrial(phase_bytes=100, phases=2, recheck_bytes=100)
    reader.trial.start()
    settle(reader.trial, {"direct": 1.0, "buffered": 2.0})
    assert reader.settled and "direct kept" in reader.measured
    reader.trial.record("direct", 100, 100.0, 110.0)
    assert not reader.settled and reader.measured.startswith("measuring again: direct slowed to")
    reader.close()


def test_the_trial_keeps_direct_unless_buffered_is_clearly_faster() -> None:
    trial, clock = ModeTrial(phase_bytes=100, phases=2), 0.0
    trial.start()
    for _ in range(4):
        mode = trial.mode
        seconds = 1.0 if mode == "direct" else 0.95  # 5% faster: within the margin
        trial.record(mode, 50, clock, clock + seconds)
        clock += seconds
    assert trial.outcome is not None and trial.mode == "direct"


def test_the_trial_counts_parallel_reads_once() -> None:
    trial = ModeTrial(phase_bytes=10**9)
    trial.start()
    trial.record("direct", 100, 0.0, 1.0)
    trial.record("direct", 100, 0.5, 1.0)  # in flight with the first: no extra time
    assert trial.bandwidth("direct") == pytest.approx(200)
    assert trial.bytes["direct"] == 200 and trial.seconds["direct"] == pytest.approx(1.0)


def test_an_auto_reader_reads_exactly_in_both_modes_then_settles(data_file) -> None:
    source, data = data_file
    reader = DirectReader(source, max_in_flight=2, piece_bytes=2 * ALIGNMENT, mode="auto")
    reader.trial = ModeTrial(phase_bytes=ALIGNMENT, phases=4)
    reader.trial.start()
    seen = set()
    while reader.measured is None:
        seen.add(reader.io)
        chunks = reader.read(RANGES)
        assert [bytes(c.numpy()) for c in chunks] == [data[r.offset : r.offset + r.length] for r in RANGES]
    assert seen == {"direct", "buffered"}
    assert reader.io in ("direct", "buffered") and "kept" in reader.measured
    reader.close()


def test_direct_falls_back_where_o_direct_is_refused(data_file, monkeypatch) -> None:
    source, data = data_file
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(sources.os, "open", refusing_open)
    reader = DirectReader(source)
    chunks = reader.read(RANGES)
    assert [bytes(c.numpy()) for c in chunks] == [data[r.offset : r.offset + r.length] for r in RANGES]
    assert "O_DIRECT refused" in reader.fallback


def test_direct_falls_back_when_a_read_is_refused(data_file, monkeypatch) -> None:
    source, data = data_file
    reader = DirectReader(source)
    real_preadv = os.preadv
    direct_fds = set()
    real_fd = reader._direct_fd

    def remember(shard):
        fd = real_fd(shard)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def refusing_preadv(fd, buffers, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(reader, "_direct_fd", remember)
    monkeypatch.setattr(sources.os, "preadv", refusing_preadv)
    chunks = reader.read(RANGES)
    assert [bytes(c.numpy()) for c in chunks] == [data[r.offset : r.offset + r.length] for r in RANGES]
    assert reader.fallback is not None


def test_direct_read_of_a_shrunk_file_is_a_clear_error(data_file) -> None:
    source, data = data_file
    reader = DirectReader(source)
    with open(source.paths["s"], "r+b") as f:
        f.truncate(ALIGNMENT)
    with pytest.raises(CheckpointError, match="unexpected end of file"):
        reader.read([Range("s", 100, 3 * ALIGNMENT)])


def test_direct_read_errors_other_than_einval_are_raised(data_file, monkeypatch) -> None:
    source, _ = data_file
    reader = DirectReader(source)

    def failing_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sources.os, "preadv", failing_preadv)
    with pytest.raises(CheckpointError, match="Input/output error"):
        reader.read(RANGES)


def test_reclaim_reuses_a_buffer_only_when_nothing_else_views_it(data_file) -> None:
    source, data = data_file
    reader = DirectReader(source)
    chunks = reader.read(RANGES)
    buffer = reader.reclaim(chunks)
    assert buffer is not None and chunks == []
    assert reader.reuse([buffer], RANGES[:1]) is None  # another size: not this buffer
    candidates = [buffer]
    assert reader.reuse(candidates, RANGES) is buffer and candidates == []
    again = reader.read(RANGES, buffer)
    assert again[0]._base is buffer
    assert [bytes(c.numpy()) for c in again] == [data[r.offset : r.offset + r.length] for r in RANGES]

    # The next unit of the same kind starts elsewhere in its page: one page more or less once aligned.
    shifted = [Range(r.shard, r.offset + 100, r.length) for r in RANGES[2:3]]
    candidates = [reader.reclaim(reader.read(RANGES[2:3]))]
    assert reader.reuse(candidates, shifted) is not None

    mapped = MappedReader(source).read(RANGES[2:3])  # page cache of the file: never a buffer to read into
    assert reader.reclaim(mapped) is None

    kept = again[1].view(torch.uint8)  # a user holds a tensor of the evicted unit
    assert reader.reclaim(again) is None
    assert bytes(kept.numpy()) == data[RANGES[1].offset : RANGES[1].offset + RANGES[1].length]


# ------------------------------------------------------------------------------------------------ choice
def limits_with(room: int, page_cache: bool = True) -> MemoryLimits:
    kind = "cgroup1" if page_cache else "rlimit_as"
    return MemoryLimits((Limit(kind, "/x", 10_000 * MB, 10_000 * MB - room), Limit("host", "/proc", 10**12, 0)))


@pytest.mark.parametrize(
    ("io", "budget", "room", "expected", "why"),
    [
        ("auto", 300 * MB, 1000 * MB, "direct", "cannot keep the model cached"),  # direct first, then measured
        ("auto", 1400 * MB, 1000 * MB, "mmap", "holds the whole model"),
        ("auto", 300 * MB, 1600 * MB, "mmap", "can keep the model cached"),
        ("auto", 950 * MB, 1000 * MB, "mmap", "too little"),  # anonymous buffers would not fit: stay reclaimable
        ("mmap", 300 * MB, 1000 * MB, "mmap", "asked for"),
        ("direct", 300 * MB, 10**6 * MB, "direct", "asked for"),
        ("buffered", 300 * MB, 10**6 * MB, "buffered", "asked for"),
    ],
)
def test_choose_reader(data_file, io, budget, room, expected, why) -> None:
    source, _ = data_file
    reader, reason = choose_reader(
        source, io, device=torch.device("cpu"), budget=budget, model_bytes=1400 * MB, limits=limits_with(room)
    )
    assert reader.io == expected and why in reason
    assert (getattr(reader, "trial", None) is not None) == (io == "auto" and expected == "direct")


def test_choose_reader_off_the_cpu_and_for_sources_that_cannot_map(data_file) -> None:
    source, _ = data_file
    reader, reason = choose_reader(source, "direct", device=torch.device("cuda"), budget=1, model_bytes=2, limits=None)
    assert reader is None and "staging" in reason

    class Remote:
        def read_into(self, shard, offset, out):
            out[:] = b"x" * len(out)

    reader, _ = choose_reader(Remote(), "direct", device=torch.device("cpu"), budget=1, model_bytes=2, limits=None)
    assert reader.io == "pread"
    assert bytes(reader.read([Range("s", 0, 3)])[0].numpy()) == b"xxx"
    assert isinstance(
        choose_reader(source, "auto", device=torch.device("cpu"), budget=9, model_bytes=2, limits=None)[0], MappedReader
    )


def test_unknown_io_is_a_clear_error() -> None:
    with pytest.raises(StreamConfigError, match="Unknown io 'odirect'"):
        StreamConfig(io="odirect")


# ------------------------------------------------------------------------------------------------ end to end
def units_and_half_budget(folder: Path, **kwargs) -> tuple[list, int]:
    """The units of a streamed model, and a budget for half of them (never below three of the largest)."""
    units = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", **kwargs)._hf_weightstream.units
    return units, max(sum(u.resident_bytes for u in units) // 2, 3 * max(u.charge_bytes for u in units))


def reading_as_auto(model, phases: int):
    """The model's engine, reading as io="auto" does under a memory limit below the model, with trial phases small
    enough for a tiny model (one phase: only direct reads are timed, so direct is kept)."""
    engine = model._hf_weightstream
    engine.reader = DirectReader(engine.reader.source, mode="auto")
    engine.reader.trial = ModeTrial(phase_bytes=ALIGNMENT, phases=phases)
    return engine


def spare_once_full(pool, spare: int):
    """A memory limit that leaves ``spare`` bytes of page cache beyond the slack and the pool's budget once full."""
    return lambda: limits_with(PAGE_CACHE_SLACK + spare + max(0, pool.budget - pool.held))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_direct_io_outputs_are_identical_and_buffers_are_recycled(checkpoints, dtype) -> None:
    folder = checkpoints("llama")
    kwargs = {} if dtype is None else {"dtype": dtype}
    ref = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    _units, budget = units_and_half_budget(folder, **kwargs)
    config = StreamConfig(budget=budget, io="direct")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=config, **kwargs)
    engine = model._hf_weightstream
    reused = []
    real_read = engine.reader.read

    def counting_read(ranges, buffer=None, cached=False):
        reused.append(buffer is not None)
        return real_read(ranges, buffer, cached)

    engine.reader.read = counting_read
    with torch.no_grad():
        assert torch.equal(ref(PROMPT).logits, model(PROMPT).logits)
    expected = ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False), expected)
    stats = hf_weightstream.stats(model)
    assert stats["io"] == "direct" and stats["io_reason"] == "io='direct' asked for"
    assert stats["peak_resident_bytes"] <= budget
    if dtype is None:  # views of the buffer: an evicted unit's buffer takes the next read
        assert any(reused)
    else:  # cast tensors are new memory; the raw buffer goes at once
        assert not any(reused)


def test_a_measured_read_mode_starts_after_the_traced_pass_and_keeps_outputs_identical(checkpoints) -> None:
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    _units, budget = units_and_half_budget(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=budget))
    engine = reading_as_auto(model, phases=4)
    engine.memory_limits = lambda: limits_with(0)  # no page cache to spare: every streamed unit is timed
    with torch.no_grad():
        model(PROMPT)
    assert engine.reader.trial.started and engine.reader.measured is None  # the traced pass is not timed
    expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8, do_sample=False), expected)
    stats = hf_weightstream.stats(model)
    assert stats["io"] in ("direct", "buffered") and "kept" in stats["io_reason"]
    assert stats["peak_resident_bytes"] <= budget and stats["page_cached_units"] == 0


def test_units_the_limit_has_page_cache_room_for_are_read_through_it_and_left_there(checkpoints, monkeypatch) -> None:
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    units, budget = units_and_half_budget(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=budget))
    engine = reading_as_auto(model, phases=1)
    layer = max(u.raw_bytes for u in units if u.name.startswith("model.layers."))
    engine.memory_limits = spare_once_full(engine.pool, 2 * layer + layer // 2)
    reads, dropped = [], []
    real_read, real_fadvise = engine.reader.read, os.posix_fadvise

    def recording_read(ranges, buffer=None, cached=False):
        reads.append(cached)
        return real_read(ranges, buffer, cached)

    def recording_fadvise(fd, offset, length, advice):
        dropped.append((offset, length))
        return real_fadvise(fd, offset, length, advice)

    engine.reader.read = recording_read
    monkeypatch.setattr(sources.os, "posix_fadvise", recording_fadvise)
    expected = ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False), expected)
    stats = hf_weightstream.stats(model)
    streamed = {u.name for u in engine.schedule} - engine.keep_resident
    assert engine.page_cached <= streamed
    assert sum(name.startswith("model.layers.") for name in engine.page_cached) == 2
    assert 2 * layer <= stats["page_cached_bytes"] <= 2 * layer + layer // 2
    assert any(reads) and not all(reads)  # cached units through the page cache, the others not
    kept = [r for u in engine.units if u.name in engine.page_cached for r in u.ranges]
    assert not any(o < r.offset + r.length and r.offset < o + n for o, n in dropped for r in kept)
    assert stats["peak_resident_bytes"] <= budget


@pytest.mark.parametrize(
    ("io", "in_flight_layers", "cached_layers"), [("buffered", 0, 2), ("buffered", 1, 1), ("direct", 1, 2)]
)
def test_a_forced_read_mode_shares_the_page_cache_room_less_its_pieces_in_flight(
    checkpoints, io, in_flight_layers, cached_layers
) -> None:
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=6, do_sample=False)
    units, budget = units_and_half_budget(folder)
    layer = max(u.raw_bytes for u in units if u.name.startswith("model.layers."))
    config = StreamConfig(budget=budget, io=io)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=config)
    engine = model._hf_weightstream
    piece = ALIGNMENT * -(-layer // (2 * ALIGNMENT)) if in_flight_layers else ALIGNMENT  # two pieces: a layer
    engine.reader = DirectReader(engine.reader.source, max_in_flight=2, piece_bytes=piece, mode=io)
    engine.memory_limits = spare_once_full(engine.pool, 2 * layer + layer // 2)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False), expected)
    assert engine.reader.cache_in_flight == (2 * piece if io == "buffered" else 0)
    assert sum(name.startswith("model.layers.") for name in engine.page_cached) == cached_layers
    assert hf_weightstream.stats(model)["peak_resident_bytes"] <= budget


def test_the_page_cache_room_is_measured_again_when_the_read_mode_changes(checkpoints) -> None:
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    units, budget = units_and_half_budget(folder)
    layer = max(u.raw_bytes for u in units if u.name.startswith("model.layers."))
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=budget))
    engine = reading_as_auto(model, phases=1)  # settles on direct: no pieces in the page cache
    engine.memory_limits = spare_once_full(engine.pool, 2 * layer + layer // 2)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), expected)
    assert sum(name.startswith("model.layers.") for name in engine.page_cached) == 2
    # A re-check keeps buffered reads instead (here: a reader that reads buffered, a layer's pieces in flight).
    piece = ALIGNMENT * -(-layer // (2 * ALIGNMENT))
    engine.reader = DirectReader(engine.reader.source, max_in_flight=2, piece_bytes=piece, mode="buffered")
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), expected)
    assert sum(name.startswith("model.layers.") for name in engine.page_cached) == 1


def test_models_of_one_pool_share_the_page_cache_room(checkpoints) -> None:
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    units, budget = units_and_half_budget(folder)
    layer = max(u.raw_bytes for u in units if u.name.startswith("model.layers."))
    pool = hf_weightstream.WeightPool(budget)  # below either model: each streams
    spare = 2 * layer + layer // 2
    models = []
    for _ in range(2):
        config = StreamConfig(pool=pool)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=config)
        engine = reading_as_auto(model, phases=1)
        engine.memory_limits = spare_once_full(pool, spare)
        models.append(model)
    for model in models:
        assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), expected)
    first, second = (m._hf_weightstream.page_cached_bytes() for m in models)
    assert first >= 2 * layer and first + second <= spare  # the second model gets only what the first left
