"""`evomerge irt fit` and `evomerge irt estimate`, run as a user would (subprocess), good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", "irt", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def write_csv(path: Path, models: list[str], items: list[str], values: np.ndarray) -> Path:
    lines = [",".join(["model", *items])]
    lines += [",".join([m, *("" if np.isnan(v) else str(int(v)) for v in row)]) for m, row in zip(models, values)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 calibration models (3 of them sources) x 80 items, and 5 new models."""
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0.0, 0.3, size=(80, 1)) * 1.5, rng.normal(0.0, 2.0, size=80)
    answers = lambda theta: (rng.random((len(theta), 80)) < expit(theta @ a.T - b)).astype(float)
    folder = tmp_path_factory.mktemp("irt")
    items = [f"q{j}" for j in range(80)]
    calib = answers(rng.normal(size=(16, 1)))
    calib[1, 5] = np.nan  # a missing entry
    models = ["src_a", "src_b", "src_c"] + [f"m{i}" for i in range(13)]
    new = answers(rng.normal(size=(5, 1)))
    return {"folder": folder, "items": items, "calib": calib, "models": models, "new": new,
            "csv": write_csv(folder / "calib.csv", models, items, calib)}


@pytest.fixture(scope="module")
def fitted(data):
    out = data["folder"] / "calib.json"
    proc = run("fit", "--responses", data["csv"], "--out", out, "--anchors", 10, "--seed", 3, "--dims", 1,
               "--sources", "src_a,src_b,src_c", "--task", "demo")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return out


def anchors_of(calibration: Path, task: str = "demo") -> list[str]:
    return json.loads(calibration.read_text())["tasks"][task]["anchors"]


def test_fit_then_estimate_on_the_anchors(data, fitted, tmp_path):
    anchors = anchors_of(fitted)
    assert len(anchors) == 10
    cols = [data["items"].index(i) for i in anchors]
    new = write_csv(tmp_path / "new.csv", [f"new{i}" for i in range(5)], anchors, data["new"][:, cols])
    proc = run("estimate", "--calibration", fitted, "--responses", new, "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["model"] for r in records] == [f"new{i}" for i in range(5)]
    for r in records:
        assert r["task"] == "demo" and r["items_seen"] == 10
        assert set(r["estimates"]) == {"anchor_mean", "pirt", "gpirt", "mpirt", "gmpirt"}
        assert all(0 <= v <= 1 for v in r["estimates"].values())
        assert sum(r["mpirt_weights"].values()) == pytest.approx(1.0)
    table = run("estimate", "--calibration", fitted, "--responses", f"demo={new}")
    assert table.returncode == 0 and "new4" in table.stdout and "gpirt" in table.stdout


@pytest.mark.slow  # a second fit in a subprocess: ~4 s
def test_same_seed_same_anchors(data, fitted, tmp_path):
    again = tmp_path / "again.json"
    assert run("fit", "--responses", data["csv"], "--out", again, "--anchors", 10, "--seed", 3, "--dims", 1,
               "--sources", "src_a,src_b,src_c", "--task", "demo").returncode == 0
    assert anchors_of(again) == anchors_of(fitted)


@pytest.mark.slow  # fit + estimate in subprocesses: ~6-9 s
def test_parquet_in_and_out(data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"model": data["models"], **{i: data["calib"][:, j] for j, i in enumerate(data["items"])}}
    pq.write_table(pa.table(columns), tmp_path / "calib.parquet")
    out = tmp_path / "calib.json"
    proc = run("fit", "--responses", f"demo={tmp_path / 'calib.parquet'}", "--out", out, "--anchors", 8,
               "--dims", 1, "--method", "random")
    assert proc.returncode == 0, proc.stderr
    anchors = anchors_of(out)
    cols = [data["items"].index(i) for i in anchors]
    pq.write_table(pa.table({"model": ["x", "y"], **{i: data["new"][:2, c] for i, c in zip(anchors, cols)}}),
                   tmp_path / "new.parquet")
    proc = run("estimate", "--calibration", out, "--responses", tmp_path / "new.parquet", "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["model"] for r in records] == ["x", "y"]
    assert "mpirt" not in records[0]["estimates"]  # no --sources


def one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:"), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("name, text, expected", [
    ("values.csv", "model,q1,q2\nm1,1,0\nm2,1,x\n", ["values.csv", "line 3", "'m2'", "'q2'", "0 or 1"]),
    ("ragged.csv", "model,q1,q2\nm1,1,0\nm2,1\n", ["ragged.csv", "line 3", "2 fields", "header has 3"]),
    ("items.csv", "model,q1,q1\nm1,1,0\n", ["items.csv", "duplicate item id 'q1'"]),
    ("models.csv", "model,q1\nm1,1\nm1,0\n", ["models.csv", "duplicate model name 'm1'"]),
    ("empty.csv", "", ["empty.csv", "empty"]),
])
def test_fit_bad_responses(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    one_line_error(run("fit", "--responses", tmp_path / name, "--out", tmp_path / "c.json"), *expected)
    assert not (tmp_path / "c.json").exists()


def test_fit_too_few_items_for_the_anchors(data, tmp_path):
    one_line_error(run("fit", "--responses", data["csv"], "--out", tmp_path / "c.json", "--anchors", 500),
                   "80 items, too few for 500 anchors")


def test_estimate_unknown_item_ids(data, fitted, tmp_path):
    new = write_csv(tmp_path / "new.csv", ["n"], ["q1", "zzz"], np.array([[1.0, 0.0]]))
    one_line_error(run("estimate", "--calibration", fitted, "--responses", new), "new.csv", "'zzz'", "'demo'")


def test_estimate_calibration_of_another_version(data, fitted, tmp_path):
    old = json.loads(fitted.read_text())
    old["version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(old))
    new = write_csv(tmp_path / "new.csv", ["n"], ["q1"], np.array([[1.0]]))
    one_line_error(run("estimate", "--calibration", tmp_path / "old.json", "--responses", new),
                   "old.json", "version 0", "refit")


def test_a_degenerate_fit_warns_on_the_command_line_and_in_the_file(data, fitted, tmp_path):
    zeros = write_csv(tmp_path / "zeros.csv", [f"m{i}" for i in range(8)], [f"q{i}" for i in range(30)],
                      np.zeros((8, 30)))
    out = tmp_path / "zeros.json"
    proc = run("fit", "--responses", zeros, "--out", out, "--anchors", 5, "--dims", 1, "--task", "z")
    assert proc.returncode == 0, proc.stderr  # written, since the file may still be inspected, but flagged
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("evomerge: warning: task z:")]
    assert any("every answer is wrong" in w for w in warnings), proc.stderr
    assert any("every answer is wrong" in w for w in json.loads(out.read_text())["tasks"]["z"]["diagnostics"]["warnings"])
    # a healthy fit (the module's calibration) carries no such warning
    assert not any("every answer" in w for w in json.loads(fitted.read_text())["tasks"]["demo"]["diagnostics"]["warnings"])


def test_too_few_calibration_models_warn_on_fit_estimate_and_in_the_file(data, tmp_path):
    from evomerge.fitness.calibration_fit import MIN_INFORMATIVE_MODELS

    few = write_csv(tmp_path / "few.csv", data["models"][:5], data["items"][:40], data["calib"][:5, :40])
    out = tmp_path / "few.json"
    proc = run("fit", "--responses", few, "--out", out, "--anchors", 10, "--task", "p")
    assert proc.returncode == 0, proc.stderr
    said = f"5 calibration models, fewer than {MIN_INFORMATIVE_MODELS}"
    warned = [w for w in proc.stderr.splitlines() if w.startswith("evomerge: warning: task p:") and said in w]
    assert len(warned) == 1, proc.stderr  # once: the log record is not printed a second time
    recorded = json.loads(out.read_text())["tasks"]["p"]["diagnostics"]["warnings"]
    assert [w for w in recorded if said in w] == [warned[0].removeprefix("evomerge: warning: task p: ")]
    anchors = anchors_of(out, "p")
    new = write_csv(tmp_path / "new.csv", ["n0"], anchors, data["new"][:1, [data["items"].index(i) for i in anchors]])
    est = run("estimate", "--calibration", out, "--responses", new, "--json")
    assert est.returncode == 0 and said in est.stderr, est.stderr
    json.loads(est.stdout)  # the warning goes to stderr: the JSON on stdout stays parseable
    # enough models: no such warning
    enough = write_csv(tmp_path / "enough.csv", data["models"], data["items"], data["calib"])
    if len(data["models"]) >= MIN_INFORMATIVE_MODELS:
        proc = run("fit", "--responses", enough, "--out", tmp_path / "enough.json", "--anchors", 10, "--dims", 1)
        assert proc.returncode == 0 and "calibration models, fewer than" not in proc.stderr, proc.stderr
