"""Run mergekit's `run_merge` in-process on a list of merge YAMLs: the reference side of the benchmarks.

Runs under bench/.mergekit-venv/bin/python (mergekit is never installed into the project's venv), is
driven by bench_materialize.py and check_against_mergekit.py, and talks to them through JSON files:

    mergekit_runner.py JOBS.json RESULT.json

JOBS.json:
    {"device": "cpu", "seed": 0, "repeats": 5, "warmup": 1, "clear_loader_cache": false,
     "jobs": [{"name": "ties", "yaml": "/abs/ties.yml", "out": null}, ...]}
    (a job may add "options": {MergeOptions field: value} to override the defaults below for it alone)

A job with "out" set is merged once into that directory and kept (equality checks). A job without
it is timed: `warmup` untimed calls, then `repeats` timed ones, each into a fresh temporary
directory that is deleted afterwards (deletion is not timed). mergekit is imported once, so its
import cost (several seconds) is not part of any timing.

RESULT.json: {"mergekit_version": ..., "methods": [the names mergekit registers],
              "jobs": {name: {"times_s": [...], "error": null}}}
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import MergeOptions, run_merge


def merge_once(yaml_text: str, out: str, options: MergeOptions, clear_loader_cache: bool) -> float:
    # run_merge rewrites the configuration it is given (models -> slices), so parse afresh each call.
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    if clear_loader_cache:
        # LoaderCache is a process-wide singleton holding open shard handles per model; inputs are
        # never rewritten here, so clearing is optional (it makes each call start cold, like the CLI).
        LoaderCache().loaders.clear()
    if options.device and options.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_merge(config, out, options)  # returns after every tensor is written to disk
    if options.device and options.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(jobs_path: str, result_path: str) -> int:
    spec = json.loads(Path(jobs_path).read_text())
    device = spec.get("device", "cpu")
    options = MergeOptions(
        device=device,
        cuda=device.startswith("cuda"),
        copy_tokenizer=False,
        write_model_card=False,
        lazy_unpickle=False,
        low_cpu_memory=False,
        out_shard_size=10**12,  # one shard: no sharding logic in the timed path
        random_seed=spec.get("seed", 0),
        quiet=True,
    )
    clear = bool(spec.get("clear_loader_cache", False))
    repeats, warmup = int(spec.get("repeats", 5)), int(spec.get("warmup", 1))
    scratch = Path(tempfile.mkdtemp(prefix="mergekit_bench_", dir=spec.get("scratch")))
    results: dict[str, dict] = {}
    try:
        for job in spec["jobs"]:
            text = Path(job["yaml"]).read_text()
            entry: dict = {"times_s": [], "error": None}
            # per-job MergeOptions overrides (e.g. {"copy_tokenizer": true} to compare tokenizers and chat templates)
            job_options = options.model_copy(update=job["options"]) if job.get("options") else options
            results[job["name"]] = entry
            try:
                if job.get("out"):
                    shutil.rmtree(job["out"], ignore_errors=True)
                    entry["times_s"].append(merge_once(text, job["out"], job_options, clear))
                    continue
                for i in range(warmup + repeats):
                    out = tempfile.mkdtemp(dir=scratch)
                    elapsed = merge_once(text, out, options, clear)
                    shutil.rmtree(out)
                    if i >= warmup:
                        entry["times_s"].append(elapsed)
                    print(f"mergekit {job['name']}: {elapsed * 1e3:.1f} ms{' (warm-up)' if i < warmup else ''}",
                          file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001  (report and go on: one failing recipe should not hide the others)
                entry["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from mergekit.merge_methods import registered_methods  # the oracle's own method list (coverage check)

    methods = sorted(m.spec.name for m in registered_methods())
    Path(result_path).write_text(json.dumps({"mergekit_version": version("mergekit"), "methods": methods,
                                             "jobs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
