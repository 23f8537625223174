"""Run directory, evaluation ledger and resume by replay: real SQLite, real pymoo, real SIGKILLs."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.search import (
    Ledger,
    LedgerError,
    Record,
    RunDir,
    RunDirError,
    RunDirLockedError,
    candidate_key,
    pareto_front,
)
from evomerge.search.ledger import collapse_ties
from evomerge.search import rundir as rundir_module

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
    )


def _ok(gen: int, idx: int, genome, **kw) -> Record:
    return Record(key=candidate_key(gen, idx, genome), generation=gen, index=idx, genome=tuple(genome), status="ok", **kw)


# ---- ledger --------------------------------------------------------------------------------------


def test_record_get_round_trip_is_exact(tmp_path):
    genome = [0.1, 1 / 3, 5e-324, 1 - 2**-53, float(np.float64(0.7) * 3), 0.0, 1.0, float(np.nextafter(0.5, 1))]
    rec = _ok(
        3, 7, genome, seed=2**63 - 1,
        recipe={"method": "ties", "weights": [[0.25, 0.75]], "density": 0.5},
        responses={"arith": {"12": 1, "40": 0}, "copy": {"a": 1}},
        estimates={"arith": 0.61, "copy": 0.99},
        objectives={"arith": 0.61, "copy": 0.99, "size": math.inf},
        worker="w1", node="node-a", timings={"materialize": 0.12, "score": 1.5, "total": 1.7},
        extra={"note": "x"},
    )
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        stored = ledger.record(rec)
    with Ledger.open(tmp_path / "l.sqlite", create=False) as ledger:
        got = ledger.get(rec.key)
        assert ledger.get("g0000-0000-000000000000") is None
    assert got == stored
    assert got.genome == tuple(genome)  # bit-exact floats
    assert all(struct_eq(a, b) for a, b in zip(got.genome, genome))
    assert got.objectives["size"] == math.inf and got.seed == 2**63 - 1
    assert got.created is not None and got.finished is not None and got.is_finished


def struct_eq(a: float, b: float) -> bool:
    return np.float64(a).tobytes() == np.float64(b).tobytes()


def test_candidate_key_is_deterministic_and_exact():
    g = np.random.default_rng(0).random(12)
    assert candidate_key(2, 5, g) == candidate_key(2, 5, list(map(float, g)))
    assert candidate_key(2, 5, g).startswith("g0002-0005-")
    g2 = g.copy()
    g2[3] = np.nextafter(g2[3], 2.0)  # one ulp
    assert candidate_key(2, 5, g) != candidate_key(2, 5, g2)
    assert candidate_key(2, 5, g) != candidate_key(2, 6, g)


def test_append_only_and_running_rows(tmp_path):
    g = [0.2, 0.4]
    key = candidate_key(0, 0, g)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        running = ledger.record(Record(key=key, generation=0, index=0, genome=tuple(g), status="running", worker="w0"))
        assert running.finished is None and not running.is_finished
        assert ledger.done(0) == {}
        done = ledger.record(_ok(0, 0, g, objectives={"a": 0.5}, worker="w1"))
        assert done.created == running.created and done.finished is not None
        with pytest.raises(LedgerError, match="append-only"):
            ledger.record(_ok(0, 0, g, objectives={"a": 0.9}))
        assert ledger.get(key).objectives == {"a": 0.5}
        with pytest.raises(LedgerError, match="does not match"):
            ledger.record(Record(key=key, generation=0, index=1, genome=tuple(g), status="ok"))
        with pytest.raises(LedgerError, match="status"):
            ledger.record(Record(key=key, generation=0, index=0, genome=tuple(g), status="done"))  # type: ignore[arg-type]


def test_queries_counts_and_front(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        assert ledger.last_generation() is None
        pts = {0: (0.9, 0.1), 1: (0.5, 0.5), 2: (0.4, 0.4), 3: (0.1, 0.9)}
        for i, (a, b) in pts.items():
            ledger.record(_ok(1, i, [i / 10], objectives={"a": a, "b": b}))
        failed = Record(key=candidate_key(1, 4, [0.9]), generation=1, index=4, genome=(0.9,), status="failed",
                        error="RecipeError: bad", objectives={"a": math.nan, "b": math.nan})
        ledger.record(failed)
        ledger.record(Record(key=candidate_key(2, 0, [0.3]), generation=2, index=0, genome=(0.3,), status="running"))
        ledger.set_meta("objectives", {"a": "max", "b": "max"})
        assert ledger.get_meta("objectives") == {"a": "max", "b": "max"}
        assert ledger.get_meta("schema_version") == 1
        assert ledger.counts() == {"running": 1, "ok": 4, "failed": 1}
        assert [r.index for r in ledger.done(1).values()] == [0, 1, 2, 3, 4]
        assert ledger.done(2) == {}
        assert [r.index for r in ledger.all("ok")] == [0, 1, 2, 3]
        assert len(ledger.all()) == 6 and ledger.last_generation() == 2
        assert [r.index for r in ledger.front({"a": "max", "b": "max"})] == [0, 1, 3]
        assert [r.index for r in ledger.front({"a": "min", "b": "min"})] == [0, 2, 3]
        with pytest.raises(ValueError, match="direction"):
            pareto_front([], {"a": "up"})  # type: ignore[dict-item]


def test_front_clones_collapse_to_their_earliest_candidate():
    """A 40-generation run once listed 47 front members with 2 distinct score pairs."""
    clones = [_ok(g, i, [g + i / 10], objectives={"a": 0.5, "b": 0.5}) for g, i in ((3, 1), (1, 2), (1, 0), (2, 0))]
    other = _ok(0, 3, [0.0], objectives={"a": 0.9, "b": 0.1})
    front = pareto_front([*clones, other], {"a": "max", "b": "max"})
    assert len(front) == 5
    groups = collapse_ties(front, ["a", "b"])
    assert [(rep.key, [r.key for r in others]) for rep, others in groups] == [
        (clones[2].key, [clones[1].key, clones[3].key, clones[0].key]), (other.key, [])]


def test_schema_version_and_not_a_ledger(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match=r"schema version 99, this evomerge reads version 1") as e:
        Ledger.open(path)
    assert "\n" not in str(e.value) and isinstance(e.value, EvomergeError)

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database\n" * 100)
    with pytest.raises(LedgerError, match="not a readable SQLite ledger"):
        Ledger.open(text)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not an evomerge ledger"):
        Ledger.open(other)
    with pytest.raises(LedgerError, match="no ledger here"):
        Ledger.open(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


WRITER = """
    import os, signal, sys
    from evomerge.search import Ledger, Record, candidate_key
    path, mode = sys.argv[1], sys.argv[2]

    class KillBeforeCommit:  # stands in for the connection: dies at the COMMIT of row 16
        def __init__(self, conn):
            self.conn, self.armed = conn, False
        def execute(self, sql, *args):
            if self.armed and sql == "COMMIT":
                os.kill(os.getpid(), signal.SIGKILL)
            return self.conn.execute(sql, *args)
        def __getattr__(self, name):
            return getattr(self.conn, name)

    with Ledger.open(path) as ledger:
        if mode == "commit":
            ledger._conn.execute("PRAGMA cache_size=2")  # spill the uncommitted row into the WAL before dying
            ledger._conn = KillBeforeCommit(ledger._conn)
        for i in range(10_000):
            if mode == "commit":
                ledger._conn.armed = i == 16
            genome = [i / 7, 1 / (i + 3)]
            # ~200 KB per row, so timed kills often land inside a write
            responses = {"t": {str(j): (i + j) % 2 for j in range(12000)}}
            ledger.record(Record(key=candidate_key(i // 10, i % 10, genome), generation=i // 10, index=i % 10,
                                 genome=tuple(genome), status="ok", responses=responses,
                                 objectives={"a": i / 3}, seed=i))
            print(i, flush=True)
"""


@pytest.mark.parametrize("mode", ["commit", "timer-0.0", "timer-0.003", "timer-0.008"])
def test_sigkill_mid_write_leaves_only_complete_rows(tmp_path, mode):
    import time

    path = tmp_path / "l.sqlite"
    proc = _spawn(WRITER, str(path), mode)
    committed = -1
    for line in proc.stdout:  # type: ignore[union-attr]
        committed = int(line)
        if committed >= 15:
            break
    if mode == "commit":
        proc.wait()  # it kills itself at the COMMIT of row 16, after its INSERT ran
    else:
        time.sleep(float(mode.split("-")[1]))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()  # type: ignore[union-attr]
    with Ledger.open(path, create=False) as ledger:
        rows = ledger.all()
        assert ledger.counts()["ok"] == len(rows)
    assert len(rows) >= committed + 1  # everything reported committed survived
    if mode == "commit":
        assert committed == 15 and len(rows) == 16
    for i, r in enumerate(rows):  # consecutive and complete
        assert (r.generation, r.index, r.seed) == (i // 10, i % 10, i)
        assert r.genome == (i / 7, 1 / (i + 3)) and r.objectives == {"a": i / 3}
        assert len(r.responses["t"]) == 12000 and r.responses["t"]["11999"] == (i + 11999) % 2


# ---- run directory -------------------------------------------------------------------------------

CONFIG_TEXT = "name: demo\nseed: 1\n# verbatim, comments kept\n"


def test_create_and_open(tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text('{"tasks": {}}')
    run = RunDir.create(tmp_path / "runs" / "a", CONFIG_TEXT, calib)
    assert sorted(p.name for p in run.path.iterdir()) == ["calibration.json", "config.yaml", "ledger.sqlite", "logs", "run.json"]
    assert run.config_text() == CONFIG_TEXT and run.calibration_path.read_text() == '{"tasks": {}}'
    assert run.info()["format"] == 1
    again = RunDir.open(run.path)
    with again.open_ledger() as ledger:
        assert ledger.counts() == {"running": 0, "ok": 0, "failed": 0}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a"]  # no temp siblings left
    # an existing empty directory is fine; calibration is optional
    (tmp_path / "empty").mkdir()
    assert RunDir.create(tmp_path / "empty", CONFIG_TEXT).calibration_path is None


def test_create_refuses_existing_dir_and_leaves_it_untouched(tmp_path):
    run = RunDir.create(tmp_path / "a", CONFIG_TEXT)
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match="already exists; resume it with `evomerge resume"):
        RunDir.create(tmp_path / "a", "name: other\n")
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="already exists"):
        RunDir.create(tmp_path / "afile", CONFIG_TEXT)
    with pytest.raises(RunDirError, match="calibration file not found"):
        RunDir.create(tmp_path / "b", CONFIG_TEXT, tmp_path / "nope.json")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fail_at", ["ledger", "rename"])
def test_failed_create_leaves_nothing(tmp_path, monkeypatch, fail_at):
    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    if fail_at == "ledger":
        monkeypatch.setattr(rundir_module.Ledger, "open", boom)
    else:
        monkeypatch.setattr(rundir_module.os, "rename", boom)
    (tmp_path / "keep").write_text("x")
    with pytest.raises(OSError, match="simulated"):
        RunDir.create(tmp_path / "new" / "deeper" / "run", CONFIG_TEXT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_open_errors(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        RunDir.open(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir.open(tmp_path / "f")
    with pytest.raises(RunDirError, match="not an evomerge run directory"):
        RunDir.open(tmp_path)
    run = RunDir.create(tmp_path / "r", CONFIG_TEXT)
    (run.path / "run.json").write_text(json.dumps({"format": 7, "evomerge": "9.9"}))
    with pytest.raises(RunDirError, match="format 7, this evomerge reads format 1; use evomerge 9.9"):
        RunDir.open(run.path)
    (run.path / "run.json").write_text("{broken")
    with pytest.raises(RunDirError, match="unreadable run marker"):
        RunDir.open(run.path)
    run2 = RunDir.create(tmp_path / "r2", CONFIG_TEXT)
    run2.ledger_path.unlink()
    with pytest.raises(RunDirError, match="missing ledger.sqlite"):
        RunDir.open(run2.path)


HOLDER = """
    import sys, time
    from evomerge.search import RunDir
    run = RunDir.open(sys.argv[1])
    run.acquire_lock()
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_excludes_second_driver_and_dies_with_its_holder(tmp_path):
    path = RunDir.create(tmp_path / "r", CONFIG_TEXT).path
    a, b = RunDir.open(path), RunDir.open(path)
    with a.locked(), pytest.raises(RunDirLockedError, match=rf"in use by another driver \(pid {os.getpid()}"):
        b.acquire_lock()
    with b.locked():  # released by a
        pass
    proc = _spawn(HOLDER, str(path))
    assert proc.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
    with pytest.raises(RunDirLockedError, match=f"pid {proc.pid}"):
        b.acquire_lock()
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the driver: the kernel drops its flock
    proc.wait()
    b.acquire_lock()
    b.release_lock()


# ---- algorithm checkpoint with real pymoo -----------------------------------------------------------


def _zdt1(X: np.ndarray) -> np.ndarray:
    # X: (pop, n_var) in [0, 1] -> F: (pop, 2), both minimised
    g = 1 + 9 * X[:, 1:].mean(axis=1)
    return np.stack([X[:, 0], g * (1 - np.sqrt(X[:, 0] / g))], axis=1)


def _nsga2(seed: int):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem

    algo = NSGA2(pop_size=12)
    algo.setup(Problem(n_var=6, n_obj=2, xl=0.0, xu=1.0), seed=seed, verbose=False)
    return algo


def _generations(algo, n: int):
    for _ in range(n):
        pop = algo.ask()
        pop.set("F", _zdt1(pop.get("X")))  # evaluated outside pymoo, as the driver does
        algo.tell(infills=pop)
    return algo


def test_replaying_recorded_generations_reproduces_the_front(tmp_path):
    """What resume relies on instead of a pickled optimizer: a fresh, equally seeded algorithm told the recorded
    objectives of the first generations asks exactly what the uninterrupted one asked, and ends on its front."""
    straight = _nsga2(seed=11)
    recorded = []
    for _ in range(5):
        pop = straight.ask()
        recorded.append((pop.get("X").copy(), _zdt1(pop.get("X"))))
        pop.set("F", recorded[-1][1])
        straight.tell(infills=pop)
    replayed = _nsga2(seed=11)
    for X, F in recorded[:2]:
        pop = replayed.ask()
        assert np.array_equal(pop.get("X"), X)  # the same genomes, bit for bit: their ledger keys match
        pop.set("F", F)  # from the ledger, not evaluated again
        replayed.tell(infills=pop)
    resumed = _generations(replayed, 3)
    assert np.array_equal(straight.opt.get("X"), resumed.opt.get("X"))
    assert np.array_equal(straight.opt.get("F"), resumed.opt.get("F"))


# ---- resume after kill -9 of a toy driver mid-generation -------------------------------------------

DRIVER = """
    import json, os, signal, sys
    import numpy as np
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from evomerge.search import Record, RunDir, candidate_key
    from evomerge.seeds import derive_seed

    run_dir, n_gen, crash_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    RUN_SEED = 1234
    run = RunDir.open(run_dir)
    with run.locked(), run.open_ledger() as ledger:
        # always a fresh algorithm: finished generations are replayed from the ledger (as session.drive does)
        gen = 0
        algo = NSGA2(pop_size=8)
        algo.setup(Problem(n_var=5, n_obj=2, xl=0.0, xu=1.0), seed=derive_seed(RUN_SEED, "nsga2", bits=32),
                   verbose=False)
        evaluated = 0
        while gen < n_gen:
            pop = algo.ask()
            F = []
            for i, x in enumerate(pop.get("X")):
                key = candidate_key(gen, i, x)
                rec = ledger.get(key)
                if rec is None or not rec.is_finished:
                    noise = np.random.default_rng(derive_seed(RUN_SEED, key)).normal(scale=1e-3)
                    g = 1 + 9 * float(np.mean(x[1:]))
                    acc_a = 1 - float(x[0]) + noise
                    acc_b = 1 - g * (1 - np.sqrt(float(x[0]) / g))
                    rec = ledger.record(Record(key=key, generation=gen, index=i, genome=tuple(map(float, x)),
                                               status="ok", seed=derive_seed(RUN_SEED, key),
                                               objectives={"a": acc_a, "b": float(acc_b)}, worker=str(os.getpid())))
                    evaluated += 1
                    if evaluated == crash_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                F.append([-rec.objectives["a"], -rec.objectives["b"]])  # pymoo minimises
            pop.set("F", np.array(F))
            algo.tell(infills=pop)
            gen += 1
        print(json.dumps({"X": algo.opt.get("X").tolist(), "F": algo.opt.get("F").tolist(), "evaluated": evaluated,
                          "front": [r.key for r in ledger.front({"a": "max", "b": "max"})]}))
"""


def _drive(run_dir: Path, n_gen: int, crash_after: int = 0) -> tuple[int, int, str]:
    proc = _spawn(DRIVER, str(run_dir), str(n_gen), str(crash_after))
    out, err = proc.communicate(timeout=120)
    return proc.returncode, proc.pid, out if proc.returncode == 0 else err


def test_resume_after_kill9_mid_generation_matches_uninterrupted(tmp_path):
    straight_dir = RunDir.create(tmp_path / "straight", CONFIG_TEXT).path
    rc, _, out = _drive(straight_dir, 5)
    assert rc == 0, out
    straight = json.loads(out)
    assert straight["evaluated"] == 40  # 5 generations x 8

    crashed_dir = RunDir.create(tmp_path / "crashed", CONFIG_TEXT).path
    rc, crashed_pid, err = _drive(crashed_dir, 5, crash_after=19)  # kill -9 inside generation 2 (0-based)
    assert rc == -signal.SIGKILL, err
    with Ledger.open(crashed_dir / "ledger.sqlite", create=False) as ledger:
        assert ledger.counts()["ok"] == 19
    assert not list(crashed_dir.glob("*.pkl"))  # nothing but the ledger to resume from

    rc, _, out = _drive(crashed_dir, 5)  # evomerge resume: replay + ledger
    assert rc == 0, out
    resumed = json.loads(out)
    assert resumed["evaluated"] == 40 - 19  # completed evaluations came from the ledger
    assert resumed["X"] == straight["X"] and resumed["F"] == straight["F"]  # exact, not approximately
    assert resumed["front"] == straight["front"]
    with Ledger.open(straight_dir / "ledger.sqlite") as a, Ledger.open(crashed_dir / "ledger.sqlite") as b:
        ra, rb = a.all(), b.all()
    assert [(r.key, r.objectives, r.seed) for r in ra] == [(r.key, r.objectives, r.seed) for r in rb]
    assert sum(r.worker == str(crashed_pid) for r in rb) == 19


def test_search_package_does_not_import_torch():
    code = "import sys, evomerge.search; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=REPO)
