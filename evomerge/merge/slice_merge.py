"""Run a slices plan (merge/slices.py) over checkpoints on disk: one output tensor at a time, streamed.

Each job reads only the tensors it merges (a frankenmerge of a 70B model holds one tensor at a time), moves
vocabulary tensors onto the output tokenizer's rows when the recipe sets one, then copies (passthrough:
times `scale`) or merges them with the method's tensor function, in float32 as the Materializer does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from evomerge.errors import EvomergeError, RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.methods import Workspace, tensor_function
from evomerge.merge.slices import PASSTHROUGH, TensorJob
from evomerge.merge.specs import METHODS
from evomerge.merge.tokenizer_merge import OutputVocabulary, remap_rows
from evomerge.seeds import derive_seed


def run_jobs(
    jobs: Sequence[TensorJob],
    checkpoints: Mapping[str, Checkpoint],
    method: str,
    *,
    out_dtype: torch.dtype,
    load_dtype: torch.dtype | None = None,
    vocab: OutputVocabulary | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
    where: str = "recipe",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(output name, tensor) per job. load_dtype: inputs are rounded to it when read (mergekit's `dtype`)."""
    spec = METHODS[method]
    fn = None if method == PASSTHROUGH else tensor_function(method)
    ws = Workspace()
    for job in jobs:
        keys = list(dict.fromkeys([*job.inputs, job.reference]))
        loaded = {}
        for model, name in keys:
            t = checkpoints[model].load(name, device)
            loaded[model, name] = t.to(load_dtype) if load_dtype is not None and t.is_floating_point() else t
        if job.vocab and vocab is not None:  # rows moved on the CPU (a one-off per vocabulary tensor)
            key_of = dict(keys)  # model -> its input name; rows are filled in the slice's source order
            by_model = {m: loaded[m, key_of[m]].cpu() for m in job.group if m in key_of}
            for m, t in remap_rows(vocab, by_model, job.base_model, f"{where}: {job.name}").items():
                loaded[m, key_of[m]] = t.to(device)
        ref = loaded[job.reference]
        if not ref.is_floating_point():
            result = ref.clone()  # integer buffers are not merged: the reference's are kept
        elif fn is None:
            x = loaded[job.inputs[0]]
            scale = job.params["scale"][0]
            result = x * scale if scale != 1.0 else x  # mergekit multiplies in the loaded dtype
        else:
            base = ref.float()
            deltas = [None if key == job.reference else loaded[key].float() - base for key in job.inputs]
            kwargs = dict(job.params)
            if spec.random:
                kwargs["seed"] = derive_seed(seed, job.name)  # independent of tensor order
            try:
                result = fn(base, deltas, ws=ws, **kwargs)
            except ValueError as e:
                raise RecipeError(f"{where}: {method} on tensor {job.name}: {e}") from None
        result = result.to(out_dtype, copy=True) if result.is_floating_point() else result
        if not allow_nonfinite and result.is_floating_point() and not bool(torch.isfinite(result).all()):
            raise EvomergeError(f"{where}: tensor {job.name} holds NaN/inf values (from {', '.join(m for m, _ in keys)}):"
                                " fix or drop that model, or pass --allow-nonfinite to write them anyway")
        yield job.name, result
