"""Where every tensor of a checkpoint lives: shard, byte offset, length, dtype and shape.

Only safetensors headers are read to build it (a few KB per shard), never weight bytes. The header format is
tiny and documented (8-byte little-endian length, then JSON), and we need the absolute byte offsets to issue
one coalesced read per unit, which the ``safetensors`` package does not expose without mapping the whole file.
Every field is validated here, so a corrupt or truncated file fails at ``from_pretrained`` time with the file
named, rather than as garbage weights later.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .errors import CheckpointError

# safetensors dtype names -> torch dtypes, for the types this torch build knows.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",  # ue8m0 block scales (FP8 checkpoints with scale_fmt "ue8m0", MXFP8)
    }.items()
    if hasattr(torch, attr)
}

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}  # for writing headers
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too
FIX_HINT = (
    "The file is damaged or incomplete: delete it (or the whole model folder / Hub cache entry) and download it "
    "again, e.g. `hf download REPO --force-download`."
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a shard; ``offset`` is absolute within the file."""

    key: str
    shard: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def header_length(prefix: bytes, shard: str) -> int:
    """Length of the JSON header, from the first 8 bytes of a safetensors file."""
    if len(prefix) < 8:
        raise CheckpointError(f"{shard}: file is shorter than a safetensors header (8 bytes). {FIX_HINT}")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length == 0 or length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{shard}: not a valid safetensors file (header length {length}). Streaming needs safetensors "
            f"checkpoints. {FIX_HINT}"
        )
    return length


def parse_header(header: bytes, shard: str, file_size: int) -> dict[str, TensorEntry]:
    """Validate a safetensors JSON header and turn it into entries with absolute offsets."""
    data_start = 8 + len(header)
    try:
        raw = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{shard}: corrupt safetensors header ({err}). {FIX_HINT}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{shard}: corrupt safetensors header (not a JSON object). {FIX_HINT}")
    entries: dict[str, TensorEntry] = {}
    for key, info in raw.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{shard}: corrupt safetensors header entry for {key!r}. {FIX_HINT}"
            ) from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{shard}: tensor {key!r} has dtype {dtype_name}, which this torch build cannot hold; "
                "upgrade torch or convert the checkpoint."
            )
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(
                f"{shard}: tensor {key!r} spans {end - begin} bytes but {dtype_name}{list(shape)} needs "
                f"{numel * dtype.itemsize}. {FIX_HINT}"
            )
        if data_start + end > file_size:
            raise CheckpointError(
                f"{shard}: truncated: tensor {key!r} ends at byte {data_start + end} but the file has "
                f"{file_size} bytes. {FIX_HINT}"
            )
        entries[key] = TensorEntry(key, shard, data_start + begin, end - begin, dtype, shape)
    return entries


def read_shard_header(shard: str, size: int, read: Callable[[int, int], bytes]) -> dict[str, TensorEntry]:
    """Parse the header of one shard through ``read(offset, length)``, which may be a file or HTTP ranges."""
    if size < 8:
        raise CheckpointError(f"{shard}: file has {size} bytes, too short for safetensors. {FIX_HINT}")
    length = header_length(read(0, 8), shard)
    if 8 + length > size:
        raise CheckpointError(f"{shard}: truncated inside its header. {FIX_HINT}")
    return parse_header(read(8, length), shard, size)


class CheckpointIndex:
    """All tensors of a checkpoint, by checkpoint key."""

    def __init__(self, entries: Iterable[TensorEntry], shard_sizes: dict[str, int]):
        self.entries: dict[str, TensorEntry] = {}
        for entry in entries:
            if entry.key in self.entries:
                raise CheckpointError(
                    f"Tensor {entry.key!r} is stored twice, in {self.entries[entry.key].shard} and "
                    f"{entry.shard}: the checkpoint is inconsistent."
                )
            self.entries[entry.key] = entry
        self.shard_sizes = shard_sizes

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype transformers' ``dtype="auto"`` falls back to when the config names none."""
        for entry in self.entries.values():
            if entry.dtype.is_floating_point:
                return entry.dtype
        return None
