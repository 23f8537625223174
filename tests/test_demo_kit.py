"""The demo kit: synthetic data (deterministic, held-out pairs never trained), committed task files, the
character tokenizer, a tiny kit build (cache, crash safety, determinism) and the tasks under lm-eval."""

from __future__ import annotations

import dataclasses
import random
import re
import time
from pathlib import Path

import pytest

from evomerge.demo import data
from evomerge.demo.kit import MANIFEST, SPECIALISTS, KitConfig, build_demo_kit, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "fitness" / "demo"

# Small enough to train in a second or two; same data as the real kit.
TINY = KitConfig(hidden=32, layers=2, heads=2, intermediate=64, block=32, batch=4,
                 base_steps=6, specialist_steps=4, warmup=2, log_every=3)


# ---------------------------------------------------------------------------------------------
# Data


def test_generator_is_deterministic():
    a, b = data.DataSpec(), data.DataSpec()
    assert a.splits == b.splits
    assert data.render_files(a) == data.render_files(b)
    other = data.render_files(data.DataSpec(seed=1))
    assert other["data/demo_add_test.jsonl"] != data.render_files(a)["data/demo_add_test.jsonl"]


def test_splits_are_disjoint_and_sized():
    spec = data.DataSpec()
    unordered = {name: {frozenset(p) for p in pairs} for name, pairs in spec.splits.items()}
    assert not unordered["search"] & unordered["test"]
    assert not (unordered["search"] | unordered["test"]) & unordered["train"]
    assert len(spec.splits["search"]) == spec.n_search == 500
    assert len(spec.splits["test"]) == spec.n_test == 300
    every = [(a, b) for a in range(spec.lo, spec.hi + 1) for b in range(spec.lo, spec.hi + 1)]
    assert sorted(p for pairs in spec.splits.values() for p in pairs) == every  # a partition of all operand pairs


def _pairs_in(text: str) -> set[frozenset]:
    """Every operand pair a line mentions, in any of the corpora's forms."""
    found = set()
    for a, b in re.findall(r"(\d+) plus (\d+) is", text) + re.findall(r"(\d+)\+(\d+)=", text):
        found.add(frozenset((int(a), int(b))))
    word = "|".join(data.DIGIT_WORDS)
    for a, b in re.findall(rf"((?:(?:{word}) ?)+)\+((?:(?:{word}) ?)+)=", text):
        to_n = {w: str(i) for i, w in enumerate(data.DIGIT_WORDS)}
        found.add(frozenset(int("".join(to_n[w] for w in s.split())) for s in (a, b)))
    return found


def test_no_held_out_pair_in_any_training_corpus():
    spec = data.DataSpec()
    held = {frozenset(p) for split in data.SPLITS for p in spec.splits[split]}
    rng = random.Random(0)
    lines = [data.base_line(rng, spec, (0.0, 1.0, 0.0)) for _ in range(20_000)]  # all prose addition
    lines += [data.adder_line(rng, spec) for _ in range(20_000)]
    lines += [data.translator_line(rng, spec) for _ in range(20_000)]
    lines += [data.base_line(rng, spec, KitConfig().mix) for _ in range(5_000)]
    seen = set().union(*map(_pairs_in, lines))
    assert len(seen) > 300  # the parser does find the training pairs
    assert not seen & held
    assert set("".join(lines)) <= set(data.ALPHABET)


def test_items_are_well_formed():
    spec = data.DataSpec()
    for task in data.TASKS:
        for split in data.SPLITS:
            items = data.task_items(task, split, spec)
            assert len(items) == len(spec.splits[split])
            assert len({it["id"] for it in items}) == len(items)
            for it in items:
                a, b, choices = it["a"], it["b"], it["choices"]
                right = {"demo_add": f"{a + b}", "demo_words": f"{a}+{b}", "demo_cross": f"{a}+{b}={a + b}"}[task]
                assert choices[it["label"]] == right
                assert len(set(choices)) == 4 and len({len(c) for c in choices}) == 1
            labels = [it["label"] for it in items]
            assert all(labels.count(k) > len(items) / 8 for k in range(4))  # the answer's position varies


def test_cross_items_need_both_skills():
    # One distractor translates right (needs an adder to rule out); two add up consistently (need a translator).
    for it in data.task_items("demo_cross", "test")[:50]:
        wrong = [c for i, c in enumerate(it["choices"]) if i != it["label"]]
        right_translation = [c for c in wrong if c.startswith(f"{it['a']}+{it['b']}=")]
        consistent = [c for c in wrong if sum(map(int, c.split("=")[0].split("+"))) == int(c.split("=")[1])]
        assert len(right_translation) == 1 and len(consistent) == 2


def test_committed_task_files_equal_the_generator():
    rendered = data.render_files()
    on_disk = {p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*") if p.is_file()} - {"README.md"}
    assert on_disk == set(rendered), "run: python -m evomerge.demo.data --write fitness/demo"
    for rel, text in rendered.items():
        assert (COMMITTED / rel).read_bytes() == text.encode(), f"{rel} differs: regenerate fitness/demo"


def test_write_tasks_cli(tmp_path):
    assert data.main(["--write", str(tmp_path)]) == 0
    for rel, text in data.render_files().items():
        assert (tmp_path / rel).read_text() == text


def test_write_tasks_cli_as_a_module_and_its_usage_error(tmp_path, capsys):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "evomerge.demo.data", "--write", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and (tmp_path / "demo_add.yaml").is_file()
    assert data.main([]) == 2 and "--write DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_every_task_character(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = [data.ALPHABET]
    for task in data.TASKS:
        for split in data.SPLITS:
            texts += [it["context"] + c for it in data.task_items(task, split) for c in it["choices"]]
    chars = set("".join(texts))
    assert chars <= set(data.ALPHABET)
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per character, nothing prepended or appended
        assert tok.decode(ids) == text
    assert tok.unk_token_id not in tok.encode(data.ALPHABET)
    assert tok.bos_token_id is None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok("12+34=")["input_ids"] == tok.encode("12+34=")  # no special tokens either way


# ---------------------------------------------------------------------------------------------
# A tiny kit


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory):
    lines: list[str] = []
    t0 = time.perf_counter()
    kit = build_demo_kit(tmp_path_factory.mktemp("kit"), log=lines.append, config=TINY)
    return kit, lines, time.perf_counter() - t0


@pytest.mark.slow
def test_tiny_kit_builds_and_loads(tiny_kit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kit, lines, _ = tiny_kit
    assert set(kit.specialists) == set(SPECIALISTS)
    assert any("base: step 6/6" in line and "loss" in line for line in lines)
    assert any("adder: step 4/4" in line for line in lines)
    for path in (kit.base, *kit.specialists.values()):
        assert (path / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.hidden_size == TINY.hidden and model.config.vocab_size == len(tok)
        assert tok.decode(tok.encode("ki ra+mu te=12+34=46")) == "ki ra+mu te=12+34=46"
    for task in data.TASKS:
        assert (kit.tasks_dir / f"{task}.yaml").is_file() and (kit.tasks_dir / f"{task}_test.yaml").is_file()
    assert (kit.root / MANIFEST).is_file()


@pytest.mark.slow
def test_tiny_kit_cache_hit_and_crash_safety(tiny_kit):
    kit, _, _ = tiny_kit
    cache = kit.root.parent
    lines: list[str] = []
    t0 = time.perf_counter()
    again = build_demo_kit(cache, log=lines.append, config=TINY)
    assert time.perf_counter() - t0 < 1.0
    assert again == kit and lines == [f"demo kit: cached in {kit.root}"]

    # A damaged kit (a file missing) is rebuilt, not trusted; leftovers of a crashed build are removed.
    weights = kit.specialists["adder"] / "model.safetensors"
    before = weights.read_bytes()
    weights.unlink()
    leftover = cache / f"{kit.root.name.replace('kit-', '.kit-')}.partial-crashed"
    leftover.mkdir()
    lines.clear()
    rebuilt = build_demo_kit(cache, log=lines.append, config=TINY)
    assert rebuilt == kit and "rebuilding" in lines[0]
    assert weights.read_bytes() == before  # same seed, same weights
    assert not leftover.exists()
    assert sorted(p.name for p in cache.iterdir()) == ["kit", kit.root.name]

    # A changed configuration gets its own folder; the `kit` link follows the kit last returned.
    other = build_demo_kit(cache, config=dataclasses.replace(TINY, seed=1))
    assert other.root != kit.root and (cache / "kit").resolve() == other.root.resolve()
    build_demo_kit(cache, config=TINY)
    assert (cache / "kit" / "adder" / "config.json").is_file() and (cache / "kit").resolve() == kit.root.resolve()


@pytest.mark.slow
def test_interrupted_build_leaves_nothing(tmp_path):
    def log(msg: str) -> None:
        if "adder: step" in msg:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the adder trains

    with pytest.raises(KeyboardInterrupt):
        build_demo_kit(tmp_path, log=log, config=TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_same_seed_same_weights(tiny_kit, tmp_path):
    kit, _, _ = tiny_kit
    again = build_demo_kit(tmp_path, config=TINY)
    files = kit.manifest["files"]
    assert files == again.manifest["files"]  # SHA-256 of every file, weights included
    weights = {f for f in files if f.endswith(".safetensors")}
    assert weights == {f"{m}/model.safetensors" for m in ("base", *SPECIALISTS)}


@pytest.mark.slow
def test_tasks_run_under_lm_eval(tiny_kit, tmp_path):
    """Both splits of every task load and score with lm-eval's HFLM (data paths made absolute here: the
    scorer resolves them relative to the YAML for real runs)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kit, _, _ = tiny_kit
    for yaml_file in kit.tasks_dir.glob("*.yaml"):
        text = yaml_file.read_text().replace(" data/", f" {kit.tasks_dir / 'data'}/")
        (tmp_path / yaml_file.name).write_text(text)
    model = AutoModelForCausalLM.from_pretrained(kit.specialists["adder"]).eval()
    tok = AutoTokenizer.from_pretrained(kit.specialists["adder"])
    lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=16)
    names = [data.task_name(t, s) for t in data.TASKS for s in data.SPLITS]
    out = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        limit=3, log_samples=True, verbosity="ERROR",
    )
    for name in names:
        assert 0.0 <= out["results"][name]["acc,none"] <= 1.0
        samples = out["samples"][name]
        assert len(samples) == 3 and all(len(s["resps"]) == 4 for s in samples)
    # The split decides the data: the search task reads search items, the _test task test items.
    assert out["samples"]["demo_add"][0]["doc"]["id"].startswith("demo_add-search-")
    assert out["samples"]["demo_add_test"][0]["doc"]["id"].startswith("demo_add-test-")
    # The continuation follows the context directly: "12+34=" + "46", no space between.
    first = out["samples"]["demo_add"][0]
    assert first["arguments"][0] == (first["doc"]["context"], first["doc"]["choices"][0])
