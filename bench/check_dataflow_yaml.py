"""Round trip of a data-flow export's mergekit.yaml: mergekit 0.1.5 (and evomerge) run it, and the tensors must
equal the folded export's.

On tiny Llama, Qwen2 and GPT-2 families (two fine-tunes each), `evomerge merge` runs a data-flow recipe whose path
starts and ends in model A, repeats layers, crosses models and scales the stream (c_k != 1). The export
writes mergekit.yaml next to the checkpoint; this script runs mergekit on it (bench/.mergekit-venv, via
bench/mergekit_runner.py) and `evomerge merge` on it, and prints each side's max abs diff against the export.

    python bench/check_dataflow_yaml.py   (needs: bash bench/setup_mergekit_env.sh)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "out" / "dataflow_yaml"
MERGEKIT_PY = ROOT / ".mergekit-venv" / "bin" / "python"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    if set(a) != set(b):
        return float("inf"), f"names differ: {sorted(set(a) ^ set(b))[:4]}"
    worst = max((x.float() - b[n].float()).abs().max().item() for n, x in a.items())
    return worst, ""


def main() -> int:
    from evomerge.testing.tiny import TinySpec, make_family
    from evomerge.worker.merge_command import merge_from_yaml

    if not MERGEKIT_PY.is_file():
        print("mergekit is not installed: run `bash bench/setup_mergekit_env.sh` first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cases = []
    for arch in ("llama", "qwen2", "gpt2"):
        fam = make_family(WORK / arch, TinySpec(arch=arch, layers=4), n_sources=2)
        a, b = fam.sources
        recipe = {"merge_method": "dataflow", "sources": [{"name": "a", "model": str(a)}, {"name": "b", "model": str(b)}],
                  "path": [["a", 0], ["a", 1, 1.3], ["b", 1, 0.8], ["b", 2, 0.8], ["b", 2], ["a", 2, 1.9],
                           ["b", 3, 0.7], ["a", 3, 1.25]]}
        yml = WORK / f"{arch}_dataflow.yml"
        yml.write_text(yaml.safe_dump(recipe))
        export = WORK / f"{arch}_export"
        merge_from_yaml(yml, export, force=True)
        if not (export / "mergekit.yaml").is_file():
            print(f"{arch}: the export wrote no mergekit.yaml")
            return 1
        evo = WORK / f"{arch}_evomerge_from_yaml"
        merge_from_yaml(export / "mergekit.yaml", evo, force=True)
        cases.append((arch, export, evo))
    jobs = {"device": "cpu", "seed": 0, "jobs": [
        {"name": arch, "yaml": str(export / "mergekit.yaml"), "out": str(WORK / f"{arch}_mergekit")}
        for arch, export, _ in cases]}
    (WORK / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([str(MERGEKIT_PY), str(ROOT / "mergekit_runner.py"), str(WORK / "jobs.json"),
                    str(WORK / "result.json")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads((WORK / "result.json").read_text())["jobs"]
    failed = False
    for arch, export, evo in cases:
        ref = tensors(export)
        ev, why_e = max_diff(ref, tensors(evo))
        config = json.loads((export / "config.json").read_text())
        layers = config.get("num_hidden_layers", config.get("n_layer"))
        failed |= not ev <= 1e-6
        error = result[arch]["error"]
        if error and "layer_types" in error:
            # a mergekit limitation, not a wrong file: it keeps the donor's per-layer layer_types list, which
            # transformers 5 refuses once the layer count changes (the file's header says so)
            print(f"{arch}: {len(ref)} tensors, {layers} layers; mergekit 0.1.5 cannot save it (keeps layer_types "
                  f"of the old length); evomerge on mergekit.yaml vs export: max abs diff {ev:.2e} {why_e}")
            continue
        if error:
            print(f"{arch}: mergekit failed: {error}")
            failed = True
            continue
        mk, why_m = max_diff(ref, tensors(WORK / f"{arch}_mergekit"))
        print(f"{arch}: {len(ref)} tensors, {layers} layers; mergekit on mergekit.yaml vs export: max abs diff "
              f"{mk:.2e} {why_m}; evomerge on mergekit.yaml vs export: {ev:.2e} {why_e}")
        failed |= not mk <= 1e-6
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
