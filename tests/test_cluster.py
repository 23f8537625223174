"""A search on a two-node Ray cluster on this machine (loopback only), through the Jobs API: both nodes evaluate,
the second node is lost mid-search and nothing is lost; a stopped job is resumed; the jobs CLI end to end.

The cluster is Ray's own `ray.cluster_utils.Cluster`: a head (1 CPU, dashboard and job server) and worker nodes
(1 CPU each), separate raylets with separate object stores, in a private temp dir. Each node has its own
EVOMERGE_SOURCE_CACHE, so `workers.sources: object_store` shows a copy of the sources arriving on each node."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from evomerge.search import pool as ray_pool  # before Ray itself: it sets Ray's auth mode at import
from evomerge.testing.workspace import make_search_workspace

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DOCKER = Path(__file__).resolve().parent.parent / "docker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evomerge(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"evomerge {' '.join(args)}: {done.stderr}"
    return done


class LoopbackCluster:
    def __init__(self, root: Path) -> None:
        from ray.cluster_utils import Cluster

        self.root = root
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            **self._node_args("head"), "gcs_server_port": _free_port(), "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": int(self.dashboard.rsplit(":", 1)[1]),
            "dashboard_agent_listen_port": _free_port()})
        try:
            deadline = time.time() + 120
            while evomerge("jobs", "list", "--address", self.dashboard, check=False).returncode != 0:
                assert time.time() < deadline, "the job server did not come up"
                time.sleep(1)
        except BaseException:
            self.cluster.shutdown()
            raise

    def _node_args(self, name: str) -> dict:
        # the node's raylet, hence its workers, get their own cache of shipped sources
        return {"num_cpus": 1, "node_ip_address": "127.0.0.1",
                "env_vars": {"EVOMERGE_SOURCE_CACHE": str(self.root / f"cache-{name}")}}

    def add_node(self, name: str):
        return self.cluster.add_node(**self._node_args(name))

    def job(self, job_id: str) -> dict:
        return json.loads(evomerge("jobs", "status", job_id, "--address", self.dashboard, "--json").stdout)

    def logs(self, job_id: str) -> str:
        return evomerge("jobs", "logs", job_id, "--address", self.dashboard).stdout


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="evr", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    saved = dict(os.environ)
    os.environ.update({"RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"})  # nothing in /tmp/ray
    ray_pool._loopback_only()  # every node (and the job's driver) on 127.0.0.1, even a second one
    c = None
    try:
        c = LoopbackCluster(root)
        yield c
    finally:
        if c is not None:
            c.cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)


def _workspace(root: Path, generations: int, **workers_config) -> Path:
    """The tiny workspace, with candidates made slower (lm-eval batch size 1) so that a stop or a lost node
    lands mid-search."""
    fitness = {"calibration": "calibration.json", "task_paths": ["tasks"], "estimator": "pirt", "batch_size": 1}
    return make_search_workspace(root, algorithm={"pop_size": 4, "generations": generations}, fitness=fitness,
                                 workers={"cpus_per_worker": 1, **workers_config})


def _rows(run_dir: Path) -> list[dict]:
    if not (run_dir / "ledger.sqlite").exists():
        return []
    with sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key, generation, status, worker, node, finished, error FROM evaluations "
                          "ORDER BY generation, idx").fetchall()
    return [dict(zip(("key", "generation", "status", "worker", "node", "finished", "error"), r)) for r in rows]


def _poll(run_dir: Path, until, job_id: str, cluster: LoopbackCluster, timeout: float = 240) -> list[dict]:
    """The ledger's rows once `until(rows)` holds (the job must still be running meanwhile)."""
    deadline, checked = time.time() + timeout, time.time()
    while not until(rows := _rows(run_dir)):
        assert time.time() < deadline, (rows, cluster.logs(job_id)[-3000:])
        if time.time() > checked + 5:  # a CLI call costs a second or two: now and then
            assert cluster.job(job_id)["status"] not in TERMINAL, (rows, cluster.logs(job_id)[-3000:])
            checked = time.time()
        time.sleep(0.2)
    return rows


@pytest.mark.slow
def test_a_search_spans_two_nodes_and_survives_losing_one(cluster, tmp_path):
    pop, gens = 4, 12
    root = _workspace(tmp_path, gens, count=2, sources="object_store")
    second = cluster.add_node("second")
    run_dir = tmp_path / "runs" / "two-nodes"
    job_id = evomerge("submit", str(root / "run.yaml"), "--address", cluster.dashboard, "--run-dir",
                      str(run_dir)).stdout.split()[-1]
    follow = subprocess.Popen([sys.executable, "-m", "evomerge", "jobs", "logs", job_id, "--address",
                               cluster.dashboard, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        # both nodes at work, in generation 2 or later
        rows = _poll(run_dir, lambda rows: len({r["node"] for r in rows}) == 2 and len(rows) >= 2 * pop,
                     job_id, cluster)
        assert len(rows) < pop * gens, "the search ended before the node could be lost: make it longer"
        cluster.cluster.remove_node(second, allow_graceful=False)  # the node is gone: raylet, store, its worker
        lost_at = time.time()
        followed, errors = follow.communicate(timeout=300)  # --follow returns when the job ends
    finally:
        follow.kill()
    (tmp_path / "job.log").write_text(followed)  # kept with pytest's temporary directories, for a failure's story
    info = cluster.job(job_id)
    assert follow.returncode == 0 and info["status"] == "SUCCEEDED", (errors, followed[-3000:])
    assert info["run_dir"] == str(run_dir)
    assert f"generation {gens - 1}:" in followed and "Pareto front" in followed  # the whole log, as it came
    rows = _rows(run_dir)
    assert [sum(r["generation"] == g for r in rows) for g in range(gens)] == [pop] * gens  # nothing lost
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 2 and all(n.startswith("127.0.0.1/") for n in nodes)
    lost = second.node_id[:12]
    assert any(r["node"].endswith(lost) and r["finished"] < lost_at for r in rows)
    assert not any(r["node"].endswith(lost) for r in rows if r["finished"] > lost_at + 1)  # then the head alone
    # the sources went through the object store: each node has its own cached copy
    for name in ("head", "second"):
        cached = [p for p in (cluster.root / f"cache-{name}").iterdir() if p.is_dir()]
        assert len(cached) == 5, (name, cached)  # base, 2 sources, the calibration, the tasks folder


@pytest.mark.slow
def test_a_stopped_job_is_resumed_on_the_cluster_and_here_without_evaluating_twice(cluster, tmp_path):
    # generations enough that each stop lands mid-search: a stop takes seconds to reach the job, and at 16 the
    # resumed job once finished all 64 candidates before its stop did
    pop, gens = 4, 32
    root = _workspace(tmp_path, gens, count=1)
    run_dir = tmp_path / "runs" / "stopped"
    job_id = evomerge("submit", str(root / "run.yaml"), "--address", cluster.dashboard, "--run-dir",
                      str(run_dir)).stdout.split()[-1]
    busy = evomerge("jobs", "resume", job_id, "--address", cluster.dashboard, check=False)
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and "stop it first" in busy.stderr
    _poll(run_dir, lambda rows: len(rows) > pop, job_id, cluster)  # in generation 1
    stop = evomerge("jobs", "stop", job_id, "--address", cluster.dashboard)
    assert f"job {job_id}: STOPPED" in stop.stdout
    assert f"run directory: {run_dir}" in stop.stdout and f"evomerge resume {run_dir}" in stop.stdout
    first = {r["key"]: r for r in _rows(run_dir)}
    assert pop < len(first) < pop * gens

    # resumed as a new job on the cluster, stopped again
    resumed = evomerge("jobs", "resume", job_id, "--address", cluster.dashboard).stdout.split()[-1]
    assert resumed != job_id
    _poll(run_dir, lambda rows: len(rows) >= len(first) + 2 * pop, resumed, cluster)
    assert evomerge("jobs", "stop", resumed, "--address", cluster.dashboard).stdout.startswith(
        f"job {resumed}: STOPPED")
    second = {r["key"]: r for r in _rows(run_dir)}
    assert len(first) < len(second) < pop * gens
    assert all(second[k] == r for k, r in first.items())  # the ledgered candidates were not evaluated again

    # and finished here, where the run directory is (a private Ray: not the cluster this machine also runs)
    done = evomerge("resume", str(run_dir), timeout=300)
    assert "Pareto front" in done.stdout
    last = {r["key"]: r for r in _rows(run_dir)}
    assert len(last) == pop * gens and all(r["status"] == "ok" for r in last.values())
    assert all(last[k] == r for k, r in second.items())
    here = {r["node"] for k, r in last.items() if k not in second}
    assert here and here.isdisjoint(r["node"] for r in second.values())  # its own Ray, not the cluster's head

    listed = {j["id"]: j for j in json.loads(evomerge("jobs", "list", "--address", cluster.dashboard,
                                                      "--json").stdout)}
    assert listed[job_id]["status"] == listed[resumed]["status"] == "STOPPED"
    assert (listed[job_id]["command"], listed[resumed]["command"]) == ("search", "resume")
    assert listed[job_id]["run_dir"] == listed[resumed]["run_dir"] == str(run_dir)
    table = evomerge("jobs", "list", "--address", cluster.dashboard).stdout
    assert job_id in table and resumed in table
    assert "Pareto front" not in evomerge("jobs", "logs", resumed, "--address", cluster.dashboard).stdout
    unknown = evomerge("jobs", "status", "raysubmit_nosuchjob", "--address", cluster.dashboard, check=False)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "no such job" in unknown.stderr


@pytest.mark.parametrize("args", [["list"], ["status", "raysubmit_x"], ["logs", "raysubmit_x"],
                                  ["logs", "raysubmit_x", "--follow"], ["stop", "raysubmit_x"],
                                  ["resume", "raysubmit_x"]])
def test_jobs_against_an_unreachable_address_fail_in_one_line(args):
    done = evomerge("jobs", *args, "--address", f"http://127.0.0.1:{_free_port()}", check=False)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("evomerge: error: --address http://127.0.0.1:") and "cannot reach" in done.stderr


def test_jobs_without_an_address_is_a_usage_error():
    done = evomerge("jobs", "stop", "raysubmit_x", check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--address" in done.stderr


# -- the deployment files (no Docker, Kubernetes or remote machines here: their schemas and commands) --------
def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks first: the launcher's schema, unknown keys refused
    assert config["docker"]["image"] and any("--gpus" in o for o in config["docker"]["run_options"])


def test_the_rayjob_runs_commands_that_evomerge_accepts():
    from evomerge.cli.parser import build_parser as _parser

    job, *claims = yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = job["spec"]["entrypoint"]
    commands = re.findall(r"evomerge ([^;]+)", entrypoint)
    assert [c.split()[0] for c in commands] == ["resume", "search"]
    for c in commands:
        args = _parser().parse_args(shlex.split(c))  # a usage error would exit
        assert args.address == "auto"
    run_dir = job["spec"]["metadata"]["evomerge.run_dir"]
    assert f"--run-dir {run_dir}" in entrypoint and f"resume {run_dir}" in entrypoint
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"] if "persistentVolumeClaim" in v} \
        == {c["metadata"]["name"] for c in claims}


def test_the_image_copies_what_exists_and_its_context_lets_it_through():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    sources = [src for line in dockerfile.splitlines() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    allowed = [line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sources and all((DOCKER.parent / s).exists() for s in sources), sources
    assert all(any(s.rstrip("/") == a or s.startswith(a + "/") for a in allowed) for s in sources), sources
