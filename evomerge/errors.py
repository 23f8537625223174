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
