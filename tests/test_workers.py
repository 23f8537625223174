"""The Ray worker pool end to end: real Ray (local, loopback), 2 CPU workers, real tiny models, tasks, calibration."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest
import yaml

from evomerge.search import pool as ray_pool  # before Ray itself: it sets Ray's auth mode at import
from evomerge.search.session import create_run, drive, status
from evomerge.testing.workspace import make_search_workspace
from evomerge.worker.evaluator import Evaluator
from evomerge.worker.local_pool import LocalPool

ray = ray_pool.ray

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny models, two tiny tasks, a calibration, a PS and a DFS run config (2 Ray workers of 1 CPU)."""
    root = make_search_workspace(tmp_path_factory.mktemp("workers"),
                                 workers={"count": 2, "cpus_per_worker": 1, "max_retries": 2})
    config = yaml.safe_load((root / "run.yaml").read_text())
    dfs = {**config, "search_space": {"preset": "dfs_paths"},
           "objectives": [{"task": "t_add"}, {"task": "t_more"}, {"cost": "path_length"}]}
    (root / "dfs.yaml").write_text(yaml.safe_dump(dfs))
    return root


@pytest.fixture(scope="module")
def reference(workspace):
    """The same PS search through the in-process pool: what Ray must reproduce."""
    run, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "local")
    drive(run, prepared, LocalPool(prepared))
    return status(run, prepared), _ledger(run.path)


@pytest.fixture(scope="module")
def pool(workspace):
    """One Ray pool for the module (Ray start-up and source loading cost seconds). Its actors evaluate any
    recipe over these sources and tasks, so the DFS run uses it too."""
    from evomerge.search.pool import RayPool

    _, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "pool-probe")
    with RayPool(prepared, Evaluator) as p:
        yield p
    assert not ray.is_initialized()  # the pool started Ray, so it shut it down


def _ledger(run_dir):
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = db.execute("SELECT key, status, worker, node, error FROM evaluations ORDER BY key").fetchall()
    return [dict(zip(("key", "status", "worker", "node", "error"), r)) for r in rows]


def test_ray_search_gives_the_local_front(workspace, reference, pool):
    assert pool.count == 2 and {i["worker"] for i in pool.info} == {"worker-0", "worker-1"}
    assert all(i["node"].startswith("127.0.0.1/") and i["device"] == "cpu" for i in pool.info), pool.info
    run, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "ray")
    drive(run, prepared, pool)
    state, local_rows = reference
    assert status(run, prepared) == state  # same generation, evaluations and front
    rows = _ledger(run.path)
    assert [r["key"] for r in rows] == [r["key"] for r in local_rows]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["worker"] for r in rows} == {"worker-0", "worker-1"}
    assert all(r["node"].startswith("127.0.0.1/") for r in rows)


def test_a_killed_worker_is_replaced_and_its_candidate_retried(workspace, reference, pool):
    run, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "killed")
    victims = []

    def kill_once(rec):  # generation 1, after its first result: the other worker is mid-candidate
        if rec.generation == 1 and not victims:
            for actor in pool.actors:
                info = ray.get(actor.info.remote())
                if info["worker"] != rec.worker:
                    os.kill(info["pid"], signal.SIGKILL)
                    victims.append(info["pid"])

    before = pool.replacements
    drive(run, prepared, pool, on_result=kill_once)
    assert victims and pool.replacements == before + 1
    state, local_rows = reference
    assert status(run, prepared) == state
    rows = _ledger(run.path)
    assert [r["key"] for r in rows] == [r["key"] for r in local_rows]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    pids = {ray.get(a.info.remote())["pid"] for a in pool.actors}
    assert len(pids) == 2 and not pids & set(victims)  # the dead actor was replaced


def test_a_candidate_that_keeps_killing_workers_fails_after_max_retries(workspace, pool):
    from evomerge.search.candidates import Candidate

    _, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "doomed")
    cand = Candidate("doomed", 0, 0, [0.5] * prepared.space.dim(prepared.layer_counts),
                     prepared.decode([0.5] * prepared.space.dim(prepared.layer_counts)), 1)
    saved = pool.timeout_s
    pool.timeout_s = 0.0  # every attempt "hangs": its actor is killed and replaced
    try:
        (result,) = list(pool.evaluate([cand]))
    finally:
        pool.timeout_s = saved
    assert result.status == "failed" and result.error.startswith("worker died 3 times: timed out")
    assert pool.count == len(pool.actors) == 2
    (ok,) = list(pool.evaluate([cand]))  # the replacements work
    assert ok.status == "ok"
    pool.wait_ready()  # both replacements serve the next test
    assert len(pool.info) == 2 and all(i["pid"] for i in pool.info)


def test_a_dfs_search_runs_on_ray(workspace, pool):
    run, prepared = create_run(workspace / "dfs.yaml", workspace / "runs" / "dfs")
    drive(run, prepared, pool)
    state = status(run, prepared)
    rows = _ledger(run.path)
    assert state["generation"] == 3 and state["front"]
    assert state["evaluations"]["done"] == len(rows) and all(r["status"] == "ok" for r in rows)
    assert {r["worker"] for r in rows} == {"worker-0", "worker-1"}
    assert any(f["objectives"]["cost:path_length"] > 0 for f in state["front"])


def test_a_second_pool_without_free_cpus_fails_at_once(workspace, pool):
    """While a pool's workers hold this machine's CPUs, another pool in the process would wait for them for
    start_timeout_s (Ray only queues it): it says so in one line instead."""
    import time

    from evomerge.search.pool import RayPool, WorkerStartError

    config = yaml.safe_load((workspace / "run.yaml").read_text())
    config["workers"]["count"] = int(ray.cluster_resources()["CPU"])  # more than is free beside `pool`
    (workspace / "greedy.yaml").write_text(yaml.safe_dump(config))
    _, prepared = create_run(workspace / "greedy.yaml", workspace / "runs" / "greedy")
    start = time.monotonic()
    with pytest.raises(WorkerStartError, match="are free .*close that pool first, or lower workers.count"):
        RayPool(prepared, Evaluator)
    assert time.monotonic() - start < 60
    assert ray.is_initialized()  # the first pool's Ray (and workers) are untouched
