"""Ray worker pool: long-lived actors, each holding one Evaluator (with jobs.py, the only modules that import Ray).

Use it wherever a `LocalPool` goes (the pool interface is `pool.evaluate(candidates) -> Iterable[EvalResult]`).
The caller passes the worker side's Evaluator class, so this module (driver side) never imports torch:

    from evomerge.search.pool import RayPool
    from evomerge.search.session import drive
    from evomerge.worker.evaluator import Evaluator

    with RayPool(prepared, Evaluator) as pool:                  # a private Ray on this machine, loopback only
        drive(run, prepared, pool)
    with RayPool(prepared, Evaluator, address="auto") as pool:  # join a running cluster (`ray start --head` ...)
        drive(run, prepared, pool)

Workers: `config.workers.count` actors (default: one per GPU of the cluster, else max(1, CPUs // 2)), each
reserving `cpus_per_worker` CPUs and `gpus_per_worker` GPUs. Each actor builds ONE Evaluator when it starts
(sources are read once per actor, onto "cuda" when Ray gave it a GPU, else "cpu", unless `device=` says otherwise),
named `worker-<i>` and placed on the node `<ip>/<node id prefix>`.

`evaluate(candidates)` keeps every actor busy: one candidate per idle actor, results yielded as soon as they come
(no barrier inside a call). The order does not matter: each result depends only on its candidate.

Faults: an actor that dies (killed, crashed, out of memory, its node lost) or that exceeds `timeout_s` on one
candidate is replaced by a fresh actor and the candidate is retried, at most `workers.max_retries` times; then it
is a failed result ("worker died N times: ..."). A replacement gets candidates only once it is ready: while it
waits for resources (its node is gone and no other node has room) the other actors go on alone, and it joins
when a node offers room again. Nothing waits forever: a candidate has `timeout_s` per attempt, actors that cannot
start (not enough CPUs/GPUs) raise `WorkerStartError` after `start_timeout_s`, and so does a pool left with no
ready actor for that long.

Sources: with `workers.sources: path` (the default) every actor reads models, calibration and tasks at the paths
of the config, so they must exist on every node (shared filesystem, the same image, or the same HF cache). With
`workers.sources: object_store` the driver ships them through Ray's object store and each node keeps one copy
in its cache (see shipping.py); only the driver needs the files.

`close()` (or leaving the `with` block) kills the actors and shuts Ray down when this pool started it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from evomerge.search.ray_env import ENV_PASSED, set_auth_mode

set_auth_mode()  # before Ray is first imported: its clients read the mode at import

import ray  # noqa: E402
from ray import exceptions as rex  # noqa: E402

from evomerge.cpus import usable_cpus
from evomerge.errors import EvomergeError, one_line
from evomerge.search.candidates import FAILED, Candidate, EvalResult


class WorkerStartError(EvomergeError):
    """The Ray workers could not start (resources, cluster, or the Evaluator's constructor failed)."""


class _EvalActor:
    """One worker: one Evaluator, built once, evaluating candidates one after another."""

    def __init__(self, evaluator: Callable, config, config_dir: str, worker: str, device: str | None,
                 env: dict[str, str], shipment=None) -> None:
        os.environ.update(env)
        node_id = ray.get_runtime_context().get_node_id()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "?")
        self.node = f"{ip}/{node_id[:12]}"  # the address the node registered (127.0.0.1 for a private Ray)
        if device is None:
            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.local: dict[str, Path] = {}  # shipped reference -> this node's copy
        if shipment is not None:  # workers.sources: object_store
            from evomerge.search.shipping import localize, unpack

            self.local = unpack(shipment, ray.get)
            config = localize(config, self.local)
        self.evaluator = evaluator(config, config_dir, device=device, worker=worker, node=self.node)

    def info(self) -> dict:
        split = self.evaluator.sources.split
        return {"pid": os.getpid(), "node": self.node, "device": split.describe() if split else str(self.evaluator.device),
                "worker": self.evaluator.worker, "sources": {ref: str(p) for ref, p in self.local.items()}}

    def evaluate(self, cand: Candidate) -> EvalResult:
        if self.local:  # the driver's recipes name models by its own paths
            from dataclasses import replace

            from evomerge.search.shipping import translate

            cand = replace(cand, recipe=translate(cand.recipe, self.local))
        return self.evaluator.evaluate(cand)


# errors after which the actor is gone (or unusable) and the candidate is worth another try on a fresh one
# (RayActorError covers ActorDiedError and ActorUnavailableError)
_DEATHS = (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.OutOfMemoryError, rex.NodeDiedError)


class RayPool:
    """`config.workers.count` Ray actors with one Evaluator each; see the module docstring."""

    def __init__(self, prepared, evaluator: Callable, *, address: str | None = None, device: str | None = None,
                 timeout_s: float | None = 3600.0, start_timeout_s: float = 900.0) -> None:
        self.config = prepared.config
        self.config_dir = str(Path(prepared.config_dir).resolve())
        self.device = device
        self.evaluator = evaluator  # the worker side's Evaluator class, built once in each actor
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        workers = self.config.workers
        self.max_retries = workers.max_retries
        self._owns_ray = False
        self.replacements = 0  # actors started to replace dead (or timed-out) ones
        self.shipment = None  # what the driver put into the object store (workers.sources: object_store)
        self._actors: list = []
        self._starting: dict = {}  # info() ref of an actor not ready yet -> its slot
        self._start_failures: dict[int, int] = {}  # slot -> replacements in a row that died before ready
        self._retired: set[int] = set()  # slots whose replacements kept dying: given up
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
            if address is None:  # a private Ray, on loopback only, without dashboard
                _loopback_only()
                # "local": a new instance even when `ray start` runs on this machine (ray.init() would join it)
                ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=True)
            else:
                ray.init(address=address, configure_logging=False)
            self._owns_ray = True
        try:
            resources = ray.cluster_resources()
            cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
            self.count = workers.count or (int(gpus) if gpus >= 1 else max(1, int(cpus) // 2))
            gpus_each = workers.gpus_per_worker
            if workers.count is None and gpus >= 1 and gpus_each == 0:
                gpus_each = 1.0  # the default of one worker per GPU: give each its GPU
            self._options = {"num_cpus": workers.cpus_per_worker, "num_gpus": gpus_each, "max_restarts": 0,
                             "max_task_retries": 0}
            need_cpu, need_gpu = workers.cpus_per_worker, gpus_each
            if need_cpu > cpus or need_gpu > gpus:
                raise WorkerStartError(
                    f"workers: one worker needs {need_cpu:g} CPU and {need_gpu:g} GPU, but the Ray cluster has "
                    f"{cpus:g} CPU and {gpus:g} GPU in all: lower workers.cpus_per_worker / "
                    "workers.gpus_per_worker in the run config")
            if address is None:  # this machine's Ray: no other node will come, so waiting would be forever
                free = float(ray.available_resources().get("CPU", 0))
                if need_cpu * self.count > free:
                    raise WorkerStartError(
                        f"workers: {self.count} worker(s) need {need_cpu * self.count:g} CPU, but {free:g} of "
                        f"this machine's {cpus:g} are free (another worker pool in this process holds the rest): "
                        "close that pool first, or lower workers.count")
            self._env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
            if workers.sources == "object_store":  # read here once; kept (referenced) while the pool lives
                from evomerge.search.shipping import pack

                self.shipment = pack(self.config, Path(self.config_dir), ray.put)
            self._remote = ray.remote(_EvalActor)
            self._actors = [self._start(i) for i in range(self.count)]
            self.info = self._wait_ready(list(range(self.count)))
        except BaseException:
            self.close()
            raise

    # -- actors --------------------------------------------------------------------------------------------
    def _name(self, i: int) -> str:
        return f"worker-{i}"

    def _start(self, i: int):
        return self._remote.options(**self._options).remote(self.evaluator, self.config, self.config_dir, self._name(i),
                                                             self.device, self._env, self.shipment)

    def _wait_ready(self, slots: list[int]) -> list[dict]:
        refs = [self._actors[i].info.remote() for i in slots]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if pending:
            raise WorkerStartError(
                f"workers: {len(pending)} of {len(refs)} Ray workers did not start within "
                f"{self.start_timeout_s:g} s (each needs {self._options['num_cpus']:g} CPU, "
                f"{self._options['num_gpus']:g} GPU; the cluster has {ray.cluster_resources()}): "
                "lower workers.count or the resources per worker")
        try:
            return ray.get(refs)
        except rex.RayError as e:
            raise WorkerStartError(f"workers: a Ray worker failed to start: {one_line(e, limit=300)}") from e

    def _replace(self, i: int) -> None:
        """A fresh actor in slot i; it gets candidates once ready (see `_started`)."""
        self.replacements += 1
        _kill(self._actors[i])
        self._actors[i] = self._start(i)
        self._starting[self._actors[i].info.remote()] = i

    def wait_ready(self) -> None:
        """Wait until every replacement actor is ready (each gets work only then; the others go on meanwhile),
        at most `start_timeout_s`."""
        deadline = time.monotonic() + self.start_timeout_s
        while self._starting:
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise WorkerStartError(f"workers: {len(self._starting)} replacement Ray worker(s) not ready after "
                                       f"{self.start_timeout_s:g} s: add nodes, or lower the resources per worker")
            self._started(done[0])

    def _started(self, ref) -> int | None:
        """A replacement's info() came back: its slot when the actor is ready, None when it died first (it is
        replaced again, or its slot given up after `max_retries + 1` deaths in a row)."""
        i = self._starting.pop(ref)
        try:
            self.info[i] = ray.get(ref)
        except rex.RayError:
            self._start_failures[i] = self._start_failures.get(i, 0) + 1
            if self._start_failures[i] > self.max_retries:
                self._retired.add(i)
                _kill(self._actors[i])
            else:
                self._replace(i)
            return None
        self._start_failures.pop(i, None)
        return i

    @property
    def actors(self) -> list:
        """The live actor handles (tests kill them; `ray.get(actor.info.remote())` gives pid, node, device)."""
        return list(self._actors)

    # -- the pool interface ------------------------------------------------------------------------------
    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[EvalResult]:
        queue = deque(candidates)
        deaths: dict[str, list[str]] = {}
        waiting = set(self._starting.values()) | self._retired
        idle = deque(i for i in range(len(self._actors)) if i not in waiting)
        running: dict = {}  # ObjectRef -> (slot, candidate, started)
        try:
            while queue or running:
                while queue and idle:
                    i, c = idle.popleft(), queue.popleft()
                    running[self._actors[i].evaluate.remote(c)] = (i, c, time.monotonic())
                if not running:  # candidates left and no ready actor: only replacements can help
                    if not self._starting:
                        raise WorkerStartError("workers: every Ray worker died and none could be started again "
                                               f"({self.replacements} replacements): see the Ray logs")
                    timeout = self.start_timeout_s
                elif self.timeout_s is None:
                    timeout = None
                else:
                    oldest = min(t for _, _, t in running.values())
                    timeout = max(0.0, oldest + self.timeout_s - time.monotonic())
                done, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=timeout)
                if not done and not running:
                    raise WorkerStartError(
                        f"workers: no Ray worker was ready for {self.start_timeout_s:g} s (replacements need "
                        f"{self._options['num_cpus']:g} CPU, {self._options['num_gpus']:g} GPU; the cluster has "
                        f"{ray.available_resources()} free): add nodes, or lower the resources per worker")
                if not done:  # the oldest attempt ran past timeout_s: its actor is treated as dead
                    ref = min(running, key=lambda r: running[r][2])
                    i, c, _ = running.pop(ref)
                    self._replace(i)
                    yield from self._retry_or_fail(c, f"timed out after {self.timeout_s:g} s", deaths, queue, i)
                    continue
                ref = done[0]
                if ref in self._starting:
                    if (i := self._started(ref)) is not None:
                        idle.append(i)
                    continue
                i, c, _ = running.pop(ref)
                try:
                    result = ray.get(ref)
                except _DEATHS as e:
                    self._replace(i)
                    yield from self._retry_or_fail(c, one_line(e, limit=300), deaths, queue, i)
                    continue
                except rex.RayTaskError as e:  # evaluate() raised (it should not): a failed candidate
                    result = EvalResult(c.key, FAILED, error=one_line(e.cause if e.cause else e, limit=300),
                                        worker=self._name(i), node="")
                idle.append(i)
                yield result
        finally:
            for ref in running:  # the caller stopped early: do not leave work queued on the actors
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001, S110  (already finished)
                    pass

    def _retry_or_fail(self, c: Candidate, why: str, deaths: dict[str, list[str]], queue: deque,
                       i: int) -> Iterator[EvalResult]:
        deaths.setdefault(c.key, []).append(why)
        n = len(deaths[c.key])
        if n > self.max_retries:
            yield EvalResult(c.key, FAILED, error=f"worker died {n} times: {why}", worker=self._name(i), node="")
        else:
            queue.appendleft(c)

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        for a in getattr(self, "_actors", []):
            _kill(a)
        self._actors = []
        self._starting = {}
        self.shipment = None  # the driver's references: Ray frees the shipped objects
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001, S110  (already dead)
        pass


def _loopback_only() -> None:
    """Make a local Ray listen on 127.0.0.1 only. Measured with Ray 2.60: `_node_ip_address="127.0.0.1"` alone
    still registers the node under the machine's address and leaves agents listening on 0.0.0.0 / *; with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by Ray's processes at import: set here for the ones ray.init
    starts, and patched for this one, which imported Ray already) every port is on loopback."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a later Ray: the variable alone, as Ray documents it
        pass




__all__ = ["RayPool", "WorkerStartError"]
