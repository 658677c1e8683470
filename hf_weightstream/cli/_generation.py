"""Generation for the subcommands that talk to a model (``generate``, ``demo --chat``): prompt encoding, timed
token streaming, a chat loop.

Imports torch and transformers: import it inside a subcommand's ``run``, never at module level (``--help`` must
not pay for them).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.streamers import BaseStreamer

from ._common import Answer, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class TimedStreamer(BaseStreamer):
    """transformers' ``TextStreamer`` that also notes when each new token arrives.

    ``generate`` hands the streamer the prompt first and then every new token as it is produced, so the
    arrival times give the time to the first token and the time per later token without a second run.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        from transformers import TextStreamer

        self.token_times: list[float] = []
        self._printer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True
        self._printer.put(value)

    def end(self) -> None:
        self._printer.end()


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], use_template: bool
) -> dict[str, torch.Tensor]:
    """Model inputs for a conversation: through the tokenizer's chat template if it has one, as instruct
    models expect."""
    if use_template and tokenizer.chat_template:
        return dict(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        )
    text = "\n".join(m["content"] for m in messages)
    return dict(tokenizer(text, return_tensors="pt"))


def run_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    *,
    sample: bool = False,
) -> Answer:
    """Generate, printing tokens as they come; greedy unless ``sample``, so that runs can be compared."""
    streamer = TimedStreamer(tokenizer)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample, "streamer": streamer}
    if model.generation_config.pad_token_id is None:  # avoids transformers' warning on every call
        pad = tokenizer.pad_token_id
        options["pad_token_id"] = pad if pad is not None else tokenizer.eos_token_id
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    total = time.perf_counter() - start
    # A decoder-only model's output repeats the prompt; an encoder-decoder's starts with the decoder's start token.
    skip = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    new_ids = output[0, skip:].tolist()
    times = streamer.token_times
    first = times[0] - start if times else None
    per_token = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else None
    return Answer(new_ids, tokenizer.decode(new_ids, skip_special_tokens=True), total, first, per_token)


def _read_line(prompt: str) -> str:
    """One line of user input; the prompt goes to stderr so that stdout holds only answers."""
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    *,
    first: str | None = None,
    after_turn: Callable[[Answer], None] | None = None,
    sample: bool = False,
) -> None:
    """Talk with the model on stdin until an empty line or end of input, keeping the conversation."""
    if not tokenizer.chat_template:
        raise UsageError("--chat needs a tokenizer with a chat template; this one has none.")
    print("Chat: type a message and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        line = first if first is not None else _read_line("\nyou> ")
        first = None
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        print("model> ", end="", flush=True)
        answer = run_generate(model, tokenizer, encode(tokenizer, messages, True), max_new_tokens, sample=sample)
        messages.append({"role": "assistant", "content": answer.text})
        if after_turn is not None:
            after_turn(answer)
