"""Run the public mergekit recipes in bench/recipes/ through evomerge and mergekit 0.1.5, and compare.

Every model a recipe names is replaced by a tiny random model of the right layer count (evomerge.testing.tiny:
one family per recipe shape, so fine-tunes share a base; Qwen recipes get qwen2 models, GPT-2 ones gpt2,
Mistral ones mistral, the rest llama). The non-base models' tokenizers carry three extra tokens and a ChatML
template, so `tokenizer_source: union`, `tokenizer:` and `chat_template: auto` have something to do.
Then each recipe runs through `evomerge merge` (in process) and mergekit's run_merge (bench/.mergekit-venv,
via bench/mergekit_runner.py), and one line per recipe says:

    equal      every tensor present in both, max abs diff within the output dtype's tolerance (printed);
               vocabulary rows compared by token, so ids that differ only in order do not count
    random     a random method (dare/della/...): masks differ by design, so the share of entries left at
               the base and the task-vector norm are compared instead
    refused    evomerge refused it (the feature it names); "both" when mergekit failed too
    different  anything else (shapes, names, values, or mergekit refused what evomerge ran)

    python bench/run_recipes.py [--only NAME ...] [--keep]   (needs: bash bench/setup_mergekit_env.sh)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "recipes"
WORK = ROOT / "out" / "recipes"
MERGEKIT_PY = ROOT / ".mergekit-venv" / "bin" / "python"
EXTRA_TOKENS = ["<|im_start|>", "<|im_end|>"]  # special tokens the non-base models add
EXTRA_WORD = "mergeword"  # a plain token they add
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # times max(1, max |x|)
MODEL_KEYS = ("model", "base_model")


def model_refs(doc) -> list[str]:
    """Every model reference in a recipe, in order of first appearance (base_model first)."""
    refs: list[str] = []

    def add(ref):
        if isinstance(ref, str) and ref not in ("base", "union") and ref not in refs:
            refs.append(ref)

    if isinstance(doc, dict):
        add(doc.get("base_model"))

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if (k in MODEL_KEYS or k == "source") and isinstance(v, str) or k == "tokenizer_source":
                    add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return refs


def bare(ref: str) -> str:
    return ref.split("+")[0].split("@")[0]


def substitute(node, mapping: dict[str, str]):
    """The recipe with model names replaced (keeping @revision and +lora tails), keys included (tokens:)."""
    if isinstance(node, dict):
        return {substitute(k, mapping): substitute(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, mapping) for v in node]
    if isinstance(node, str):
        parts = re.split(r"([+@])", node)
        if bare(node) in mapping:
            return "".join(mapping.get(p, p) for p in parts)
    return node


def shape_of(doc, refs: list[str]) -> int:
    ends = []

    def walk(node):
        if isinstance(node, dict):
            if "layer_range" in node and isinstance(node["layer_range"], list):
                ends.append(int(node["layer_range"][1]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return max(ends) if ends else 4


def arch_of(text: str) -> str:
    low = text.lower()
    if "gpt2" in low:
        return "gpt2"
    if "qwen" in low:
        return "qwen2"
    if "mistral" in low:
        return "mistral"
    return "llama"


def family(arch: str, layers: int, n: int) -> list[Path]:
    """base + n - 1 fine-tunes (cached); the fine-tunes' tokenizers carry extra tokens and a chat template."""
    from transformers import AutoTokenizer

    from evomerge.testing.tiny import TinySpec, make_family

    root = WORK / "models" / f"{arch}-L{layers}-n{n}"
    dirs = [root / "base"] + [root / f"source_{i}" for i in range(n - 1)]
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    spec = TinySpec(arch=arch, layers=layers, hidden=32, heads=4, kv_heads=2 if arch != "gpt2" else 4)
    fam = make_family(root, spec, n_sources=n - 1, seed=layers)
    for d in fam.sources:
        tok = AutoTokenizer.from_pretrained(d)
        tok.add_tokens([EXTRA_WORD])
        tok.add_tokens(EXTRA_TOKENS, special_tokens=True)
        tok.chat_template = CHATML
        tok.save_pretrained(d)
    return dirs


def prepare(path: Path) -> dict:
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    doc = docs[0]
    refs = model_refs(doc)
    bases = list(dict.fromkeys(bare(r) for r in refs))
    layers = shape_of(doc, refs)
    dirs = family(arch_of(text), layers, max(len(bases), 1))
    mapping = {b: str(d) for b, d in zip(bases, dirs)}
    out = WORK / "yml" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump_all([substitute(d, mapping) for d in docs], sort_keys=False, allow_unicode=True)
    out.write_text(f"# {path.name} with tiny stand-ins\n" + body)
    return {"name": path.stem, "yaml": out, "doc": doc, "method": str(doc.get("merge_method")) if isinstance(doc, dict)
            else "?"}


def run_evomerge(job: dict) -> str | None:
    """None when merged; else the refusal (one line)."""
    from evomerge.errors import EvomergeError
    from evomerge.worker.merge_command import merge_from_yaml

    try:
        merge_from_yaml(job["yaml"], WORK / "evomerge" / job["name"], force=True, seed=0)
    except EvomergeError as e:
        return " ".join(str(e).split()).replace(str(job["yaml"]) + ": ", "")
    return None


def run_mergekit(jobs: list[dict]) -> dict:
    spec = {"device": "cpu", "seed": 0, "jobs": [
        {"name": j["name"], "yaml": str(j["yaml"]), "out": str(WORK / "mergekit" / j["name"]),
         "options": {"copy_tokenizer": True}} for j in jobs]}
    (WORK / "jobs.json").write_text(json.dumps(spec))
    result = WORK / "mergekit_result.json"
    subprocess.run([str(MERGEKIT_PY), str(ROOT / "mergekit_runner.py"), str(WORK / "jobs.json"), str(result)],
                   check=True, stdout=subprocess.DEVNULL, stderr=(WORK / "mergekit.log").open("w"))
    return json.loads(result.read_text())["jobs"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def vocab_order(e: Path, m: Path) -> torch.Tensor | None:
    """Row i of evomerge's vocabulary tensors -> the row of the same token in mergekit's (None: same order)."""
    try:
        from transformers import AutoTokenizer

        ve, vm = AutoTokenizer.from_pretrained(e).get_vocab(), AutoTokenizer.from_pretrained(m).get_vocab()
    except Exception:  # noqa: BLE001  (no tokenizer on one side: compare rows as they are)
        return None
    if ve == vm or set(ve) != set(vm):
        return None
    order = torch.empty(len(ve), dtype=torch.long)
    for tok, i in ve.items():
        order[i] = vm[tok]
    return order


def compare(job: dict) -> tuple[str, str]:
    from evomerge.merge.specs import METHODS

    e_dir, m_dir = WORK / "evomerge" / job["name"], WORK / "mergekit" / job["name"]
    te, tm = tensors(e_dir), tensors(m_dir)
    if set(te) != set(tm):
        only_e, only_m = sorted(set(te) - set(tm)), sorted(set(tm) - set(te))
        return "different", f"tensor names differ (only evomerge: {only_e[:3]}, only mergekit: {only_m[:3]})"
    order = vocab_order(e_dir, m_dir)
    ce, cm = (json.loads((d / "config.json").read_text()) for d in (e_dir, m_dir))
    notes = []
    for key in ("num_hidden_layers", "n_layer", "vocab_size"):
        if key in ce and ce.get(key) != cm.get(key):
            return "different", f"config {key}: evomerge {ce.get(key)}, mergekit {cm.get(key)}"
    if "num_hidden_layers" in ce or "n_layer" in ce:
        notes.append(f"{ce.get('num_hidden_layers', ce.get('n_layer'))} layers")
    worst, scale = 0.0, 1.0
    for name, a in te.items():
        b = tm[name]
        if order is not None and name.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight")):
            b = b[order[: b.shape[0]]] if b.shape[0] == order.numel() else b
        if a.shape != b.shape:
            return "different", f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.is_floating_point():
            worst = max(worst, (a.float() - b.float()).abs().max().item())
            scale = max(scale, a.float().abs().max().item())
        elif not torch.equal(a, b):
            return "different", f"{name}: integer tensor differs"
    dtype = str(next(iter(te.values())).dtype).removeprefix("torch.")
    method = job["method"]
    template = _template_note(job, e_dir, m_dir)
    if template:
        notes.append(template)
    if method in METHODS.names() and METHODS[method].random:
        return _random_verdict(job, te, tm, notes)
    tol = TOL.get(dtype, 1e-5) * scale
    verdict = "equal" if worst <= tol else "different"
    return verdict, f"max abs diff {worst:.2e} ({dtype}, tol {tol:.1e}" + "".join(f"; {n}" for n in notes) + ")"


def _template_note(job: dict, e_dir: Path, m_dir: Path) -> str:
    if not isinstance(job["doc"], dict) or "chat_template" not in job["doc"]:
        return ""
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        te, tm = AutoTokenizer.from_pretrained(e_dir), AutoTokenizer.from_pretrained(m_dir)
        if te.chat_template == tm.chat_template:
            return "chat template identical"
        same = te.apply_chat_template(chat, tokenize=False) == tm.apply_chat_template(chat, tokenize=False)
        return "chat template renders the same" if same else "chat template text and rendering differ"
    except Exception as e:  # noqa: BLE001
        return f"chat template not comparable ({type(e).__name__})"


def _random_verdict(job: dict, te, tm, notes) -> tuple[str, str]:
    """Random masks differ by design: compare the share of entries equal to the base and the change's norm."""
    base_dir = WORK / "yml"
    doc = yaml.safe_load((base_dir / f"{job['name']}.yml").read_text())
    base = tensors(Path(doc["base_model"])) if isinstance(doc, dict) and doc.get("base_model") else None
    if base is None:
        return "different", "random method without a base: not compared"
    share, norm = [], []
    for t in (te, tm):
        at_base = total = 0
        sq = 0.0
        for name, a in t.items():
            if name in base and a.is_floating_point() and base[name].shape == a.shape:
                d = a.float() - base[name].float()
                at_base += int((d == 0).sum())
                total += d.numel()
                sq += float((d * d).sum())
        share.append(at_base / max(total, 1))
        norm.append(sq ** 0.5)
    close = abs(share[0] - share[1]) <= 0.02 and abs(norm[0] / max(norm[1], 1e-12) - 1) <= 0.05
    return ("random" if close else "different",
            f"at-base share {share[0]:.3f} vs {share[1]:.3f}, change norm ratio {norm[0] / max(norm[1], 1e-12):.3f}"
            + "".join(f"; {n}" for n in notes))


def roundtrip(name: str, mk: dict) -> str:
    """mergekit on evomerge's written mergekit_config.yml vs mergekit on the recipe itself."""
    entry = mk.get(name + "@written")
    if entry is None:
        return "no mergekit_config.yml written"
    if entry.get("error"):
        return "written YAML fails in mergekit: " + " ".join(entry["error"].split())[:120]
    a, b = tensors(WORK / "mergekit" / name), tensors(WORK / "mergekit" / (name + "@written"))
    if set(a) != set(b) or any(a[n].shape != b[n].shape for n in a):
        return "written YAML gives other tensors in mergekit"
    worst = max(((a[n].float() - b[n].float()).abs().max().item() for n in a if a[n].is_floating_point()), default=0)
    return f"written YAML through mergekit: max abs diff {worst:.1e} vs the recipe"


def recheck(jobs: list[dict], verdicts: dict[str, tuple[str, str]]) -> None:
    """A half-precision recipe that differs is run again by both tools with dtype: float32: mergekit computes the
    task-arithmetic family in the recipe's dtype, evomerge always in float32 (a deliberate difference), so equality
    there shows the difference is rounding, not semantics."""
    again = []
    for j in jobs:
        verdict = verdicts.get(j["name"])
        doc = yaml.safe_load(j["yaml"].read_text())
        if verdict and verdict[0] == "different" and isinstance(doc, dict) and doc.get("dtype") in ("float16", "bfloat16"):
            doc["dtype"] = "float32"
            doc.pop("out_dtype", None)
            path = j["yaml"].with_name(j["name"] + "@float32.yml")
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            again.append({**j, "name": j["name"] + "@float32", "yaml": path, "half": verdict[1]})
    if not again:
        return
    again = [j for j in again if run_evomerge(j) is None]
    mk = run_mergekit(again)
    for j in again:
        if (mk.get(j["name"]) or {}).get("error"):
            continue
        verdict, detail = compare(j)
        if verdict == "equal":
            verdicts[j["name"].removesuffix("@float32")] = (
                "equal", (f"at float32: {detail}; at the recipe's half precision: {j['half']}, because mergekit "
                          "computes this method in that precision and evomerge in float32"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="recipe names (file stems) to run")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs under bench/out/recipes")
    args = ap.parse_args()
    if not MERGEKIT_PY.is_file():
        print("mergekit is not installed: run `bash bench/setup_mergekit_env.sh` first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    paths = sorted(RECIPES.glob("*.yml"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    jobs = [prepare(p) for p in paths]
    refused = {j["name"]: run_evomerge(j) for j in jobs}
    # round trip: the mergekit_config.yml evomerge writes next to each merge, run by mergekit as well
    written = [{"name": j["name"] + "@written", "yaml": WORK / "evomerge" / j["name"] / "mergekit_config.yml"}
               for j in jobs if refused[j["name"]] is None]
    mk = run_mergekit(jobs + [w for w in written if w["yaml"].is_file()])
    verdicts = {}
    for j in jobs:
        if refused[j["name"]] is None and not (mk.get(j["name"]) or {}).get("error"):
            verdicts[j["name"]] = compare(j)
    recheck(jobs, verdicts)
    counts: dict[str, int] = {}
    features: dict[str, int] = {}
    for j in jobs:
        name, why = j["name"], refused[j["name"]]
        mk_error = (mk.get(name) or {}).get("error")
        if why is not None:
            verdict = "refused"
            both = " (mergekit failed too: " + " ".join(mk_error.split())[:90] + ")" if mk_error else " (mergekit ran it)"
            detail = why[:200] + both
            features[_feature(why)] = features.get(_feature(why), 0) + 1
        elif mk_error:
            verdict, detail = "different", "mergekit failed: " + " ".join(mk_error.split())[:200]
        else:
            verdict, detail = verdicts[name]
        counts[verdict] = counts.get(verdict, 0) + 1
        if why is None and not mk_error:
            detail += "; " + roundtrip(name, mk)
        print(f"{name:34s} {verdict:9s} {detail}", flush=True)
    print("\nsummary: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" of {len(jobs)} recipes")
    for f, n in sorted(features.items(), key=lambda kv: -kv[1]):
        print(f"  refused for {f}: {n}")
    if not args.keep:
        for sub in ("evomerge", "mergekit"):
            shutil.rmtree(WORK / sub, ignore_errors=True)
    return 0


def _feature(message: str) -> str:
    for pattern, label in ((r"LoRA", "LoRA adapters"), (r"'modules'", "modules: (multimodal)"),
                           (r"unknown merge method '([^']+)'", "method {0}"), (r"unknown key '([^']+)'", "key {0}"),
                           (r"key '([^']+)' is not supported", "key {0}"),
                           (r"^(\w+) needs base_model", "{0} without base_model"),
                           (r"@", "model@revision"), (r"base_model .* is not among", "base not in slice")):
        m = re.search(pattern, message)
        if m:
            return label.format(*m.groups())
    return message[:60]


if __name__ == "__main__":
    sys.exit(main())
