"""Everything the dashboard and the report show, as JSON-able dicts computed from a run directory.

Reads the ledger (SQLite), the run's config snapshot (through session.open_run, as `evomerge status` does) and the
verify.json files of exported candidates; never unpickles anything and loads no torch (import-linter checks both).
figures.py turns these dicts into plotly figures; server.py serves them; report.py writes them into one file.

Objective values are shown as users read them: a task's estimated accuracy (the ledger stores it negated, pymoo
minimizes), a cost as is. Fronts per generation are the non-dominated feasible "ok" evaluations of generations
0..g, equal objective vectors collapsed onto their earliest candidate (as status() collapses the current front).
Times are unix seconds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.report.recipes import recipe_view
from evomerge.search.driver import Objective, objectives_of
from evomerge.search.ledger import Record, pareto_front
from evomerge.search.plot import axis_label
from evomerge.search.rundir import RunDir
from evomerge.search.session import GENERATIONS_DONE, Prepared, feasibility, front_entries, open_run, status

VERIFY = "verify.json"  # what `evomerge export --verify` writes into OUT/<candidate id>/ (evomerge/export.py)
COST_MARGIN = 1.1  # hypervolume reference of a cost: the largest observed cost times this (so extreme points count)
TIMELINE_LIMIT = 5000  # the latest evaluations drawn on the worker timeline (the counts cover every one)
ERROR_CHARS = 400  # of a failure message in the overview (the candidate view has all of it)


class ReportError(EvomergeError):
    """A dashboard or report input is unusable: an --exports folder, an output path, an unknown candidate id."""


class CandidateNotFound(ReportError):
    """No ledger record has this id (or unique id prefix)."""


@dataclass
class RunSource:
    """A run directory opened for reading, with the export folders searched for verify.json files."""

    run: RunDir
    prepared: Prepared
    exports: tuple[Path, ...] = ()

    @classmethod
    def open(cls, run_dir: Path, exports: Sequence[Path] = ()) -> RunSource:
        for d in exports:
            if not Path(d).is_dir():
                raise ReportError(f"--exports {d}: no such folder; pass the --out folder of `evomerge export --verify`")
        run, prepared = open_run(Path(run_dir))
        return cls(run, prepared, tuple(Path(d) for d in exports))

    @property
    def objectives(self) -> list[Objective]:
        return objectives_of(self.prepared.config)

    def fingerprint(self) -> str:
        """Changes whenever the ledger gains or finishes a row, a generation is told, or an export is verified."""
        with self.run.open_ledger() as ledger:
            counts = ledger.counts()
            done = ledger.get_meta(GENERATIONS_DONE, 0)
        files = [f.stat().st_mtime_ns for f in _verify_files(self.exports)]
        return f"{counts['running']}.{counts['ok']}.{counts['failed']}.{done}.{len(files)}.{max(files, default=0)}"


# ---------------------------------------------------------------------------------------------------- overview


def overview(src: RunSource) -> dict[str, Any]:
    """The run at a glance: summary, objectives, every ok evaluation's point, fronts and hypervolume per
    generation, evaluations and failures per generation, per-worker activity, the current front (status())."""
    fingerprint = src.fingerprint()
    with src.run.open_ledger() as ledger:
        records = ledger.all()
        told = int(ledger.get_meta(GENERATIONS_DONE, 0))
    config = src.prepared.config
    objectives = src.objectives
    feasible = feasibility(config)
    ok = [r for r in records if r.status == "ok"]
    last = max((r.generation for r in records), default=-1)
    verified, problems = verifications(src.exports)
    fronts, reference = _fronts(ok, objectives, feasible, last)
    return jsonable({
        "version": fingerprint,
        "run": {"name": config.name, "path": str(src.run.path.resolve()), "created": src.run.info().get("created"),
                "generation": told, "generations": config.algorithm.generations,
                "last_generation": None if last < 0 else last, "algorithm": config.algorithm.name,
                "pop_size": config.algorithm.pop_size, "estimator": config.fitness.estimator,
                "space": getattr(src.prepared.space, "kind", None), "max_path_length": config.max_path_length},
        "objectives": [{"name": o.name, "task": o.task, "cost": o.cost, "label": axis_label(o.name),
                        "kind": "accuracy" if o.task is not None else "cost"} for o in objectives],
        "evaluations": {**(counts := _counts(records)), "done": counts["ok"] + counts["failed"]},
        "front": fronts[-1]["front"] if fronts else [],  # status()'s front: the last generation's, over all
        "points": [{"id": r.key, "generation": r.generation, "objectives": shown(r, objectives),
                    "feasible": feasible(r)} for r in ok],
        "fronts": fronts,
        "hypervolume": _hypervolume_summary(fronts, reference),
        "generation_stats": _generation_stats(records, last),
        "throughput": _throughput(records),
        "failures": [{"id": r.key, "generation": r.generation, "worker": r.worker, "node": r.node,
                      "finished": r.finished, "error": " ".join((r.error or "?").split())[:ERROR_CHARS]}
                     for r in records if r.status == "failed"],
        "workers": _workers(records),
        "timeline": _timeline(records),
        "candidates": [r.key for r in records],
        "exports": {"folders": [str(d) for d in src.exports], "verified": sorted(verified), "problems": problems},
    })


def shown(rec: Record, objectives: Sequence[Objective]) -> dict[str, float]:
    """A record's objectives as users read them (those it has: a failed one may have none)."""
    values = rec.objectives or {}
    return {o.name: o.shown(values[o.name]) for o in objectives if o.name in values}


def _counts(records: Iterable[Record]) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "running": 0}
    for r in records:
        counts[r.status] += 1
    return counts


def _fronts(ok: list[Record], objectives: list[Objective], feasible, last: int):
    """Per generation g: the collapsed front of generations 0..g and its hypervolume; and the reference point."""
    import numpy as np
    from pymoo.indicators.hv import HV

    names = [o.name for o in objectives]
    directions = {n: "min" for n in names}  # the ledger stores every objective minimized
    reference = _reference(ok, objectives, feasible)
    hv = HV(ref_point=np.array([reference[n] for n in names]))
    by_generation: dict[int, list[Record]] = defaultdict(list)
    for r in ok:
        if feasible(r):
            by_generation[r.generation].append(r)
    front: list[Record] = []
    out = []
    for g in range(last + 1):
        # dominated points stay dominated, so each front extends the last; the order is the ledger's, as status()'s
        front = pareto_front(front + by_generation[g], directions)
        F = np.array([[r.objectives[n] for n in names] for r in front], dtype=float).reshape(-1, len(names))
        out.append({"generation": g, "hypervolume": float(hv(F)) if len(F) else 0.0,  # clones add no volume
                    "front": front_entries(front, objectives)})
    return out, reference


def _reference(ok: list[Record], objectives: list[Objective], feasible) -> dict[str, float]:
    """The hypervolume reference point, minimized: accuracy 0 for a task; for a cost, the largest observed (feasible,
    ok) times COST_MARGIN (1 when none is positive)."""
    ref = {}
    for o in objectives:
        if o.task is not None:
            ref[o.name] = 0.0
        else:
            worst = max((r.objectives[o.name] for r in ok if feasible(r) and o.name in (r.objectives or {})
                         and math.isfinite(r.objectives[o.name])), default=0.0)
            ref[o.name] = worst * COST_MARGIN if worst > 0 else 1.0
    return ref


def _hypervolume_summary(fronts: list[dict], reference: dict[str, float]) -> dict[str, Any]:
    # No random-search run is ever written into a run directory, so the baseline is the seed population's front.
    baseline = fronts[0]["hypervolume"] if fronts else None
    note = "accuracy 0 for every task"
    if any(n.startswith("cost:") for n in reference):
        note += f", {COST_MARGIN:g} x the largest observed value for every cost"
    return {"per_generation": [{"generation": f["generation"], "hypervolume": f["hypervolume"]} for f in fronts],
            "reference": reference,
            "reference_note": note,
            "baseline": None if baseline is None else {
                "hypervolume": baseline, "label": "generation 0 (the seed population)",
                "note": "no random-search or other baseline in this run directory: the baseline is the hypervolume "
                        "of generation 0, the seed population (uniform recipes / identity paths, then random ones)"}}


def start_of(r: Record) -> float | None:
    """When an evaluation started: its finish time less its measured total, else when its row was written."""
    total = (r.timings or {}).get("total")
    if r.finished is not None and total:
        return r.finished - total
    return r.created


def _generation_stats(records: list[Record], last: int) -> list[dict[str, Any]]:
    by_generation: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_generation[r.generation].append(r)
    out = []
    for g in range(last + 1):
        recs = by_generation[g]
        starts = [s for s in map(start_of, recs) if s is not None]
        ends = [r.finished for r in recs if r.finished is not None]
        finished = sum(r.is_finished for r in recs)
        wall = (max(ends) - min(starts)) if starts and ends else None
        out.append({"generation": g, **_counts(recs), "started": min(starts, default=None),
                    "ended": max(ends, default=None), "wall_s": wall,
                    "per_hour": finished / wall * 3600 if wall else None})
    return out


def _throughput(records: list[Record]) -> dict[str, Any]:
    ends = sorted(r.finished for r in records if r.finished is not None)
    starts = [s for s in map(start_of, records) if s is not None]
    span = (ends[-1] - min(starts)) if ends and starts else None
    return {"finished": [{"t": t, "done": i + 1} for i, t in enumerate(ends)],
            "first_start": min(starts, default=None), "span_s": span,
            "per_hour": len(ends) / span * 3600 if span else None}


def _workers(records: list[Record]) -> list[dict[str, Any]]:
    by_worker: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_worker[r.worker or "?"].append(r)
    out = []
    for worker, recs in sorted(by_worker.items()):
        busy = sum(r.finished - s for r in recs if r.finished is not None and (s := start_of(r)) is not None)
        starts = [s for s in map(start_of, recs) if s is not None]
        ends = [r.finished for r in recs if r.finished is not None]
        span = (max(ends) - min(starts)) if starts and ends else None
        out.append({"worker": worker, "nodes": sorted({r.node or "?" for r in recs}), **_counts(recs),
                    "evaluations": sum(r.is_finished for r in recs), "busy_s": busy,
                    "first": min(starts, default=None), "last": max(ends, default=None),
                    "busy_share": busy / span if span else None})
    return out


def _timeline(records: list[Record]) -> list[dict[str, Any]]:
    recs = sorted((r for r in records if start_of(r) is not None), key=lambda r: start_of(r))[-TIMELINE_LIMIT:]
    return [{"id": r.key, "generation": r.generation, "worker": r.worker or "?", "node": r.node or "?",
             "status": r.status, "start": start_of(r), "end": r.finished} for r in recs]


# ---------------------------------------------------------------------------------------------------- exports


def _verify_files(exports: Iterable[Path]) -> list[Path]:
    files = []
    for d in exports:
        files += [f for f in [d / VERIFY, *sorted(d.glob(f"*/{VERIFY}"))] if f.is_file()]
    return files


def verifications(exports: Iterable[Path]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """candidate id -> its verify.json (plus "path"), from every export folder (DIR/<id>/verify.json, or DIR itself);
    and one line per file that could not be read. A later folder wins for an id exported twice."""
    found: dict[str, dict[str, Any]] = {}
    problems = []
    for f in _verify_files(exports):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            key, tasks = doc["candidate"], doc["tasks"]
            if not isinstance(key, str) or not isinstance(tasks, dict):
                raise TypeError("'candidate' must be an id and 'tasks' a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{f}: not a verify.json of `evomerge export --verify` ({type(e).__name__}: {e})")
            continue
        found[key] = {**doc, "path": str(f)}
    return found, problems


# ---------------------------------------------------------------------------------------------------- candidate


def candidate(src: RunSource, key: str, front: list[dict] | None = None) -> dict[str, Any]:
    """One candidate: status, where and how long it ran, its recipe (and the view drawn of it), anchor responses,
    estimates and objectives, its place on the current front, and its verify.json when an export folder has one.
    `key` is an id or a unique id prefix; `front` is status()'s front (computed here when not given)."""
    with src.run.open_ledger() as ledger:
        rec = ledger.get(key)
        if rec is None:
            matches = [r for r in ledger.all() if r.key.startswith(key)] if key else []
            if len(matches) != 1:
                some = ", ".join(r.key for r in matches[:3])
                raise CandidateNotFound(f"candidate {key!r}: " + (f"{len(matches)} ids start with it ({some}, ...): "
                                                                   "give more of it" if matches else
                                                                   "no such id in the ledger"))
            rec = matches[0]
    if front is None:
        front = status(src.run, src.prepared)["front"]
    return candidate_of(src, rec, front, verifications(src.exports)[0].get(rec.key))


def candidate_of(src: RunSource, rec: Record, front: list[dict], verify: dict | None) -> dict[str, Any]:
    config = src.prepared.config
    names = {path: name for name, path in config.sources.models.items()}
    if config.sources.base_model is not None:
        names.setdefault(config.sources.base_model, "base")
    place = next((f for f in front if rec.key == f["id"] or rec.key in f.get("tied_ids", [])), None)
    return jsonable({
        "id": rec.key, "generation": rec.generation, "index": rec.index, "status": rec.status,
        "seed": None if rec.seed is None else str(rec.seed),  # 64-bit: beyond what JavaScript numbers hold exactly
        "worker": rec.worker, "node": rec.node, "created": rec.created, "finished": rec.finished,
        "started": start_of(rec), "timings": rec.timings or {}, "error": rec.error, "extra": rec.extra,
        "objectives": shown(rec, src.objectives), "estimator": config.fitness.estimator,
        "estimates": rec.estimates or {}, "responses": rec.responses or {},
        "response_summary": {task: {"correct": sum(v for v in items.values()), "items": len(items)}
                             for task, items in (rec.responses or {}).items()},
        "recipe": rec.recipe, "view": recipe_view(rec.recipe, names, src.prepared.layer_counts),
        "front": None if place is None else {"representative": place["id"], "ties": place.get("ties", 1)},
        "verify": verify,
    })


# ---------------------------------------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN; browsers refuse it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
