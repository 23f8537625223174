"""Check, before any work, that source checkpoints can be merged tensor by tensor."""

from __future__ import annotations

from typing import Sequence

from evomerge.errors import IncompatibleModelsError
from evomerge.io.checkpoint import Checkpoint

MAX_LISTED = 5  # mismatches named in the error; the rest are counted


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Raise IncompatibleModelsError naming the first mismatches (architecture, tensor names, shapes)."""
    if len(checkpoints) < 2:
        return
    ref = checkpoints[0]
    problems: list[str] = []
    for other in checkpoints[1:]:
        if other.architecture != ref.architecture:
            problems.append(f"architecture {ref.architecture} in {ref.path} vs {other.architecture} in {other.path}")
            continue
        # in checkpoint order, so the first mismatches named are the first ones a reader meets
        for name, meta in ref.tensors.items():
            if name not in other.tensors:
                problems.append(f"tensor {name} is in {ref.path} but missing from {other.path}")
            elif meta.shape != other.tensors[name].shape:
                problems.append(
                    f"tensor {name} has shape {list(meta.shape)} in {ref.path} but {list(other.tensors[name].shape)} in {other.path}"
                )
        for name in sorted(other.tensors.keys() - ref.tensors.keys()):
            problems.append(f"tensor {name} is in {other.path} but missing from {ref.path}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise IncompatibleModelsError(
            "source models are not compatible: " + "; ".join(problems[:MAX_LISTED]) + more
            + ". All sources must share one architecture and tensor shapes."
        )
