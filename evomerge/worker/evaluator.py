"""One worker's evaluation of candidates: recipe -> live model -> anchor answers -> estimated accuracies.

The torch side of the search (no Ray here: `search.pool` wraps an Evaluator in an actor). An Evaluator
is built once per worker: it loads the sources once onto its device (one Materializer over base + sources
serves parameter-space recipes and the merge part of hybrid recipes; the sources' own live models serve
data-flow routing, loaded on the first data-flow candidate), builds one Scorer and reads the calibration.
`evaluate(candidate)` never raises for a bad candidate: any error, or non-finite merged weights or scores,
is a `status="failed"` result with a one-line error, and the next candidate evaluates as usual.
Candidates arrive decoded: the driver turns genomes into recipes, a worker only materializes them.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.config import RunConfig
from evomerge.errors import FitnessError, RecipeError, one_line
from evomerge.io.paths import find_path
from evomerge.merge.dataflow_recipe import is_dataflow, parse_dataflow
from evomerge.merge.fused import out_of_memory
from evomerge.merge.recipe import Recipe
from evomerge.search.candidates import FAILED, OK, Candidate, EvalResult
from evomerge.worker.finite import all_finite
from evomerge.worker.sources import SourceModels


class NonFiniteError(FitnessError):
    """The merged model has NaN/inf weights, or its scores are not finite."""


class ForwardClock:
    """Wall time spent inside `model`'s forward calls while the `with` block runs (the rest of scoring is
    lm-eval's request handling, tokenization and answer extraction). On a GPU both ends synchronize, so the
    time is the kernels', not their launch's."""

    def __init__(self, model: torch.nn.Module, devices: list[torch.device]) -> None:
        self.model, self.seconds, self._started = model, 0.0, 0.0
        self._cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})  # a split model runs on several

    def _sync(self) -> None:
        for i in self._cuda:
            torch.cuda.synchronize(i)

    def __enter__(self) -> ForwardClock:
        self._hooks = [self.model.register_forward_pre_hook(self._start),
                       self.model.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def _start(self, module, args) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started


class Evaluator:
    """One per worker: loads sources once onto its device, keeps one Materializer (PS and hybrid merge part),
    the live source models for DFS routing (each built by the first candidate that needs it), one Scorer,
    and the calibration."""

    def __init__(self, config: RunConfig, config_dir: str | Path, *, device: str | torch.device = "cpu",
                 worker: str = "local", node: str | None = None,
                 devices: list[str | torch.device] | None = None) -> None:
        """devices: split the models by layers over these (default: see evomerge.worker.layer_split)."""
        from transformers import AutoTokenizer

        from evomerge.fitness.calibration import Calibration
        from evomerge.fitness.lmeval import Scorer

        self.config = config
        self.config_dir = Path(config_dir).resolve()
        self.worker = worker
        self.node = node if node is not None else socket.gethostname()
        search = [self.config_dir, Path.cwd()]
        self.sources = SourceModels(config, self.config_dir, device, devices)  # each part built on first use
        self.device = self.sources.device  # where inputs go in and logits come out (a split's first device)
        self.devices = list(self.sources.split.devices) if self.sources.split else [self.device]
        self._ps_params: int | None = None  # parameters of a parameter-space merge (tied tensors once)
        self._checked: set[str] = set()  # live source models whose weights were checked

        self.calibration = Calibration.load(find_path(config.fitness.calibration, search))
        scoring = self.calibration.scoring_for(config.fitness.stated_scoring())  # what the calibration scored
        self.tasks = list(scoring)
        self.anchors = {t: self.calibration.anchors(t) for t in self.tasks}
        self._anchor_ids = {t: [int(i) for i in ids] for t, ids in self.anchors.items()}
        self.scorer = Scorer(self.tasks, [find_path(p, search) for p in config.fitness.task_paths],
                             tokenizer=AutoTokenizer.from_pretrained(self.sources.paths[self.sources.base_ref]),
                             batch_size=config.fitness.batch_size, device=self.device, scoring=scoring)

    @property
    def materializer(self):
        """The Materializer of parameter-space recipes and hybrid merges (built by the first that needs it)."""
        return self.sources.materializer

    # -- what the driver needs -------------------------------------------------------------------------
    def layer_counts(self) -> dict[str, int]:
        """Source name -> number of layers of the sources as loaded here."""
        return {name: self.sources.layers[ref] for name, ref in self.sources.names.items()}

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, cand: Candidate) -> EvalResult:
        """Evaluate one candidate; failures are results, never exceptions (KeyboardInterrupt still stops)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            model, costs = self._materialize(cand, timings)
            t = time.perf_counter()
            with ForwardClock(model, self.devices) as forward:
                scores = self.scorer.score(model, self._anchor_ids)
            timings["score"] = time.perf_counter() - t
            timings["forward"] = forward.seconds
            t = time.perf_counter()
            responses, estimates = self._estimate(scores)
            timings["estimate"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001  (a bad candidate is a result, not a crash of the worker)
            timings["total"] = time.perf_counter() - start
            error = one_line(e)
            if out_of_memory(e):  # the same for every candidate of this size: say what to change
                error = (f"out of memory: {error} (`evomerge plan CONFIG` shows what fits: sources.placement: host "
                         "or a smaller fitness.batch_size)")
            return EvalResult(cand.key, FAILED, error=error, worker=self.worker, node=self.node, timings=timings)
        timings["total"] = time.perf_counter() - start
        return EvalResult(cand.key, OK, responses, estimates, costs, None, self.worker, self.node, timings)

    def _materialize(self, cand: Candidate, timings: dict[str, float]) -> tuple[torch.nn.Module, dict[str, float]]:
        t = time.perf_counter()
        where = f"candidate {cand.key}"
        if not cand.recipe:  # the driver decodes genomes; a worker only materializes recipes
            raise RecipeError(f"{where} has no recipe: the driver sends each candidate's decoded recipe")
        doc = cand.recipe
        if is_dataflow(doc):
            model, costs, check = self._route(doc, where, cand.seed)
        else:
            model = self.materializer.materialize(Recipe.from_mergekit(doc, where), seed=cand.seed)
            if self._ps_params is None:
                self._ps_params = sum(p.numel() for p in model.parameters())
            costs, check = {"params": float(self._ps_params), "path_length": 0.0}, [model]
        timings["materialize"] = time.perf_counter() - t
        t = time.perf_counter()
        bad = [m for m in check if not all_finite(m.parameters())]
        timings["check"] = time.perf_counter() - t
        if bad:
            raise NonFiniteError("the merged weights hold NaN or inf values")
        return model, costs

    def _route(self, doc: dict, where: str, seed: int) -> tuple[torch.nn.Module, dict[str, float], list]:
        from evomerge.worker.routed import build_routed_model, layers_of

        recipe = parse_dataflow(doc, where, lambda source: self.sources.layer_count(source, where))
        merges = [s for s in recipe.sources if s.merge is not None]
        if len(merges) > 1:
            raise RecipeError(f"{where}: {len(merges)} merge sources, but a worker keeps one live merged model")
        models: dict[str, torch.nn.Module] = {}
        check: list[torch.nn.Module] = []
        used = {step.source for step in recipe.path} | {recipe.sources[0].name}  # model A: embeddings and head
        for s in recipe.sources:
            if s.name not in used:  # neither loaded nor merged: a bad source only fails the paths through it
                continue
            if s.model is not None:
                models[s.name] = self._source_model(s.model)
            else:
                models[s.name] = self.materializer.materialize(s.merge, seed=seed)
                check.append(models[s.name])
        routed = build_routed_model(models, recipe.path)
        # parameters of the exported model: everything outside the layers once, each path step's layer
        layers = layers_of(routed)[1]
        in_layers = {id(p) for p in layers.parameters()}
        outside = sum(p.numel() for p in routed.parameters() if id(p) not in in_layers)
        per_layer = sum(sum(p.numel() for p in rl.layer.parameters()) for rl in layers)
        costs = {"params": float(outside + per_layer), "path_length": float(len(recipe.path))}
        return routed, costs, check

    def _source_model(self, ref: str) -> torch.nn.Module:
        """A source's own live model (loaded once, on first use; its weights are checked once)."""
        model = self.sources.model(ref)
        if ref not in self._checked:
            if not all_finite(model.parameters()):
                raise NonFiniteError(f"source {ref} holds NaN or inf weights")
            self._checked.add(ref)
        return model

    def _estimate(self, scores: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
        from evomerge.fitness.estimators import estimate

        responses, estimates = {}, {}
        for task in self.tasks:
            s = scores[task]
            raw, correct = np.asarray(s.raw, dtype=float), np.asarray(s.correct, dtype=float)
            if not (np.isfinite(raw).all() and np.isfinite(correct).all()):
                raise NonFiniteError(f"task {task}: the scores are not finite (NaN logits)")
            responses[task] = {str(i): int(c) for i, c in zip(s.item_ids.tolist(), correct.tolist())}
            values = estimate(self.calibration, task, self.anchors[task], correct)
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise NonFiniteError(f"task {task}: estimator {bad[0]} gave {values[bad[0]]}")
            estimates[task] = {k: float(v) for k, v in values.items()}
        return responses, estimates


__all__ = ["Evaluator", "ForwardClock", "NonFiniteError", "all_finite"]
