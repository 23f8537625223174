"""A run's source models on one device, loaded once: what a worker's Evaluator and `evomerge export` build from.

One Materializer over base + sources (parameter-space recipes, and the merge part of hybrid ones), and the
sources' own live models for data-flow routing, each built on first use: a data-flow search holds its sources'
weights and nothing else (the Materializer's fp32 base and task vectors would cost ~4 + 4K bytes a parameter).
Models are named as recipes name them: by the config's path strings ("references").
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.config import RunConfig
from evomerge.errors import RecipeError
from evomerge.io.paths import resolve_model


class SourceModels:
    def __init__(self, config: RunConfig, config_dir: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig

        from evomerge.io.checkpoint import Checkpoint
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
        self.dtype = Checkpoint.open(self.paths[self.base_ref]).dtype  # of every live model, as the Materializer's
        self._materializer = None
        self._live: dict[str, torch.nn.Module] = {}

    @property
    def materializer(self):
        """The Materializer over base + sources (evomerge.worker.materializer), built on first use."""
        if self._materializer is None:
            from evomerge.worker.materializer import Materializer

            self._materializer = Materializer(self.paths, self.base_ref, device=self.device)
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
        """A source's own live model, loaded on first use."""
        if ref not in self._live:
            from evomerge.worker.routed import load_models

            if ref not in self.paths:
                raise RecipeError(f"model {ref!r} is not one of this run's sources ({', '.join(self.paths)})")
            self._live[ref] = load_models({ref: self.paths[ref]}, device=self.device, dtype=self.dtype)[ref]
        return self._live[ref]
