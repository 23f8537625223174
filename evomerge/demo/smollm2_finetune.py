"""Cheap, resumable fine-tuning of a pretrained causal LM on CPU: the SmolLM2 demo kit's specialists.

Only a subset of the weights trains (the MLPs of the upper layers: embeddings, attention and the lower layers
stay as the base has them), on short prompt/answer pairs with the loss on the answer tokens only. That is
several times cheaper per step than training everything, and it keeps the task vectors confined to a few
tensors, which is what merges of specialists want.

Resumable: every `save_every` steps, once `save_after` seconds have passed since the last save, the trainable
tensors, AdamW's state and the losses so far are written into `work/step-N/` (built aside, renamed into
place, and only then is the previous step deleted: a saved step exists at every moment), and a later call
continues from the last saved step.
Batches are a pure function of (seed, step) and the learning rate a pure function of the step, so a resumed
run computes the same steps as an uninterrupted one (same weights on the same machine and thread count).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Example = tuple[str, str]  # (prompt, answer): the loss is on the answer's tokens
Batches = Callable[[int], list[Example]]  # step -> that step's examples, deterministic
Progress = Callable[[int, int, str], None]
Log = Callable[[str], None]

STATE = "step-{:06d}"  # a saved step inside the work folder; the older one goes once the newer is in place
_TRAINABLE_FILE, _OPTIMIZER_FILE, _STEP_FILE = "trainable.safetensors", "optimizer.pt", "step.json"


@dataclass(frozen=True)
class Finetune:
    """One fine-tune's settings."""

    steps: int = 40
    lr: float = 3e-4
    warmup: int = 4  # steps of linear warmup, then cosine decay to 10% of lr
    first_layer: int = 15  # the MLPs of layers first_layer.. train; everything else is frozen
    save_every: int = 10  # steps between saved states, at least (a state of the default subset is ~0.5 GB)
    # and seconds of training since the last save: the adder's state (80M trained parameters and AdamW's
    # moments) is ~1 GB, ~14 s to write on a slow disk, more than 10 of its steps take
    save_after: float = 30.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def trainable_names(model, first_layer: int) -> list[str]:
    """The MLP weights of layers `first_layer` and up: the subset a fine-tune changes."""
    return [n for n, _ in model.named_parameters()
            if n.startswith("model.layers.") and ".mlp." in n and int(n.split(".")[2]) >= first_layer]


def finetune(base: Path, out: Path, work: Path, batches: Batches, settings: Finetune, *, name: str = "",
             dtype: str = "float32", tokenizer=None, progress: Progress | None = None, log: Log | None = None,
             ) -> list[float]:
    """Fine-tune the checkpoint `base` (in float32) and save it to `out` in `dtype` (safetensors, with the base's
    tokenizer and chat template), resuming from `work/` if an earlier call was interrupted; returns every step's
    loss.
    `progress(steps done, steps, name)` after each step (and once at the start with the steps already done)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.io.save import staged_dir

    hf_logging.disable_progress_bar()  # the caller shows the steps; loading and saving bars would only interleave
    progress = progress or (lambda done, total, note: None)
    log = log or (lambda message: None)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = trainable_names(model, settings.first_layer)
    if not names:
        raise ValueError(f"no MLP at layer {settings.first_layer} or above: the model has "
                         f"{model.config.num_hidden_layers} layers")
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    trained = [params[n] for n in names]
    opt = torch.optim.AdamW(trained, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = _resume(work, model, opt, names)
    start = len(losses)
    if start:
        log(f"  {name}: resuming at step {start}/{settings.steps} (saved in {work})")
    progress(start, settings.steps, name)
    model.train()
    t0 = saved = time.perf_counter()
    for step in range(start, settings.steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr_at(step)
        loss = answer_loss(model, tokenizer, batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(loss.item())
        progress(step + 1, settings.steps, name)
        if ((step + 1) % settings.save_every == 0 and step + 1 < settings.steps
                and time.perf_counter() - saved >= settings.save_after):
            _save_state(work, model, opt, names, losses)
            saved = time.perf_counter()
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            recent = losses[-settings.save_every:]
            log(f"  {name}: step {step + 1}/{settings.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"({(time.perf_counter() - t0) / max(1, step + 1 - start):.1f} s/step)")
    model.eval().to(getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps({"losses": losses, "trained": names}) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the finished model supersedes its saved states
    return losses


def answer_loss(model, tokenizer, examples: list[Example]) -> torch.Tensor:
    """Mean cross-entropy of the answers' tokens given their prompts (prompt tokens and padding not scored).
    Prompt and answer are tokenized apart, as lm-eval scores a continuation."""
    rows, targets = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        targets.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # right padding: positions unchanged
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _save_state(work: Path, model, opt, names: list[str], losses: list[float]) -> None:
    from safetensors.torch import save_file

    from evomerge.io.save import staged_dir

    params = dict(model.named_parameters())
    work.mkdir(parents=True, exist_ok=True)
    folder = work / STATE.format(len(losses))
    with staged_dir(folder) as tmp:
        save_file({n: params[n].detach().contiguous() for n in names}, tmp / _TRAINABLE_FILE)
        torch.save(opt.state_dict(), tmp / _OPTIMIZER_FILE)
        (tmp / _STEP_FILE).write_text(json.dumps({"step": len(losses), "losses": losses, "trained": names}) + "\n")
    for old in _saved(work):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _saved(work: Path) -> list[Path]:
    """The saved steps in `work`, oldest first (staged_dir's partial folders start with a dot: not listed)."""
    return sorted(work.glob("step-*")) if work.is_dir() else []


def _resume(work: Path, model, opt, names: list[str]) -> list[float]:
    """The losses of the saved steps, with the model's trainable tensors and the optimizer restored from them;
    [] when nothing was saved (or it was saved for another subset of tensors: then it starts over)."""
    from safetensors.torch import load_file

    folders = _saved(work)
    if not folders:
        return []
    folder = folders[-1]
    try:
        saved = json.loads((folder / _STEP_FILE).read_text())
    except (OSError, ValueError):
        return []
    if saved.get("trained") != names:
        return []
    tensors = load_file(folder / _TRAINABLE_FILE)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[n])
    opt.load_state_dict(torch.load(folder / _OPTIMIZER_FILE, weights_only=True))
    return list(saved["losses"])
