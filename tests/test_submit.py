"""`evomerge submit` against a real `ray start --head` cluster on loopback (Ray Jobs API)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.testing.workspace import make_search_workspace

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = _free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, check=False, capture_output=True)


def _job_status(head: str, job_id: str) -> str:
    # a fresh process: Ray reads its auth mode at import time (the cluster uses token auth)
    out = subprocess.run([sys.executable, "-c", "import sys; from evomerge.search import jobs; "
                          "from ray.job_submission import JobSubmissionClient as C; "
                          "c = C(sys.argv[1]); print(c.get_job_status(sys.argv[2]).value); "
                          "print(c.get_job_logs(sys.argv[2])[-1500:], file=sys.stderr)", head, job_id],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() + "\n" + out.stderr


def test_submit_runs_the_search_as_a_ray_job(head, tmp_path):
    root = make_search_workspace(tmp_path, workers={"count": 2})
    done = subprocess.run([sys.executable, "-m", "evomerge", "submit", str(root / "run.yaml"), "--address", head,
                           "--run-dir", str(root / "runs" / "job")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    deadline = time.time() + 300
    while (state := _job_status(head, job_id)).split("\n")[0] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, state
        time.sleep(2)
    assert state.startswith("SUCCEEDED"), state
    status = subprocess.run([sys.executable, "-m", "evomerge", "status", str(root / "runs" / "job"), "--json"],
                            capture_output=True, text=True, check=True)
    assert '"done": 12' in status.stdout


def test_submit_to_an_unreachable_cluster_is_one_line(tmp_path):
    root = make_search_workspace(tmp_path)
    done = subprocess.run([sys.executable, "-m", "evomerge", "submit", str(root / "run.yaml"), "--address",
                           f"http://127.0.0.1:{_free_port()}"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot reach" in done.stderr
