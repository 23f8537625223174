"""Small files users hand us, read with one-line errors: YAML documents (configs, recipes, search spaces) and a
model folder's config.json. No torch: the driver side reads them too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import CheckpointError, EvomergeError


def read_yaml(path: Path, error: type[EvomergeError], what: str = "file") -> Any:
    """The YAML document at `path`; a missing file or bad YAML raises `error` naming the file (and the line)."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise error(f"{path} is not valid YAML{at}" + (f": {problem}" if problem else "")) from None


def read_model_config(path: Path) -> dict:
    """A Hugging Face model folder's config.json as a dict."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json: is it a Hugging Face model folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e.msg}, line {e.lineno})") from None


def layer_count(config: dict, path: Path) -> int:
    """The number of transformer layers a model config declares (num_hidden_layers, or GPT-2's n_layer)."""
    n = config.get("num_hidden_layers") or config.get("n_layer")
    if not n:
        raise CheckpointError(f"{path}/config.json has no num_hidden_layers (or n_layer)")
    return int(n)
