"""Check: a worker whose models are split by layers over several devices merges and scores like one device.

Builds a small Llama family, then for each of TIES (parameter space) and a data-flow path compares the logits of
the split model with those of the model on the first device alone: the merged weights must be equal bit for bit
(each tensor is merged on its layer's device with the same ops), and the logits equal up to the kernels' own
float differences across device kinds (zero where the devices are of one kind).

    .venv/bin/python bench/check_split.py --devices cuda:0,cpu     # a real device crossing on one GPU
    .venv/bin/python bench/check_split.py --devices cuda:0,cuda:1  # two GPUs
    .venv/bin/python bench/check_split.py --devices cpu,cpu        # the plumbing only (hooks move nothing)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from evomerge.merge.recipe import Recipe
from evomerge.testing.tiny import TinySpec, make_family
from evomerge.worker.layer_split import LayerSplit, place
from evomerge.worker.materializer import Materializer

SPEC = TinySpec(arch="llama", hidden=256, layers=8, heads=8, kv_heads=4, intermediate=512, vocab=2048)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cuda:0,cpu")
    args = ap.parse_args()
    devices = [torch.device(d) for d in args.devices.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        fam = make_family(Path(tmp), SPEC, n_sources=2, seed=0, dtype=torch.bfloat16)
        sources = {"base": fam.base, "a": fam.sources[0], "b": fam.sources[1]}
        models = [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in (("a", 0.6), ("b", 0.4))]
        recipe = Recipe.from_mergekit({"merge_method": "ties", "base_model": "base", "models": models}, where="check")
        ids = torch.randint(0, SPEC.vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        one = Materializer(sources, "base", device=devices[0])
        weights = one.merged_state_dict(recipe)
        with torch.no_grad():
            expect = one.model(ids.to(devices[0])).logits.float().cpu()
        base = one.reference
        split = LayerSplit.for_checkpoint(devices, {n: m.nbytes for n, m in base.tensors.items()}, base.num_layers)
        many = Materializer(sources, "base", device=devices[0], split=split, placement="device")
        got_weights = many.merged_state_dict(recipe)
        with torch.no_grad():
            got = many.model(ids.to(devices[0])).logits.float().cpu()
        same = all(torch.equal(got_weights[n].cpu(), t.cpu()) for n, t in weights.items())
        where = {str(p.device) for p in many.model.parameters()}
        err = float((got - expect).abs().max())
        print(f"split {split.describe()}; parameters on {sorted(where)}")
        print(f"merged weights equal bit for bit: {same}; logits max |diff| {err:.3g} "
              f"(scale {float(expect.abs().max()):.3g})")
        # a data-flow style use: a source's own model, placed after it was built
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            ref = plain.to(devices[0])(ids.to(devices[0])).logits.float().cpu()
            placed = place(plain, split)(ids.to(devices[0])).logits.float().cpu()
        print(f"placed source model: logits max |diff| {float((placed - ref).abs().max()):.3g}")
        ok = same and err <= 1e-2 * float(expect.abs().max())
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
