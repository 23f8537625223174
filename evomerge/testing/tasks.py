"""Tiny lm-eval multiple-choice tasks written on the fly (addition questions), for tests and benchmarks."""

from __future__ import annotations

import json
import random
from pathlib import Path

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

# Two filter pipelines of one generation, for generate_until task YAMLs: the whole output, or its first non-space
# character. Targets that are first characters make them disagree item by item.
WHOLE_OR_FIRST_CHAR_FILTERS = """\
filter_list:
  - name: whole
    filter:
      - function: take_first
  - name: first_char
    filter:
      - function: regex
        regex_pattern: '(\\S)'
      - function: take_first
"""


def write_choice_tasks(folder: Path, sizes: dict[str, int], *, seed: int = 0, n_choices: int = 3) -> Path:
    """Write one task per name with `sizes[name]` items into folder (YAMLs, data/ beside them); returns folder.
    The label is drawn at random, so tiny random models score near chance, and merges differ item by item."""
    rng = random.Random(seed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        rows = []
        for _ in range(n):
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            choices = [f" {a + b}", f" {a + b + 1}", f" {a}", f" {a + b - 10}"][:n_choices]
            rows.append({"q": f"{a} plus {b} is", "choices": choices, "label": rng.randrange(n_choices)})
        (folder / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name))
    return folder
