"""Read Hugging Face causal-LM checkpoint directories without building the model.

A `Checkpoint` knows the config and, for every tensor, its file, shape and dtype, read from
safetensors headers (no weights are loaded until asked for). Pickled `.bin` weights are read only
when the caller opts in, and then only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import CheckpointError
from evomerge.io.documents import layer_count, read_model_config
from evomerge.io.headers import INDEX as SAFETENSORS_INDEX
from evomerge.io.headers import indexed_files, shard_files

PICKLE_INDEX = "pytorch_model.bin.index.json"

# safetensors header dtype names -> torch dtypes (those a language model checkpoint holds)
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A checkpoint directory on disk: config, tensor inventory, and lazy tensor reads."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorMeta], pickled: bool):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.pickled = pickled
        self._pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model directory {path} does not exist: give the path of a Hugging Face model folder")
        config = read_model_config(path)
        st_files = shard_files(path)
        if st_files:
            return cls(path, config, _safetensors_inventory(st_files), pickled=False)
        bin_files = _pickle_files(path)
        if not bin_files:
            raise CheckpointError(f"{path} holds no model weights: expected model.safetensors, {SAFETENSORS_INDEX} or shards")
        if not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled .bin weights: convert it to safetensors, or opt in with --allow-pickle "
                "(read with torch.load(weights_only=True))"
            )
        return cls(path, config, _pickle_inventory(bin_files), pickled=True)

    # -- description -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def num_layers(self) -> int:
        return layer_count(self.config, self.path)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in."""
        counts: dict[torch.dtype, int] = defaultdict(int)
        for meta in self.tensors.values():
            if meta.dtype.is_floating_point:
                counts[meta.dtype] += _numel(meta.shape)
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.architecture}, {len(self.tensors)} tensors)"

    # -- reading -----------------------------------------------------------------------------------
    def load(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return next(self.iter_tensors([name], device, dtype))[1]

    def iter_tensors(
        self,
        names: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the given names (all by default), opening each file once."""
        names = list(self.tensors if names is None else names)
        unknown = [n for n in names if n not in self.tensors]
        if unknown:
            raise CheckpointError(f"{self.path} has no tensor {unknown[0]!r}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.tensors[n].file].append(n)
        for file, file_names in by_file.items():
            if self.pickled:
                state = self._pickled_state(file)
                for n in file_names:
                    yield n, _convert(state[n], device, dtype)
            else:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for n in file_names:
                        yield n, _convert(f.get_tensor(n), device, dtype)

    def _pickled_state(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickle_cache:
            try:
                self._pickle_cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # a corrupt or non-tensor pickle: name the file
                raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {e}") from None
        return self._pickle_cache[file]


def _convert(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pickle_files(path: Path) -> list[Path]:
    indexed = indexed_files(path, PICKLE_INDEX)
    if indexed is not None:
        return indexed
    return sorted(path.glob("pytorch_model*.bin"))


def _safetensors_inventory(files: list[Path]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        _check_readable(file)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    tensors[name] = TensorMeta(file, tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()])
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read safetensors file {file}: {e}") from None
    return tensors


def _check_readable(file: Path) -> None:
    """safetensors reports every failure to open as "No such file or directory"; open() says what is wrong."""
    try:
        open(file, "rb").close()
    except PermissionError:
        raise CheckpointError(f"cannot read {file}: permission denied: make it readable (chmod a+r) or run as "
                              "its owner") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None


def _pickle_inventory(files: list[Path]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {e}") from None
        for name, t in state.items():
            tensors[name] = TensorMeta(file, tuple(t.shape), t.dtype)
    return tensors
