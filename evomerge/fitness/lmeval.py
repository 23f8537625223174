"""Score a live, in-memory model on chosen items of lm-eval tasks, with per-item correctness.

The Scorer builds its tasks once and every request once (prompts, few-shot contexts), then each
`score(model, items)` runs the model on only the requests of the chosen items, applies the task's
filters and `process_results`, and returns per-item values. One lm-eval model wrapper (HFLM) is made
on first use and kept; the model inside it is swapped by reference, so the Materializer's in-place
weight writes and routed (DFS) model objects are both seen without rebuilding anything.

Why not `lm_eval.evaluator.evaluate(lm, tasks, samples=...)` per call (lm-eval 0.4.13)? It rebuilds
every request of the chosen items on each call; it labels results with `samples[i]` while iterating
documents in dataset order, so unsorted ids get the wrong labels; an empty list means "all items";
and its few-shot sampler draws from one random stream, so an item's few-shot context depends on
which other items are in the call. Here every item's prompt is built once, in the order and with
the seed of a full lm-eval run (fewshot seed 1234), so an item's result is the same in any subset
and equals the full run's.
"""

from __future__ import annotations

import contextlib
import difflib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import FitnessError
from evomerge.fitness.tasks import TaskLoader, chatty_loggers, default_include_paths, muted, quiet


@dataclass(frozen=True)
class TaskScores:
    """One task's results on the scored items, in the order the items were asked for."""

    task: str
    metric: str  # the task's metric used per item (acc, acc_norm, exact_match, ...)
    item_ids: np.ndarray  # (k,) int64 doc ids of the evaluation split
    correct: np.ndarray  # (k,) float64 in {0, 1}: raw itself for 0/1 metrics, else raw > threshold
    value: float  # the task's own aggregation of `raw` over these items (the mean for acc/exact_match)
    raw: np.ndarray  # (k,) float64 per-item metric values
    threshold: float | None = None  # set when a continuous metric was binarized: correct = raw > threshold
    filter: str = "none"  # the lm-eval filter whose output was scored


# ---------------------------------------------------------------- binarization (tinyBenchmarks)


def mean_keeping_threshold(scores: np.ndarray) -> float:
    """The threshold c for which mean(scores > c) is closest to mean(scores) (tinyBenchmarks' rule for
    continuous metrics). Ties go to the smallest c. Scores should lie in [0, 1]."""
    y = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0:
        raise ValueError("no scores to binarize")
    u = np.unique(y)  # (m,) sorted; (y > c) only changes at these values
    cands = np.concatenate([[np.nextafter(u[0], -np.inf)], u])  # first candidate: every item passes
    frac = (y[None, :] > cands[:, None]).mean(axis=1)  # (m+1,) fraction above each candidate
    return float(cands[int(np.argmin(np.abs(frac - y.mean())))])


def binarize(scores: np.ndarray, threshold: float) -> np.ndarray:
    return (np.asarray(scores, dtype=np.float64) > threshold).astype(np.float64)


def _is_binary(raw: np.ndarray) -> bool:
    return bool(np.all((raw == 0.0) | (raw == 1.0)))


# ---------------------------------------------------------------- the lm-eval model wrapper

CPU_AUTO_BATCH = 16  # batch_size auto on CPU (see LiveLM._detect_batch_size)


class _StandIn:
    """What HFLM's constructor reads from a model (config, device), without being a model: HFLM then
    skips `.eval()`/`.tie_weights()`, which a routed module need not have. The real model is attached
    with `LiveLM.set_model`."""

    def __init__(self, config, device) -> None:
        self.config, self.device = config, device


def _model_device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if dev is None:
        dev = next(model.parameters()).device
    return torch.device(dev)


def _live_lm_class():
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length

    class LiveLM(HFLM):
        """HFLM around a model that lives in memory and may be replaced between calls."""

        def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int | str, max_length: int | None) -> None:
            super().__init__(
                pretrained=_StandIn(model.config, _model_device(model)), tokenizer=tokenizer,
                backend="causal", batch_size=batch_size, max_length=max_length,
            )
            self._encodings: dict[tuple, list[int]] = {}
            self._auto_batch: dict[tuple, int] = {}
            self.set_model(model)

        def set_model(self, model: torch.nn.Module) -> None:
            if model.training:
                model.eval()
            self._model = model
            self._config = model.config
            self._device = _model_device(model)
            # HFLM resolves max_length from the config on every request; do it once per model
            self._resolved_max_length = self._max_length or resolve_max_length(
                model.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH
            )

        @property
        def max_length(self) -> int:
            return self._resolved_max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs) -> list[int]:
            # The same prompts are encoded on every call; remember them (bounded by the tasks' prompts).
            key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
            enc = self._encodings.get(key)
            if enc is None:
                enc = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
                self._encodings[key] = enc
            return list(enc)

        def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
            """batch_size "auto": lm-eval's probe (from max_batch_size, halving on out-of-memory) on an
            accelerator, run once per request kind and depth of model (a longer data-flow path needs more
            memory), not on every call. On CPU nothing signals "too big" before the machine swaps, and lm-eval
            would probe max_batch_size sequences of the model's whole context: there auto means CPU_AUTO_BATCH."""
            key = (requests is None, getattr(self._config, "num_hidden_layers", None))
            if key not in self._auto_batch:
                if self.device.type == "cpu":
                    self._auto_batch[key] = CPU_AUTO_BATCH
                else:
                    with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints its findings
                        self._auto_batch[key] = super()._detect_batch_size(requests, pos)
            return self._auto_batch[key]

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if hasattr(self.model, "generate"):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            return _greedy(self.model, context, generation_kwargs.get("attention_mask"), max_length, stop,
                           self.tokenizer)

    return LiveLM


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, max_length: int, stop: list[str], tokenizer):
    """Greedy decoding for a module with no `generate` (a routed model): full forward each step, no cache.
    ids: (B, T) left-padded context; returns (B, T + new) like HF generate."""
    mask = torch.ones_like(ids) if mask is None else mask
    start = ids.shape[1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    while ids.shape[1] < max_length:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions skip the left padding
        logits = model(ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]  # (B, V)
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        if tokenizer.eos_token_id is not None:
            done |= nxt == tokenizer.eos_token_id
        text = tokenizer.batch_decode(ids[:, start:], skip_special_tokens=True)
        done |= torch.tensor([any(s in t for s in stop) for t in text], device=ids.device)
        if bool(done.all()):
            break
    return ids


# ---------------------------------------------------------------- the scorer


class _PerDoc:
    """A task field (doc_to_choice, doc_to_target) computed once per document by the task's own method.

    lm-eval renders Jinja fields by compiling the template on every call (~1 ms each); `process_results`
    needs choices and target of every scored item on every call. Set as the task's field (a callable is a
    supported value), this returns what the original field gave for the same document object."""

    def __init__(self, method, original) -> None:
        self.method, self.original = method, original
        self.memo: dict[int, tuple[Any, Any]] = {}  # id(doc) -> (doc, value); the doc is kept so ids stay unique

    def __call__(self, doc):
        hit = self.memo.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = self.memo[id(doc)] = (doc, self.method(doc, self.original))
        return hit[1]


def _memoize_doc_fields(task) -> None:
    if getattr(task, "prompt", None) is not None or not hasattr(task, "set_config"):
        return  # promptsource prompts and Python tasks: leave them as they are
    for field, method in (("doc_to_choice", task.doc_to_choice), ("doc_to_target", task.doc_to_target)):
        original = getattr(task.config, field, None)
        if original is not None and not isinstance(original, _PerDoc):
            task.set_config(field, _PerDoc(method, original))


@dataclass
class _Prepared:
    task: Any  # lm_eval ConfigurableTask
    by_doc: list[list[Any]]  # doc id -> its Instances, in request order
    docs: list[Any]  # doc id -> document
    filter: Any  # the FilterEnsemble whose output is scored
    metric: str
    aggregate: Any  # the task's aggregation function of the metric
    generation: dict[str, Any]  # overrides of the task's generation kwargs (max_gen_toks included)


SETTINGS = ("metric", "filter", "max_gen_toks", "generation_kwargs")


def _filter_of(task_name: str, task, name: str | None):
    """The task's filter pipeline called `name` (default: its first, lm-eval's default report; a task without
    filters scores its first response as it is, under the name "none")."""
    from lm_eval.filters import build_filter_ensemble

    pipelines = {f["name"]: f for f in task.config.filter_list or []}
    if name is None or (name == "none" and not pipelines):
        if not pipelines:
            return build_filter_ensemble("none", [["take_first", None]])
        name = next(iter(pipelines))
    if name not in pipelines:
        close = difflib.get_close_matches(name, pipelines, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FitnessError(f"task {task_name!r} has no filter {name!r}: {hint}its filters are "
                           f"{', '.join(pipelines) or 'none (it scores the raw output: filter none)'}")
    f = pipelines[name]
    return build_filter_ensemble(
        name, [[fn["function"], {k: v for k, v in fn.items() if k != "function"}] for fn in f["filter"]])


def _generation_overrides(task_name: str, task, settings: Mapping[str, Any]) -> dict[str, Any]:
    overrides = dict(settings.get("generation_kwargs") or {})
    if settings.get("max_gen_toks") is not None:
        overrides["max_gen_toks"] = int(settings["max_gen_toks"])
    if overrides and task.config.output_type != "generate_until":
        raise FitnessError(f"task {task_name!r} is a {task.config.output_type} task: max_gen_toks and "
                           "generation_kwargs apply to generate_until tasks only")
    return overrides


def _public_generation(generation: Mapping[str, Any]) -> dict[str, Any]:
    """Generation overrides as a TaskScoring writes them (max_gen_toks on its own)."""
    rest = {k: v for k, v in generation.items() if k != "max_gen_toks"}
    out: dict[str, Any] = {}
    if "max_gen_toks" in generation:
        out["max_gen_toks"] = generation["max_gen_toks"]
    if rest:
        out["generation_kwargs"] = rest
    return out


class Scorer:
    """Score live models on item subsets of lm-eval tasks. Build once per worker; call `score` per candidate."""

    def __init__(
        self,
        tasks: Sequence[str],
        include_paths: Sequence[str | Path] = (),
        *,
        tokenizer,
        batch_size: int | str = 16,
        device: str | torch.device = "cpu",
        scoring: Mapping[str, Mapping[str, Any]] | None = None,
        thresholds: Mapping[str, float] | None = None,
        fewshot_seed: int = 1234,
        max_length: int | None = None,
        debug: bool = False,
    ) -> None:
        """tasks: lm-eval task names, looked up in the project's fitness/ folder, then `include_paths` (later
        folders win), then lm-eval's built-ins (datasets from the local HF cache). tokenizer: a tokenizer object
        (or a local path). batch_size: lm-eval's (an int, or "auto": see LiveLM._detect_batch_size).
        device: where the scored models live. scoring: task -> what is scored ({metric, filter, max_gen_toks,
        generation_kwargs}, each optional: the task's first metric and first filter by default).
        thresholds: task -> fixed threshold for a continuous metric; without one, each call
        binarizes with the mean-keeping threshold of its own scores, which moves with the candidate, so a
        search should fix it from calibration data. fewshot_seed: lm-eval's default, so prompts equal a full
        lm-eval run's. debug: keep lm-eval's logs and progress bars."""
        if isinstance(tasks, str):
            tasks = [tasks]
        if not tasks:
            raise FitnessError("no tasks to score: name at least one lm-eval task")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = max_length
        self.thresholds = dict(thresholds or {})
        self.debug = debug
        scoring = {t: dict(v) for t, v in (scoring or {}).items()}
        for name in list(scoring) + list(self.thresholds):
            if name not in tasks:
                raise FitnessError(f"scoring settings or a threshold are given for {name!r}, which is not among the "
                                   f"tasks ({', '.join(tasks)})")
        paths = default_include_paths() + [Path(p) for p in include_paths]
        self.loader = TaskLoader(paths, debug=debug)
        self.tasks: dict[str, _Prepared] = {}
        for name in dict.fromkeys(tasks):
            self.tasks[name] = self._prepare(name, scoring.get(name, {}), fewshot_seed)
        self._lm = None

    # -- building (once)

    def _prepare(self, name: str, settings: dict[str, Any], fewshot_seed: int) -> _Prepared:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise FitnessError(f"task {name!r}: unknown scoring setting {unknown[0]!r}: use {', '.join(SETTINGS)}")
        task = self.loader.load(name, fewshot_seed)
        with quiet(not self.debug):
            task.build_all_requests()  # every item, in order: prompts as in a full lm-eval run
        n = len(task.eval_docs)
        by_doc: list[list[Any]] = [[] for _ in range(n)]
        for inst in task.instances:
            by_doc[inst.doc_id].append(inst)
        for insts in by_doc:
            insts.sort(key=lambda i: i.idx)
        docs = [insts[0].doc if insts else None for insts in by_doc]
        _memoize_doc_fields(task)
        generation = _generation_overrides(name, task, settings)
        if generation:
            for inst in task.instances:  # (context, gen_kwargs): lm-eval batches requests by their gen_kwargs
                inst.arguments = (inst.arguments[0], {**inst.arguments[1], **generation})

        aggregations = task.aggregation()
        metric = settings.get("metric")
        if metric is None:
            if not aggregations:
                raise FitnessError(f"task {name!r} declares no metric: add a metric_list to its YAML")
            metric = next(iter(aggregations))
        elif metric not in aggregations:
            raise FitnessError(f"task {name!r} has no metric {metric!r}: its metrics are {', '.join(aggregations)}")
        return _Prepared(task, by_doc, docs, _filter_of(name, task, settings.get("filter")), metric,
                         aggregations[metric], generation)

    def settings(self, task: str) -> dict[str, Any]:
        """What is scored for `task`, resolved: metric and filter by name, and any generation overrides (what a
        calibration records, so that the search and export --verify score the same thing)."""
        prep = self._get(task)
        return {"metric": prep.metric, "filter": prep.filter.name, **_public_generation(prep.generation)}

    def num_items(self, task: str) -> int:
        """Number of items (documents) in the task's evaluation split (test, else validation)."""
        return len(self._get(task).docs)

    def _get(self, task: str) -> _Prepared:
        if task not in self.tasks:
            close = difflib.get_close_matches(task, self.tasks, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise FitnessError(f"task {task!r} is not one this scorer was built with: {hint}"
                               f"valid names are {', '.join(self.tasks)}")
        return self.tasks[task]

    def _item_ids(self, task: str, ids) -> np.ndarray:
        n = self.num_items(task)
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise FitnessError(f"items for task {task!r} must be a flat list of integer doc ids, got {ids!r}")
        arr = arr.astype(np.int64)
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise FitnessError(f"item ids {bad[:5].tolist()} of task {task!r} are out of range: "
                               f"its evaluation split has {n} items (ids 0..{n - 1})")
        return arr

    # -- scoring (per candidate)

    def score(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> dict[str, TaskScores]:
        """Run `model` on the chosen items (task -> doc ids; None = every item of every task).

        The model is used as it is now: weights written in place since the last call, or another module
        object, are both picked up. Items are returned in the order asked for (duplicates allowed)."""
        if items is None:
            items = {t: range(self.num_items(t)) for t in self.tasks}
        asked = {}
        for t, ids in items.items():
            self._get(t)  # unknown names fail here, with the valid ones
            asked[t] = self._item_ids(t, ids)
        lm = self._wrapper(model)
        with muted([] if self.debug else self._loggers):
            unique = {t: np.unique(ids) for t, ids in asked.items()}  # sorted, each item run once

            # every request of every chosen item, grouped by request type across tasks (as lm-eval does)
            by_type: dict[str, list[Any]] = {}
            for t, ids in unique.items():
                prep = self.tasks[t]
                for d in ids:
                    for inst in prep.by_doc[d]:
                        inst.resps, inst.filtered_resps = [], {}
                        by_type.setdefault(inst.request_type, []).append(inst)
            for reqtype, reqs in by_type.items():
                cloned = [r for r in reqs for _ in range(r.repeats)]
                with contextlib.redirect_stdout(io.StringIO()) if not self.debug else contextlib.nullcontext():
                    resps = getattr(lm, reqtype)(cloned, disable_tqdm=not self.debug)  # (lm-eval prints on auto)
                for resp, req in zip(resps, cloned, strict=True):
                    req.resps.append(resp)

            out = {}
            for t, ids in asked.items():
                out[t] = self._results(t, ids, unique[t])
        return out

    def _wrapper(self, model: torch.nn.Module):
        dev = _model_device(model)
        same_index = dev.index is None or self.device.index is None or dev.index == self.device.index
        if dev.type != self.device.type or not same_index:
            raise FitnessError(f"the model is on {dev} but this scorer was built for device {self.device}: "
                               "move the model, or build the scorer with device=...")
        if self._lm is None:
            with quiet(not self.debug):
                self._lm = _live_lm_class()(model, self.tokenizer, self.batch_size, self.max_length)
            self._loggers = chatty_loggers()  # all of lm-eval's modules are imported by now
        else:
            self._lm.set_model(model)
        return self._lm

    def _results(self, task: str, asked: np.ndarray, unique: np.ndarray) -> TaskScores:
        prep = self.tasks[task]
        insts = [inst for d in unique for inst in prep.by_doc[d]]
        if insts:
            prep.filter.apply(insts)
        key = prep.filter.name
        values = []
        for d in unique:
            metrics = prep.task.process_results(prep.docs[d], [i.filtered_resps[key] for i in prep.by_doc[d]])
            if prep.metric not in metrics:
                raise FitnessError(f"task {task!r} gives no per-item {prep.metric!r} (it gives "
                                   f"{', '.join(metrics)}): choose one of those as its metric")
            values.append(metrics[prep.metric])
        try:
            raw_u = np.asarray(values, dtype=np.float64)  # (u,)
        except (TypeError, ValueError):
            raise FitnessError(f"metric {prep.metric!r} of task {task!r} is not a per-item number (it is aggregated "
                               "over the corpus): choose a per-item metric such as acc or exact_match") from None
        raw = raw_u[np.searchsorted(unique, asked)]  # (k,) back to the asked order
        value = float(prep.aggregate(list(raw))) if raw.size else float("nan")

        threshold = self.thresholds.get(task)
        if threshold is None and raw.size and not _is_binary(raw):
            threshold = mean_keeping_threshold(raw)
        correct = raw.copy() if threshold is None else binarize(raw, threshold)
        return TaskScores(task=task, metric=prep.metric, item_ids=asked, correct=correct, value=value, raw=raw,
                          threshold=threshold, filter=key)
