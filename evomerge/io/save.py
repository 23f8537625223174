"""Write a Hugging Face checkpoint: sharded safetensors, index, config, generation config, tokenizer.

The directory is assembled under a temporary name beside the target and renamed into place at the
end, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import SAFETENSORS_INDEX
from evomerge.io.paths import check_writable

DEFAULT_SHARD_BYTES = 5 * 2**30


def parse_size(size: str | int) -> int:
    """'500MB', '2GB', '64KB' or a byte count -> bytes (binary units, like transformers)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, factor in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise EvomergeError(f"shard size {size!r} is not a size: write it like 500MB or 2GB")


def prepare_output_dir(out: Path, *, force: bool) -> None:
    """Refuse to write into a non-empty directory unless force is set."""
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"output {out} exists and is a file: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EvomergeError(f"output directory {out} exists and is not empty: choose another --out or pass --force")
    check_writable(out, "output")


def save_checkpoint(
    out: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config,  # transformers.PretrainedConfig
    *,
    tokenizer_from: str | Path | None = None,
    generation_config_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write tensors (streamed: each shard is moved to CPU when written) and metadata to `out`."""
    out = Path(out)
    prepare_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes)
        config.save_pretrained(tmp)
        _write_generation_config(tmp, config, generation_config_from)
        if tokenizer_from is not None:
            _write_tokenizer(tmp, Path(tokenizer_from))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write a model into; on success it gets the usual modes and replaces
    `out` in one rename, on any error (Ctrl-C included) it is removed: `out` appears whole or not at all."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(folder: Path) -> None:
    """The modes a plain mkdir/open would have given (mkdtemp makes 0700; safetensors writes 0600): a model is
    made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _write_shards(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    # Shards are written as they fill, under provisional names: the final names need the count.
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()

    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(out: Path, config, source: str | Path | None) -> None:
    from transformers import GenerationConfig

    if source is not None and (Path(source) / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(source)
    else:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out)


def _write_tokenizer(out: Path, source: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise EvomergeError(f"cannot load the tokenizer from {source}: {e}") from None
    tok.save_pretrained(out)
