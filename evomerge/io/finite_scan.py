"""NaN and inf in safetensors checkpoints, found without torch: the float bits read through a memory map.

A float is NaN or inf exactly when its bits without the sign are at least its exponent mask (all exponent bits
set), so the raw bits answer for every float format, bf16 included (which numpy has no dtype for): clear the
sign, and only when a chunk's maximum reaches the mask, count (a clean chunk costs one AND and one max).
The driver runs this before a search starts: a poisoned source would otherwise fail every candidate, one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evomerge.errors import CheckpointError
from evomerge.io.headers import read_entries, shard_files

# dtype -> (unsigned integer of its width, exponent mask). F8_E4M3 has no inf and one NaN pattern per sign.
EXPONENT_BITS = {
    "F64": (np.uint64, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7F80_0000),
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),
}
CHUNK = 2**22  # values per step: bounded memory however large the tensor, and a buffer that stays in cache


def nonfinite_counts(file: Path) -> dict[str, int]:
    """Tensor name -> number of NaN/inf values, for the tensors of one safetensors file that hold any."""
    entries = read_entries(file)
    found: dict[str, int] = {}
    try:
        raw = np.memmap(file, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:  # ValueError: an empty file
        raise CheckpointError(f"cannot read {file}: {e}") from None
    for name, entry in entries.items():
        if entry.dtype not in EXPONENT_BITS or entry.end <= entry.start:
            continue
        uint, mask = EXPONENT_BITS[entry.dtype]
        if entry.end > raw.size or (entry.end - entry.start) % np.dtype(uint).itemsize:
            raise CheckpointError(f"{file}: tensor {name} lies outside the file (truncated download?)")
        count = _count_nonfinite(raw[entry.start:entry.end].view(uint), uint(mask))
        if count:
            found[name] = count
    return found


def _count_nonfinite(bits: np.ndarray, mask) -> int:
    no_sign = bits.dtype.type(np.iinfo(bits.dtype).max >> 1)
    buf = np.empty(min(CHUNK, bits.size), bits.dtype)
    count = 0
    for i in range(0, bits.size, CHUNK):
        magnitude = np.bitwise_and(bits[i:i + CHUNK], no_sign, out=buf[:min(CHUNK, bits.size - i)])
        if magnitude.max() >= mask:
            count += int(np.count_nonzero(magnitude >= mask))
    return count


def nonfinite_tensors(model_dir: Path) -> list[tuple[Path, str, int]]:
    """(file, tensor, count) for every tensor of a model directory that holds a NaN or inf."""
    return [(file, name, count) for file in shard_files(model_dir)
            for name, count in nonfinite_counts(file).items()]
