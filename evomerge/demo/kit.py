"""The demo kit: a tiny base language model and two specialists, trained locally on synthetic data.

`build_demo_kit(cache_dir)` trains (once, then cached) on CPU with a fixed seed:
  base        a character-level Llama trained on generic text, addition in prose (`12 plus 34 is 46.`)
              and a made-up digit vocabulary (`ki ra is 12.`): the knowledge sits in the base
  adder       base fine-tuned on `12+34=46`            (skill A, task demo_add)
  translator  base fine-tuned on `ki ra+mu te=12+34`   (skill B, task demo_words)
and writes the lm-eval tasks (search and test splits, see evomerge.demo.data) beside them.

Why this recipe (measured, see DEMO_NOTES): with the skills' knowledge in the base, the specialists
learn mostly a format, their task vectors stay small, and merges keep part of both skills.

The cache is a folder per configuration, `cache_dir/kit-<hash>/`, and a link `cache_dir/kit` to the one
last returned (run configs such as runs/demo.yaml name the models through it). Each folder is built under a temporary name and
renamed into place only when complete; its manifest.json lists every file with its SHA-256, so a
damaged kit is rebuilt, never trusted. Leftovers of an interrupted build are deleted by the next build
of the same configuration (two builds of one configuration into one cache at once are not supported).

Same seed, same weights: on one machine with the same number of torch threads (the thread count
changes the order of floating-point sums, so 1 and 2 threads give slightly different weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evomerge.demo import data
from evomerge.seeds import derive_seed

KIT_VERSION = 1  # bump when the training code changes what a configuration builds
MANIFEST = "manifest.json"
SPECIALISTS = ("adder", "translator")
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2; no BOS: nothing is ever prepended

Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]  # progress(steps done, steps in all, model being trained)


@dataclass(frozen=True)
class KitConfig:
    """What the demo kit trains. Defaults are the real demo: 1,400 training steps of a 0.86M-parameter
    model, about 3 minutes on 2 idle CPU cores (at ~0.22 s per step on one core)."""

    seed: int = 0  # model init and training data order
    # Model: LlamaForCausalLM over characters, ~0.87M parameters at the defaults
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384  # MLP width
    max_positions: int = 128  # task items are at most ~20 characters
    # Training: blocks of `block` characters (each starts at a line start), AdamW, warmup + cosine decay
    block: int = 64
    batch: int = 32
    base_steps: int = 800
    base_lr: float = 2e-3
    base_weight_decay: float = 0.1
    specialist_steps: int = 300
    specialist_lr: float = 1e-3  # 3e-4 under-trains the adder, and its merges get worse
    specialist_weight_decay: float = 0.0  # decay would move every weight: noise in the task vectors
    warmup: int = 30  # steps of linear warmup (base and specialists)
    replay: float = 0.2  # share of base-corpus lines in a specialist's training data
    # Base corpus mix: generic text, addition in prose, vocabulary (`ki ra is 12.`)
    mix: tuple[float, float, float] = (0.35, 0.35, 0.30)
    log_every: int = 100  # steps between loss lines (done/total and an ETA: build_demo_kit(progress=...))
    data: data.DataSpec = field(default_factory=data.DataSpec)

    def key(self) -> str:
        """Hash of the version and of every field that changes what is built: names the cache folder."""
        fields = {k: v for k, v in _config_dict(self).items() if k != "log_every"}
        blob = json.dumps({"version": KIT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class DemoKit:
    root: Path  # cache_dir/kit-<hash>
    base: Path  # HF checkpoint folders (safetensors, config, tokenizer)
    specialists: dict[str, Path]  # {"adder": ..., "translator": ...}
    tasks_dir: Path  # lm-eval YAMLs (demo_add, demo_add_test, ...) with data/ beside them
    manifest: dict = field(default_factory=dict, compare=False, repr=False)


def build_demo_kit(
    cache_dir: str | Path,
    log: Log | None = None,
    force: bool = False,
    *,
    config: KitConfig | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> DemoKit:
    """Return the demo kit for `config`, building it into `cache_dir` unless a complete, verified copy
    is there already (then this takes milliseconds). `force` rebuilds anyway.

    `threads`: torch CPU threads while training (None: torch's default, one per core). On a machine
    whose cores are busy with other work, 1 thread trains 2-3x faster than 2 contended ones.

    `progress(done, total, name)` is called after every training step, counting the steps of all three
    models (nothing is called when the kit is cached)."""
    config = config or KitConfig()
    log = log or (lambda msg: None)
    progress = progress or (lambda done, total, name: None)
    cache_dir = Path(cache_dir)
    key = config.key()
    root = cache_dir / f"kit-{key[:12]}"
    if not force:
        manifest = _verified_manifest(root, key)
        if manifest is not None:
            log(f"demo kit: cached in {root}")
            _link_current(cache_dir, root)
            return _kit(root, manifest)
        if root.exists():
            log(f"demo kit: {root} is incomplete or damaged; rebuilding it")

    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".kit-{key[:12]}.partial-", dir=cache_dir))
    try:
        with _torch_threads(threads):
            manifest = _build(tmp, config, key, log, progress)
        if root.exists():  # replaced: move aside first, so `root` is never half old, half new
            old = Path(tempfile.mkdtemp(prefix=f".kit-{key[:12]}.old-", dir=cache_dir))
            root.rename(old / "kit")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"demo kit: built in {manifest['seconds']['total']:.0f} s, in {root}")
    _link_current(cache_dir, root)
    return _kit(root, manifest)


# ---------------------------------------------------------------------------------------------
# Building


def _build(out: Path, config: KitConfig, key: str, log: Log, progress: Progress) -> dict:
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    tokenizer = build_tokenizer(config.max_positions)
    spec = config.data
    total = config.base_steps + len(SPECIALISTS) * config.specialist_steps
    trained = 0  # steps of the models trained before this one

    def on_step(name: str) -> Callable[[int], None]:
        return lambda step: progress(trained + step, total, name)

    t0 = time.perf_counter()
    base = new_model(config, len(tokenizer))
    log(f"demo kit: training the base model ({_n_params(base) / 1e6:.2f}M parameters, "
        f"{config.base_steps} steps of {config.batch} x {config.block} characters)")
    corpus = _batches(lambda r: data.base_line(r, spec, config.mix), tokenizer, config, config.base_steps, "base")
    train(base, corpus, lr=config.base_lr, weight_decay=config.base_weight_decay, config=config, log=log, name="base",
          on_step=on_step("base"))
    trained += config.base_steps
    _save(base, tokenizer, out / "base")
    seconds["base"] = time.perf_counter() - t0

    lines = {"adder": data.adder_line, "translator": data.translator_line}
    for name in SPECIALISTS:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        log(f"demo kit: fine-tuning the {name} ({config.specialist_steps} steps, {config.replay:.0%} base replay)")

        def line(r: random.Random, task_line=lines[name]) -> str:
            return data.base_line(r, spec, config.mix) if r.random() < config.replay else task_line(r, spec)

        corpus = _batches(line, tokenizer, config, config.specialist_steps, name)
        train(model, corpus, lr=config.specialist_lr, weight_decay=config.specialist_weight_decay,
              config=config, log=log, name=name, on_step=on_step(name))
        trained += config.specialist_steps
        _save(model, tokenizer, out / name)
        seconds[name] = time.perf_counter() - t0

    data.write_tasks(out / "tasks", spec)
    seconds["total"] = time.perf_counter() - t_start
    manifest = {
        "kind": "evomerge-demo-kit",
        "version": KIT_VERSION,
        "key": key,
        "config": _config_dict(config),
        "torch": torch.__version__,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "files": {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    return manifest


def build_tokenizer(max_length: int = 128):
    """A character tokenizer over `data.ALPHABET`: one token per character, no BOS, EOS and pad set.
    Decoding joins characters back exactly (no spaces inserted)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*_SPECIAL_TOKENS, *data.ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def new_model(config: KitConfig, vocab_size: int):
    """A freshly initialised Llama (seeded; the global torch RNG is left as it was)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        intermediate_size=config.intermediate, max_position_embeddings=config.max_positions,
        bos_token_id=None, eos_token_id=_SPECIAL_TOKENS.index("<eos>"), pad_token_id=_SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        return LlamaForCausalLM(cfg)


def _batches(line, tokenizer, config: KitConfig, steps: int, name: str) -> torch.Tensor:
    """(steps, batch, block + 1) token ids: inputs are [:, :-1], targets [:, 1:]."""
    rng = random.Random(derive_seed(config.seed, "corpus", name))
    texts = data.blocks(line, rng, steps * config.batch, config.block + 1)
    vocab = tokenizer.get_vocab()
    ids = [[vocab[c] for c in t] for t in texts]  # character tokenizer: one id per character
    return torch.tensor(ids, dtype=torch.long).view(steps, config.batch, config.block + 1)


def train(model, batches: torch.Tensor, *, lr: float, weight_decay: float, config: KitConfig,
          log: Log, name: str, on_step: Callable[[int], None] = lambda steps_done: None) -> list[float]:
    """Next-character training over `batches` (steps, B, T+1); AdamW, linear warmup then cosine decay to
    10% of lr. Deterministic: no dropout, no sampling. Returns the loss of each step; `on_step(steps done)`
    after each."""
    steps = batches.shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        x = batches[step]  # (B, T+1)
        logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        on_step(step + 1)
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            recent = losses[-min(len(losses), config.log_every):]
            log(f"  {name}: step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def _save(model, tokenizer, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Cache


def _verified_manifest(root: Path, key: str) -> dict | None:
    """The manifest of a complete kit for `key` whose files all match their hashes, else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("kind") != "evomerge-demo-kit" or manifest.get("key") != key:
        return None
    files = manifest.get("files") or {}
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            return None
    needed = ["base/config.json", "tasks/demo_add.yaml"] + [f"{s}/config.json" for s in SPECIALISTS]
    return manifest if all(n in files for n in needed) else None


def _kit(root: Path, manifest: dict) -> DemoKit:
    return DemoKit(
        root=root, base=root / "base", specialists={s: root / s for s in SPECIALISTS},
        tasks_dir=root / "tasks", manifest=manifest,
    )


def _link_current(cache_dir: Path, root: Path) -> None:
    """Point `cache_dir/kit` at `root` (relative, replaced atomically: a reader sees the old or the new kit)."""
    link = cache_dir / "kit"
    if link.is_symlink() and Path(link.readlink()) == Path(root.name):
        return
    tmp = cache_dir / f".kit-link-{root.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(root.name, target_is_directory=True)
    tmp.replace(link)


def _remove_stale(cache_dir: Path, key: str) -> None:
    """Delete leftovers of an interrupted build of this configuration (a crash between mkdtemp and rename)."""
    for p in cache_dir.glob(f".kit-{key[:12]}.*-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_dict(config: KitConfig) -> dict:
    d = asdict(config)
    d["mix"] = list(config.mix)
    return d


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
