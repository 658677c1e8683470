"""User-facing options of a streamed model.

`StreamConfig` is deliberately a small, validated value object: every field is checked when it is made, so
a typo such as ``lookahaed=2`` fails at once with a suggestion instead of being silently ignored deep inside
``from_pretrained``.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .errors import StreamConfigError

if TYPE_CHECKING:
    import torch

    from .residency import WeightPool

POLICIES = ("schedule", "lru")
EXPERT_MODES = ("routed", "whole")
IO_MODES = ("auto", "mmap", "direct", "buffered")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | float | str, what: str = "budget") -> int:
    """Turn ``150_000_000``, ``"150MB"`` or ``"1.5GiB"`` into bytes.

    Decimal units (MB, GB) are powers of ten and binary ones (MiB, GiB) powers of two, as in transformers'
    ``max_memory`` and ``max_shard_size``.
    """
    if isinstance(value, bool):
        raise StreamConfigError(f"{what} must be a number of bytes or a string like '150MB', not {value!r}.")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise StreamConfigError(f"{what} must be positive, got {value!r}.")
        if isinstance(value, float) and not value.is_integer():  # 0.5 would be 0 bytes, not half of anything
            raise StreamConfigError(
                f"{what} is a number of bytes, not a fraction: got {value!r}. Use e.g. 150_000_000 or '150MB'."
            )
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number = float(match.group(1))
            size = int(number * _UNITS[(match.group(2) or "b").lower()])
            if size > 0:
                return size
    raise StreamConfigError(
        f"Cannot read {what}={value!r}: use a positive number of bytes or a string such as '150MB', "
        "'2GiB' or '1.5GB' (MB/GB are powers of 10, MiB/GiB powers of 2)."
    )


META_DEVICE = (
    "A streamed model cannot compute on the meta device, which holds no values: its weights already stay out of "
    "memory until a call reads them. To drop the ones resident now, call hf_weightstream.release(model)."
)


@dataclass
class StreamConfig:
    """How a model streams its weights.

    Args:
        budget: bytes of weights that may be held on the execution device at once (resident plus in flight),
            as an int or a string like ``"150MB"``. ``None`` picks a default from the memory this process may
            really use: cgroup (container) limits, ``RLIMIT_AS``, the GPU's free memory, the host's (`limits.py`).
        policy: ``"schedule"`` (default) keeps a fixed set of units resident and streams the rest in
            execution order, which is optimal for the cyclic access of a decoder; ``"lru"`` evicts the least
            recently used unit, which suits irregular access.
        lookahead: the most units ahead of the running one read in the background. With ``policy="schedule"``
            the planner picks the depth (0 to ``lookahead``) predicted fastest, trading read-ahead room against
            resident units (`planner.py`).
        device: execution device; default is the first CUDA GPU if there is one, else the CPU.
        num_workers: background reader threads.
        pool: a `WeightPool` shared with other models, so several models live under one budget.
        complete_download: for Hub repos, fetch the rest of each shard in the background and commit it to the
            Hub cache once verified.
        max_connections: parallel HTTP range requests when streaming from the Hub.
        coalesce_gap: two byte ranges of one unit at most this far apart are read as one, gap included (a gap
            is read only up to an eighth of what the unit needs, or 4 KiB, so a small unit such as one expert
            does not read its neighbours).
        experts: ``"routed"`` (default) reads only the experts each MoE call routes to, one unit per expert;
            ``"whole"`` streams an MoE layer's experts with its block, like a dense layer.
        io: how CPU weights are read from local files. ``"mmap"`` maps page-cache ranges in place (best when the
            files stay cached); ``"direct"`` reads with ``O_DIRECT`` into reused aligned buffers, several reads
            in flight (best when the streamed bytes come from disk every token, e.g. in a container whose
            limit charges the page cache); ``"buffered"`` reads the same way through the page cache and drops
            each piece from it once copied (some disks, virtual ones above all, serve the kernel's read-ahead
            faster than direct reads); ``"auto"`` (default) picks from the memory limits, and between
            ``"direct"`` and ``"buffered"`` by timing both on the first reads. The choice and its reason are
            in ``stats()["io"]`` and ``stats()["io_reason"]``.
    """

    budget: int | str | None = None
    policy: str = "schedule"
    lookahead: int = 2
    device: str | torch.device | None = None
    num_workers: int = 4
    pool: WeightPool | None = None
    complete_download: bool = True
    max_connections: int = 12
    coalesce_gap: int = 1 << 20
    experts: str = "routed"
    io: str = "auto"
    _budget_bytes: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget is not None:
            self._budget_bytes = parse_size(self.budget)
        if self.experts not in EXPERT_MODES:
            raise StreamConfigError(f"Unknown experts={self.experts!r}: choose one of {', '.join(EXPERT_MODES)}.")
        if self.policy not in POLICIES:
            raise StreamConfigError(f"Unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}.")
        if self.io not in IO_MODES:
            raise StreamConfigError(f"Unknown io {self.io!r}: choose one of {', '.join(IO_MODES)}.")
        for name in ("lookahead", "coalesce_gap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StreamConfigError(f"{name} must be an integer >= 0, got {value!r}.")
        if not isinstance(self.complete_download, bool):
            raise StreamConfigError(f"complete_download must be True or False, got {self.complete_download!r}.")
        for name in ("num_workers", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StreamConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.device is not None:
            import torch  # here, so that parse_size and POLICIES stay importable without torch (command line)

            try:
                self.device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise StreamConfigError(f"Cannot use device={self.device!r}: {err}") from None
            if self.device.type == "meta":
                raise StreamConfigError(META_DEVICE)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise StreamConfigError(
                    f"Cannot use device={str(self.device)!r}: CUDA is not available on this machine (torch "
                    f"{torch.__version__}). Use device='cpu', or install a CUDA build of torch on a machine with a GPU."
                )
        if self.pool is not None and self.budget is not None:
            raise StreamConfigError(
                "Pass either budget= or pool=, not both: a pool's budget is shared by all its models."
            )

    @property
    def budget_bytes(self) -> int | None:
        return self._budget_bytes

    def __deepcopy__(self, memo: dict) -> StreamConfig:
        # transformers deep-copies from_pretrained kwargs; a config naming a shared pool must stay one object.
        return self


_generated_init = StreamConfig.__init__


@functools.wraps(_generated_init)
def _checked_init(self: StreamConfig, *args: Any, **kwargs: Any) -> None:
    # The dataclass __init__ would raise a bare TypeError; name the closest field instead.
    known = sorted(f.name for f in fields(StreamConfig) if f.init)
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise StreamConfigError(f"Unknown StreamConfig field {key!r}.{hint} Known fields: {', '.join(known)}.")
    _generated_init(self, *args, **kwargs)


StreamConfig.__init__ = _checked_init  # type: ignore[method-assign]


def stream_request(kwargs: dict[str, Any]) -> StreamConfig | None:
    """Pop our options from ``from_pretrained`` kwargs; a StreamConfig if streaming was asked for."""
    device_map = kwargs.get("device_map")
    streaming = kwargs.pop("streaming", None)
    config = kwargs.pop("stream_config", None)
    if streaming is not None and not isinstance(streaming, bool):  # "no" would be true
        raise StreamConfigError(f"streaming must be True or False, got {streaming!r}.")
    if streaming is False:  # an explicit no wins over a stream_config (e.g. a flag that turns streaming off)
        if isinstance(device_map, str) and device_map == "stream":
            raise StreamConfigError("streaming=False contradicts device_map='stream': drop one of the two.")
        return None
    if isinstance(device_map, str) and device_map == "stream":
        kwargs.pop("device_map")
    elif not streaming and config is None:
        if isinstance(device_map, str) and difflib.get_close_matches(device_map.strip().lower(), ["stream"], 1, 0.7):
            raise StreamConfigError(f"device_map={device_map!r} is not a device map: did you mean device_map='stream'?")
        return None
    elif device_map is not None:
        raise StreamConfigError(
            f"device_map={device_map!r} cannot be combined with streaming: use device_map='stream' "
            "(and StreamConfig(device=...) to pick the execution device)."
        )
    if config is None:
        config = StreamConfig()
    elif isinstance(config, dict):
        config = StreamConfig(**config)
    elif not isinstance(config, StreamConfig):
        raise StreamConfigError(f"stream_config must be a StreamConfig or a dict, not {type(config).__name__}.")
    return config
