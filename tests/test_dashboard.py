"""`evomerge dashboard` and `evomerge report`: the views computed from the ledger (checked against it, on hand-made
ledgers whose fronts and hypervolumes are known), the aiohttp endpoints, the static report, the CLI on real tiny
searches (finished, and running in another process), and the page rendered in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.report.bundle import write_report
from evomerge.report.data import COST_MARGIN, CandidateNotFound, RunSource, candidate, overview
from evomerge.report.figures import candidate_figures, front_figure
from evomerge.search.ledger import Record, candidate_key
from evomerge.search.rundir import RunDir
from evomerge.search.session import GENERATIONS_DONE, Prepared, open_run, status

T0 = 1_700_000_000.0  # the hand-made ledgers' clock


# ------------------------------------------------------------------------------------------- hand-made ledgers


def _source(tmp_path: Path, objectives=({"task": "t1"}, {"task": "t2"}), max_path_length=None,
            exports=()) -> RunSource:
    config = RunConfig.model_validate({
        "name": "handmade", "sources": {"models": {"a": "/m/a", "b": "/m/b"}, "base_model": "/m/base"},
        "search_space": "ps_task_arithmetic", "fitness": {"calibration": "c.json", "estimator": "pirt"},
        "objectives": list(objectives), "max_path_length": max_path_length,
        "algorithm": {"pop_size": 4, "generations": 5}})
    run = RunDir.create(tmp_path / "run", "name: handmade\n")
    return RunSource(run, Prepared(config, tmp_path, None, {"a": 4, "b": 4}), tuple(exports))


def _record(g: int, i: int, objectives=None, *, status="ok", worker="w0", start=0.0, total=1.0, **kw) -> Record:
    genome = (g + i / 10, 0.5)
    finished = None if status == "running" else T0 + start + total
    return Record(key=candidate_key(g, i, genome), generation=g, index=i, genome=genome, status=status,
                  seed=2**63 - 25 - i, objectives=objectives or {}, worker=worker, node="n0",
                  timings={} if status == "running" else {"total": total, "score": total / 2},
                  created=T0 + start, finished=finished, **kw)


def _acc(t1: float, t2: float) -> dict[str, float]:
    return {"t1": -t1, "t2": -t2}  # the ledger stores accuracies negated (pymoo minimizes)


def _two_generations(src: RunSource) -> dict[str, Record]:
    """Generation 0: two front points, one failure (its message holds markup), one dominated point; generation 1:
    a clone of a front point (a tie), a new front point, a dominated point, one still running."""
    rows = {
        "a": _record(0, 0, _acc(0.2, 0.6), worker="w0", start=0.0),
        "b": _record(0, 1, _acc(0.5, 0.3), worker="w1", start=0.0),
        "fail": _record(0, 2, status="failed", worker="w0", start=1.0, total=0.5,
                        error="RuntimeError: NaN in <b>layer 3</b>\n  traceback line"),
        "low": _record(0, 3, _acc(0.1, 0.1), worker="w1", start=1.0),
        "tie": _record(1, 0, _acc(0.5, 0.3), worker="w1", start=2.0),
        "new": _record(1, 1, _acc(0.4, 0.5), worker="w0", start=2.0, responses={"t1": {"3": 1, "11": 0, "7": 1}}),
        "dominated": _record(1, 2, _acc(0.3, 0.2), worker="w1", start=3.0),
        "running": _record(1, 3, status="running", worker="w1", start=4.0),
    }
    with src.run.open_ledger() as ledger:
        for rec in rows.values():
            ledger.record(rec)
        ledger.set_meta(GENERATIONS_DONE, 1)
    return rows


def _hv_2d(points: list[tuple[float, float]]) -> float:
    """The area dominated by `points` (both maximized) above (0, 0)."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, reverse=True):
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def test_overview_fronts_hypervolume_and_counts_match_the_ledger(tmp_path):
    src = _source(tmp_path)
    rows = _two_generations(src)
    ov = overview(src)
    json.dumps(ov, allow_nan=False)  # strict JSON: what the browser parses

    assert ov["evaluations"] == {"ok": 6, "failed": 1, "running": 1, "done": 7}
    assert ov["run"]["generation"] == 1 and ov["run"]["last_generation"] == 1
    fronts = [{p["id"]: (p["ties"], p["tied_ids"]) for p in f["front"]} for f in ov["fronts"]]
    assert fronts[0] == {rows["a"].key: (1, []), rows["b"].key: (1, [])}
    # the clone collapses onto the earliest candidate with its scores
    assert fronts[1] == {rows["a"].key: (1, []), rows["b"].key: (2, [rows["tie"].key]), rows["new"].key: (1, [])}
    assert ov["front"] == status(src.run, src.prepared)["front"]  # the current front is status()'s
    assert {p["id"] for p in ov["front"]} == set(fronts[1])
    points = {p["id"]: p["objectives"] for p in ov["points"]}
    assert points[rows["new"].key] == {"t1": 0.4, "t2": 0.5}  # accuracies un-negated
    assert set(points) == {r.key for r in rows.values() if r.status == "ok"}

    hv = [h["hypervolume"] for h in ov["hypervolume"]["per_generation"]]
    assert hv == pytest.approx([_hv_2d([(0.2, 0.6), (0.5, 0.3)]), _hv_2d([(0.2, 0.6), (0.5, 0.3), (0.4, 0.5)])])
    assert hv == pytest.approx([0.21, 0.25])
    assert ov["hypervolume"]["reference"] == {"t1": 0.0, "t2": 0.0}
    baseline = ov["hypervolume"]["baseline"]
    assert baseline["hypervolume"] == pytest.approx(0.21) and "generation 0" in baseline["note"]

    stats = ov["generation_stats"]
    assert [(s["ok"], s["failed"], s["running"]) for s in stats] == [(3, 1, 0), (3, 0, 1)]
    assert stats[0]["wall_s"] == pytest.approx(2.0) and stats[0]["per_hour"] == pytest.approx(4 / 2.0 * 3600)
    assert ov["throughput"]["per_hour"] == pytest.approx(7 / 4.0 * 3600)  # 7 finished from T0 to T0 + 4
    (failure,) = ov["failures"]
    assert failure["id"] == rows["fail"].key and failure["error"] == "RuntimeError: NaN in <b>layer 3</b> traceback line"
    workers = {w["worker"]: w for w in ov["workers"]}
    assert (workers["w0"]["evaluations"], workers["w0"]["failed"], workers["w0"]["busy_s"]) == (3, 1, pytest.approx(2.5))
    assert (workers["w1"]["evaluations"], workers["w1"]["running"]) == (4, 1)
    assert {t["id"] for t in ov["timeline"]} == {r.key for r in rows.values()}
    assert ov["candidates"] == [r.key for r in sorted(rows.values(), key=lambda r: (r.generation, r.index))]


def test_a_run_with_no_evaluation_yet_has_views_too(tmp_path):
    from evomerge.report.bundle import front_view, report_bundle

    src = _source(tmp_path)
    ov = overview(src)
    assert ov["evaluations"] == {"ok": 0, "failed": 0, "running": 0, "done": 0} and ov["fronts"] == []
    assert ov["hypervolume"]["baseline"] is None and ov["run"]["last_generation"] is None
    assert "no evaluation has finished yet" in front_view(ov, None)["figure"]["layout"]["title"]["text"]
    json.dumps(report_bundle(src), allow_nan=False)


def test_the_report_package_loads_no_torch():
    code = ("import sys, evomerge.report.server, evomerge.report.bundle, evomerge.cli.dashboard; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_costs_infeasible_paths_and_axes(tmp_path):
    """A cost objective: the reference is COST_MARGIN x the largest feasible cost; a path over max_path_length is
    on no front; accuracy axes read in percent, cost axes as whole numbers, never in offset or SI notation."""
    src = _source(tmp_path, objectives=({"task": "t1"}, {"cost": "path_length"}), max_path_length=6)
    rows = [_record(0, 0, {"t1": -0.6, "cost:path_length": 5.0}, extra={"path_length": 5}),
            _record(0, 1, {"t1": -0.4, "cost:path_length": 3.0}, extra={"path_length": 3}),
            _record(0, 2, {"t1": -0.9, "cost:path_length": 8.0}, extra={"path_length": 8})]  # over the limit
    with src.run.open_ledger() as ledger:
        for r in rows:
            ledger.record(r)
    ov = overview(src)
    assert {p["id"] for p in ov["fronts"][0]["front"]} == {rows[0].key, rows[1].key}
    assert {p["id"]: p["feasible"] for p in ov["points"]}[rows[2].key] is False
    ref = 5.0 * COST_MARGIN
    assert ov["hypervolume"]["reference"] == {"t1": 0.0, "cost:path_length": pytest.approx(ref)}
    # minimized space: (-0.6, 5) and (-0.4, 3) against (0, ref)
    expected = 0.6 * (ref - 5.0) + 0.4 * (5.0 - 3.0)
    assert ov["hypervolume"]["per_generation"][0]["hypervolume"] == pytest.approx(expected)
    layout = front_figure(ov, 0)["layout"]
    assert layout["xaxis"]["tickformat"] == ".1%" and "estimated accuracy" in layout["xaxis"]["title"]["text"]
    assert layout["yaxis"]["tickformat"] == ",d" and layout["yaxis"]["dtick"] == 1
    assert "path_length" in layout["yaxis"]["title"]["text"]
    assert all(layout[a].get("exponentformat") == "none" for a in ("xaxis", "yaxis"))


def _plotly_accepts(figures: list[dict]) -> None:
    """The per-candidate figures are plain specs (built without plotly's slow validation): plotly must accept them."""
    import plotly.graph_objects as go

    for f in figures:
        go.Figure(f)  # raises ValueError on an unknown or invalid property


def test_candidate_of_a_parameter_space_recipe(tmp_path):
    src = _source(tmp_path)
    recipe = {"merge_method": "ties", "base_model": "/m/base", "models": [
        {"model": "/m/a", "parameters": {"weight": [{"filter": "self_attn", "value": [0.1, 0.1, 0.9, 0.9]},
                                                    {"value": 0.5}],
                                         "density": [0.0, 1.0]}},  # 2 control points: linear over 4 layers
        {"model": "/m/b", "parameters": {"weight": 0.25, "density": 0.7}}],
        "parameters": {"lambda": 1.2, "normalize": True}}
    estimates = {"t1": {"pirt": 0.41, "gpirt": 0.45}, "t2": {"pirt": float("nan"), "gpirt": 0.3}}
    rec = _record(0, 0, _acc(0.41, 0.3), recipe=recipe, responses={"t1": {"0": 1, "5": 0}}, estimates=estimates)
    with src.run.open_ledger() as ledger:
        ledger.record(rec)
    c = candidate(src, rec.key[:12])  # a unique prefix
    json.dumps(c, allow_nan=False)
    assert c["id"] == rec.key and c["recipe"] == recipe and c["responses"] == rec.responses
    assert c["seed"] == str(rec.seed)  # 64-bit seeds as text: JavaScript numbers would round them
    assert c["estimates"]["t1"] == estimates["t1"] and c["estimates"]["t2"]["pirt"] is None
    assert c["response_summary"] == {"t1": {"correct": 1, "items": 2}}
    assert c["front"] == {"representative": rec.key, "ties": 1}
    view = c["view"]
    assert (view["kind"], view["method"], view["base_model"], view["layers"]) == ("ps", "ties", "base", 4)
    assert view["scalars"] == {"lambda": 1.2, "normalize": True}
    rows = {(r["source"], r["param"], r["tensors"]): r["values"] for r in view["rows"]}
    assert rows[("a", "weight", "self_attn")] == [0.1, 0.1, 0.9, 0.9]
    assert rows[("a", "weight", "other tensors")] == [0.5] * 4
    assert rows[("a", "density", "all tensors")] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert rows[("b", "weight", "all tensors")] == [0.25] * 4
    figures = candidate_figures(c)
    _plotly_accepts(figures)
    assert [f["layout"]["title"]["text"].split(" per ")[0] for f in figures] == ["weight", "density"]
    assert figures[0]["data"][0]["z"][0] == [0.1, 0.1, 0.9, 0.9]
    with pytest.raises(CandidateNotFound, match="no such id"):
        candidate(src, "g0009")


def test_candidate_of_a_hybrid_recipe(tmp_path):
    src = _source(tmp_path)
    merge = {"merge_method": "ties", "base_model": "/m/base", "models": [
        {"model": "/m/a", "parameters": {"weight": 0.3, "density": 0.5}},
        {"model": "/m/b", "parameters": {"weight": 0.7, "density": 0.5}}]}
    recipe = {"merge_method": "dataflow", "max_layers": 8, "sources": [
        {"name": "a", "model": "/m/a"}, {"name": "b", "model": "/m/b"}, {"name": "ps_merge", "merge": merge}],
        "path": [["a", 0], ["ps_merge", 1, 1.25], ["b", 2, 0.75], ["a", 3]]}
    rec = _record(0, 0, _acc(0.3, 0.3), recipe=recipe)
    with src.run.open_ledger() as ledger:
        ledger.record(rec)
    view = candidate(src, rec.key)["view"]
    assert (view["kind"], view["length"], view["max_layers"]) == ("hybrid", 4, 8)
    assert [(s["source"], s["layer"], s["scale"]) for s in view["path"]] == [
        ("a", 0, 1.0), ("ps_merge", 1, 1.25), ("b", 2, 0.75), ("a", 3, 1.0)]
    merged = next(s for s in view["sources"] if s["name"] == "ps_merge")["merge"]
    assert {(r["source"], r["param"]): r["values"][0] for r in merged["rows"]} == {
        ("a", "weight"): 0.3, ("a", "density"): 0.5, ("b", "weight"): 0.7, ("b", "density"): 0.5}
    figures = candidate_figures(candidate(src, rec.key))
    _plotly_accepts(figures)
    assert figures[0]["data"][0]["y"] == ["a", "ps_merge", "b", "a"]  # the path, then the merge's heatmaps
    assert figures[0]["data"][0]["marker"]["color"] == [1.0, 1.25, 0.75, 1.0]
    assert len(figures) == 3


def test_verified_exports_show_their_full_task_scores(tmp_path):
    exports = tmp_path / "merged"
    src = _source(tmp_path, exports=[exports])
    rows = _two_generations(src)
    key = rows["new"].key
    verify = {"candidate": key, "tasks": {"t1": {"accuracy": 0.38, "items": 30, "metric": "acc", "filter": "none",
                                                 "estimated": 0.4}},
              "anchors": {"checked": 3, "matched": True, "mismatches": []}}
    (exports / key).mkdir(parents=True)
    (exports / key / "verify.json").write_text(json.dumps(verify))
    (exports / "broken").mkdir()
    (exports / "broken" / "verify.json").write_text("{not json")
    c = candidate(src, key)
    assert c["verify"]["tasks"] == verify["tasks"] and c["verify"]["path"] == str(exports / key / "verify.json")
    assert candidate(src, rows["a"].key)["verify"] is None
    ov = overview(src)
    assert ov["exports"]["verified"] == [key]
    assert len(ov["exports"]["problems"]) == 1 and "broken" in ov["exports"]["problems"][0]


# ------------------------------------------------------------------------------------------- the app and the report


def test_endpoints_follow_rows_written_between_fetches(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from evomerge.report.server import make_app

    src = _source(tmp_path)
    rows = _two_generations(src)

    async def scenario():
        async with TestClient(TestServer(make_app(src))) as client:
            page = await (await client.get("/")).text()
            assert '<script src="plotly.js">' in page and not re.search(r"src=[\"']?https?:", page)
            js = await client.get("/plotly.js")
            assert js.status == 200 and "plotly.js v" in (await js.text())[:200]
            first = await (await client.get("/api/overview")).json()
            assert first["data"]["evaluations"]["done"] == 7 and first["data"]["run"]["last_generation"] == 1
            assert set(first["figures"]) == {"hypervolume", "evaluations", "throughput", "timeline"}
            version = first["data"]["version"]
            same = await (await client.get(f"/api/overview?version={version}")).json()
            assert same == {"version": version, "unchanged": True}
            front = await (await client.get("/api/front?generation=0")).json()
            assert {p["id"] for p in front["front"]} == {rows["a"].key, rows["b"].key}
            assert front["figure"]["layout"]["title"]["text"].startswith("Pareto front after generation 0")
            assert (await client.get("/api/front?generation=x")).status == 400
            one = await (await client.get(f"/api/candidate/{rows['new'].key}")).json()
            assert one["data"]["responses"] == rows["new"].responses
            missing = await client.get("/api/candidate/g0042")
            assert missing.status == 404 and "no such id" in (await missing.json())["error"]

            # the search goes on: the running candidate finishes, generation 2 starts
            with src.run.open_ledger() as ledger:
                done = _record(1, 3, _acc(0.6, 0.1), worker="w1", start=4.0)
                ledger.record(done)
                ledger.set_meta(GENERATIONS_DONE, 2)
                ledger.record(_record(2, 0, _acc(0.7, 0.05), worker="w0", start=6.0))
            later = await (await client.get(f"/api/overview?version={version}")).json()
            assert later["data"]["version"] != version
            assert later["data"]["evaluations"] == {"ok": 8, "failed": 1, "running": 0, "done": 9}
            assert later["data"]["run"]["generation"] == 2 and len(later["data"]["fronts"]) == 3
            assert done.key in {p["id"] for p in later["data"]["front"]}
            latest = await (await client.get("/api/front")).json()
            assert latest["generation"] == 2

    asyncio.run(scenario())


def _embedded(html: str) -> dict:
    raw = re.search(r'<script type="application/json" id="config">(.*?)</script>', html, re.DOTALL).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def test_report_is_one_self_contained_file_with_the_data(tmp_path):
    src = _source(tmp_path)
    rows = _two_generations(src)
    out = tmp_path / "share" / "report.html"
    assert write_report(src, out) == out
    html = out.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js and the data are inline: it opens offline
    assert not re.search(r"<link[^>]*\bhref=[\"']?https?:", html)
    assert "plotly.js v" in html
    bundle = _embedded(html)["bundle"]
    assert set(bundle["candidates"]) == {r.key for r in rows.values() if r.status != "running"}
    assert bundle["candidates"][rows["fail"].key]["data"]["error"].startswith("RuntimeError: NaN in <b>")
    assert [len(f["front"]) for f in bundle["fronts"]] == [2, 3]
    assert bundle["overview"]["data"]["evaluations"]["done"] == 7
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # written atomically: no temporary left

    with pytest.raises(EvomergeError, match="is a file"):
        write_report(src, out / "nested.html")
    with pytest.raises(EvomergeError, match="is a folder"):
        write_report(src, out.parent)


def test_bad_run_directories_and_outputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    cases = [(["dashboard", str(tmp_path)], "not an evomerge run directory"),
             (["dashboard", str(tmp_path / "nowhere")], "no such run directory"),
             (["dashboard", str(tmp_path), "--port", "99999"], "--port 99999"),
             (["report", str(tmp_path), "--out", str(tmp_path / "r.html")], "not an evomerge run directory"),
             (["report", str(tmp_path), "--out", str(tmp_path / "a-file" / "r.html")], "is a file"),
             (["report", str(tmp_path), "--out", str(tmp_path)], "is a folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("evomerge: error: ") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------- real tiny searches


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny workspace and a finished 3-generation search of it."""
    root = make_workspace(tmp_path_factory.mktemp("dashboard"))
    run_dir = root / "runs" / "finished"
    assert main(["search", str(root / "run.yaml"), "--run-dir", str(run_dir), "--in-process"]) == 0
    return root, run_dir


def make_workspace(root: Path) -> Path:
    from evomerge.testing.workspace import make_search_workspace

    return make_search_workspace(root)


class Dashboard:
    """`python -m evomerge dashboard ...` in a subprocess, with its URL read from its first line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "evomerge", "dashboard", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the dashboard did not start: {self.proc.stderr.read()}")
        self.url = re.search(r"http://\S+", line).group(0)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def _ledger_rows(run_dir: Path) -> list[Record]:
    run, _ = open_run(run_dir)
    with run.open_ledger() as ledger:
        return ledger.all()


@pytest.mark.slow
def test_dashboard_on_a_finished_search_shows_its_ledger(finished, tmp_path):
    _, run_dir = finished
    records = _ledger_rows(run_dir)
    run, prepared = open_run(run_dir)
    front = status(run, prepared)["front"]
    exports = tmp_path / "merged"
    assert main(["export", str(run_dir), "--out", str(exports), "--ids", front[0]["id"], "--verify"]) == 0

    dash = Dashboard(str(run_dir), "--port", "0", "--exports", str(exports))
    try:
        assert dash.url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        import psutil

        listening = [c.laddr for c in psutil.Process(dash.proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}
        ov = dash.get("api/overview")["data"]
        assert ov["evaluations"]["done"] == len(records) == 12
        assert ov["evaluations"]["ok"] == sum(r.status == "ok" for r in records)
        assert ov["front"] == front
        by_id = lambda fr: sorted(fr, key=lambda f: f["id"])
        assert by_id(ov["fronts"][-1]["front"]) == by_id([{**f, "generation": int(f["id"][1:5])} for f in front])
        assert ov["run"]["generation"] == 3 and len(ov["fronts"]) == 3
        assert sorted(ov["candidates"]) == sorted(r.key for r in records)
        by_key = {r.key: r for r in records}
        for f in front:  # the estimated objectives, as the ledger has them (negated there)
            assert f["objectives"] == {t: -by_key[f["id"]].objectives[t] for t in ("t_add", "t_more")}
        one = dash.get(f"api/candidate/{front[0]['id']}")["data"]
        rec = by_key[front[0]["id"]]
        assert one["responses"] == rec.responses and one["estimates"] == rec.estimates
        assert one["view"]["kind"] == "ps" and one["view"]["layers"] == 4
        verify = json.loads((exports / rec.key / "verify.json").read_text())
        assert one["verify"]["tasks"] == verify["tasks"] and one["verify"]["anchors"]["matched"] is True
        with urllib.request.urlopen(dash.url, timeout=30) as r:
            page = r.read().decode()
        assert "<title>evomerge: tiny</title>" in page and not re.search(r"src=[\"']?https?:", page)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(dash.url + "api/candidate/nope", timeout=30)
        assert e.value.code == 404

        # a second dashboard on the same port: one line, exit code 2
        port = dash.url.rsplit(":", 1)[1].strip("/")
        busy = subprocess.run([sys.executable, "-m", "evomerge", "dashboard", str(run_dir), "--port", port],
                              capture_output=True, text=True, timeout=120, check=False)
        assert busy.returncode == 2 and busy.stderr.startswith("evomerge: error: --port") and "in use" in busy.stderr
        assert busy.stderr.count("\n") == 1
    finally:
        code, err = dash.stop()
    assert code == 0 and err.strip() == "dashboard stopped"  # Ctrl-C stops it cleanly


@pytest.mark.slow
def test_dashboard_follows_a_running_search(finished, tmp_path):
    root, _ = finished
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["algorithm"]["generations"] = 8
    # one item per forward pass: evaluations slow enough that the search is still running once the dashboard's
    # server is up (with the default batch the whole search could finish during its start-up)
    config["fitness"]["batch_size"] = 1
    (root / "run8.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "running"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    search = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(root / "run8.yaml"), "--run-dir",
                               str(run_dir), "--in-process"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env)
    dash = None
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "run.json").exists():  # the run directory appears complete (renamed into place)
            assert search.poll() is None and time.monotonic() < deadline, search.stderr.read() if search.poll() else ""
            time.sleep(0.2)
        dash = Dashboard(str(run_dir), "--port", "0")
        seen: list[tuple[int, int]] = []  # (generations told, evaluations done) as the page saw them
        version = None
        while time.monotonic() < deadline + 180:
            body = dash.get("api/overview" + (f"?version={version}" if version else ""))
            if not body.get("unchanged"):
                version = body["data"]["version"]
                seen.append((body["data"]["run"]["generation"], body["data"]["evaluations"]["done"]))
            if search.poll() is not None and seen and seen[-1][0] == 8:
                break
            time.sleep(0.3)
        assert search.wait(timeout=60) == 0, search.stderr.read()
        generations = [g for g, _ in seen]
        assert generations == sorted(generations) and generations[-1] == 8
        assert len(set(generations)) >= 3, seen  # it saw the search move, not only its end
        records = _ledger_rows(run_dir)
        final = dash.get("api/overview")["data"]
        assert final["evaluations"]["done"] == len(records) == 32
        run, prepared = open_run(run_dir)
        assert final["front"] == status(run, prepared)["front"]
    finally:
        if search.poll() is None:
            search.kill()
        if dash is not None:
            assert dash.stop()[0] == 0


# ------------------------------------------------------------------------------------------- headless Chromium


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _headless(url: str, profile: Path, *extra: str) -> str:
    """Chromium's DOM (with --dump-dom) after 20 s of virtual time; no script error may reach its console."""
    browser = _chromium()
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--window-size=1400,3000", "--virtual-time-budget=20000",
                           "--enable-logging=stderr", "--v=0", *extra, url],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_the_page_renders_the_front_and_a_candidate_in_chromium(finished, tmp_path):
    _, run_dir = finished
    run, prepared = open_run(run_dir)
    newest = max(status(run, prepared)["front"], key=lambda f: f["id"][:11])["id"]  # the page opens it first
    dash = Dashboard(str(run_dir), "--port", "0")
    try:
        dom = _headless(dash.url, tmp_path / "profile", "--dump-dom")
        _headless(dash.url, tmp_path / "profile", f"--screenshot={tmp_path / 'dashboard.png'}")
    finally:
        dash.stop()
    assert 'data-ready="1"' in dom
    front = dom[dom.index('id="front-figure"'):dom.index('id="front-table"')]
    assert "main-svg" in front and "Pareto front after generation 2" in front  # plotly drew the front
    assert re.search(r'id="candidate-id"[^>]*>' + newest, dom)  # a candidate view opened
    assert 'id="scores-table"' in dom and "Anchor answers" in dom and "weight per layer" in dom
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000

    # the report: offline from a file, and text from the run (a failure's markup) stays text
    copy = _source(tmp_path / "handmade")
    _two_generations(copy)
    report = write_report(copy, tmp_path / "report.html")
    dom = _headless(report.as_uri(), tmp_path / "profile", "--dump-dom")
    _headless(report.as_uri(), tmp_path / "profile", f"--screenshot={tmp_path / 'report.png'}")
    assert 'data-ready="1"' in dom and "main-svg" in dom
    assert "NaN in &lt;b&gt;layer 3&lt;/b&gt;" in dom and "<b>layer 3</b>" not in dom
    assert (tmp_path / "report.png").stat().st_size > 20_000
