"""The model card (README.md) of an exported candidate: sources, recipe, search settings, scores.

A pure function of data (the ledger record, the run config, the recipe file's text, the verification
result), so the card says exactly what the ledger and the written files say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from evomerge.search.ledger import Record

if TYPE_CHECKING:
    from evomerge.config import RunConfig


def model_card(
    rec: Record,
    config: RunConfig,
    *,
    kind: str,  # ps, dataflow or hybrid
    objectives: Mapping[str, float],  # objective name -> value as `evomerge status` shows it
    recipe_file: str,  # mergekit_config.yml or evomerge_recipe.yml
    recipe_text: str,  # that file's text
    verification: Mapping[str, Any] | None = None,  # verify.json's content
) -> str:
    run_name = config.name
    ps = kind == "ps"
    what = {"ps": "A parameter-space merge",
            "dataflow": "A data-flow merge (a path of the sources' layers, its scales folded into the weights)",
            "hybrid": "A hybrid merge (a path of the sources' layers and of a parameter-space merge's, its scales "
                      "folded into the weights)"}[kind]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        "",
        f"# {run_name} / {rec.key}",
        "",
        (f"{what}, found by an evomerge evolutionary search (run `{run_name}`, generation {rec.generation}, "
         f"candidate {rec.index}). It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(<this folder>)`."),
        "",
        "## Sources",
        "",
        "| name | path |",
        "|---|---|",
        *(f"| {name} | `{path}` |" for name, path in config.sources.models.items()),
    ]
    if config.sources.base_model:
        lines.append(f"| base model | `{config.sources.base_model}` |")
    seed = rec.seed if rec.seed is not None else 0
    lines += [
        "",
        "## Recipe",
        "",
        f"`{recipe_file}` (merge seed {seed}, used by the random methods: DARE, DELLA):",
        "",
        "```yaml",
        recipe_text.rstrip("\n"),
        "```",
        "",
        f"Rebuild it with `evomerge merge {recipe_file} --out DIR --seed {seed}`"
        + (" (or with mergekit: `mergekit-yaml mergekit_config.yml DIR`; random methods draw other masks there)."
           if ps else "."),
        "",
        "## Search",
        "",
        "| setting | value |",
        "|---|---|",
        f"| run | {run_name} |",
        f"| algorithm | {config.algorithm.name} |",
        f"| population size | {config.algorithm.pop_size} |",
        f"| generations | {config.algorithm.generations} |",
        f"| seed | {config.seed} |",
        f"| search space | `{_inline(config.search_space)}` |",
        f"| estimator | {config.fitness.estimator} |",
        f"| objectives | {', '.join(o.name for o in config.objectives)} |",
    ]
    if config.max_path_length is not None:
        lines.append(f"| max path length | {config.max_path_length} |")
    lines += ["", "## Scores", "", *_estimates(rec, config.fitness.estimator), "",
              ("Objectives (as `evomerge status` shows them: task accuracies estimated by the run's estimator, "
               "costs as they are):"), "",
              "| objective | value |", "|---|---|", *(f"| {n} | {_num(v)} |" for n, v in objectives.items())]
    if verification is not None:
        lines += ["", *_verification(verification)]
    return "\n".join(lines) + "\n"


def _estimates(rec: Record, objective_estimator: str) -> list[str]:
    estimates = rec.estimates or {}
    names = list(dict.fromkeys(k for v in estimates.values() if isinstance(v, Mapping) for k in v))
    lines = [(f"Estimated full-task accuracy from the anchor items the search scored (IRT; "
              f"`{objective_estimator}` is the objective's estimator):"), ""]
    lines += ["| task | anchors right | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, values in estimates.items():
        answers = (rec.responses or {}).get(task, {})
        right = f"{sum(answers.values())}/{len(answers)}"
        values = values if isinstance(values, Mapping) else {objective_estimator: values}
        lines.append(f"| {task} | {right} | " + " | ".join(_num(values.get(n)) for n in names) + " |")
    return lines


def _verification(v: Mapping[str, Any]) -> list[str]:
    anchors = v["anchors"]
    lines = ["## Verification", "",
             ("This folder, loaded back with plain `AutoModelForCausalLM.from_pretrained`, scored on every item "
              "of each task:"), "",
             "| task | metric | items | full-task score | estimated during the search |", "|---|---|---|---|---|"]
    for task, s in v["tasks"].items():
        lines.append(f"| {task} | {s['metric']} | {s['items']} | {_num(s['accuracy'])} | {_num(s.get('estimated'))} |")
    if anchors["matched"]:
        lines += ["", (f"Its answers on the {anchors['checked']} anchor items equal the ones recorded in the "
                       "search's ledger.")]
    else:
        shown = ", ".join(f"{m['task']} item {m['item']}" for m in anchors["mismatches"][:10])
        lines += ["", (f"**Its answers on {len(anchors['mismatches'])} of {anchors['checked']} anchor items differ "
                       f"from the ones recorded in the search's ledger** ({shown}): this checkpoint is not exactly "
                       "the model the search scored.")]
    return lines


def _num(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def _inline(value: Any) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
