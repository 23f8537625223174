"""A generative task scored by a chosen filter and budget, end to end: calibrate records what it scored, the search
scores that, and export --verify scores it again on the exported checkpoints (real lm-eval, real tiny models)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.fitness.calibration import Calibration
from evomerge.testing.tasks import WHOLE_OR_FIRST_CHAR_FILTERS
from evomerge.testing.workspace import MODELS, make_search_workspace

N_ITEMS = 24

# the whole output, or its first non-space character (targets are first characters: only that filter scores)
ECHO_YAML = """\
task: t_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/t_echo.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""" + WHOLE_OR_FIRST_CHAR_FILTERS

SCORING = {"metric": "exact_match", "filter": "first_char", "max_gen_toks": 2}


@torch.no_grad()
def _first_chars(model_dir, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0].strip()
        out.append(text[:1] or "?")
    return out


@pytest.mark.slow
def test_calibrate_search_and_verify_score_the_filter_the_calibration_chose(tmp_path, capsys):
    root = make_search_workspace(tmp_path)
    prompts = [f"{a} and {a + 3} make" for a in range(10, 10 + N_ITEMS)]
    # targets: source_0's first characters on even items, source_1's on odd ones, so merges differ item by item
    firsts = [_first_chars(root / MODELS[k], prompts) for k in ("a", "b")]
    rows = [{"q": q, "target": firsts[i % 2][i]} for i, q in enumerate(prompts)]
    (root / "tasks" / "data" / "t_echo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks" / "t_echo.yaml").write_text(ECHO_YAML)

    calib = yaml.safe_load((root / "calibrate.yaml").read_text())
    calib.update(tasks=[{"task": "t_echo", "filter": "first_char", "max_gen_toks": 2}, "t_add"], out="echo.json")
    (root / "calibrate_echo.yaml").write_text(yaml.safe_dump(calib))
    assert main(["calibrate", str(root / "calibrate_echo.yaml")]) == 0
    calibration = Calibration.load(root / "echo.json")
    assert calibration.task("t_echo").scoring == SCORING  # resolved: the metric by name too
    assert calibration.task("t_add").scoring == {"metric": "acc", "filter": "none"}

    run = yaml.safe_load((root / "run.yaml").read_text())
    run["fitness"]["calibration"] = "echo.json"
    run["objectives"] = [{"task": "t_echo"}, {"task": "t_add"}]
    run["algorithm"] = {"pop_size": 4, "generations": 2}
    (root / "echo_run.yaml").write_text(yaml.safe_dump(run))
    run_dir = root / "runs" / "echo"
    assert main(["search", str(root / "echo_run.yaml"), "--run-dir", str(run_dir), "--in-process"]) == 0
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        answers = [json.loads(r)["t_echo"] for (r,) in db.execute("SELECT responses FROM evaluations "
                                                                  "WHERE status = 'ok'")]
    assert len({tuple(a.values()) for a in answers}) > 1 and any(v for a in answers for v in a.values())

    out = root / "exports"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(out), "--verify"]) == 0  # exit 1 on any anchor mismatch
    for exported in out.iterdir():
        verify = json.loads((exported / "verify.json").read_text())
        assert verify["anchors"]["matched"] and verify["anchors"]["checked"] == 12
        assert verify["tasks"]["t_echo"]["filter"] == "first_char" and verify["tasks"]["t_echo"]["items"] == N_ITEMS
