"""A run's source models on one device, loaded once: what a worker's Evaluator and `evomerge export` build from.

One SourceStore holds each source's weights once, in the storage dtype and placement the config asks for
(sources.storage_dtype, sources.placement), read on first use. Two users share it, each built on first use:
the Materializer over base + sources (parameter-space recipes, and the merge part of hybrid ones), and the
sources' own live models for data-flow routing, whose parameters are the store's tensors themselves (device
placement), so a data-flow search holds its sources' weights and nothing else.
Models are named as recipes name them: by the config's path strings ("references").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.config import RunConfig
from evomerge.errors import RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.paths import resolve_model
from evomerge.merge.specs import compiles_kernels
from evomerge.worker.layer_split import LayerSplit, place, worker_devices
from evomerge.worker.source_store import SourceStore


class SourceModels:
    def __init__(self, config: RunConfig, config_dir: str | Path, device: str | torch.device = "cpu",
                 devices: Sequence[str | torch.device] | None = None) -> None:
        """devices: split every model by layers over these (default: the worker's GPUs where
        workers.gpus_per_worker >= 2, see evomerge.worker.layer_split)."""
        from transformers import AutoConfig

        from evomerge.worker.routed import num_layers

        src = config.sources
        search = [Path(config_dir).resolve(), Path.cwd()]
        self.names = dict(src.models)  # source name -> reference
        fields: dict[str, str] = {}  # reference -> the config field that names it first
        for name, ref in src.models.items():
            fields.setdefault(ref, f"sources.models.{name}")
        if src.base_model:
            fields.setdefault(src.base_model, "sources.base_model")
        self.paths = {ref: resolve_model(ref, search, field) for ref, field in fields.items()}
        self.base_ref = src.base_model or next(iter(src.models.values()))
        self.layers = {ref: num_layers(AutoConfig.from_pretrained(p)) for ref, p in self.paths.items()}
        self.device = torch.device(device)
        checkpoints = {ref: Checkpoint.open(p) for ref, p in self.paths.items()}
        if devices is None:
            devices = worker_devices(self.device, config.workers.gpus_per_worker)
        self.split = None
        if devices is not None:
            base = checkpoints[self.base_ref]
            self.split = LayerSplit.for_checkpoint(devices, {n: m.nbytes for n, m in base.tensors.items()},
                                                   self.layers[self.base_ref])
            self.device = self.split.first
        self.store = SourceStore(checkpoints, device=self.device, dtype=src.storage_dtype, placement=src.placement,
                                 split=self.split)
        self.dtype = self.store.dtype  # of every live model: routed paths mix their layers
        self.selection_cache = {"auto": None, "on": True, "off": False}[src.selection_cache]
        self._materializer = None
        self._live: dict[str, torch.nn.Module] = {}

    @property
    def materializer(self):
        """The Materializer over base + sources (evomerge.worker.materializer), built on first use."""
        if self._materializer is None:
            from evomerge.worker.materializer import Materializer

            params = sum(m.numel for m in self.store.checkpoints[self.base_ref].tensors.values())
            self._materializer = Materializer(self.paths, self.base_ref, device=self.device, model_dtype=self.dtype,
                                              store=self.store, selection_cache=self.selection_cache,
                                              fused=compiles_kernels(self.device.type, params),
                                              precompiled="build")  # CPU: one-pass weighted sums, once built
        return self._materializer

    @property
    def has_materializer(self) -> bool:
        return self._materializer is not None

    def layer_count(self, source, where: str) -> int:
        """Layers of a data-flow recipe's source: a model, or a merge (its base model's count)."""
        ref = source.model if source.model is not None else (source.merge.base_model or source.merge.models[0].model)
        if ref not in self.layers:
            raise RecipeError(f"{where}: model {ref!r} is not one of this run's sources ({', '.join(self.layers)})")
        return self.layers[ref]

    @property
    def loaded(self) -> dict[str, torch.nn.Module]:
        """Reference -> live model, of the sources loaded so far."""
        return dict(self._live)

    def model(self, ref: str) -> torch.nn.Module:
        """A source's own live model, built on first use around the store's tensors (no second copy where
        the store holds them on the device)."""
        if ref not in self._live:
            if ref not in self.paths:
                raise RecipeError(f"model {ref!r} is not one of this run's sources ({', '.join(self.paths)})")
            self._live[ref] = model_around(self.paths[ref], self.store.tensors(ref), self.device, self.dtype,
                                           self.split)
        return self._live[ref]


def model_around(path: Path, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 split: LayerSplit | None = None) -> torch.nn.Module:
    """The transformers model of checkpoint `path` whose parameters are `tensors` (moved to `device`, or to
    their layer's device of `split`, where they are not there yet). Built with skipped initialization, then its
    parameters are swapped for the tensors: the freshly allocated ones are freed at once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.worker.materializer import skip_weight_init

    config = AutoConfig.from_pretrained(path)
    with torch.device("cpu" if split else device), skip_weight_init():  # split: untouched host pages, then placed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {n: t.to(split.device_of(n) if split else device) for n, t in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head shares the embedding it was not saved apart from
    tied = {n for n, t in model.state_dict().items() if any(t.data_ptr() == s.data_ptr() for s in state.values())}
    untied = [n for n in missing if n not in tied]
    if unexpected or untied:
        name = (unexpected or untied)[0]
        raise RecipeError(f"{path}: tensor {name} has no counterpart in {type(model).__name__} as built by this "
                          "transformers version" if unexpected else f"{path}: the checkpoint lacks tensor {name}")
    if split:
        place(model, split)  # the assigned tensors are where they belong already; buffers move, hooks go on
    return model.eval()
