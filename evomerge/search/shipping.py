"""Ship a run's files to workers on nodes that cannot read the driver's paths (no shared filesystem).

With `workers.sources: object_store` the driver packs every file the workers read: the source and base models,
the calibration, the task folders (`fitness.task_paths`) and a search-space YAML given by path. Each file goes in
chunks of `CHUNK` bytes through `put` (`ray.put` in pool.py: one object per chunk, so neither end holds more
than one chunk of a file in memory); the `Shipment` that results is small (names, sizes, sha256 digests, chunk
handles) and travels with the actor's arguments.

On the worker, `unpack` writes each folder or file once per node into a content-addressed cache,
`$EVOMERGE_SOURCE_CACHE` (default `~/.cache/evomerge/sources`): `<cache>/<digest>/<original name>`. A file lock
makes the other workers of the same node wait and reuse the copy; the copy is built in a temporary sibling,
verified against the digests and renamed into place, so a half-written cache is never used. A later run over the
same files reuses it. `localize` then rewrites the config to the local copies and `translate` rewrites the model
references in a recipe (recipes name models by the driver's path strings).

No Ray here: `put` and `get` are passed in (pool.py passes ray.put / ray.get; tests pass plain functions).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.io.paths import find_path, resolve_model

CHUNK = 64 * 2**20  # bytes per object: the most either side holds of a file at once
CACHE_ENV = "EVOMERGE_SOURCE_CACHE"
# weights in formats evomerge does not read, left behind when a model folder has safetensors
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


class ShippingError(EvomergeError):
    """A file to ship cannot be read, or a worker's copy does not match what the driver sent."""


@dataclass(frozen=True)
class ShippedFile:
    name: str  # relative to the shipped folder ("" for a single file)
    size: int
    sha256: str
    chunks: tuple  # handles returned by `put`, in order


@dataclass(frozen=True)
class ShippedTree:
    ref: str  # the reference exactly as the config writes it
    name: str  # the folder's (or file's) own name, kept in the cache: recipes may name sources by folder
    is_dir: bool
    digest: str  # sha256 over (name, size, sha256) of every file
    files: tuple[ShippedFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Shipment:
    trees: tuple[ShippedTree, ...]

    @property
    def size(self) -> int:
        return sum(t.size for t in self.trees)


def shipped_paths(config: RunConfig, config_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Reference (as the config writes it) -> (local path on the driver, is a model folder)."""
    search = [Path(config_dir), Path.cwd()]
    src = config.sources
    out: dict[str, tuple[Path, bool]] = {}
    for name, ref in [*src.models.items(), *([("base_model", src.base_model)] if src.base_model else [])]:
        where = "sources.base_model" if name == "base_model" and ref == src.base_model else f"sources.models.{name}"
        out.setdefault(ref, (resolve_model(ref, search, where), True))
    out[config.fitness.calibration] = (find_path(config.fitness.calibration, search), False)
    for p in config.fitness.task_paths:
        out[p] = (find_path(p, search), False)
    space = config.search_space
    if isinstance(space, str) and (space.endswith((".yaml", ".yml")) or "/" in space):
        path = find_path(space, search)
        if path.is_file():
            out[space] = (path, False)
    return out


def pack(config: RunConfig, config_dir: Path, put: Callable[[bytes], Any], chunk: int = CHUNK) -> Shipment:
    """Read everything the workers read, chunk by chunk through `put`; see the module docstring."""
    return Shipment(tuple(_pack_tree(ref, path, is_model, put, chunk)
                          for ref, (path, is_model) in shipped_paths(config, config_dir).items()))


def _files_of(path: Path, is_model: bool) -> list[tuple[str, Path]]:
    if path.is_file():
        return [("", path)]
    if not path.is_dir():
        raise ShippingError(f"{path}: no such file or folder to ship to the workers")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # symlinked files (the HF cache's blobs) are followed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                full = Path(dirpath) / f
                files.append((full.relative_to(path).as_posix(), full))
    if is_model and any(name.endswith(".safetensors") for name, _ in files):
        files = [(name, p) for name, p in files if not name.endswith(_OTHER_WEIGHTS)]
    return files


def _pack_tree(ref: str, path: Path, is_model: bool, put: Callable[[bytes], Any], chunk: int) -> ShippedTree:
    shipped = []
    for name, full in _files_of(path, is_model):
        digest, chunks, size = hashlib.sha256(), [], 0
        try:
            with open(full, "rb") as f:
                while block := f.read(chunk):
                    digest.update(block)
                    chunks.append(put(block))
                    size += len(block)
        except OSError as e:
            raise ShippingError(f"{full}: cannot be read to ship it to the workers ({e.strerror or e})") from e
        shipped.append(ShippedFile(name, size, digest.hexdigest(), tuple(chunks)))
    tree = hashlib.sha256()
    for f in shipped:
        tree.update(f"{f.name}\0{f.size}\0{f.sha256}\n".encode())
    return ShippedTree(ref, path.name, path.is_dir(), tree.hexdigest(), tuple(shipped))


def cache_root() -> Path:
    """This node's cache of shipped files: $EVOMERGE_SOURCE_CACHE, else ~/.cache/evomerge/sources."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "evomerge" / "sources").expanduser()


def unpack(shipment: Shipment, get: Callable[[Any], bytes], root: Path | None = None) -> dict[str, Path]:
    """Materialize every shipped tree in this node's cache (once per node); reference -> local path."""
    root = Path(root) if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return {t.ref: _unpack_tree(t, get, root) for t in shipment.trees}


def _unpack_tree(tree: ShippedTree, get: Callable[[Any], bytes], root: Path) -> Path:
    home = root / tree.digest[:32]
    target = home / tree.name
    with open(root / f"{tree.digest[:32]}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers of this node wait, then reuse the copy
        if home.is_dir() and _complete(tree, target):
            return target
        shutil.rmtree(home, ignore_errors=True)  # an incomplete or altered copy: write it again
        tmp = root / f".{tree.digest[:32]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            for f in tree.files:
                path = tmp / tree.name / f.name if f.name else tmp / tree.name
                path.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with open(path, "wb") as out:
                    for ref in f.chunks:
                        block = get(ref)
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != f.sha256:
                    raise ShippingError(f"{tree.ref}: {f.name or tree.name} arrived altered (sha256 mismatch)")
            if tree.is_dir:
                (tmp / tree.name).mkdir(parents=True, exist_ok=True)  # a folder may hold no files to ship
            os.rename(tmp, home)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _complete(tree: ShippedTree, target: Path) -> bool:
    for f in tree.files:
        path = target / f.name if f.name else target
        if not path.is_file() or path.stat().st_size != f.size:
            return False
    return True


def localize(config: RunConfig, local: Mapping[str, Path]) -> RunConfig:
    """The config with every shipped reference replaced by its local copy."""
    doc = config.model_dump(mode="json")

    def sub(ref: str) -> str:
        return str(local[ref]) if ref in local else ref

    doc["sources"]["models"] = {n: sub(r) for n, r in doc["sources"]["models"].items()}
    if doc["sources"]["base_model"]:
        doc["sources"]["base_model"] = sub(doc["sources"]["base_model"])
    doc["fitness"]["calibration"] = sub(doc["fitness"]["calibration"])
    doc["fitness"]["task_paths"] = [sub(p) for p in doc["fitness"]["task_paths"]]
    if isinstance(doc["search_space"], str):
        doc["search_space"] = sub(doc["search_space"])
    return RunConfig.model_validate(doc)


def translate(doc: Any, local: Mapping[str, Path]) -> Any:
    """A recipe document with every shipped model reference (the values of `model` and `base_model`, at any depth:
    mergekit recipes, data-flow sources and their merges) replaced by its local copy."""
    if isinstance(doc, Mapping):
        return {k: str(local[v]) if k in ("model", "base_model") and isinstance(v, str) and v in local
                else translate(v, local) for k, v in doc.items()}
    if isinstance(doc, list):
        return [translate(v, local) for v in doc]
    return doc


__all__ = ["CACHE_ENV", "CHUNK", "Shipment", "ShippingError", "cache_root", "localize", "pack", "shipped_paths",
           "translate", "unpack"]
