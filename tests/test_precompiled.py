"""Weighted sums by kernels compiled ahead of time (worker/precompiled.py): built in the background by a real
compiler into the session's kernel cache (conftest), loaded from disk, and written with the eager ops' bits; a
build that fails, a damaged package and another process's build leave the eager ops merging, bit for bit."""

from __future__ import annotations

import logging
import os
import socket
import subprocess

import pytest
import torch

from evomerge.merge.recipe import Recipe
from evomerge.worker.materializer import Materializer
from evomerge.worker.precompiled import Variant, package_path


def _sources(fam, k: int = 2):
    return {"base": fam.base, **{f"s{i}": p for i, p in enumerate(fam.sources[:k])}}


def _task_arithmetic(k: int = 2) -> Recipe:
    return Recipe.build("task_arithmetic", {f"s{i}": {"weight": w} for i, w in enumerate((0.7, -0.45)[:k])},
                        base_model="base", parameters={"lambda": 1.3})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.mark.slow
def test_a_precompiled_sum_is_built_in_the_background_and_writes_the_eager_bits(qwen2_bf16, kernel_cache):
    """linear (normalized) and task arithmetic, bf16 and float32 sources, whole tensors and pieces (host placement):
    the first candidate merges in eager ops while the package builds, the next ones by the package."""
    linear = Recipe.build("linear", {"s0": {"weight": 0.6}, "s1": {"weight": 0.25}})
    for recipe in (_task_arithmetic(), linear):
        reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(recipe)
        for dtype, placement in [("auto", "device"), ("float32", "device"), ("auto", "host")]:
            m = Materializer(_sources(qwen2_bf16), "base", storage_dtype=dtype, placement=placement,
                             precompiled="build")
            m.piece_entries = 4096
            assert _same(m.merged_state_dict(recipe), reference)  # eager, while the build runs
            m.precompiled.wait()
            assert _same(m.merged_state_dict(recipe), reference), (recipe.method, dtype, placement)
            assert m.precompiled.calls > 0, (recipe.method, dtype, placement)  # the package merged them
    names = sorted(p.name.split("-to-")[0] for p in kernel_cache.glob("*.pt2"))
    assert names == ["weighted_sum-k2-bf16-bf16.bf16", "weighted_sum-k2-f32-f32.f32"]  # one per variant
    assert not list(kernel_cache.glob("*.lock")) and not list(kernel_cache.glob("*.log"))

    # a new worker (a process of its own) finds the packages and merges with them from its first candidate
    other = Materializer(_sources(qwen2_bf16), "base", precompiled="use")
    assert _same(other.merged_state_dict(_task_arithmetic()), Materializer(
        _sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic()))
    assert other.precompiled.calls > 0 and not other.precompiled._builders


@pytest.mark.slow
def test_a_failed_build_is_reported_once_and_not_retried(qwen2_bf16, kernel_cache, monkeypatch, caplog):
    """No working C++ compiler: the build (which takes over a lock whose process is gone) fails and leaves a
    note; the worker merges in eager ops, and a later worker neither rebuilds nor warns again."""
    monkeypatch.setenv("CXX", "/bin/false")  # the build process's compiler
    path = package_path(Variant("bf16", ("bf16", "bf16"), "bf16"), kernel_cache)
    kernel_cache.mkdir()
    lock = path.with_name(path.name + ".lock")
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}")  # a build that died
    reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic())
    m = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    assert len(m.precompiled._builders) == 1  # the stale lock was taken over
    m.precompiled.wait()
    with caplog.at_level(logging.INFO, logger="evomerge.worker.precompiled"):
        assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"delete {path}.failed to try again" in warned[0].getMessage()
    assert path.with_name(path.name + ".failed").is_file() and not path.exists() and not lock.exists()
    assert path.with_name(path.name + ".log").is_file()  # kept: it says why
    caplog.clear()

    later = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    with caplog.at_level(logging.INFO, logger="evomerge.worker.precompiled"):
        assert _same(later.merged_state_dict(_task_arithmetic()), reference)
    assert not later.precompiled._builders and later.precompiled.calls == 0
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # said, not warned: that run warned already


def test_another_live_build_is_waited_for_not_repeated(qwen2_bf16, kernel_cache):
    path = package_path(Variant("bf16", ("bf16", "bf16"), "bf16"), kernel_cache)
    kernel_cache.mkdir()
    path.with_name(path.name + ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # alive: this process
    reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic())
    m = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    assert not m.precompiled._builders and m.precompiled.calls == 0 and not path.exists()


def test_a_damaged_package_is_set_aside_with_a_warning(qwen2_bf16, kernel_cache, caplog):
    path = package_path(Variant("bf16", ("bf16", "bf16"), "bf16"), kernel_cache)
    kernel_cache.mkdir()
    path.write_bytes(b"not a package")
    reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic())
    m = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    with caplog.at_level(logging.WARNING, logger="evomerge.worker.precompiled"):
        assert _same(m.merged_state_dict(_task_arithmetic()), reference)
        assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    assert len(caplog.records) == 1 and f"could not load {path}" in caplog.records[0].getMessage()
    assert m.precompiled.calls == 0 and not m.precompiled._builders


def test_precompiled_can_be_turned_off_and_takes_only_known_values(qwen2_bf16):
    assert Materializer(_sources(qwen2_bf16), "base", precompiled="off").precompiled is None
    with pytest.raises(ValueError, match="precompiled must be use, build or off"):
        Materializer(_sources(qwen2_bf16), "base", precompiled="yes")


def test_a_cache_directory_that_cannot_be_written_leaves_the_eager_ops(qwen2_bf16, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EVOMERGE_KERNEL_CACHE", str(blocker / "kernels"))  # under a file: cannot be created
    reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic())
    m = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    with caplog.at_level(logging.WARNING, logger="evomerge.worker.precompiled"):
        assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    assert len(caplog.records) == 1 and "set EVOMERGE_KERNEL_CACHE to a writable directory" in caplog.text


def test_a_build_killed_midway_is_reported_and_its_lock_freed(qwen2_bf16, kernel_cache, caplog):
    reference = Materializer(_sources(qwen2_bf16), "base", precompiled="off").merged_state_dict(_task_arithmetic())
    m = Materializer(_sources(qwen2_bf16), "base", precompiled="build")
    assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    (builder,) = m.precompiled._builders.values()
    builder.kill()
    m.precompiled.wait()
    with caplog.at_level(logging.WARNING, logger="evomerge.worker.precompiled"):
        assert _same(m.merged_state_dict(_task_arithmetic()), reference)
    assert len(caplog.records) == 1 and "ended with code -9" in caplog.records[0].getMessage()
    assert not list(kernel_cache.glob("*.lock")) and not list(kernel_cache.glob("*.pt2"))
