"""Bad inputs as a new user makes them: every case runs the real CLI in a subprocess on a tiny workspace and is
judged by the house rule: one line naming the field or file, exit code 2, no traceback, and nothing created or
changed on disk (a finished run's ledger byte-identical, no run directory or output left behind).

    .venv/bin/python bench/bad_inputs.py [--out bench/out/bad_inputs.md]

Prints a markdown table (case, exit code, the error line, what is left on disk, verdict) and exits 1 when a case
breaks the rule. Tests cover the cases one by one; this is the sweep across commands.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.testing.workspace import make_search_workspace

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass
class Case:
    name: str
    args: Callable[[Path], list]  # workspace root -> CLI arguments
    setup: Callable[[Path], None] = lambda root: None
    creates: Callable[[Path], Path] | None = None  # what must not exist afterwards


def _config(root: Path, **changes) -> Path:
    doc = yaml.safe_load((root / "run.yaml").read_text())
    for dotted, value in changes.items():
        node, *path = dotted.split("__")
        target = doc
        for key in [node, *path][:-1]:
            target = target.setdefault(key, {})
        target[[node, *path][-1]] = value
    path = root / f"bad-{hashlib.sha1(repr(sorted(changes.items())).encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _search(**changes) -> Case:
    name = ", ".join(f"{k.replace('__', '.')}={v!r}" for k, v in changes.items())
    return Case(f"search: {name}", lambda root: ["search", _config(root, **changes), "--run-dir", root / "runs" / "x",
                                                 "--in-process"], creates=lambda root: root / "runs" / "x")


def _edited_snapshot(old: str, new: str) -> Case:
    def setup(root: Path) -> None:
        run = root / "runs" / "edited"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(root / "runs" / "done", run)
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace(old, new) if old else text + new)

    return Case(f"resume: config snapshot edited ({old.strip() or 'appended'} -> {new.strip()})",
                lambda root: ["resume", root / "runs" / "edited", "--in-process"], setup)


def _damaged_marker(root: Path) -> None:
    shutil.copytree(root / "runs" / "done", root / "runs" / "damaged", dirs_exist_ok=True)
    (root / "runs" / "damaged" / "run.json").write_text("{")


def _broken_copy(name: str, content: bytes | None, run: str = "broken-ledger") -> Callable[[Path], None]:
    """A copy of the finished run with one file replaced by `content` (None: deleted)."""
    def setup(root: Path) -> None:
        target = root / "runs" / run
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "runs" / "done", target)
        if content is None:
            (target / name).unlink()
        else:
            (target / name).write_bytes(content)
    return setup


def _dataflow(root: Path, path: list) -> dict:
    return {"merge_method": "dataflow", "sources": [{"name": "a", "model": str(root / "models" / "source_0")}],
            "path": path}


def _recipe(root: Path, doc: dict, name: str) -> Path:
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _merge(name: str, doc: Callable[[Path], dict]) -> Case:
    return Case(f"merge: {name}", lambda root: ["merge", _recipe(root, doc(root), "r"), "--out", root / "merged"],
                creates=lambda root: root / "merged")


def _linear(root: Path, **kw) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(root / "models" / "source_0"),
                                                   "parameters": {"weight": 0.5}},
                                                  {"model": str(root / "models" / "source_1"),
                                                   "parameters": {"weight": 0.5}}], **kw}


def cases() -> list[Case]:
    blocker = lambda root: root / "a-file"  # noqa: E731  (a regular file where a folder would be)
    return [
        # -- run configs --------------------------------------------------------------------------------
        _search(fitness__estimator="gpirtt"),
        _search(algorithm__name="nsga22"),
        _search(algorithm__pop_size=1),
        _search(algorithm__generations=0),
        _search(seed=-1),
        _search(objectives=[]),
        _search(objectives=[{"cost": "params"}]),
        _search(objectives=[{"task": "t_add"}, {"task": "t_mroe"}]),
        _search(objectives=[{"task": "t_add"}, {"cost": "flops"}]),
        _search(fitness__tasks=["t_add", "t_nope"]),
        _search(fitness__calibration="missing.json"),
        _search(fitness__calibration="run.yaml"),
        _search(fitness__batch_size=0),
        _search(sources__models={"a": "models/nope", "b": "models/source_1"}),
        _search(sources__models={"a": "models/source_0", "b": "models/pickled"}),
        _search(sources__models={"a": "models/source_0", "b": "models/empty"}),
        _search(search_space="ps_no_such_preset"),
        _search(search_space="spaces/missing.yaml"),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"layer_groups": 9}}),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"layer_groups": 0}}),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"methods": ["tiess"]}}),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"methods": ["dataflow"]}}),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"density": [0.5, 1.5]}}),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"weight": [0.5, 0.5],
                                                                       "params": {"lambda": [1, 1]}}}),
        _search(search_space={"preset": "dfs_paths", "dfs": {"scales": {"range": [0.0, 1.0]}}}),
        _search(workers__count=0),
        _search(workers__sources="s3"),
        _search(max_path_length=0),
        _search(unknown_key=1),
        _search(sources__models={}),
        _search(sources__models=["models/source_0", "models/source_1"]),
        _search(sources__models={"a": "models/source_0", "b": "models/source_1/config.json"}),
        _search(sources__models={"a": "models/source_0", "b": "models/poisoned"}),
        _search(sources__models={"a": "models/source_0", "b": "models/wide"}),
        _search(sources__models={"a": "models/source_0", "b": "models/truncated"}),
        _search(sources__base_model="models/nope"),
        _search(fitness__task_paths=["no_such_folder"]),
        _search(fitness__tasks=[]),
        _search(fitness__estimator=3),
        _search(algorithm__pop_size="sixteen"),
        _search(algorithm__generations=-3),
        _search(objectives=[{"task": "t_add", "cost": "params"}]),
        _search(objectives=[{"task": "t_add"}, {"task": "t_add"}]),
        _search(search_space={"preset": "ps_task_arithmetic", "ps": {"layer_grups": 2}}),
        _search(search_space={"preset": "dfs_paths", "dfs": {"repeats": 0}}),
        _search(workers__count="two"),
        _search(seed="abc"),
        Case("search: config empty", lambda root: ["search", root / "empty.yaml"],
             lambda root: (root / "empty.yaml").write_text("")),
        Case("search: config is a folder", lambda root: ["search", root / "models"]),
        Case("search: --run-dir a non-empty folder that is not a run", lambda root: [
            "search", root / "run.yaml", "--run-dir", root / "tasks", "--in-process"]),
        Case("search: config file missing", lambda root: ["search", root / "nope.yaml"]),
        Case("search: config not YAML", lambda root: ["search", root / "broken.yaml"],
             lambda root: (root / "broken.yaml").write_text("name: [unclosed\n")),
        Case("search: config a list", lambda root: ["search", root / "list.yaml"],
             lambda root: (root / "list.yaml").write_text("- a\n- b\n")),
        Case("search: --run-dir under a file", lambda root: ["search", root / "run.yaml", "--run-dir",
                                                              blocker(root) / "x", "--in-process"]),
        Case("search: --run-dir is a finished run", lambda root: ["search", root / "run.yaml", "--run-dir",
                                                                   root / "runs" / "done", "--in-process"]),
        # -- run directories ----------------------------------------------------------------------------
        _edited_snapshot("layer_groups: 2", "layer_groups: 4"),
        _edited_snapshot("generations: 3", "generations: 5"),
        _edited_snapshot("\nseed: 7", "\nseed: 8"),
        _edited_snapshot("", "\n  - [unclosed\n"),
        Case("resume: not a run directory", lambda root: ["resume", root / "models", "--in-process"]),
        Case("resume: no such directory", lambda root: ["resume", root / "runs" / "nope", "--in-process"]),
        Case("status: run.json damaged", lambda root: ["status", root / "runs" / "damaged"], _damaged_marker),
        Case("resume: ledger not a database", lambda root: ["resume", root / "runs" / "broken-ledger",
                                                            "--in-process"], _broken_copy("ledger.sqlite", b"junk")),
        Case("resume: ledger deleted", lambda root: ["resume", root / "runs" / "no-ledger", "--in-process"],
             _broken_copy("ledger.sqlite", None, "no-ledger")),
        Case("resume: config.yaml deleted", lambda root: ["resume", root / "runs" / "no-config", "--in-process"],
             _broken_copy("config.yaml", None, "no-config")),
        Case("status: no such directory", lambda root: ["status", root / "runs" / "nope"]),
        Case("status: --plot under a file", lambda root: ["status", root / "runs" / "done", "--plot",
                                                          blocker(root) / "f.png"]),
        Case("export: not a run directory", lambda root: ["export", root / "models", "--out", root / "exp"],
             creates=lambda root: root / "exp"),
        Case("export: unknown id", lambda root: ["export", root / "runs" / "done", "--out", root / "exp",
                                                 "--ids", "g9999-0000"], creates=lambda root: root / "exp"),
        Case("export: empty --ids", lambda root: ["export", root / "runs" / "done", "--out", root / "exp",
                                                  "--ids", ","], creates=lambda root: root / "exp"),
        Case("export: --out under a file", lambda root: ["export", root / "runs" / "done", "--out",
                                                         blocker(root) / "exp"]),
        # -- merge recipes -----------------------------------------------------------------------------
        Case("merge: recipe missing", lambda root: ["merge", root / "nope.yml", "--out", root / "merged"],
             creates=lambda root: root / "merged"),
        _merge("unknown method", lambda root: {**_linear(root), "merge_method": "lineer"}),
        _merge("unknown key", lambda root: _linear(root, paramters={})),
        _merge("unsupported mergekit key (slices)", lambda root: _linear(root, slices=[])),
        _merge("missing model", lambda root: {**_linear(root), "models": [{"model": str(root / "nope"),
                                                                            "parameters": {"weight": 1}}]}),
        _merge("weights sum to 0", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "source_0"), "parameters": {"weight": 1}},
            {"model": str(root / "models" / "source_1"), "parameters": {"weight": -1}}]}),
        _merge("density outside [0, 1]", lambda root: {
            "merge_method": "ties", "base_model": str(root / "models" / "base"),
            "models": [{"model": str(root / "models" / "source_0"), "parameters": {"weight": 1, "density": 1.5}}]}),
        _merge("task vectors without a base", lambda root: {**_linear(root), "merge_method": "ties"}),
        _merge("pickled source without --allow-pickle", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "pickled"), "parameters": {"weight": 1}}]}),
        _merge("NaN in a source", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "poisoned"), "parameters": {"weight": 1}}]}),
        Case("merge: recipe not YAML", lambda root: ["merge", root / "broken.yaml", "--out", root / "merged"],
             lambda root: (root / "broken.yaml").write_text("name: [unclosed\n"), creates=lambda root: root / "merged"),
        Case("merge: recipe empty", lambda root: ["merge", root / "empty.yaml", "--out", root / "merged"],
             lambda root: (root / "empty.yaml").write_text(""), creates=lambda root: root / "merged"),
        _merge("no models", lambda root: {**_linear(root), "models": []}),
        _merge("weight a string", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "source_0"), "parameters": {"weight": "half"}}]}),
        _merge("unknown dtype", lambda root: _linear(root, dtype="float13")),
        _merge("base_model missing", lambda root: {**_linear(root), "merge_method": "task_arithmetic",
                                                   "base_model": str(root / "models" / "nope")}),
        _merge("models of another hidden size", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "source_0"), "parameters": {"weight": 0.5}},
            {"model": str(root / "models" / "wide"), "parameters": {"weight": 0.5}}]}),
        _merge("truncated safetensors shard", lambda root: {**_linear(root), "models": [
            {"model": str(root / "models" / "truncated"), "parameters": {"weight": 1}}]}),
        _merge("data flow: layer out of range", lambda root: _dataflow(root, [["a", 0], ["a", 9]])),
        _merge("data flow: unknown source", lambda root: _dataflow(root, [["a", 0], ["zz", 1]])),
        Case("merge: --out is a source model", lambda root: ["merge", _recipe(root, _linear(root), "ok"), "--out",
                                                             root / "models" / "source_0", "--force"]),
        Case("merge: --out under a file", lambda root: ["merge", _recipe(root, _linear(root), "ok"), "--out",
                                                        blocker(root) / "m"]),
        Case("merge: --device nonsense", lambda root: ["merge", _recipe(root, _linear(root), "ok"), "--out",
                                                       root / "merged", "--device", "tpu:7"],
             creates=lambda root: root / "merged"),
        Case("merge: --shard-size nonsense", lambda root: ["merge", _recipe(root, _linear(root), "ok"), "--out",
                                                           root / "merged", "--shard-size", "big"],
             creates=lambda root: root / "merged"),
        # -- IRT and calibration -------------------------------------------------------------------------
        Case("irt fit: responses file missing", lambda root: ["irt", "fit", "--responses", root / "nope.csv",
                                                              "--out", root / "c.json"],
             creates=lambda root: root / "c.json"),
        Case("irt fit: a value that is not 0/1", lambda root: ["irt", "fit", "--responses", root / "bad.csv",
                                                               "--out", root / "c.json"],
             lambda root: (root / "bad.csv").write_text("model,q1,q2\nm1,1,0\nm2,1,x\n"),
             creates=lambda root: root / "c.json"),
        Case("irt fit: --out under a file", lambda root: ["irt", "fit", "--responses", root / "bad.csv", "--out",
                                                          blocker(root) / "c.json"]),
        Case("irt fit: --dims nonsense", lambda root: ["irt", "fit", "--responses", root / "bad.csv", "--out",
                                                       root / "c.json", "--dims", "two"],
             creates=lambda root: root / "c.json"),
        Case("irt fit: empty responses file", lambda root: ["irt", "fit", "--responses", root / "empty.csv",
                                                            "--out", root / "c.json"],
             lambda root: (root / "empty.csv").write_text(""), creates=lambda root: root / "c.json"),
        Case("irt fit: a model listed twice", lambda root: ["irt", "fit", "--responses", root / "twice.csv",
                                                            "--out", root / "c.json"],
             lambda root: (root / "twice.csv").write_text("model,q1,q2\nm1,1,0\nm1,0,1\nm2,1,1\n"),
             creates=lambda root: root / "c.json"),
        Case("calibrate: out exists", lambda root: ["calibrate", root / "calibrate.yaml"]),
        Case("calibrate: config missing", lambda root: ["calibrate", root / "nope.yaml"]),
        Case("calibrate: a task that is not there", lambda root: ["calibrate", root / "calib-bad.yaml"],
             lambda root: (root / "calib-bad.yaml").write_text(
                 (root / "calibrate.yaml").read_text().replace("- t_more", "- t_mroe").replace(
                     "calibration.json", "c.json")), creates=lambda root: root / "c.json"),
        Case("usage: no command", lambda root: []),
        Case("usage: search without a config", lambda root: ["search"]),
        Case("usage: unknown command", lambda root: ["serach"]),
        Case("usage: unknown option", lambda root: ["status", root / "runs" / "done", "--jsn"]),
    ]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and "-wal" not in p.name and "-shm" not in p.name and p.suffix != ".lock":
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def _workspace(root: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from evomerge.cli import main
    from evomerge.testing.tiny import TinySpec, random_model, save_model

    make_search_workspace(root)
    model = random_model(TinySpec(), seed=0)
    (root / "models" / "pickled").mkdir()
    model.config.save_pretrained(root / "models" / "pickled")
    torch.save(model.state_dict(), root / "models" / "pickled" / "pytorch_model.bin")
    (root / "models" / "empty").mkdir()
    model.config.save_pretrained(root / "models" / "empty")
    shutil.copytree(root / "models" / "source_1", root / "models" / "poisoned")
    shard = next((root / "models" / "poisoned").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors[next(iter(tensors))].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    (root / "a-file").write_text("not a folder")
    save_model(random_model(TinySpec(hidden=48), seed=0), root / "models" / "wide", root / "models" / "tokenizer")
    shutil.copytree(root / "models" / "source_1", root / "models" / "truncated")
    shard = next((root / "models" / "truncated").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])  # an interrupted download
    if main(["search", str(root / "run.yaml"), "--run-dir", str(root / "runs" / "done"), "--in-process"]) != 0:
        raise RuntimeError("the reference run failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/bad_inputs.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    _workspace(root)
    done = root / "runs" / "done"
    rows, broken = [], 0
    for case in cases():
        case.setup(root)
        before = _tree_digest(done)
        proc = subprocess.run([sys.executable, "-m", "evomerge", *map(str, case.args(root))], capture_output=True,
                              text=True, env=ENV, check=False, timeout=600)
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith(("evomerge", "usage"))]
        error = (lines or proc.stderr.strip().splitlines() or ["(nothing)"])[-1]
        left = []
        if _tree_digest(done) != before:
            left.append("finished run CHANGED")
        if case.creates is not None and case.creates(root).exists():
            left.append(f"{case.creates(root).name}/ created")
        if any(p.name.startswith(".") for p in (root / "runs").iterdir()):
            left.append("temporary directory left")
        ok = (proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) >= 1
              and not left)
        broken += not ok
        rows.append((case.name, proc.returncode, error.replace(str(root), "WS").replace("|", "\\|"),
                     ", ".join(left) or "nothing", "ok" if ok else "BROKEN"))
        leftovers = [case.creates(root)] if case.creates is not None else []  # so one case cannot fail the next
        for p in (root / "merged", root / "exp", root / "c.json", *leftovers):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    table = ["| case | exit | error (WS = the workspace) | left on disk | verdict |", "|---|---|---|---|---|"]
    table += [f"| {n} | {rc} | {e} | {left} | {v} |" for n, rc, e, left, v in rows]
    text = "\n".join(table) + f"\n\n{len(rows)} bad inputs, {broken} breaking the rule\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(root, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
