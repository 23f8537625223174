"""One worker's models split by layers over several devices (workers.gpus_per_worker >= 2).

A 70B model in bf16 (140 GB) fits no single GPU; split over the GPUs Ray gives one worker, each GPU holds
a contiguous run of decoder layers, with their share of the sources (device placement) and of the merge
scratch. Tensors outside the layers (embeddings, final norm, LM head; tied ones must stay together) live on
the first device, where lm-eval's inputs arrive and its logits are read, so a forward pass runs
first device -> ... -> last device -> first device. Forward pre-hooks move each block's inputs (hidden
states, masks, rotary tables) to the block's device: the model needs no other change, and data-flow paths,
which run source layers in any order, cross devices the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evomerge.merge.recipe import layer_index


@dataclass(frozen=True)
class LayerSplit:
    devices: tuple[torch.device, ...]
    starts: tuple[int, ...]  # first layer of each device (starts[0] == 0)

    @classmethod
    def balanced(cls, devices: Sequence[str | torch.device], layer_bytes: Sequence[int], rest_bytes: int) -> LayerSplit:
        """Contiguous runs of layers whose bytes, with the first device's `rest_bytes` (the tensors outside
        the layers), come closest to an equal share per device. Every device gets at least one layer while
        layers last."""
        devices = tuple(torch.device(d) for d in devices)
        if not devices:
            raise ValueError("a layer split needs at least one device")
        share = (sum(layer_bytes) + rest_bytes) / len(devices)
        starts, load = [0], rest_bytes
        for i, size in enumerate(layer_bytes):
            left_devices = len(devices) - len(starts)
            left_layers = len(layer_bytes) - i
            # move on when this device has its share (counting half of the next layer), or when the
            # remaining devices need one layer each
            if left_devices and i > starts[-1] and (load + size / 2 > share or left_layers <= left_devices):
                starts.append(i)
                load = 0
            load += size
        return cls(devices, tuple(starts))

    @classmethod
    def for_checkpoint(cls, devices: Sequence[str | torch.device], tensors: Mapping[str, int], num_layers: int) -> LayerSplit:
        """The balanced split of a checkpoint given its tensor name -> bytes."""
        layer_bytes = [0] * num_layers
        rest = 0
        for name, size in tensors.items():
            i = layer_index(name)
            if i is not None and i < num_layers:
                layer_bytes[i] += size
            else:
                rest += size
        return cls.balanced(devices, layer_bytes, rest)

    @property
    def first(self) -> torch.device:
        return self.devices[0]

    def device_of_layer(self, i: int) -> torch.device:
        d = 0
        while d + 1 < len(self.starts) and self.starts[d + 1] <= i:
            d += 1
        return self.devices[d]

    def device_of(self, tensor_name: str) -> torch.device:
        """Where a checkpoint tensor lives: its layer's device, or the first device for the rest."""
        i = layer_index(tensor_name)
        return self.first if i is None else self.device_of_layer(i)

    def describe(self) -> str:
        ends = [*self.starts[1:], None]
        return ", ".join(f"{d}: layers {s}-{'end' if e is None else e - 1}" for d, s, e in zip(self.devices, self.starts, ends))


def worker_devices(device: str | torch.device, gpus_per_worker: float) -> list[torch.device] | None:
    """The devices one worker's model is split over: cuda:0 .. cuda:g-1 (Ray makes a worker's g GPUs the
    visible ones) for workers.gpus_per_worker g >= 2 on a CUDA worker; None for a single device."""
    device, g = torch.device(device), int(gpus_per_worker)
    if device.type != "cuda" or g < 2:
        return None
    visible = torch.cuda.device_count()
    if visible < g:
        raise RuntimeError(f"workers.gpus_per_worker is {g} but this worker sees {visible} GPU(s): lower it, "
                           "or give each worker that many GPUs (CUDA_VISIBLE_DEVICES)")
    return [torch.device("cuda", i) for i in range(g)]


def to_device(obj, device: torch.device):
    """obj with every tensor in it (nested in tuples, lists, dicts) on `device`; other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return type(obj)(*(to_device(o, device) for o in obj)) if hasattr(obj, "_fields") else tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def inputs_to(module: nn.Module, device: torch.device):
    """Register a forward pre-hook that moves the module's positional and keyword inputs to `device`."""

    def hook(_module, args, kwargs):
        return to_device(args, device), to_device(kwargs, device)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def place(model: nn.Module, split: LayerSplit) -> nn.Module:
    """Move a causal LM's decoder layers to their devices and everything else to the first device, and hook
    every block so a forward pass carries its inputs along. Layers move one at a time, so no device ever
    holds more than its share."""
    from evomerge.worker.routed import layers_of

    _, layers = layers_of(model)
    inside = set()
    for i, layer in enumerate(layers):
        layer.to(split.device_of_layer(i))
        inputs_to(layer, split.device_of_layer(i))
        inside.update(id(m) for m in layer.modules())
    for m in model.modules():
        if id(m) not in inside:
            m._apply(lambda t: t.to(split.first), recurse=False)  # tied parameters stay one object
    inner = getattr(model, model.base_model_prefix)
    for child in [*inner.children(), *model.children()]:
        if child is not layers and child is not inner:
            inputs_to(child, split.first)  # the final norm and the head read the last layer's output
    return model
