"""The sources' weights, read once and held in their storage dtype where the placement says.

A worker keeps the raw tensors of the base and of every fine-tune (never task vectors: those are formed
per tensor, in float32 scratch, when a candidate is written), so its sources cost (K+1) x P x the storage
dtype's size. Placement:
- device: the tensors live on the worker's device; `stream` hands them out as they are;
- host: they live in (pinned) CPU memory and `stream` copies them to the device tensor by tensor into two
  staging slots: while the caller merges tensor i from one slot, tensor i+1 is copied into the other on a
  side CUDA stream, so the device holds only the live model, the staging slots and scratch.
On a CPU device the host is the device: host placement reads the host tensors where they are (a copy would
only move memory to memory), still merging large tensors piece by piece; tests set STAGE_ON_CPU to run the
staging code there with plain copies.
A worker split over several devices (evomerge.worker.layer_split) holds or stages each tensor on its
layer's device.
Sources are loaded on first use, so a data-flow search that touches two models reads two.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch

from evomerge.io.checkpoint import Checkpoint
from evomerge.worker.layer_split import LayerSplit

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PLACEMENTS = ("device", "host")


def storage_dtype(name: str | torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The dtype sources are held in: `auto`/None keeps the checkpoint's."""
    if isinstance(name, torch.dtype):
        return name
    return stored if name in (None, "auto") else STORAGE_DTYPES[name]


class SourceStore:
    STAGE_ON_CPU = False  # copy into staging slots on a CPU device too (tests: the GPU's code path, on a CPU)

    def __init__(
        self,
        checkpoints: Mapping[str, Checkpoint],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        placement: str = "device",
        split: LayerSplit | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"sources.placement must be one of {', '.join(PLACEMENTS)} (got {placement!r})")
        self.checkpoints = dict(checkpoints)
        self.device = torch.device(device)
        self.split = split
        self.placement = placement
        first = next(iter(self.checkpoints.values()))
        self.dtype = storage_dtype(dtype, first.dtype)
        self.home = self.device if placement == "device" else torch.device("cpu")
        self._pin = placement == "host" and self.device.type == "cuda"
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._staging: list[dict[tuple, torch.Tensor]] = [{}, {}]  # slot -> (model, dtype, device) -> flat buffer

    def device_of(self, name: str) -> torch.device:
        """The device tensor `name` is merged on: its layer's where the worker is split, else the worker's."""
        return self.device if self.split is None else self.split.device_of(name)

    # -- holding ----------------------------------------------------------------------------------
    def tensors(self, model: str) -> dict[str, torch.Tensor]:
        """A model's tensors where they are held (loaded on first use): floats in the storage dtype,
        integer tensors as stored."""
        if model not in self._tensors:
            held = {}
            spread = self.split is not None and self.placement == "device"
            for name, t in self.checkpoints[model].iter_tensors(device="cpu" if spread else self.home):
                if t.dtype.is_floating_point and t.dtype != self.dtype:
                    t = t.to(self.dtype)
                if spread:
                    t = t.to(self.device_of(name))
                held[name] = t.pin_memory() if self._pin else t
            self._tensors[model] = held
        return self._tensors[model]

    @property
    def loaded(self) -> list[str]:
        return list(self._tensors)

    @property
    def stages(self) -> bool:
        """Whether `stream` copies the tensors to the device (host placement, where the device is not the host)."""
        return self.placement == "host" and (self.device.type != "cpu" or self.STAGE_ON_CPU)

    def held_bytes(self) -> int:
        """Bytes of the sources themselves (on the device or on the host, as placed)."""
        return sum(t.numel() * t.element_size() for d in self._tensors.values() for t in d.values())

    def device_bytes(self) -> int:
        """Bytes this store holds on the worker's device: the sources (device placement) or the staging slots."""
        staging = sum(b.numel() * b.element_size() for slot in self._staging for b in slot.values())
        return staging + (self.held_bytes() if self.placement == "device" else 0)

    # -- handing out --------------------------------------------------------------------------------
    def stream(self, items: Sequence[str | Span], models: Sequence[str]) -> Iterator[tuple[str | Span, dict[str, torch.Tensor]]]:
        """(item, model -> that tensor on the device) for each item in order: a tensor name (the whole
        tensor) or a Span (a piece of one). With host placement the tensors are views of staging slots,
        valid until the caller asks for the next item; the slots hold the largest item of the call."""
        held = {m: self.tensors(m) for m in models}
        if not self.stages:
            for item in items:
                yield item, {m: _part(held[m], item) for m in models}
            return
        yield from self._staged(list(items), models, held)

    def _staged(self, items, models, held) -> Iterator[tuple[str | Span, dict[str, torch.Tensor]]]:
        cuda = self.device.type == "cuda"
        copiers: dict[torch.device, torch.cuda.Stream] = {}  # a side stream per device
        ready: dict[int, torch.cuda.Event] = {}  # slot -> its copies are done
        free: dict[tuple[int, torch.device], torch.cuda.Event] = {}  # (slot, device) -> the caller is done with it
        views: list[dict[str, torch.Tensor]] = [{}, {}]
        devices = [self.device_of(_name(item)) for item in items]
        need: dict[torch.device, int] = {}  # the largest item per device: what the slots there must hold
        for item, dev in zip(items, devices):
            need[dev] = max(need.get(dev, 0), _numel(item, held[models[0]]))

        def stage(i: int) -> None:
            slot, item, dev = i % 2, items[i], devices[i]
            if cuda and dev not in copiers:
                copiers[dev] = torch.cuda.Stream(dev)
            with torch.cuda.stream(copiers[dev]) if cuda else nullcontext():
                if cuda:
                    copiers[dev].wait_event(free[slot, dev])  # the merge of the slot's last item is done
                for m in models:
                    src = _part(held[m], item)
                    buf = self._slot(slot, m, src.dtype, dev, need[dev])[: src.numel()]
                    buf.copy_(src.reshape(-1), non_blocking=cuda)
                    views[slot][m] = buf.view(src.shape)
                if cuda:
                    ready[slot] = torch.cuda.Event()
                    ready[slot].record(copiers[dev])

        if cuda:  # earlier calls' work on the staging slots may still be queued on the devices' streams
            for dev in need:
                for slot in range(2):
                    free[slot, dev] = torch.cuda.Event()
                    free[slot, dev].record(torch.cuda.current_stream(dev))
        if items:
            stage(0)
        for i, item in enumerate(items):
            if i + 1 < len(items):
                stage(i + 1)  # overlaps the caller's work on item i (on CUDA; in order on CPU)
            slot, dev = i % 2, devices[i]
            if cuda:
                torch.cuda.current_stream(dev).wait_event(ready[slot])
            yield item, dict(views[slot])
            if cuda:
                free[slot, dev] = torch.cuda.Event()
                free[slot, dev].record(torch.cuda.current_stream(dev))

    def _slot(self, slot: int, model: str, dtype: torch.dtype, device: torch.device, numel: int) -> torch.Tensor:
        """The staging buffer of one model in one slot on one device, grown to `numel` entries (dtype as held)."""
        key = (model, dtype, device)
        buf = self._staging[slot].get(key)
        if buf is None or buf.numel() < numel:
            self._staging[slot].pop(key, None)  # freed before the larger one is allocated
            buf = self._staging[slot][key] = torch.empty(numel, dtype=dtype, device=device)
        return buf


class Span(NamedTuple):
    """Entries [start, stop) of tensor `name` in flat order, viewed as `shape` (whole rows, where a piece
    holds them, so row-wise methods see rows). `measure`: the caller's mark (a first pass over the pieces)."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]
    measure: bool = False


def _name(item: str | Span) -> str:
    return item if isinstance(item, str) else item.name


def _numel(item: str | Span, tensors: Mapping[str, torch.Tensor]) -> int:
    return tensors[item].numel() if isinstance(item, str) else item.stop - item.start


def _part(tensors: Mapping[str, torch.Tensor], item: str | Span) -> torch.Tensor:
    """A whole tensor, or a view of a span of it."""
    if isinstance(item, str):
        return tensors[item]
    return tensors[item.name].view(-1)[item.start : item.stop].view(item.shape)
