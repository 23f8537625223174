"""workers.sources: object_store: the driver ships models, calibration and tasks; each node keeps one cached copy.

The packing and the per-node cache are tested without Ray (plain put/get functions); then a Ray pool whose
actors read only the shipped copies: the workspace's models are moved away once the pool is up, and a killed
worker's replacement still starts, from the cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from evomerge.search import pool as ray_pool  # before Ray itself: it sets Ray's auth mode at import
from evomerge.search.session import create_run, drive, status
from evomerge.search.shipping import ShippingError, localize, pack, shipped_paths, translate, unpack
from evomerge.testing.workspace import make_search_workspace
from evomerge.worker.evaluator import Evaluator
from evomerge.worker.local_pool import LocalPool

ray = ray_pool.ray


class Store:
    """put/get over a dict, counting the chunks read back."""

    def __init__(self) -> None:
        self.objects: dict[int, bytes] = {}
        self.gets = 0
        self.lock = threading.Lock()

    def put(self, block: bytes) -> int:
        self.objects[len(self.objects)] = bytes(block)
        return len(self.objects) - 1

    def get(self, ref: int) -> bytes:
        with self.lock:
            self.gets += 1
        return self.objects[ref]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_search_workspace(tmp_path_factory.mktemp("ship"),
                                 workers={"count": 2, "cpus_per_worker": 1, "sources": "object_store"})
    return root


def test_pack_and_unpack_copy_every_file_the_workers_read(workspace, tmp_path):
    _, prepared = create_run(workspace / "run.yaml", tmp_path / "run")
    config = prepared.config
    model = Path(config.sources.models["a"])
    (model / "pytorch_model.bin").write_bytes(b"x" * 10)  # another format beside safetensors: not shipped
    (model / ".cache").mkdir()
    (model / ".cache" / "meta").write_text("hub download metadata")  # hidden: not shipped
    try:
        store = Store()
        shipment = pack(config, prepared.config_dir, store.put, chunk=4096)  # small chunks: many per file
        paths = shipped_paths(config, prepared.config_dir)
        assert set(paths) == {*config.sources.models.values(), config.sources.base_model,
                              config.fitness.calibration, *config.fitness.task_paths}
        assert max(len(f.chunks) for t in shipment.trees for f in t.files) > 1
        copy = workspace.parent / "ship-copy"  # the originals, kept for comparison, then gone from their paths
        shutil.copytree(workspace, copy)
        shutil.rmtree(workspace / "models")
        (workspace / "calibration.json").unlink()

        local = unpack(shipment, store.get, tmp_path / "cache")
    finally:
        if not (workspace / "models").exists():
            shutil.copytree(copy / "models", workspace / "models")
            shutil.copyfile(copy / "calibration.json", workspace / "calibration.json")
        (model / "pytorch_model.bin").unlink()
        shutil.rmtree(model / ".cache")
    for ref, (path, _) in paths.items():
        rel = Path(ref).relative_to(workspace)
        assert local[ref].name == path.name  # folder and file names are kept (recipes may name sources by folder)
        assert str(local[ref]).startswith(str(tmp_path / "cache"))
        if (copy / rel).is_dir():
            expected = {k: v for k, v in _tree(copy / rel).items() if not k.startswith(".cache")
                        and k != "pytorch_model.bin"}
            assert _tree(local[ref]) == expected
        else:
            assert local[ref].read_bytes() == (copy / rel).read_bytes()

    reads = store.gets
    again = unpack(shipment, store.get, tmp_path / "cache")  # the node's copy is reused: nothing is read
    assert again == local and store.gets == reads

    local_config = localize(config, local)
    assert local_config.sources.models == {n: str(local[r]) for n, r in config.sources.models.items()}
    assert local_config.fitness.calibration == str(local[config.fitness.calibration])
    recipe = prepared.decode([0.5] * prepared.space.dim(prepared.layer_counts))
    moved = translate(recipe, local)
    assert moved["base_model"] == str(local[recipe["base_model"]])
    assert [m["model"] for m in moved["models"]] == [str(local[m["model"]]) for m in recipe["models"]]
    assert {k: v for k, v in moved.items() if k not in ("models", "base_model")} == \
        {k: v for k, v in recipe.items() if k not in ("models", "base_model")}


def test_workers_of_one_node_share_one_copy_and_a_bad_copy_is_refused(workspace, tmp_path):
    _, prepared = create_run(workspace / "run.yaml", tmp_path / "run")
    store = Store()
    shipment = pack(prepared.config, prepared.config_dir, store.put)
    chunks = sum(len(f.chunks) for t in shipment.trees for f in t.files)
    results = []
    threads = [threading.Thread(target=lambda: results.append(unpack(shipment, store.get, tmp_path / "c")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert store.gets == chunks  # one copy was written, the others waited and reused it
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temporary left

    store.objects[0] = b"altered" + store.objects[0][7:]
    with pytest.raises(ShippingError, match="arrived altered"):
        unpack(shipment, store.get, tmp_path / "other")
    assert not [p for p in (tmp_path / "other").iterdir() if not p.name.endswith(".lock")]  # nothing half-done


@pytest.mark.slow
def test_ray_workers_read_only_the_shipped_copies(workspace, tmp_path, monkeypatch):
    reference_run, reference = create_run(workspace / "run.yaml", tmp_path / "local")
    drive(reference_run, reference, LocalPool(reference))
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("EVOMERGE_SOURCE_CACHE", str(cache))  # read by the raylet the pool starts, hence its actors
    run, prepared = create_run(workspace / "run.yaml", tmp_path / "ray")
    moved = workspace.parent / "models-away"
    with ray_pool.RayPool(prepared, Evaluator) as pool:
        assert pool.shipment is not None and pool.shipment.size > 0
        assert all(set(i["sources"]) == set(shipped_paths(prepared.config, prepared.config_dir))
                   and all(p.startswith(str(cache)) for p in i["sources"].values()) for i in pool.info)
        os.rename(workspace / "models", moved)  # from now on only the shipped copies exist
        try:
            victims = []

            def kill_once(rec):  # a replacement must start from the cache too
                if rec.generation == 1 and not victims:
                    info = ray.get(pool.actors[0].info.remote())
                    os.kill(info["pid"], signal.SIGKILL)
                    victims.append(info["pid"])

            drive(run, prepared, pool, on_result=kill_once)
            assert victims and pool.replacements >= 1
            assert all(p.startswith(str(cache)) for i in pool.info for p in i["sources"].values())
        finally:
            os.rename(moved, workspace / "models")
    assert status(run, prepared) == status(reference_run, reference)  # same evaluations, same front
    assert len([p for p in cache.iterdir() if p.is_dir()]) == len(shipped_paths(prepared.config, prepared.config_dir))


def test_an_unknown_sources_mode_is_a_one_line_error_naming_the_field(workspace, tmp_path, capsys):
    from evomerge.cli import main

    config = (workspace / "run.yaml").read_text().replace("sources: object_store", "sources: nfs")
    assert "sources: nfs" in config
    (workspace / "bad.yaml").write_text(config)
    assert main(["search", str(workspace / "bad.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "workers.sources" in err and "object_store" in err, err
    assert not (tmp_path / "run").exists()
