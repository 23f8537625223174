"""Ray jobs: submit a search (or its resume) to a cluster's job server, list, inspect, follow and stop jobs.

Everything goes through the Ray Jobs SDK at the cluster's dashboard address; results are plain dicts and
strings for the CLI.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from evomerge.errors import EvomergeError, one_line
from evomerge.search.ray_env import ENV_PASSED, set_auth_mode

set_auth_mode()  # before Ray is first imported: its clients read the mode at import


class JobError(EvomergeError):
    """A Ray job server cannot be reached, or it has no job of that id, or refuses a request."""


_META = "evomerge."  # prefix of the job metadata written by submit (run_dir, config, command)
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # unreachable dashboard, bad address: one line for the CLI
        raise JobError(f"--address {address}: cannot reach the Ray job server ({one_line(e, limit=300)}): "
                       "start one with `ray start --head` or check host and port") from None


def _call(address: str, job_id: str | None, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:  # the SDK's answer to any failed request
        text = str(e)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise JobError(f"job {job_id}: no such job on {address}: `evomerge jobs list --address {address}` "
                           "lists them") from None
        raise JobError(f"{address}: the Ray job server refused the request ({one_line(e, limit=300)})") from None
    except OSError as e:  # the connection broke after the client was made
        raise JobError(f"--address {address}: cannot reach the Ray job server ({one_line(e, limit=300)})") from None


def _entrypoint(args: list[str]) -> str:
    """`python -m evomerge ARGS` on the cluster: this interpreter where it exists there (a cluster on this
    machine), else the `python` on the job's PATH (the cluster's image)."""
    import shlex

    return (f"PY={shlex.quote(sys.executable)}; [ -x \"$PY\" ] || PY=python; "
            f"exec \"$PY\" -m evomerge {shlex.join(args)}")


def _submit(address: str, args: list[str], metadata: dict[str, str]) -> str:
    client = _client(address)
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    return _call(address, None, lambda: client.submit_job(
        entrypoint=_entrypoint(args), runtime_env={"env_vars": env} if env else None,
        metadata={f"{_META}{k}": v for k, v in metadata.items()}))


def submit_search(config_path: Path, address: str, run_dir: Path | None = None) -> str:
    """Submit `evomerge search CONFIG` as a Ray job on the cluster at `address` (its dashboard, e.g.
    http://HOST:8265); returns the job id. The job joins the cluster's Ray (--address auto), so its workers
    run on the cluster's nodes; the config (and, with workers.sources: path, the models) must be readable where
    the job runs. The run directory goes into the job's metadata (`evomerge jobs status` shows it)."""
    args = ["search", str(config_path.resolve()), "--address", "auto"]
    meta = {"command": "search", "config": str(config_path.resolve())}
    if run_dir is not None:
        args += ["--run-dir", str(run_dir.resolve())]
        meta["run_dir"] = str(run_dir.resolve())
    return _submit(address, args, meta)


def submit_resume(address: str, job_id: str) -> tuple[str, str]:
    """Submit `evomerge resume RUN_DIR --address auto` for the run of an ended job; (new job id, run dir)."""
    info = job_info(address, job_id)
    if info["status"] not in _TERMINAL:
        raise JobError(f"job {job_id} is {info['status']}: stop it first (`evomerge jobs stop {job_id} "
                       f"--address {address}`), then resume")
    if not info["run_dir"]:
        raise JobError(f"job {job_id} was not submitted by `evomerge submit` (no run directory in its "
                       "metadata): run `evomerge resume RUN_DIR` where the run directory is")
    meta = {"command": "resume", "run_dir": info["run_dir"], "resumes": job_id}
    if info["config"]:
        meta["config"] = info["config"]
    return _submit(address, ["resume", info["run_dir"], "--address", "auto"], meta), info["run_dir"]


def _details(d) -> dict:
    meta = d.metadata or {}
    status = getattr(d.status, "value", str(d.status))
    return {"id": d.submission_id or d.job_id, "status": status, "message": d.message or "",
            "run_dir": meta.get(f"{_META}run_dir", ""), "config": meta.get(f"{_META}config", ""),
            "command": meta.get(f"{_META}command", ""), "entrypoint": d.entrypoint or "",
            "start": (d.start_time or 0) / 1000 or None, "end": (d.end_time or 0) / 1000 or None,
            "driver_node": d.driver_node_id or ""}


def list_jobs(address: str) -> list[dict]:
    """Every job the cluster knows, oldest first (id, status, run_dir, command, start, end, ...)."""
    client = _client(address)
    return sorted((_details(d) for d in _call(address, None, client.list_jobs)), key=lambda j: j["start"] or 0)


def job_info(address: str, job_id: str) -> dict:
    client = _client(address)
    return _details(_call(address, job_id, client.get_job_info, job_id))


def job_logs(address: str, job_id: str) -> str:
    client = _client(address)
    return _call(address, job_id, client.get_job_logs, job_id)


def follow_job_logs(address: str, job_id: str) -> Iterator[str]:
    """The job's logs as they come, until it ends."""
    import asyncio

    client = _client(address)
    _call(address, job_id, client.get_job_info, job_id)  # an unknown id: one line, not a websocket error
    chunks = client.tail_job_logs(job_id)

    async def next_chunk() -> str | None:
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:  # the job ended
            return None

    loop = asyncio.new_event_loop()
    try:
        while (chunk := _call(address, job_id, loop.run_until_complete, next_chunk())) is not None:
            yield chunk
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def stop_job(address: str, job_id: str, wait_s: float = 60.0) -> dict:
    """Ask the job to stop (SIGTERM to `evomerge search`, then SIGKILL; the run directory is consistent either
    way: the ledger commits each evaluation, the checkpoint is replaced atomically), and wait up to `wait_s`
    for it to end; returns its details."""
    client = _client(address)
    _call(address, job_id, client.stop_job, job_id)
    deadline = time.monotonic() + wait_s
    while (info := job_info(address, job_id))["status"] not in _TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return info


__all__ = ["JobError", "follow_job_logs", "job_info", "job_logs", "list_jobs", "stop_job", "submit_resume",
           "submit_search"]
