"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class EvomergeError(Exception):
    """Bad input: the message names the field or file and says how to fix it."""


class CheckpointError(EvomergeError):
    """A model directory is missing, unreadable, or of an unsupported format."""


class IncompatibleModelsError(EvomergeError):
    """Source models differ in architecture, tensor names or shapes."""


class RecipeError(EvomergeError):
    """A merge recipe (YAML or built in code) is invalid."""


class FitnessError(EvomergeError):
    """A responses matrix, a calibration file or an estimator request is invalid."""


class SearchSpaceError(EvomergeError):
    """A search-space preset or override is invalid, or does not fit the sources (layer counts, methods)."""


class GenomeError(EvomergeError):
    """A genome is not valid for its search space (length, values outside [0, 1], NaN) or decodes to no
    usable recipe (an empty path, a path over max_layers). The driver records it as a failed evaluation."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """An exception as one line, `Type: message` (whitespace folded, the message cut to `limit` characters)."""
    msg = " ".join(str(e).split())
    if limit is not None:
        msg = msg[:limit]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
