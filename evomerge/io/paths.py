"""Paths users name: model directories in recipes (local folders, else the local Hugging Face cache, offline),
files in configs, and outputs checked before any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from evomerge.errors import CheckpointError, EvomergeError


def resolve_model(ref: str, search_dirs: Sequence[Path], where: str) -> Path:
    """A model reference -> its directory. Relative paths are tried against each search dir in order
    (mergekit reads them from the working directory; evomerge also tries the recipe's folder)."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [d / p for d in search_dirs]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    cached = _from_hf_cache(ref)
    if cached is not None:
        return cached
    looked = ", ".join(str(c) for c in candidates)
    raise CheckpointError(
        f"{where}: model {ref!r} not found (looked in {looked} and the local Hugging Face cache); "
        "evomerge reads local folders only, never downloads"
    )


def _from_hf_cache(ref: str) -> Path | None:
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        return None  # not a hub repo id
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached (or not a valid id): the caller reports where it looked
        return None


def find_path(ref: str, search_dirs: Sequence[Path]) -> Path:
    """A file or folder named in a config: absolute as is; relative, the first search dir where it exists
    (else under the first, so the error that follows names where it was expected)."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    for d in search_dirs:
        if (d / path).exists():
            return d / path
    return search_dirs[0] / path


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, an output `path` that cannot be created: one of its existing ancestors is a file,
    or the nearest existing one is a folder this process cannot write into."""
    path = Path(path).expanduser().absolute()
    ancestor = path.parent  # the output itself may exist (replaced with --force, or refused by its caller)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EvomergeError(f"{what} {path}: {ancestor} is a file, not a folder: choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EvomergeError(f"{what} {path}: {ancestor} is not writable: choose another path or fix its permissions")
