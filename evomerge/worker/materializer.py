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
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from evomerge.errors import RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compat import check_compatible
from evomerge.merge.fused import fused_weighted_sum
from evomerge.merge.methods import WEIGHTED_SUMS, Piece, WeightedSum, Workspace, tensor_function
from evomerge.merge.recipe import Recipe, layer_position
from evomerge.merge.sparsify import L1_CHUNK, SortedMagnitudes, l1_norm, row_ranks
from evomerge.merge.specs import BLOCK_ENTRIES, piece_entries
from evomerge.seeds import derive_seed
from evomerge.worker.layer_split import LayerSplit, place
from evomerge.worker.precompiled import PrecompiledSums
from evomerge.worker.source_store import SourceStore, Span

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
        precompiled: str = "off",
    ) -> None:
        """sources: recipe model name -> checkpoint directory; base: the name whose weights are the reference.
        fused: compiled kernels (seconds to compile once; pays off over many recipes): the combine step of the
        task-arithmetic family, and linear and task arithmetic in one pass (with the eager ops' bits).
        storage_dtype, placement: how the sources are held (see SourceStore); store: one already holding
        them, shared with the worker's other users (data-flow source models). selection_cache: keep sorted
        magnitudes / row ranks per task vector (None: on for a CPU device or host placement). split: the layers spread over
        several devices (the store's split where a store is given). precompiled: on a CPU, linear and task arithmetic
        as one pass by a kernel compiled ahead of time (worker/precompiled.py), where one is on disk ("use": one-shot
        merges), also building missing ones in the background ("build": search workers), or never ("off")."""
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
        # on by default where building them beats exact selections per candidate (CPU), and with host placement,
        # where they live in host memory and let magnitude methods merge large tensors piece by piece
        auto = self.device.type == "cpu" or store.placement == "host"
        self.selection_cache = auto if selection_cache is None else selection_cache
        store.tensors(base)  # the base is read now: every recipe needs it
        self._magnitudes: dict[tuple[str, str], SortedMagnitudes] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._l1: dict[tuple[str, str], float] = {}
        self.workspace = Workspace(fused=fused)
        if precompiled not in ("use", "build", "off"):
            raise ValueError(f"precompiled must be use, build or off, not {precompiled!r}")
        self.precompiled = PrecompiledSums(build=precompiled == "build") \
            if precompiled != "off" and self.device.type == "cpu" else None
        self.block_entries = BLOCK_ENTRIES if self.device.type == "cpu" else None  # None: whole tensors
        self.piece_entries = piece_entries(self.device.type)  # host placement
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
        piece: Piece | None = None
        with torch.no_grad():
            for item, tensors in self.store.stream(self._items(recipe), held):
                name = item if isinstance(item, str) else item.name
                target = targets[name]
                if name not in self.float_names:
                    target.copy_(tensors[self.base_name])  # integer tensors are not merged: the base's are kept
                    continue
                if isinstance(item, str) or item.start == 0:  # once per tensor (and pass), not per piece
                    kwargs = self._arguments(recipe, name, seed)
                    terms = self._terms(recipe, inputs, kwargs, name) if spec.elementwise else None
                if isinstance(item, Span):  # one piece of the tensor: pieces come in order, a pass at a time
                    target = target.view(-1)[item.start : item.stop].view(item.shape)
                    piece = _next_piece(piece, item, targets[name].numel())
                if terms is not None and terms.scale == 1.0 and self._one_pass_sum(terms, tensors, inputs, target):
                    continue
                if terms is not None and (isinstance(item, Span) or self._blockwise(target, tensors, held)):
                    self._merge_blocks(terms, tensors, inputs, target)
                    continue
                base = self._as_float32(tensors[self.base_name], "source.base")
                task = {m: self._task_vector(tensors[m], base, f"source.delta{j}") for j, m in enumerate(held[1:])}
                deltas = [task.get(m) for m in inputs]
                self._add_derived(kwargs, spec, inputs, name, task)
                if isinstance(item, Span):
                    kwargs["piece"] = piece
                out = target if target.dtype == torch.float32 else self.workspace.get("result", base)
                if isinstance(item, Span) and item.measure:
                    self._merge(merge, base, deltas, out, kwargs, recipe.method, name)  # collects; writes nothing
                    continue
                self._merge_into(target, merge, base, deltas, out, kwargs, recipe.method, name)

    def _add_derived(self, kwargs: dict, spec, inputs: list[str], name: str, task: dict[str, torch.Tensor]) -> None:
        """The data the method reads from each whole task vector (sorted magnitudes, row ranks, L1 norms), built
        on first use and cached: from `task` where the sources are on the device, else from the host's copy."""
        whole = self._host_task if self.store.placement == "host" else (lambda m, _name: task[m])
        if spec.uses_magnitude and self.selection_cache:
            kwargs["magnitudes"] = self._derived(self._magnitudes, self._built(SortedMagnitudes), inputs, name, whole)
        if spec.uses_ranks and self.selection_cache:
            kwargs["ranks"] = self._derived(self._ranks, self._built(row_ranks), inputs, name, whole)
        if spec.param("rescale") is not None and kwargs["rescale"]:
            kwargs["l1"] = self._derived(self._l1, self._built(l1_norm), inputs, name, whole)

    def _terms(self, recipe: Recipe, inputs: list[str], kwargs: dict, name: str) -> WeightedSum:
        try:
            return WEIGHTED_SUMS[recipe.method]([m != self.base_name for m in inputs], **kwargs)
        except ValueError as e:
            raise RecipeError(f"{recipe.method} on tensor {name}: {e}") from None

    def _arguments(self, recipe: Recipe, name: str, seed: int) -> dict:
        """The tensor function's keyword arguments for tensor `name`: every parameter, defaults filled."""
        spec = recipe.spec
        kwargs = recipe.resolve(name, layer_position(name, self.num_layers))
        if spec.random:
            kwargs["seed"] = derive_seed(seed, name)  # independent of tensor order
        if spec.base_optional:
            kwargs["relative"] = not recipe.baseless
        return kwargs

    # -- pieces (host placement) ---------------------------------------------------------------------
    def _items(self, recipe: Recipe) -> list[str | Span]:
        """What the store streams: tensor names, or with host placement, the pieces of the large tensors a
        method can merge piece by piece (twice where rescale needs the kept L1 norms of the whole tensor
        first: a measuring pass, then the writing one; where nothing is staged, such tensors go whole)."""
        spec, size = recipe.spec, self.piece_entries
        if self.store.placement != "host" or (spec.elementwise and not self.store.stages):
            return self.names  # nothing staged: entry-wise methods merge in blocks as they are
        items: list[str | Span] = []
        for name in self.names:
            meta = self.reference.tensors[name]
            n = math.prod(meta.shape)
            step = self._piece_entries(spec, meta.shape, size) if name in self.float_names else None
            if step is None or n <= step:
                items.append(name)
                continue
            rows = len(meta.shape) == 2 and step % meta.shape[1] == 0
            spans = [Span(name, a, min(a + step, n), (-1, meta.shape[1]) if rows else (-1,)) for a in range(0, n, step)]
            kwargs = recipe.resolve(name, layer_position(name, self.num_layers))
            if spec.piecewise and spec.param("rescale") is not None and kwargs["rescale"]:
                if not self.store.stages:  # the device is the host: pieces would only save scratch, at a pass's cost
                    items.append(name)
                    continue
                items += [s._replace(measure=True) for s in spans]
            items += spans
        return items

    def _piece_entries(self, spec, shape: tuple[int, ...], size: int) -> int | None:
        """Entries per piece for a tensor of `shape` (None: merged whole): `size`, or whole rows for DELLA
        (a multiple of L1_CHUNK, so the L1 chunks of rescale fall the same as for the whole tensor)."""
        if not spec.goes_by_pieces(self.selection_cache):
            return None
        if not spec.uses_ranks:
            return size
        if len(shape) != 2:
            return None
        every = L1_CHUNK // math.gcd(shape[1], L1_CHUNK)  # rows per L1-aligned step
        rows = size // shape[1] // every * every
        return rows * shape[1] or None

    def _built(self, build):
        """build, run where it is fastest: a host task vector goes to an accelerator for the sort (numpy's
        single-threaded sort of a 7B model's entries takes minutes), and what comes back is kept on the host.
        Row ranks go back to the device a piece at a time, so they are pinned there like the sources: from
        pageable memory each copy would wait for the stream (DELLA at 1B, H200: 0.75 s of 1.7 s a candidate)."""
        if self.store.placement != "host" or self.device.type == "cpu":
            return build

        def on_device(x: torch.Tensor):
            made = build(x.to(self.device))
            if isinstance(made, SortedMagnitudes):  # read on the host (the cut's value), never copied back
                made.values = made.values.cpu()
                return made
            if not isinstance(made, torch.Tensor):
                return made
            return made.cpu().pin_memory() if self.device.type == "cuda" else made.cpu()

        return on_device

    def _host_task(self, model: str, name: str) -> torch.Tensor:
        """A whole task vector, formed in float32 where the sources are held (the host, for host placement):
        what the selection caches are built from, once."""
        t, base = self.store.tensors(model)[name], self.store.tensors(self.base_name)[name]
        return t.float() - base.float()

    def _blockwise(self, target: torch.Tensor, tensors: Mapping[str, torch.Tensor], held: list[str]) -> bool:
        return (self.block_entries is not None and target.numel() > self.block_entries and target.is_contiguous()
                and all(tensors[m].is_contiguous() for m in held))

    def _merge_blocks(self, terms: WeightedSum, tensors: Mapping[str, torch.Tensor], inputs: list[str],
                      target: torch.Tensor) -> None:
        """An entry-wise method over `block_entries` entries at a time: the same float ops per entry as one
        whole-tensor call, so the same bits, with the float32 scratch small enough to stay in the cache (one
        task-vector buffer, refilled per model as the sum reads them). The loop is kept lean: at 2^17 entries per
        block, Python's per-op overhead is a third of the work."""
        step, dev, f32 = self.block_entries or target.numel(), target.device, torch.float32
        models = [m for m in dict.fromkeys(inputs) if m != self.base_name]
        blocks = {m: tensors[m].view(-1).split(step) for m in [self.base_name, *models]}  # views, made in one call
        wide = self.workspace.get_flat("source.base", step, f32, dev)
        task = self.workspace.get_flat("source.delta0", step, f32, dev)
        result = self.workspace.get_flat("result", step, f32, dev) if target.dtype != f32 else None
        for i, into in enumerate(target.view(-1).split(step)):
            size = into.numel()
            base, delta = blocks[self.base_name][i], task[:size]
            if base.dtype != f32:
                base = wide[:size].copy_(base)
            # task vectors one at a time: a widening copy, then a float32 subtraction (see _task_vector)
            deltas = (None if m == self.base_name else _minus(blocks[m][i], base, delta) for m in inputs)
            out = into if result is None else result[:size]
            terms.apply(base, deltas, out)
            if out is not into:
                into.copy_(out)

    def _one_pass_sum(self, terms: WeightedSum, tensors: Mapping[str, torch.Tensor], inputs: list[str],
                      target: torch.Tensor) -> bool:
        """An entry-wise method with scale 1 (task arithmetic; linear, normalized) as one compiled pass over
        the sources as stored, with the bits of the eager ops (the base's own term adds nothing): the kernel
        compiled in this process (fused), else one compiled ahead of time (CPU); False where neither ran, so the
        eager ops merge it."""
        terms_of = [(c, tensors[m]) for c, m in zip(terms.coefs, inputs) if m != self.base_name]
        base, sources, coefs = tensors[self.base_name], [t for _, t in terms_of], [c for c, _ in terms_of]
        if self.workspace.fused and fused_weighted_sum(target, base, sources, coefs):
            return True
        return self.precompiled is not None and self.precompiled.weighted_sum(target, base, sources, coefs)

    def _merge_into(self, target, merge, base, deltas, out, kwargs, method: str, name: str) -> None:
        """merge(...) written into `target` (directly where `out` is it, else copied from scratch)."""
        result = self._merge(merge, base, deltas, out, kwargs, method, name)
        if result is not target:
            target.copy_(result)

    def _merge(self, merge, base, deltas, out, kwargs, method: str, name: str) -> torch.Tensor:
        try:
            return merge(base, deltas, out=out, ws=self.workspace, **kwargs)
        except ValueError as e:
            raise RecipeError(f"{method} on tensor {name}: {e}") from None

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

    def _derived(self, cache: dict, build, inputs: list[str], name: str, whole) -> list:
        """Data derived from each input's whole task vector for tensor `name` (whole(model, name) gives it;
        fixed while the sources are loaded: built on first use, then cached); None for the base."""
        for m in inputs:
            if m != self.base_name and (m, name) not in cache:
                cache[m, name] = build(whole(m, name))
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


def _minus(t: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = t - base in float32 (base is float32): t's exact widening, then the subtraction."""
    return torch.sub(t, base, out=out) if t.dtype == torch.float32 else out.copy_(t).sub_(base)


def _next_piece(piece: Piece | None, item: Span, numel: int) -> Piece:
    """The Piece that carries `item`'s tensor from piece to piece: a new one at the tensor's first piece, except
    that a writing pass keeps what its measuring pass collected."""
    if item.start == 0:
        if piece is None or not piece.measure or item.measure:
            piece = Piece(numel)
        piece.begin(item.measure)
    piece.start = item.start
    return piece
