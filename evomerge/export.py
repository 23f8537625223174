"""`evomerge export`: candidates of a run -> Hugging Face checkpoint directories with model cards.

Each chosen candidate (by default the current Pareto front, as `evomerge status` computes it) is rebuilt
from its ledger record: its recipe materialized with its own seed by a Materializer over the run's sources
built as the evaluator builds it (same base, same dtype), so the checkpoint holds the weights that were
scored. Parameter-space recipes are written with `mergekit_config.yml`; data-flow and hybrid recipes as
standard checkpoints with their scales folded in, with `evomerge_recipe.yml` (see worker/checkpoint_writer.py)
and, where mergekit can express the path, `mergekit.yaml` (a passthrough slices recipe, merge/mergekit_export.py).

Every model is assembled under a hidden staging directory inside `--out`, verified there if asked, and
renamed into `--out/<candidate id>` only when complete: an error or an interrupt leaves no partial model.

Verification loads each exported directory back with plain `AutoModelForCausalLM.from_pretrained`, scores
it on every item of the run's tasks, and checks that its answers on the items the search scored (the
anchors) equal the responses stored in the ledger.
"""

from __future__ import annotations

import difflib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.search.ledger import Record

if TYPE_CHECKING:
    from evomerge.config import RunConfig
    from evomerge.search.rundir import RunDir
    from evomerge.search.session import Prepared

CARD = "README.md"
VERIFY = "verify.json"


class ExportError(EvomergeError):
    """Nothing to export, an unknown or unfinished candidate id, or an output directory in the way."""


@dataclass
class Verification:
    """A re-loaded checkpoint's full-task scores and whether its anchor answers equal the ledger's."""

    scores: dict[str, dict[str, Any]]  # task -> {"accuracy", "items", "metric", "filter", "estimated"}
    checked: int  # anchor answers compared
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # {"task", "item", "ledger", "exported"}

    @property
    def matched(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.scores,
                "anchors": {"checked": self.checked, "matched": self.matched, "mismatches": self.mismatches}}


@dataclass(frozen=True)
class Exported:
    key: str
    path: Path
    kind: str  # "ps", "dataflow" or "hybrid" (a data-flow path through sources and a merge)
    verification: Verification | None = None


# ---------------------------------------------------------------------------------------------- choosing


def select(run: RunDir, prepared: Prepared, ids: Sequence[str] | None = None, *, all_ties: bool = False,
           ) -> list[Record]:
    """The ledger records to export: those named by `ids` (full keys or unique prefixes), else the front: one
    candidate per distinct objective vector, or with `all_ties` every candidate of the front (clones included)."""
    from evomerge.search.session import status

    where = str(run.path)
    with run.open_ledger() as ledger:
        records = ledger.all()
    ok = {r.key: r for r in records if r.status == "ok"}
    if not ok:
        raise ExportError(f"run {where} has no finished evaluations (status ok) yet: run or resume the search "
                          f"(`evomerge resume {where}`), then export")
    if ids is None:
        keys = [k for f in status(run, prepared)["front"] for k in [f["id"], *(f["tied_ids"] if all_ties else [])]]
        if not keys:
            raise ExportError(f"run {where}: the front is empty ({len(ok)} candidates evaluated ok, none feasible): "
                              "name candidates with --ids")
        return [ok[k] for k in keys]
    by_key = {r.key: r for r in records}
    chosen = [_resolve(i, by_key, where) for i in dict.fromkeys(ids)]
    return list({r.key: r for r in chosen}.values())


def _resolve(ident: str, records: dict[str, Record], where: str) -> Record:
    rec = records.get(ident)
    if rec is None:
        hits = [k for k in records if k.startswith(ident)]
        if len(hits) > 1:
            shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
            raise ExportError(f"--ids {ident}: matches {len(hits)} candidates of run {where} ({shown}): "
                              "give more of the id")
        if not hits:
            close = difflib.get_close_matches(ident, records, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ExportError(f"--ids {ident}: no candidate with this id in run {where}: {hint}"
                              f"`evomerge status {where}` lists the front")
        rec = records[hits[0]]
    if rec.status == "failed":
        reason = " ".join((rec.error or "no reason recorded").split())[:200]
        raise ExportError(f"--ids {ident}: candidate {rec.key} failed ({reason}): only candidates evaluated ok "
                          "can be exported")
    if rec.status != "ok":
        raise ExportError(f"--ids {ident}: candidate {rec.key} has not finished evaluating: resume the run "
                          f"(`evomerge resume {where}`), then export it")
    return rec


# ---------------------------------------------------------------------------------------------- building


class _Writer:
    """Rebuilds ledger records from the run's sources (loaded once, as the evaluator loads them)."""

    def __init__(self, config: RunConfig, config_dir: Path, device: str) -> None:
        from evomerge.worker.sources import SourceModels

        self.sources = SourceModels(config, config_dir, device)

    def write(self, rec: Record, out: Path, *, max_shard_bytes: int, where: str) -> str:
        """Write the record's recipe, materialized with its seed, to `out`; returns the kind written."""
        from evomerge.merge.dataflow_recipe import is_dataflow, parse_dataflow
        from evomerge.merge.recipe import Recipe
        from evomerge.worker.checkpoint_writer import write_dataflow_checkpoint, write_ps_checkpoint
        from evomerge.worker.folded_export import mergekit_files

        seed = rec.seed if rec.seed is not None else 0
        src = self.sources
        if is_dataflow(rec.recipe):
            recipe = parse_dataflow(rec.recipe, where, lambda source: src.layer_count(source, where))
            models = {s.name: src.model(s.model) if s.model is not None
                      else src.materializer.materialize(s.merge, seed=seed) for s in recipe.sources}
            config = next(iter(models.values())).config
            write_dataflow_checkpoint(out, models, recipe, src.paths, dtype=src.dtype,
                                      max_shard_bytes=max_shard_bytes, force=False,
                                      extra_files=mergekit_files(recipe, config.model_type, src.dtype,
                                                                 getattr(config, "layer_types", None)))
            return "hybrid" if any(s.merge is not None for s in recipe.sources) else "dataflow"
        recipe = Recipe.from_mergekit(rec.recipe, where)
        tensors = src.materializer.merged_tensors(recipe, seed=seed).items()
        write_ps_checkpoint(out, tensors, recipe, src.paths, dtype=src.dtype, max_shard_bytes=max_shard_bytes,
                            force=False)
        return "ps"


# ---------------------------------------------------------------------------------------------- verifying


class _Verifier:
    """Scores re-loaded checkpoints on the run's full tasks (one Scorer, built on first use)."""

    def __init__(self, config: RunConfig, config_dir: Path, device: str) -> None:
        from evomerge.fitness.calibration import Calibration
        from evomerge.io.paths import find_path

        self.config = config
        self.search = [Path(config_dir), Path.cwd()]
        calibration = Calibration.load(find_path(config.fitness.calibration, self.search))
        self.scoring = calibration.scoring_for(config.fitness.stated_scoring())  # as the search scored
        self.tasks = list(self.scoring)
        self.device = device
        self.scorer = None

    def verify(self, rec: Record, path: Path) -> Verification:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.scorer is None:  # one Scorer (tasks built once) with the first export's tokenizer: every export
            self.scorer = self._scorer(path)  # carries the tokenizer of the run's sources, as the evaluator used
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(self.device).eval()
        with torch.no_grad():
            # the items the search scored, asked exactly as the evaluator asked them (same order, same call)
            asked = {t: [int(i) for i in (rec.responses or {}).get(t, {})] for t in self.tasks}
            anchors = self.scorer.score(model, asked)
            full = self.scorer.score(model)
        mismatches, checked = [], 0
        for t in self.tasks:
            s = anchors[t]
            for item, got in zip(s.item_ids.tolist(), s.correct.tolist()):
                want = rec.responses[t][str(item)]
                checked += 1
                if int(got) != int(want):
                    mismatches.append({"task": t, "item": int(item), "ledger": int(want), "exported": int(got)})
        estimator = self.config.fitness.estimator
        scores = {t: {"accuracy": float(full[t].value), "items": int(full[t].item_ids.size), "metric": full[t].metric,
                      "filter": full[t].filter, "estimated": _estimate(rec, t, estimator)} for t in self.tasks}
        del model
        return Verification(scores, checked, mismatches)

    def _scorer(self, path: Path):
        from transformers import AutoTokenizer

        from evomerge.fitness.lmeval import Scorer
        from evomerge.io.paths import find_path

        fitness = self.config.fitness
        return Scorer(self.tasks, [find_path(p, self.search) for p in fitness.task_paths],
                      tokenizer=AutoTokenizer.from_pretrained(path), batch_size=fitness.batch_size, device=self.device,
                      scoring=self.scoring)


def _estimate(rec: Record, task: str, estimator: str) -> float | None:
    value = ((rec.estimates or {}).get(task) or {})
    value = value.get(estimator) if isinstance(value, dict) else value
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------- the command


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    ids: Sequence[str] | None = None,
    all_ties: bool = False,
    verify: bool = False,
    force: bool = False,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int, str], None] = lambda done, total, key: None,
) -> list[Exported]:
    """Export the chosen candidates of a run (default: its front, one per distinct objective vector unless
    `all_ties`) to `out/<candidate id>/`.

    Everything that can be checked is checked before any model is loaded; `out` must be new or empty unless
    `force`, which replaces only the directories of the candidates exported (other content is kept).
    `log` gets a line as each model starts; `progress(done, total, key)` counts the models (key: the one
    under way), before each and once all are done."""
    from evomerge.io.save import parse_size, prepare_output_dir
    from evomerge.search.session import open_run
    from evomerge.worker.checkpoint_writer import check_device

    run, prepared = open_run(Path(run_dir))
    records = select(run, prepared, ids, all_ties=all_ties)
    out = Path(out)
    prepare_output_dir(out, force=force)
    max_shard_bytes = parse_size(shard_size)
    check_device(device)

    config = prepared.config
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    done: list[Exported] = []
    try:
        sources = _Writer(config, prepared.config_dir, device)
        verifier = _Verifier(config, prepared.config_dir, device) if verify else None
        for n, rec in enumerate(records, 1):
            progress(n - 1, len(records), rec.key)
            log(f"exporting {rec.key} ({n}/{len(records)})" + (" and verifying it on the full tasks" if verify else ""))
            done.append(_export_one(rec, out, sources, verifier, run, prepared, max_shard_bytes))
        progress(len(records), len(records), "")
    finally:
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)
    return done


def _export_one(rec: Record, out: Path, sources: _Writer, verifier: _Verifier | None, run: RunDir,
                prepared: Prepared, max_shard_bytes: int) -> Exported:
    from evomerge.modelcard import model_card
    from evomerge.search.driver import objectives_of
    from evomerge.worker.checkpoint_writer import MERGEKIT_FILE, RECIPE_FILE

    target = out / rec.key
    stage = Path(tempfile.mkdtemp(prefix=f".{rec.key}.export-", dir=out))
    try:
        path = stage / rec.key
        kind = sources.write(rec, path, max_shard_bytes=max_shard_bytes, where=f"{run.path}: candidate {rec.key}")
        verification = verifier.verify(rec, path) if verifier is not None else None
        if verification is not None:
            (path / VERIFY).write_text(json.dumps({"candidate": rec.key, **verification.to_json()}, indent=1) + "\n")
        recipe_file = MERGEKIT_FILE if kind == "ps" else RECIPE_FILE
        # objectives as `evomerge status` shows them: task accuracies maximized, costs as they are
        shown = {o.name: (-v if o.task is not None else v) for o in objectives_of(prepared.config)
                 if (v := (rec.objectives or {}).get(o.name)) is not None}
        card = model_card(rec, prepared.config, kind=kind, objectives=shown, recipe_file=recipe_file, recipe_text=(path / recipe_file).read_text(),
                          verification=None if verification is None else verification.to_json())
        (path / CARD).write_text(card)
        if target.is_dir():
            shutil.rmtree(target)  # --force: this candidate's earlier export
        elif target.exists():
            target.unlink()
        path.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Exported(rec.key, target, kind, verification)
