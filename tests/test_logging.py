"""What a streamed model tells through transformers' logging, and what ``print(model)`` says.

transformers' library logger does not propagate to the root logger (so pytest's ``caplog`` sees nothing): the
tests attach a handler to ours, ``transformers.hf_weightstream``, and switch transformers' verbosity as a user
would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import hf_weightstream
from hf_weightstream import log

PROMPT = torch.tensor([[1, 5, 6, 7]])


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    log.logger.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    try:
        yield handler
    finally:
        hf_logging.set_verbosity(verbosity)
        log.logger.removeHandler(handler)


def test_the_logger_follows_transformers_verbosity() -> None:
    assert log.logger.name == log.LOGGER_NAME and log.logger.parent is logging.getLogger("transformers")


def test_info_tells_the_plan_at_load_and_after_the_first_forward(records: Records, checkpoints) -> None:
    hf_logging.set_verbosity_info()
    config = hf_weightstream.StreamConfig(budget="400KB", lookahead=1)
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", stream_config=config)
    engine = model._hf_weightstream
    (loaded,) = records.messages(logging.INFO)
    assert f"{len(engine.units)} units" in loaded and "budget 0.4 MB from StreamConfig(budget=...)" in loaded
    assert "I/O: local safetensors files; each unit's byte range mapped in place" in loaded
    assert "policy schedule, lookahead 1" in loaded and "planned after the first forward pass" in loaded

    with torch.inference_mode():
        for _ in range(3):
            model(PROMPT)
    loaded_and_traced = records.messages(logging.INFO)
    assert len(loaded_and_traced) == 2  # once at load, once when the schedule is traced; not per forward
    traced = loaded_and_traced[1]
    kept = [u.name for u in engine.units if u.name in engine.keep_resident]
    assert f"Kept resident: {len(kept)} units" in traced and log.unit_names(kept) in traced
    assert f"traced {len(engine.schedule)} unit calls per forward pass" in traced
    assert not records.messages(logging.DEBUG)


def test_debug_adds_one_line_per_forward_pass(records: Records, checkpoints) -> None:
    hf_logging.set_verbosity_debug()
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", max_memory={"cpu": "400KB"})
    assert "budget 0.4 MB from max_memory" in records.messages(logging.INFO)[0]
    assert any("units: model.embed_tokens" in m for m in records.messages(logging.DEBUG))  # every unit's size
    before = len(records.messages(logging.DEBUG))
    model.generate(PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    passes = [m for m in records.messages(logging.DEBUG)[before:] if "forward pass:" in m]
    assert len(passes) == 3
    assert all("hits" in m and "misses" in m and "waited" in m for m in passes)
    assert "read 0.0 MB in 0 reads" not in passes[0]  # the first pass reads every unit


def test_nothing_is_logged_at_the_default_verbosity(records: Records, checkpoints) -> None:
    hf_logging.set_verbosity_warning()
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream")
    with torch.inference_mode():
        model(PROMPT)
    assert records.records == []


def test_budget_origin_names_where_the_budget_came_from(records: Records, checkpoints) -> None:
    hf_logging.set_verbosity_info()
    folder = checkpoints("llama")
    pool = hf_weightstream.WeightPool("1MB")
    shared = hf_weightstream.StreamConfig(pool=pool)
    AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=shared)
    hf_weightstream.set_default_pool(pool)
    try:
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    finally:
        hf_weightstream.set_default_pool(None)
    AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    origins = [m.split(" from ", 1)[1].split(";")[0] for m in records.messages(logging.INFO)]
    assert origins == [
        "the WeightPool given as StreamConfig(pool=...)",
        "the default pool (set_default_pool)",
        "the default, from the memory available on the device",
    ]


def test_print_model_says_it_is_streamed(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", max_memory={"cpu": "1MB"})
    lines = repr(model).splitlines()
    assert lines[0] == "LlamaForCausalLM("
    assert lines[1].strip().startswith("streamed by hf_weightstream: 7 units")
    assert "budget 1.0 MB on cpu" in lines[1]
    assert "(model): LlamaModel(" in lines[2]
    plain = AutoModelForCausalLM.from_pretrained(checkpoints("llama"))
    assert "hf_weightstream" not in repr(plain)


def test_unit_names_are_shortened_to_ranges() -> None:
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in (0, 1, 2, 4)), "model.norm", "lm_head"]
    assert log.unit_names(names) == "model.embed_tokens, model.layers.0-2, model.layers.4, model.norm, lm_head"
    assert log.unit_names([]) == ""
