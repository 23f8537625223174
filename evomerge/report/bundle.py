"""The views as the page receives them (data + figures), and the static report made of all of them.

The dashboard's endpoints return one view each (server.py); the report inlines every view, each candidate included,
into one HTML file written atomically (static.py makes the page).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from evomerge.io.paths import check_writable
from evomerge.report.data import ReportError, RunSource, candidate_of, overview, verifications
from evomerge.report.figures import candidate_figures, front_figure, overview_figures
from evomerge.report.static import static_page
from evomerge.search.rundir import write_atomic


def overview_view(src: RunSource) -> dict[str, Any]:
    data = overview(src)
    return {"data": data, "figures": overview_figures(data)}


def front_view(data: dict[str, Any], generation: int | None) -> dict[str, Any]:
    """The front after `generation` (clamped to those evaluated; None: the latest), with its figure."""
    fronts = data["fronts"]
    if not fronts:
        return {"generation": None, "front": [], "hypervolume": None, "figure": front_figure(data)}
    g = len(fronts) - 1 if generation is None else max(0, min(int(generation), len(fronts) - 1))
    return {"generation": g, "front": fronts[g]["front"], "hypervolume": fronts[g]["hypervolume"],
            "figure": front_figure(data, g)}


def candidate_view(c: dict[str, Any]) -> dict[str, Any]:
    return {"data": c, "figures": candidate_figures(c)}


def report_bundle(src: RunSource) -> dict[str, Any]:
    """Everything the report shows: the overview, the front of every generation, every finished candidate."""
    ov = overview_view(src)
    data = ov["data"]
    verified = verifications(src.exports)[0]
    with src.run.open_ledger() as ledger:
        records = [r for r in ledger.all() if r.is_finished]
    candidates = {r.key: candidate_view(candidate_of(src, r, data["front"], verified.get(r.key))) for r in records}
    return {"overview": ov, "fronts": [front_view(data, g) for g in range(len(data["fronts"]))],
            "candidates": candidates, "written": dt.datetime.now().isoformat(sep=" ", timespec="seconds")}


def check_report_path(out: Path) -> None:
    """Refuse, before any work, an --out that is a folder or lies under a file."""
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"--out {out}: is a folder; name the HTML file to write, e.g. {out / 'report.html'}")
    check_writable(out, "--out")  # an ancestor that is a file, or an unwritable folder: EvomergeError


def write_report(src: RunSource, out: Path) -> Path:
    """The report of `src` as one self-contained HTML file at `out`, written atomically; returns `out`."""
    check_report_path(out)
    bundle = report_bundle(src)
    html = static_page(f"evomerge report: {src.prepared.config.name}", bundle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, html.encode("utf-8"))
    return out


def dumps(value: Any) -> str:
    """JSON for the endpoints: strict (no NaN), compact."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))
