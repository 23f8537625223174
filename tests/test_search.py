"""The search end to end (in-process pool): real tiny models, real lm-eval, real IRT calibration, real pymoo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.testing.workspace import make_search_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny models, two tiny tasks, a calibration, and a run config that finishes in seconds; plus two models
    that do not fit the family (another hidden size; another MLP width)."""
    from evomerge.testing.tiny import TinySpec, random_model, save_model

    root = make_search_workspace(tmp_path_factory.mktemp("search"))
    tokenizer = root / "models" / "tokenizer"
    save_model(random_model(TinySpec(hidden=48), seed=0), root / "models" / "wide", tokenizer)
    save_model(random_model(TinySpec(intermediate=96), seed=0), root / "models" / "fat", tokenizer)
    import torch

    pickled, pickled_dir = random_model(TinySpec(), seed=0), root / "models" / "pickled"
    pickled.config.save_pretrained(pickled_dir)  # weights only as pytorch_model.bin (transformers writes safetensors)
    torch.save(pickled.state_dict(), pickled_dir / "pytorch_model.bin")
    from safetensors.torch import load_file, save_file

    poisoned = root / "models" / "poisoned"  # source_1 with two infs and a NaN in one tensor
    shutil.copytree(root / "models" / "source_1", poisoned)
    shard = next(poisoned.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.2.self_attn.v_proj.weight"].view(-1)[[0, 5, 9]] = torch.tensor([float("inf"), -float("inf"),
                                                                                        float("nan")])
    save_file(tensors, shard, metadata={"format": "pt"})
    return root


def _front(run_dir):
    out = subprocess.run([sys.executable, "-m", "evomerge", "status", str(run_dir), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _keys(run_dir):
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return sorted(k for (k,) in db.execute("SELECT key FROM evaluations WHERE status != 'running'"))


@pytest.mark.slow
def test_search_runs_and_reports_its_front(workspace, capsys, monkeypatch):
    run_dir = workspace / "runs" / "straight"
    assert main(["search", str(workspace / "run.yaml"), "--run-dir", str(run_dir), "--in-process"]) == 0
    state = _front(run_dir)
    assert state["generation"] == 3 and state["evaluations"]["done"] == len(_keys(run_dir)) >= 4
    assert state["front"] and set(state["front"][0]["objectives"]) == {"t_add", "t_more"}
    assert all(0.0 <= v <= 1.0 for f in state["front"] for v in f["objectives"].values())
    assert (run_dir / "front.png").stat().st_size > 1000
    # finished: resuming evaluates nothing and changes nothing (the run directory given relative to the cwd)
    before = _keys(run_dir)
    monkeypatch.chdir(workspace)
    assert main(["resume", "runs/straight", "--in-process"]) == 0
    assert _keys(run_dir) == before
    # an existing run directory is never overwritten
    assert main(["search", str(workspace / "run.yaml"), "--run-dir", str(run_dir)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_the_same_front(workspace):
    straight = workspace / "runs" / "reference"
    assert main(["search", str(workspace / "run.yaml"), "--run-dir", str(straight), "--in-process"]) == 0

    killed = workspace / "runs" / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(workspace / "run.yaml"),
                               "--run-dir", str(killed), "--in-process"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=workspace)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill inside generation 1, after some of its candidates are ledgered
        if (killed / "ledger.sqlite").exists():
            try:
                with sqlite3.connect(killed / "ledger.sqlite") as db:
                    n = db.execute("SELECT COUNT(*) FROM evaluations WHERE generation = 1").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            if n >= 1:
                break
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    partial = _keys(killed)
    assert 0 < len(partial) < len(_keys(straight))  # it really died mid-search
    assert main(["resume", str(killed), "--in-process"]) == 0
    assert _front(killed)["front"] == _front(straight)["front"]
    assert _keys(killed) == _keys(straight)
    assert set(partial) <= set(_keys(killed))


@pytest.mark.parametrize("change, message", [
    ({"sources": {"models": {"a": "models/nope", "b": "models/source_1"}, "base_model": "models/base"}},
     "sources.models.a"),
    ({"fitness": {"calibration": "missing.json"}}, "fitness.calibration"),
    ({"search_space": "ps_no_such_preset"}, "search_space"),
    ({"search_space": {"preset": "ps_task_arithmetic", "ps": {"layer_groups": 0}}}, "layer_groups"),
    ({"search_space": {"preset": "ps_task_arithmetic", "ps": {"layer_groups": 9}}},
     "search_space: layer_groups 9 is more than the 4 layers: lower it"),  # the reason, not "decodes the same"
    ({"objectives": [{"task": "t_add"}], "algorithm": {"name": "ga", "pop_size": 1}}, "algorithm.pop_size"),
    # names checked against their registries, with did-you-mean (a typo once ended in a KeyError traceback)
    ({"fitness": {"calibration": "calibration.json", "task_paths": ["tasks"], "estimator": "gpirtt"}},
     "fitness.estimator': unknown estimator 'gpirtt': did you mean 'gpirt'"),
    ({"algorithm": {"name": "nsga22"}}, "algorithm.name': unknown algorithm 'nsga22': did you mean 'nsga2'"),
    # checks against the files the config names (evomerge.search.preflight)
    ({"objectives": [{"task": "t_add"}, {"task": "t_never_calibrated"}]}, "objectives: task 't_never_calibrated'"),
    ({"objectives": [{"task": "t_add"}, {"task": "t_mroe"}]},
     "(its tasks: t_add, t_more): did you mean 't_more'? calibrate it"),
    ({"fitness": {"calibration": "calibration.json", "tasks": ["t_add", "t_nope"], "task_paths": ["tasks"]},
      "objectives": [{"task": "t_add"}]}, "fitness.tasks: task 't_nope'"),
    ({"fitness": {"calibration": "run.yaml"}}, "fitness.calibration"),
    # the calibration's anchors and IRT hold for what it scored (recorded in it): a run cannot score another metric
    ({"fitness": {"calibration": "calibration.json", "task_paths": ["tasks"],
                  "tasks": [{"task": "t_add", "metric": "acc_norm"}, "t_more"]}},
     "fitness.tasks: task 't_add': metric 'acc_norm' is not what the calibration scored ('acc')"),
    ({"fitness": {"calibration": "calibration.json", "task_paths": ["tasks", "taks"]}},  # once failed in generation 0
     "fitness.task_paths[1]: WS/taks is not a folder"),
    ({"sources": {"models": {"a": "models/source_0", "b": "models/wide"}, "base_model": "models/base"}},
     "sources.models.b: hidden size 48"),
    ({"sources": {"models": {"a": "models/source_0", "b": "models/fat"}, "base_model": "models/base"}},
     "sources.models.b: tensor model.layers.0.mlp"),
    ({"sources": {"models": {"a": "models/source_0", "b": "models/pickled"}, "base_model": "models/base"}},
     "holds only pickled weights (pytorch_model.bin), which a search never loads"),
    # a poisoned source once made every candidate that mixed it in fail, one by one: now named before the run
    ({"sources": {"models": {"a": "models/source_0", "b": "models/poisoned"}, "base_model": "models/base"}},
     ("sources.models.b: WS/models/poisoned/model.safetensors: tensor model.layers.2.self_attn.v_proj.weight holds "
      "3 NaN/inf values: fix or replace that model, or set sources.allow_nonfinite: true")),
    ({"search_space": {"preset": "ps_task_arithmetic", "ps": {"weight": [0.5, 0.5], "params": {"lambda": [1, 1]}}}},
     "search_space: every genome decodes to the same recipe"),
])
def test_bad_search_configs_leave_no_run_directory(workspace, capsys, change, message):
    config = {**yaml.safe_load((workspace / "run.yaml").read_text()), **change}
    path = workspace / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = workspace / "runs" / "bad"
    assert main(["search", str(path), "--run-dir", str(run_dir)]) == 2
    message = message.replace("WS/", f"{workspace}/")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and message in lines[0], lines
    assert not run_dir.exists()
    # into an existing run directory: the same one-line error, and the directory untouched
    existing = workspace / "runs" / "existing"
    existing.mkdir(parents=True, exist_ok=True)
    (existing / "ledger.sqlite").write_bytes(b"finished work")
    assert main(["search", str(path), "--run-dir", str(existing)]) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["ledger.sqlite"]
    assert (existing / "ledger.sqlite").read_bytes() == b"finished work"


def test_allow_nonfinite_lets_a_poisoned_source_through_the_checks(workspace):
    from evomerge.config import RunConfig, load_config
    from evomerge.search.session import prepare

    doc = yaml.safe_load((workspace / "run.yaml").read_text())
    doc["sources"]["models"]["b"] = "models/poisoned"
    path = workspace / "poisoned.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="holds 3 NaN/inf values"):
        prepare(load_config(path, RunConfig), workspace, str(path), scan_weights=True)
    prepare(load_config(path, RunConfig), workspace, str(path))  # reopening a run (status, export) reads no weights
    doc["sources"]["allow_nonfinite"] = True
    path.write_text(yaml.safe_dump(doc))
    prepared = prepare(load_config(path, RunConfig), workspace, str(path), scan_weights=True)
    assert prepared.config.sources.allow_nonfinite and prepared.layer_counts["b"] == 4


def test_a_search_whose_every_candidate_fails_exits_1_naming_the_first_reason(workspace, capsys):
    """Every merge with a NaN source fails; the search still runs to its budget and keeps every record, but it
    exits 1 with the first failure's reason instead of reporting success."""
    from evomerge.cli import main

    doc = yaml.safe_load((workspace / "run.yaml").read_text())
    doc["sources"]["models"]["b"] = "models/poisoned"
    doc["sources"]["allow_nonfinite"] = True
    doc["algorithm"] = {**doc.get("algorithm", {}), "pop_size": 4, "generations": 1}
    path = workspace / "all_fail.yaml"
    path.write_text(yaml.safe_dump(doc))
    run_dir = workspace / "runs" / "all_fail"
    assert main(["search", str(path), "--run-dir", str(run_dir), "--in-process"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("evomerge: every candidate failed (4 of 4); the first: ") and "NaN" in err[-1], err[-3:]
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        assert db.execute("SELECT status, count(*) FROM evaluations GROUP BY status").fetchall() == [("failed", 4)]


def test_a_run_may_state_the_scoring_its_calibration_recorded(workspace):
    from evomerge.config import RunConfig, load_config
    from evomerge.search.session import prepare

    doc = yaml.safe_load((workspace / "run.yaml").read_text())
    doc["fitness"]["tasks"] = [{"task": "t_add", "metric": "acc", "filter": "none"}, "t_more"]
    path = workspace / "stated.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = prepare(load_config(path, RunConfig), workspace, str(path)).config
    assert config.fitness.stated_scoring() == {"t_add": {"metric": "acc", "filter": "none"}, "t_more": {}}
    assert config.model_dump(mode="json")["fitness"]["tasks"] == [  # the snapshot keeps names as names
        {"task": "t_add", "metric": "acc", "filter": "none"}, "t_more"]


@pytest.mark.slow
def test_cli_search_runs_on_local_ray_workers(workspace):
    """The default: a private Ray on loopback with several workers; results equal the in-process run's."""
    config = {**yaml.safe_load((workspace / "run.yaml").read_text()), "workers": {"count": 2}}
    (workspace / "ray.yaml").write_text(yaml.safe_dump(config))
    ray_dir, local_dir = workspace / "runs" / "ray", workspace / "runs" / "local"
    done = subprocess.run([sys.executable, "-m", "evomerge", "search", str(workspace / "ray.yaml"),
                           "--run-dir", str(ray_dir)], capture_output=True, text=True, cwd=workspace)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["search", str(workspace / "ray.yaml"), "--run-dir", str(local_dir), "--in-process"]) == 0
    assert _front(ray_dir)["front"] == _front(local_dir)["front"]
    with sqlite3.connect(ray_dir / "ledger.sqlite") as db:
        workers = {w for (w,) in db.execute("SELECT DISTINCT worker FROM evaluations")}
    assert workers == {"worker-0", "worker-1"}


@pytest.mark.slow
def test_nan_candidates_are_recorded_as_failed_and_the_ray_search_goes_on(workspace):
    """A data-flow search over a source whose weights hold NaN/inf, let through with sources.allow_nonfinite (it
    is refused by default): every path through that layer fails (and is ledgered as failed, with the reason), the
    others are scored, and the search runs to its budget."""
    config = {**yaml.safe_load((workspace / "run.yaml").read_text()),
              "sources": {"models": {"a": "models/source_0", "p": "models/poisoned"}, "allow_nonfinite": True},
              "search_space": {"preset": "dfs_paths"}, "algorithm": {"pop_size": 6, "generations": 2},
              "workers": {"count": 2, "cpus_per_worker": 1}}
    (workspace / "nan.yaml").write_text(yaml.safe_dump(config))
    run_dir = workspace / "runs" / "nan"
    done = subprocess.run([sys.executable, "-m", "evomerge", "search", str(workspace / "nan.yaml"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, cwd=workspace)
    assert done.returncode == 0, done.stderr[-2000:]
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = db.execute("SELECT key, status, error, recipe FROM evaluations").fetchall()
    failed = [r for r in rows if r[1] == "failed"]
    ok = {r[0] for r in rows if r[1] == "ok"}
    assert failed and ok and len(rows) == 12
    assert all("NaN" in error and "poisoned" in recipe for _, _, error, recipe in failed), failed[0]
    state = _front(run_dir)
    assert state["generation"] == 2 and state["evaluations"] == {"done": 12, "failed": len(failed)}
    assert state["front"] and {f["id"] for f in state["front"]} <= ok


def test_status_front_keeps_only_paths_within_the_limit(tmp_path):
    from evomerge.config import RunConfig
    from evomerge.search.ledger import Record, candidate_key
    from evomerge.search.rundir import RunDir
    from evomerge.search.session import Prepared, status

    config = RunConfig.model_validate({
        "name": "t", "sources": {"models": {"a": "x"}}, "search_space": "dfs_paths", "fitness": {"calibration": "c"},
        "objectives": [{"task": "t1"}, {"task": "t2"}], "max_path_length": 6})
    run = RunDir.create(tmp_path / "run", "name: t\n")
    rows = [([0.1], -0.9, -0.1, 8), ([0.2], -0.5, -0.5, 6), ([0.3], -0.4, -0.4, 4)]  # (genome, -acc1, -acc2, length)
    with run.open_ledger() as ledger:
        for i, (genome, f1, f2, length) in enumerate(rows):
            ledger.record(Record(key=candidate_key(0, i, genome), generation=0, index=i, genome=tuple(genome),
                                 status="ok", objectives={"t1": f1, "t2": f2}, extra={"path_length": length}))
    front = status(run, Prepared(config, tmp_path, None, {}))["front"]
    # without the limit the 8-layer path (t1 0.9) would be on the front too; it is infeasible, so it is not
    assert [f["objectives"] for f in front] == [{"t1": 0.5, "t2": 0.5}]


class _Payload:
    """Unpickling this creates the file it names: proof that someone unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
def test_a_planted_pickle_in_a_run_directory_is_never_unpickled(workspace, tmp_path, capsys):
    """A run directory may come from someone else: status, resume and export read only JSON and SQLite (resume
    replays the seeded search against the ledger), so a pickle planted where v1 kept its checkpoint never runs."""
    import pickle

    run_dir = tmp_path / "foreign"
    assert main(["search", str(workspace / "run.yaml"), "--run-dir", str(run_dir), "--in-process"]) == 0
    before = _front(run_dir)
    marker = tmp_path / "pwned"
    for name in ("algorithm.pkl", "checkpoint.pkl", "front.pkl"):
        (run_dir / name).write_bytes(pickle.dumps(_Payload(str(marker))) * 2)
    assert main(["status", str(run_dir), "--json"]) == 0
    assert main(["resume", str(run_dir), "--in-process"]) == 0
    # finished: resume prints the front and starts no workers (a pool on a device that is not here would fail)
    assert main(["resume", str(run_dir), "--in-process", "--device", "cuda:7"]) == 0
    first = before["front"][0]["id"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out"), "--ids", first]) == 0
    assert not marker.exists()
    assert _front(run_dir) == before  # resumed from the ledger alone: nothing changed


@pytest.mark.slow
def test_resume_refuses_an_edited_config_snapshot_and_changes_nothing(workspace, tmp_path, capsys):
    """A run's genomes, seeds and ledger mean something only under the config it started with: an edited
    snapshot (once recorded 148 evaluations as failed, or silently ran nothing) is a one-line error naming it."""
    import shutil

    finished = tmp_path / "finished"
    assert main(["search", str(workspace / "run.yaml"), "--run-dir", str(finished), "--in-process"]) == 0
    edits = {
        "layer_groups": lambda text: text.replace("layer_groups: 2", "layer_groups: 4"),
        "generations": lambda text: text.replace("generations: 3", "generations: 5"),
        "seed": lambda text: text.replace("\nseed: 7", "\nseed: 8"),
        "not yaml": lambda text: text + "\n  - [unclosed\n",
    }
    capsys.readouterr()
    for name, edit in edits.items():
        run_dir = tmp_path / name
        shutil.copytree(finished, run_dir)
        config = run_dir / "config.yaml"
        edited = edit(config.read_text())
        assert edited != config.read_text(), name
        config.write_text(edited)
        ledger = (run_dir / "ledger.sqlite").read_bytes()
        for command in (["resume", str(run_dir), "--in-process"], ["status", str(run_dir)]):
            assert main(command) == 2, (name, command)
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and str(config) in lines[0] and "edited after the run was created" in lines[0], lines
            assert f"evomerge search {config} --run-dir" in lines[0]  # how to start a new run from it
        assert (run_dir / "ledger.sqlite").read_bytes() == ledger
