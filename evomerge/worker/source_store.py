"""The sources' weights, read once and held in their storage dtype where the placement says.

A worker keeps the raw tensors of the base and of every fine-tune (never task vectors: those are formed
per tensor, in float32 scratch, when a candidate is written), so its sources cost (K+1) x P x the storage
dtype's size. Placement:
- device: the tensors live on the worker's device; `stream` hands them out as they are;
- host: they live in (pinned) CPU memory and `stream` copies them to the device tensor by tensor into two
  staging slots: while the caller merges tensor i from one slot, tensor i+1 is copied into the other on a
  side CUDA stream, so the device holds only the live model, the staging slots and scratch.
On a CPU device host placement runs the same staging code with plain copies (what the tests check).
Sources are loaded on first use, so a data-flow search that touches two models reads two.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext

import torch

from evomerge.io.checkpoint import Checkpoint

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PLACEMENTS = ("device", "host")


def storage_dtype(name: str | torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The dtype sources are held in: `auto`/None keeps the checkpoint's."""
    if isinstance(name, torch.dtype):
        return name
    return stored if name in (None, "auto") else STORAGE_DTYPES[name]


class SourceStore:
    def __init__(
        self,
        checkpoints: Mapping[str, Checkpoint],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        placement: str = "device",
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"sources.placement must be one of {', '.join(PLACEMENTS)} (got {placement!r})")
        self.checkpoints = dict(checkpoints)
        self.device = torch.device(device)
        self.placement = placement
        first = next(iter(self.checkpoints.values()))
        self.dtype = storage_dtype(dtype, first.dtype)
        self.home = self.device if placement == "device" else torch.device("cpu")
        self._pin = placement == "host" and self.device.type == "cuda"
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._staging: list[dict[tuple, torch.Tensor]] = [{}, {}]  # slot -> (model, dtype) -> flat device buffer

    # -- holding ----------------------------------------------------------------------------------
    def tensors(self, model: str) -> dict[str, torch.Tensor]:
        """A model's tensors where they are held (loaded on first use): floats in the storage dtype,
        integer tensors as stored."""
        if model not in self._tensors:
            held = {}
            for name, t in self.checkpoints[model].iter_tensors(device=self.home):
                if t.dtype.is_floating_point and t.dtype != self.dtype:
                    t = t.to(self.dtype)
                held[name] = t.pin_memory() if self._pin else t
            self._tensors[model] = held
        return self._tensors[model]

    @property
    def loaded(self) -> list[str]:
        return list(self._tensors)

    def held_bytes(self) -> int:
        """Bytes of the sources themselves (on the device or on the host, as placed)."""
        return sum(t.numel() * t.element_size() for d in self._tensors.values() for t in d.values())

    def device_bytes(self) -> int:
        """Bytes this store holds on the worker's device: the sources (device placement) or the staging slots."""
        staging = sum(b.numel() * b.element_size() for slot in self._staging for b in slot.values())
        return staging + (self.held_bytes() if self.placement == "device" else 0)

    # -- handing out --------------------------------------------------------------------------------
    def stream(self, names: Sequence[str], models: Sequence[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(tensor name, model -> that tensor on the device) for each name in order. With host placement
        the tensors are views of staging slots: valid until the caller asks for the next one."""
        held = {m: self.tensors(m) for m in models}
        if self.placement == "device":
            for name in names:
                yield name, {m: held[m][name] for m in models}
            return
        yield from self._staged(names, models, held)

    def _staged(self, names, models, held) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        cuda = self.device.type == "cuda"
        copier = torch.cuda.Stream(self.device) if cuda else None
        ready = [torch.cuda.Event() if cuda else None for _ in range(2)]
        free = [torch.cuda.Event() if cuda else None for _ in range(2)]
        views: list[dict[str, torch.Tensor]] = [{}, {}]

        def stage(i: int) -> None:
            slot, name = i % 2, names[i]
            with torch.cuda.stream(copier) if cuda else nullcontext():
                if cuda:
                    copier.wait_event(free[slot])  # the merge of tensor i-2 is done with this slot
                for m in models:
                    src = held[m][name]
                    buf = self._slot(slot, m, src)
                    buf.copy_(src.reshape(-1), non_blocking=cuda)
                    views[slot][m] = buf.view(src.shape)
                if cuda:
                    ready[slot].record(copier)

        if cuda:
            for e in free:
                e.record(torch.cuda.current_stream(self.device))
        if names:
            stage(0)
        for i, name in enumerate(names):
            if i + 1 < len(names):
                stage(i + 1)  # overlaps the caller's work on tensor i (on CUDA; in order on CPU)
            slot = i % 2
            if cuda:
                torch.cuda.current_stream(self.device).wait_event(ready[slot])
            yield name, dict(views[slot])
            if cuda:
                free[slot].record(torch.cuda.current_stream(self.device))

    def _slot(self, slot: int, model: str, like: torch.Tensor) -> torch.Tensor:
        """The staging buffer of one model in one slot, grown to the largest tensor seen (dtype as held)."""
        key = (model, like.dtype)
        buf = self._staging[slot].get(key)
        if buf is None:
            largest = max(t.numel() for t in self._tensors[model].values() if t.dtype == like.dtype)
            buf = self._staging[slot][key] = torch.empty(largest, dtype=like.dtype, device=self.device)
        return buf[: like.numel()]
