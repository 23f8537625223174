"""The in-place materializer: recipe -> merged weights, written into one live model.

Sources are read once into a SourceStore: the raw tensors of the base and of every fine-tune, in their
storage dtype (the checkpoint's by default), on the device or pinned on the host. Each
`materialize(recipe)` walks the tensors once: it forms the base and each task vector (source - base) of one
tensor in float32 scratch, merges, and writes the result into the same preallocated model: no disk, no new
model object, no per-candidate allocation beyond reusable scratch. The difference of two bf16 or fp16
numbers is exact in float32, so the result equals that of float32-resident task vectors bit for bit.

Memory: sources ((K+1) x P x the storage dtype's size) + one live model + scratch (a few float32 tensors of
the largest shape) + selection caches where on: each task vector's sorted magnitudes for TIES/breadcrumbs
(4 bytes per entry) and row ranks for DELLA (2 bytes per entry). Caches are on for CPU workers, where
building them once beats an exact selection per candidate; on accelerators the selection runs per candidate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from evomerge.errors import RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compat import check_compatible
from evomerge.merge.methods import WEIGHTED_SUMS, WeightedSum, Workspace, tensor_function
from evomerge.merge.recipe import Recipe, layer_position
from evomerge.merge.sparsify import SortedMagnitudes, l1_norm, row_ranks
from evomerge.merge.specs import BLOCK_ENTRIES
from evomerge.seeds import derive_seed
from evomerge.worker.layer_split import LayerSplit, place
from evomerge.worker.source_store import SourceStore

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def skip_weight_init():
    """transformers' context that skips random initialization (seconds for large models), if it has one."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:
        return contextlib.nullcontext()


class Materializer:
    def __init__(
        self,
        sources: Mapping[str, str | Path],
        base: str,
        *,
        device: str | torch.device = "cpu",
        model_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        fused: bool = False,
        storage_dtype: str | torch.dtype | None = "auto",
        placement: str = "device",
        selection_cache: bool | None = None,
        store: SourceStore | None = None,
        split: LayerSplit | None = None,
    ) -> None:
        """sources: recipe model name -> checkpoint directory; base: the name whose weights are the reference.
        fused: combine with one compiled kernel (seconds to compile once; pays off over many recipes).
        storage_dtype, placement: how the sources are held (see SourceStore); store: one already holding
        them, shared with the worker's other users (data-flow source models). selection_cache: keep sorted
        magnitudes / row ranks per task vector (None: on for a CPU device). split: the layers spread over
        several devices (the store's split where a store is given)."""
        if base not in sources:
            raise RecipeError(f"base model {base!r} is not among the sources ({', '.join(sources)})")
        self.device = torch.device(device)
        if store is None:
            checkpoints = {name: Checkpoint.open(path, allow_pickle=allow_pickle) for name, path in sources.items()}
            check_compatible(list(checkpoints.values()))
            store = SourceStore(checkpoints, device=self.device, dtype=storage_dtype, placement=placement, split=split)
        self.store = store
        self.checkpoints = {name: store.checkpoints[name] for name in sources}
        self.base_name = base
        ref = self.checkpoints[base]
        self.reference = ref
        self.num_layers = ref.num_layers
        self.model_dtype = model_dtype or ref.dtype
        self.names = list(ref.tensors)  # checkpoint order
        self.float_names = [n for n in self.names if ref.tensors[n].dtype.is_floating_point]
        self.selection_cache = self.device.type == "cpu" if selection_cache is None else selection_cache
        store.tensors(base)  # the base is read now: every recipe needs it
        self._magnitudes: dict[tuple[str, str], SortedMagnitudes] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._l1: dict[tuple[str, str], float] = {}
        self.workspace = Workspace(fused=fused)
        self.block_entries = BLOCK_ENTRIES if self.device.type == "cpu" else None  # None: whole tensors
        self._model = None
        self._targets: dict[str, torch.Tensor] | None = None
        self._plain: dict[str, torch.Tensor] | None = None

    # -- the live model ----------------------------------------------------------------------------
    @property
    def model(self):
        """The live transformers model the merged weights are written into (built on first use)."""
        if self._model is None:
            self._build_model()
        return self._model

    def _build_model(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.reference.path)
        split = self.store.split
        # every weight is overwritten by materialize; a split model is built in host memory that is never
        # touched (the pages are not even mapped) and moved to its devices a layer at a time
        with torch.device("cpu" if split else self.device), skip_weight_init():
            model = AutoModelForCausalLM.from_config(config, dtype=self.model_dtype)
        model.tie_weights()  # skipped along with the initialization
        if split:
            place(model, split)
        model.eval()
        state = model.state_dict()  # detached tensors sharing storage with the parameters
        missing = [n for n in self.names if n not in state]
        if missing:
            raise RecipeError(
                f"{self.reference.path}: tensor {missing[0]} has no counterpart in {type(model).__name__} "
                "as built by this transformers version"
            )
        self._model = model
        self._targets = {n: state[n] for n in self.names}

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The live model's tensors under their checkpoint names, in checkpoint order."""
        self.model  # noqa: B018  (builds it)
        assert self._targets is not None
        return iter(self._targets.items())

    # -- merging -----------------------------------------------------------------------------------
    def materialize(self, recipe: Recipe, seed: int = 0):
        """Write recipe's merged weights into the live model and return the model."""
        self._write(recipe, dict(self.named_tensors()), seed)
        return self._model

    def merged_tensors(self, recipe: Recipe, seed: int = 0) -> dict[str, torch.Tensor]:
        """Merged weights as plain tensors (no live model is built: what a one-shot merge needs).
        The tensors are reused by the next call: copy them to keep them."""
        if self._plain is None:
            self._plain = {n: torch.empty(m.shape, dtype=self.model_dtype if m.dtype.is_floating_point else m.dtype,
                                          device=self.store.device_of(n)) for n, m in self.reference.tensors.items()}
        self._write(recipe, self._plain, seed)
        return self._plain

    def merged_state_dict(self, recipe: Recipe, seed: int = 0) -> dict[str, torch.Tensor]:
        """Materialize and return copies of the merged tensors (for tests and one-off use)."""
        self.materialize(recipe, seed)
        return {n: t.detach().clone() for n, t in self.named_tensors()}

    def _write(self, recipe: Recipe, targets: dict[str, torch.Tensor], seed: int) -> None:
        self._check(recipe)
        spec, merge = recipe.spec, tensor_function(recipe.method)
        inputs = [e.model for e in recipe.inputs()]
        held = [self.base_name, *dict.fromkeys(m for m in inputs if m != self.base_name)]
        with torch.no_grad():
            for name, tensors in self.store.stream(self.names, held):
                target = targets[name]
                if name not in self.float_names:
                    target.copy_(tensors[self.base_name])  # integer tensors are not merged: the base's are kept
                    continue
                kwargs = recipe.resolve(name, layer_position(name, self.num_layers))  # every parameter, defaults filled
                if spec.random:
                    kwargs["seed"] = derive_seed(seed, name)  # independent of tensor order
                if spec.base_optional:
                    kwargs["relative"] = not recipe.baseless
                if spec.elementwise and self._blockwise(target, tensors, held):
                    try:
                        terms = WEIGHTED_SUMS[recipe.method]([m != self.base_name for m in inputs], **kwargs)
                    except ValueError as e:
                        raise RecipeError(f"{recipe.method} on tensor {name}: {e}") from None
                    self._merge_blocks(terms, tensors, inputs, target)
                    continue
                base = self._as_float32(tensors[self.base_name], "source.base")
                task = {m: self._task_vector(tensors[m], base, f"source.delta{j}") for j, m in enumerate(held[1:])}
                deltas = [task.get(m) for m in inputs]
                if spec.uses_magnitude and self.selection_cache:
                    kwargs["magnitudes"] = self._derived(self._magnitudes, SortedMagnitudes, inputs, name, task)
                if spec.uses_ranks and self.selection_cache:
                    kwargs["ranks"] = self._derived(self._ranks, row_ranks, inputs, name, task)
                if spec.param("rescale") is not None and kwargs["rescale"]:
                    kwargs["l1"] = self._derived(self._l1, l1_norm, inputs, name, task)
                out = target if target.dtype == torch.float32 else self.workspace.get("result", base)
                self._merge_into(target, merge, base, deltas, out, kwargs, recipe.method, name)

    def _blockwise(self, target: torch.Tensor, tensors: Mapping[str, torch.Tensor], held: list[str]) -> bool:
        return (self.block_entries is not None and target.numel() > self.block_entries and target.is_contiguous()
                and all(tensors[m].is_contiguous() for m in held))

    def _merge_blocks(self, terms: WeightedSum, tensors: Mapping[str, torch.Tensor], inputs: list[str],
                      target: torch.Tensor) -> None:
        """An entry-wise method over `block_entries` entries at a time: the same float ops per entry as one
        whole-tensor call, so the same bits, with the float32 scratch small enough to stay in the cache. The
        loop is kept lean: at 2^17 entries per block, Python's per-op overhead is a third of the work."""
        step, dev, f32 = self.block_entries, target.device, torch.float32
        models = [m for m in dict.fromkeys(inputs) if m != self.base_name]
        blocks = {m: tensors[m].view(-1).split(step) for m in [self.base_name, *models]}  # views, made in one call
        wide = self.workspace.get_flat("source.base", step, f32, dev)
        task = {m: self.workspace.get_flat(f"source.delta{j}", step, f32, dev) for j, m in enumerate(models)}
        result = self.workspace.get_flat("result", step, f32, dev) if target.dtype != f32 else None
        size = None
        for i, into in enumerate(target.view(-1).split(step)):
            if into.numel() != size:  # scratch views of this block's size: the same for every block but the last
                size = into.numel()
                wide_v, task_v = wide[:size], {m: t[:size] for m, t in task.items()}
                deltas = [task_v.get(m) for m in inputs]
                out = into if result is None else result[:size]
            base = blocks[self.base_name][i]
            if base.dtype != f32:
                base = wide_v.copy_(base)
            for m in models:  # task vectors: a widening copy, then a float32 subtraction (see _task_vector)
                t = blocks[m][i]
                torch.sub(t, base, out=task_v[m]) if t.dtype == f32 else task_v[m].copy_(t).sub_(base)
            if result is None:
                out = into
            terms.apply(base, deltas, out)
            if out is not into:
                into.copy_(out)

    def _merge_into(self, target, merge, base, deltas, out, kwargs, method: str, name: str) -> None:
        """merge(...) written into `target` (directly where `out` is it, else copied from scratch)."""
        try:
            result = merge(base, deltas, out=out, ws=self.workspace, **kwargs)
        except ValueError as e:
            raise RecipeError(f"{method} on tensor {name}: {e}") from None
        if result is not target:
            target.copy_(result)

    def _as_float32(self, t: torch.Tensor, slot: str) -> torch.Tensor:
        """t in float32: itself when it already is (read-only here), else a copy in scratch."""
        if t.dtype == torch.float32:
            return t
        return self.workspace.get(slot, t, torch.float32).copy_(t)

    def _task_vector(self, t: torch.Tensor, base: torch.Tensor, slot: str) -> torch.Tensor:
        """t - base in float32 scratch. A bf16/fp16 `t` is widened first (exactly, so the bits are those of
        float32 sources): a widening copy and a float32 subtraction are both vectorized, where torch's
        mixed-dtype subtraction casts entry by entry (measured 1.3x slower on CPU)."""
        out = self.workspace.get(slot, t, torch.float32)
        if t.dtype == torch.float32:
            return torch.sub(t, base, out=out)
        return out.copy_(t).sub_(base)

    def _derived(self, cache: dict, build, inputs: list[str], name: str, task: dict[str, torch.Tensor]) -> list:
        """Data derived from each input's task vector for tensor `name` (fixed while the sources are
        loaded: built on first use, then cached); None for the base, which has no task vector."""
        for m in inputs:
            if m != self.base_name and (m, name) not in cache:
                cache[m, name] = build(task[m])
        return [None if m == self.base_name else cache[m, name] for m in inputs]

    def _check(self, recipe: Recipe) -> None:
        unknown = [m for m in recipe.model_names() if m not in self.checkpoints]
        if unknown:
            raise RecipeError(f"recipe model {unknown[0]!r} is not one of the loaded sources ({', '.join(self.checkpoints)})")
        if recipe.spec.needs_base and not recipe.baseless and recipe.base_model != self.base_name:
            raise RecipeError(
                f"recipe base_model {recipe.base_model!r} differs from the materializer's base {self.base_name!r}: "
                "task vectors are kept relative to that base"
            )

    def cache_bytes(self) -> int:
        """Bytes of the selection caches built so far."""
        return sum(m.nbytes() for m in self._magnitudes.values()) + sum(r.numel() * r.element_size() for r in self._ranks.values())

    def resident_bytes(self) -> int:
        """Bytes held on the device besides the live model: sources (or staging slots), caches and scratch."""
        return self.store.device_bytes() + self.cache_bytes() + self.workspace.nbytes()
