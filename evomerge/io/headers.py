"""Tensor names, dtypes and shapes of a safetensors checkpoint, read from the file headers alone (no torch).

A safetensors file starts with an 8-byte little-endian header length, then a JSON header that maps each
tensor name to its dtype, shape and byte offsets (counted from the end of the header). Reading only that lets
the search check its sources before it starts, in the driver process, which never imports torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import CheckpointError

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # the format's own limit; a larger "length" means the file is not safetensors


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in one safetensors file."""
    return {name: (e.dtype, e.shape) for name, e in read_entries(file).items()}


@dataclass(frozen=True)
class Entry:
    dtype: str  # the format's dtype name: F32, BF16, F16, ...
    shape: tuple[int, ...]
    start: int  # byte offsets of the tensor's data in the file
    end: int


def read_entries(file: Path) -> dict[str, Entry]:
    """name -> Entry (dtype, shape, byte range in the file) of every tensor in one safetensors file."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is over the format's limit")
            header = json.loads(f.read(n))
        data = 8 + n
        return {name: Entry(meta["dtype"], tuple(meta["shape"]), data + meta["data_offsets"][0],
                            data + meta["data_offsets"][1])
                for name, meta in header.items() if name != "__metadata__"}
    except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"cannot read the safetensors header of {file}: {e}") from None


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (from its index when it has one); [] when it has none."""
    indexed = indexed_files(model_dir, INDEX)
    return indexed if indexed is not None else sorted(model_dir.glob("*.safetensors"))


def indexed_files(model_dir: Path, index_name: str) -> list[Path] | None:
    """The shards an index file of `model_dir` lists (each checked to exist); None when there is no such index."""
    index = model_dir / index_name
    if not index.is_file():
        return None
    try:
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index} is not a valid index: expected a JSON object with 'weight_map'") from None
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} listed in {index} is missing from {model_dir}")
    return files


def inventory(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """name -> (dtype, shape) over all shards of a model directory; None when it holds no safetensors."""
    files = shard_files(model_dir)
    if not files:
        return None
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        tensors.update(read_header(file))
    return tensors
