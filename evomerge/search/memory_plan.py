"""Per-worker memory of a search, planned from safetensors headers and config.json alone (no weights, no torch).

What a worker holds, by component (K fine-tunes, one base; P: parameters of a model; s: bytes per entry of
sources.storage_dtype, auto: the first source's dtype, as evomerge.worker.source_store resolves it; m: bytes per
entry of the live model, see `live_dtype`; g: GPUs a worker's model is split over by layers,
workers.gpus_per_worker >= 2, which divides what is split):

parameter space (kind ps), placement device:
  sources           (K+1) x P x s / g           (float tensors in s, integer ones as stored)
  live model        P x m / g
  scratch           scratch_fp32_entries(...): fp32 copies of the largest tensor, the most any method of the
                    space needs (measured by bench/bench_memory.py): linear K + 2 (CPU workers merge linear and
                    task_arithmetic in blocks: copies of a block of BLOCK_ENTRIES), task arithmetic the same
                    in eager ops and none compiled (GPU workers), other task-vector methods 2K + 2,
                    sparsifying ones (a density) 3K + 6 in eager ops (CPU workers) and 2K + 2 with the fused
                    kernel (GPU workers); + K + 1 where a magnitude cache is read (the cut and each model's
                    kept entries, at worst); - 1 each for float32 sources and a float32 live model
  selection transients  when the caches are off and a method selects (TIES, breadcrumbs, DELLA):
                    SELECTION_TRANSIENTS fp32 copies of the largest tensor, freed between tensors (not kept scratch)
  selection caches  when on: K x P_float x 4 (TIES, breadcrumbs) + K x P_float x 2 (DELLA), for the methods the
                    space can produce; auto: on for CPU workers and with host placement, off on GPU workers
  activations       see `activation_bytes`
  CUDA runtime      per GPU: context, cuBLAS workspace, allocator slack (DEVICE_RUNTIME_BYTES)
  worker process    host RAM per worker: torch, transformers, lm-eval, Ray (WORKER_PROCESS_BYTES)
placement host: the device holds the live model, scratch, activations and the staging area, STAGING_BUFFERS x
  (K+1) copies of the largest item staged in s (double buffered). Tensors larger than a piece (PIECE_ENTRIES)
  are staged and merged piece by piece by the methods that can (entry-wise ones, and the task-vector family,
  magnitude selections from their caches: MethodSpec.goes_by_pieces), so where every method of the space can, staging
  and scratch are of a piece, not of the largest tensor. The host pins the sources per worker (every worker of
  a node holds its own copy) and holds the selection caches, built from the whole task vectors there.
data flow (dfs): every source's own model in s, sum over sources of P x s (plus activations).
hybrid: the sources once (shared by the merge and the routing) + the merged live model + scratch + caches.
host placement for dfs and hybrid: the routed models copy the sources they run onto the device, so the device
  holds them besides the host's pinned copy: offered only for parameter-space searches on GPU workers.
CPU workers: every component is in host RAM, shared by the node's workers (host placement stages nothing there,
  and methods that rescale merge whole tensors rather than measure them in a pass of their own).

The constants below are estimates to tune against measured memory (bench/plan_7b.py prints the 7B plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from evomerge.config import ConfigError, RunConfig
from evomerge.io.documents import layer_count, read_model_config
from evomerge.io.headers import inventory
from evomerge.search.capacity import Workers
from evomerge.search.preflight import check_source_dirs, sources_by_field

# -- estimates to tune against measured memory ----------------------------------------------------------------
# scratch, in fp32 copies of the largest tensor, as (per fine-tune, fixed); measured on K = 1..3 (bench_memory.py):
# the fp32 base and task-vector slots, the result, each task vector's sparsified part, and in eager ops the
# TIES sign election's weighted parts, sign, agreeing sum, divisor and a temporary (the fused kernel keeps those
# in registers)
SCRATCH_AVERAGE, SCRATCH_TASK_VECTORS, SCRATCH_SPARSIFY_EAGER = (1, 2), (2, 2), (3, 6)
SCRATCH_CACHED_SELECTION = (0, 2)  # a cut by thresholds (a magnitude cache's, or CPU's exact one): the cut's
# scratch, and the kept entries of the model being combined
# an exact selection without caches, one model at a time: magnitudes, topk's values and int64 indices of up to half
# the entries (or a row sort's), the tie count's cumsum; in the device's peak (bench_memory.py's peak_device)
SELECTION_TRANSIENTS = 3
STAGING_BUFFERS = 2  # host placement: (K+1) largest tensors in s, double buffered
MAGNITUDE_CACHE_BYTES = 4  # per entry per fine-tune: sorted magnitudes (TIES, breadcrumbs)
RANK_CACHE_BYTES = 2  # per entry per fine-tune: row ranks (DELLA)
PLAN_SEQ_LEN = 2048  # longest fitness sequence planned for (prompt + continuation), capped by the model's context
LOGIT_COPIES = 2  # the model's logits and lm-eval's log_softmax of them (both in the model dtype in lm-eval 0.4.13)
HIDDEN_COPIES = 4  # per-layer transients of width hidden: residual, normed input, attention output, q
MLP_COPIES = 3  # per-layer transients of width intermediate: gate, up, act(gate) * up
DEVICE_RUNTIME_BYTES = 2**30  # per GPU: CUDA context, cuBLAS workspace, caching-allocator slack
WORKER_PROCESS_BYTES = 2**30  # per worker, host RAM: torch + transformers + lm-eval + Ray in one process


def scratch_fp32_entries(k: int, methods: tuple[str, ...], cache: bool, storage: str, live: str, fused: bool,
                         largest: int, blocks: bool = False, piece: int | None = None, staged: bool = True) -> int:
    """fp32 entries a worker keeps as scratch when it merges K fine-tunes with any of `methods`: copies of the
    largest tensor (`largest` entries; the buffers grow to the largest request, so the costliest method sets
    it). Sources stored in float32 need no fp32 copy of the base, a float32 live model no result buffer.
    `fused`: the compiled kernels (merge.specs.compiles_kernels; linear is planned as eager: unnormalized, it is);
    `blocks`: elementwise methods merge tensors larger than BLOCK_ENTRIES in blocks of that size (CPU
    workers), so their copies are of a block; `piece`: sources on the host, so methods that can merge tensors
    piece by piece keep copies of a piece; `staged`: the pieces are copied to another device (on a CPU, where
    they are not, methods that rescale merge whole tensors rather than measure each in a pass of its own)."""
    from evomerge.merge.specs import BLOCK_ENTRIES, METHODS

    def entries(name: str) -> int:
        spec = METHODS[name]
        pieces = piece and spec.goes_by_pieces(cache) and (staged or spec.param("rescale") is None)
        size = min(largest, piece) if pieces else largest
        size = min(size, BLOCK_ENTRIES) if blocks and spec.elementwise else size
        return copies(spec) * size

    def copies(spec) -> int:
        if fused and spec.name == "task_arithmetic":  # a weighted sum with scale 1: one compiled pass, no scratch
            return 0
        per, fixed = (SCRATCH_AVERAGE if spec.elementwise else
                      SCRATCH_SPARSIFY_EAGER if spec.param("density") and not fused else
                      SCRATCH_TASK_VECTORS if spec.needs_base else SCRATCH_AVERAGE)
        # a cut by thresholds (what the cache gives, and on CPU workers (blocks) an exact cut without one too)
        cut = spec.uses_magnitude and (cache or blocks)
        return (per + SCRATCH_CACHED_SELECTION[0] * cut) * k + fixed + SCRATCH_CACHED_SELECTION[1] * cut \
            - (storage == "float32") - (live == "float32")

    return max(map(entries, methods), default=(SCRATCH_AVERAGE[0] * k + SCRATCH_AVERAGE[1]) * largest)


# safetensors header dtypes: bytes per entry; the floating ones are the ones merged and converted
ENTRY_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
STORAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
DEVICE, HOST = "device", "host"


# -- what the headers say --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """One checkpoint as its config.json and safetensors headers describe it."""

    path: Path
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (header dtype, shape)

    @classmethod
    def read(cls, path: Path, where: str) -> ModelShape:
        tensors = inventory(path)
        if not tensors:
            raise ConfigError(f"{where}: {path} holds no safetensors weights: the memory plan reads their headers")
        return cls(path, read_model_config(path), tensors)

    def _floats(self):
        return ((dt, math.prod(shape)) for dt, shape in self.tensors.values() if dt in FLOATS)

    @property
    def float_entries(self) -> int:
        return sum(n for _, n in self._floats())

    @property
    def dtype(self) -> str:
        """The dtype most float entries are stored in (what `Checkpoint.dtype` says, read from headers)."""
        counts: dict[str, int] = {}
        for dt, n in self._floats():
            counts[dt] = counts.get(dt, 0) + n
        return DTYPE_NAMES.get(max(counts, key=counts.__getitem__), "float32") if counts else "float32"

    @property
    def largest(self) -> tuple[str, int]:
        """(header dtype, entries) of the largest float tensor."""
        return max(self._floats(), key=lambda t: t[1], default=("F32", 0))

    def nbytes(self, dtype: str | None) -> int:
        """Bytes of every tensor with the float ones held in `dtype` (None: as stored); others as stored."""
        return sum(math.prod(shape) * (STORAGE_BYTES[dtype] if dtype and dt in FLOATS else ENTRY_BYTES.get(dt, 4))
                   for dt, shape in self.tensors.values())

    def dim(self, *keys: str, default: int | None = None) -> int:
        for k in keys:
            if self.config.get(k):
                return int(self.config[k])
        if default is None:
            raise ConfigError(f"{self.path}/config.json has none of {', '.join(keys)}: the memory plan needs it")
        return default


@dataclass(frozen=True)
class Workload:
    """What every worker of a search must hold, read from the config, the space and the sources' headers."""

    kind: str  # ps | dfs | hybrid
    held: dict[str, ModelShape]  # config field -> the sources a worker holds (ps, hybrid: base first)
    routed: tuple[str, ...]  # the fields of held whose own models data-flow paths run (dfs, hybrid)
    auto_dtype: str  # what storage_dtype auto holds the sources in: the first source's dtype
    reference: ModelShape  # the live model's shape (ps, hybrid: the base; dfs: model A)
    methods: tuple[str, ...]  # the parameter-space methods the space can produce
    batch: int  # fitness.batch_size (auto: lm-eval probes the largest that fits, so plan the smallest, 1)
    batch_auto: bool
    seq_len: int
    path_layers: int  # layers one forward runs: the model's, or the longest data-flow path the space allows

    @property
    def k(self) -> int:
        """Fine-tunes: sources besides the base (ps, hybrid)."""
        return len(self.held) - 1

    @property
    def cache_bytes(self) -> int:
        """Selection-cache bytes per entry per fine-tune, for the methods the space can produce."""
        from evomerge.merge.specs import METHODS

        specs = [METHODS[m] for m in self.methods]
        return MAGNITUDE_CACHE_BYTES * any(s.uses_magnitude for s in specs) + RANK_CACHE_BYTES * any(
            s.uses_ranks for s in specs)

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.reference.tensors.values())


def _near(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def read_workload(config: RunConfig, config_dir: Path, where: str) -> Workload:
    """The workload of `config` (relative paths against config_dir); reads config.json files and headers only."""
    from evomerge.genome import SearchSpace

    src = config.sources
    paths = {n: _near(p, config_dir) for n, p in src.models.items()}
    base = _near(src.base_model, config_dir) if src.base_model else None
    check_source_dirs(sources_by_field(paths, base), where)
    space = SearchSpace.load(config.search_space, sources=dict(src.models), base_model=src.base_model,
                             where=f"{where}: search_space")
    fields: dict[Path, str] = {}  # a model named twice is held once (as the workers' SourceModels do)
    if space.kind != "dfs" and base is not None:
        fields[base.resolve()] = "sources.base_model"
    for name, p in paths.items():
        fields.setdefault(p.resolve(), f"sources.models.{name}")
    held = {f: ModelShape.read(p, f"{where}: {f}") for p, f in fields.items()}
    reference = next(iter(held.values()))
    model_fields = list(dict.fromkeys(fields[p.resolve()] for p in paths.values()))  # in the store's order
    routed = tuple(model_fields) if space.dfs is not None else ()
    counts = {n: layer_count(read_model_config(p), p) for n, p in paths.items()}
    path_layers = reference.dim("num_hidden_layers", "n_layer")
    if space.dfs is not None:  # a candidate may route the longest path the space allows (each step has its cache)
        pool = sum(counts.values()) + (path_layers if space.kind == "hybrid" else 0)
        path_layers = space.dfs.max_layers or space.dfs.repeats * pool
    context = reference.dim("max_position_embeddings", "n_positions", default=PLAN_SEQ_LEN)
    auto = config.fitness.batch_size == "auto"
    return Workload(space.kind, held, routed, held[model_fields[0]].dtype, reference,
                    tuple(space.ps.methods) if space.ps else (),
                    1 if auto else int(config.fitness.batch_size), auto, min(PLAN_SEQ_LEN, context), path_layers)


def piece_entries(gpu: bool) -> int:
    """Entries per piece with host placement on the workers' kind of device (merge.specs.piece_entries)."""
    from evomerge.merge.specs import piece_entries as entries

    return entries("cuda" if gpu else "cpu")


def live_dtype(w: Workload, s: Setting) -> str:
    """The live model's dtype: the workers build it in the sources' storage dtype (SourceModels passes
    store.dtype as model_dtype; routed paths mix the store's own tensors). Change here if that changes."""
    return s.resolved(w)


def activation_bytes(w: Workload, gpu: bool, split: int = 1, dtype: str | None = None) -> int:
    """Peak activations of one fitness batch (B sequences of T tokens, no grad), in the live model's dtype m:
      logits       LOGIT_COPIES x B x T x vocab x m            (dominates small models)
      KV cache     2 x layers_run x B x T x kv_heads x head_dim x m / split   (HF's forward keeps a cache)
      one layer    B x T x (HIDDEN_COPIES x hidden + MLP_COPIES x intermediate) x m
      scores       CPU only: B x heads x T x T x 4 (the math attention kernel; GPU kernels do not keep them)."""
    r = w.reference
    m = STORAGE_BYTES.get(dtype or r.dtype, 4)
    b, t = w.batch, w.seq_len
    hidden = r.dim("hidden_size", "n_embd")
    heads = r.dim("num_attention_heads", "n_head")
    kv_heads = r.dim("num_key_value_heads", default=heads)
    head_dim = r.dim("head_dim", default=hidden // heads)
    inter = r.dim("intermediate_size", "n_inner", default=4 * hidden)
    vocab = r.dim("vocab_size")
    logits = LOGIT_COPIES * b * t * vocab * m
    kv = math.ceil(2 * w.path_layers * b * t * kv_heads * head_dim * m / split)
    layer = b * t * (HIDDEN_COPIES * hidden + MLP_COPIES * inter) * m
    scores = 0 if gpu else b * heads * t * t * 4
    return logits + kv + layer + scores


# -- settings and their estimates ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    placement: str  # device | host
    storage_dtype: str  # auto | bfloat16 | float16 | float32 (as the config writes it)
    selection_cache: bool

    def resolved(self, w: Workload) -> str:
        return w.auto_dtype if self.storage_dtype == "auto" else self.storage_dtype

    def fields(self, w: Workload) -> dict[str, str]:
        """The config fields of this setting, as a user writes them (the cache only where the space uses one)."""
        auto = f" ({w.auto_dtype})" if self.storage_dtype == "auto" else ""
        out = {"sources.placement": self.placement, "sources.storage_dtype": self.storage_dtype + auto}
        if w.cache_bytes and w.kind != "dfs":
            out["sources.selection_cache"] = "on" if self.selection_cache else "off"
        return out

    def bytes_per_entry(self, w: Workload) -> int:
        return STORAGE_BYTES[self.resolved(w)]


@dataclass(frozen=True)
class Estimate:
    setting: Setting
    parts: list[tuple[str, int, str]]  # (component, bytes, device|host): device per GPU, host per worker
    per_gpu: int  # device bytes on one GPU (workers sharing a GPU counted together); 0 for CPU workers
    host_node: int  # host RAM of the node's workers together
    device_ok: bool | None  # None: the capacity is unknown (or there is no device)
    host_ok: bool | None

    @property
    def fits(self) -> bool | None:
        if self.device_ok is False or self.host_ok is False:
            return False
        device_unknown = self.per_gpu > 0 and self.device_ok is None  # CPU workers have no device to judge
        return None if device_unknown or self.host_ok is None else True


def estimate(w: Workload, s: Setting, workers: Workers, piece: int | None = None) -> Estimate:
    """What one worker holds under setting s, by component (formulas in the module docstring). piece: entries
    per piece with host placement (default: what the workers' kind of device uses)."""
    gpu = workers.gpu
    split = workers.split if gpu else 1
    dev = DEVICE if gpu else HOST
    streamed = s.placement == HOST
    dtype, m = s.resolved(w), live_dtype(w, s)
    held = sum(shape.nbytes(dtype) for shape in w.held.values())
    parts = [("sources", held if streamed else math.ceil(held / split), HOST if streamed else dev)]
    if streamed and gpu and w.routed:  # routed models copy the sources they run onto the device
        routed = sum(w.held[f].nbytes(dtype) for f in w.routed)
        parts.append(("routed sources", math.ceil(routed / split), dev))
    if w.kind != "dfs":
        r = w.reference
        largest = r.largest[1]
        parts.append(("live model", math.ceil(r.nbytes(m) / split), dev))
        piece = (piece or piece_entries(gpu)) if streamed else None
        from evomerge.merge.specs import compiles_kernels

        fused = compiles_kernels("cuda" if gpu else "cpu", w.params)
        scratch = scratch_fp32_entries(w.k, w.methods, s.selection_cache, dtype, m, fused, largest, not gpu, piece,
                                       staged=gpu)
        parts.append(("scratch", scratch * 4, dev))
        from evomerge.merge.specs import METHODS

        if not s.selection_cache and any(METHODS[n].uses_magnitude or METHODS[n].uses_ranks for n in w.methods):
            parts.append(("selection transients", SELECTION_TRANSIENTS * largest * 4, dev))
        if streamed and gpu:  # the largest item staged (a CPU stages nothing): a piece where every method goes by pieces
            specs = [METHODS[name] for name in w.methods]
            staged = min(largest, piece) if all(sp.goes_by_pieces(s.selection_cache) for sp in specs) else largest
            parts.append(("staging", STAGING_BUFFERS * (w.k + 1) * staged * STORAGE_BYTES[dtype], dev))
        if s.selection_cache and w.cache_bytes:  # built from the whole task vectors, where the sources are held
            parts.append(("selection caches", math.ceil(w.k * r.float_entries * w.cache_bytes / (1 if streamed else split)),
                          HOST if streamed else dev))
    parts.append(("activations", activation_bytes(w, gpu, split, m), dev))
    if gpu:
        parts.append(("CUDA runtime", DEVICE_RUNTIME_BYTES, DEVICE))
    parts.append(("worker process", WORKER_PROCESS_BYTES, HOST))
    per_gpu = sum(b for _, b, p in parts if p == DEVICE) * workers.per_gpu
    host_node = sum(b for _, b, p in parts if p == HOST) * workers.per_node
    device_ok = None if not gpu or workers.device_free is None else per_gpu <= workers.device_free
    host_ok = None if workers.host_available is None else host_node <= workers.host_available
    return Estimate(s, parts, per_gpu, host_node, device_ok, host_ok)


BATCH_COST = 1.5  # a smaller fitness batch: slower scoring, but cheaper than streaming every source per candidate


def _cost(s: Setting, configured: Setting, w: Workload) -> float:
    """How much a change from the configured setting costs the user: a cache turned off (speed on CPU), a smaller
    batch (BATCH_COST), streaming from the host (bandwidth per candidate), a narrower storage dtype (precision)."""
    cost = (s.selection_cache != configured.selection_cache) + 2 * (s.placement != configured.placement)
    narrower = s.bytes_per_entry(w) < configured.bytes_per_entry(w)
    return cost + 4 * narrower + 8 * (s.bytes_per_entry(w) > configured.bytes_per_entry(w))


@dataclass(frozen=True)
class Fix:
    """A change of the config that fits: field -> value as written, and the estimate under it."""

    changes: dict[str, str]
    estimate: Estimate
    workers: Workers  # the workers it was planned for (fewer per node, more GPUs each, or the same)


@dataclass(frozen=True)
class Plan:
    workload: Workload
    workers: Workers
    configured: Estimate
    estimates: list[Estimate]  # the configured setting first
    notes: list[str] = field(default_factory=list)

    def fix(self) -> Fix | None:
        """The configured setting when it fits (no changes), else the cheapest change that fits: a sources
        setting and/or a smaller fitness batch (`_cost`); then more GPUs per worker, or fewer workers per node."""
        if self.configured.fits:
            return Fix({}, self.configured, self.workers)
        w, wk = self.workload, self.workers
        options = [(e, {}) for e in self.estimates]
        b = 1 if w.batch_auto else w.batch  # auto is planned at 1 already
        while b > 1:
            b //= 2
            options += [(e, {"fitness.batch_size": str(b)}) for e in self._under(replace(w, batch=b), wk)]
        found = self._cheapest(options, wk)
        for g in (2, 4, 8):
            if found is None and wk.gpu and self.configured.device_ok is False and wk.gpus_each < g:
                more = replace(wk, gpus_each=float(g))
                found = self._cheapest([(e, {"workers.gpus_per_worker": str(g)}) for e in self._under(w, more)], more)
        smallest = min(self.estimates, key=lambda e: e.host_node)
        per_worker = smallest.host_node // wk.per_node
        n = (wk.host_available or 0) // max(1, per_worker)
        if found is None and smallest.host_ok is False and 1 <= n < wk.per_node:
            fewer = replace(wk, per_node=n)
            found = self._cheapest([(e, {"workers.count": str(n)}) for e in self._under(w, fewer)], fewer)
        return found

    def _under(self, w: Workload, workers: Workers) -> list[Estimate]:
        return [estimate(w, e.setting, workers) for e in self.estimates]

    def _cheapest(self, options: list[tuple[Estimate, dict[str, str]]], workers: Workers) -> Fix | None:
        """The fitting option (an estimate, and the changes besides its sources setting) that costs least."""
        w, now = self.workload, self.configured.setting
        fitting = [(e, more) for e, more in options if e.fits]
        if not fitting:
            return None
        best, more = min(fitting, key=lambda o: (
            _cost(o[0].setting, now, w) + BATCH_COST * ("fitness.batch_size" in o[1]),
            -int(o[1].get("fitness.batch_size", w.batch)), o[0].per_gpu, o[0].host_node))
        configured = now.fields(w)
        changes = {k: v for k, v in best.setting.fields(w).items() if configured.get(k) != v}
        return Fix(changes | more, best, workers)

    def verdict(self) -> str:
        """The last line of `evomerge plan`: what to set."""
        w, c = self.workload, self.configured
        if c.fits is None:
            return (f"fits: unknown ({self.workers.source}); as configured ({_listed(c.setting.fields(w))}) "
                    f"a worker needs {self._need(c)}")
        fix = self.fix()
        if fix is None:
            return f"does not fit: {self._no_fix()}"
        shown = _listed(fix.estimate.setting.fields(w) | fix.changes)
        return f"fits as configured: {shown}" if not fix.changes else f"fits: {shown} (set {_listed(fix.changes)})"

    def refusal(self, where: str) -> str | None:
        """The one-line error of a search whose configured setting does not fit; None when it fits or when the
        memory the workers will get is unknown."""
        if self.configured.fits is not False:
            return None
        need, fix = self._shortfall(self.configured), self.fix()
        if fix is None:
            name = "workers.gpus_per_worker" if self.configured.device_ok is False else "workers.count"
            return f"{where}: {name}: {need}; {self._no_fix()}"
        return (f"{where}: {next(iter(fix.changes))}: {need}; set {_listed(fix.changes)} "
                f"(needs {self._need(fix.estimate, fix.workers)})")

    # -- wording -------------------------------------------------------------------------------------------------
    def _need(self, e: Estimate, workers: Workers | None = None) -> str:
        wk = workers or self.workers
        host = f"{gib(e.host_node)} of host RAM" + (f" for {wk.per_node} workers" if wk.per_node > 1 else "")
        return f"{gib(e.per_gpu)} per GPU, {host}" if wk.gpu else host

    def _shortfall(self, e: Estimate) -> str:
        on_device = e.device_ok is False
        top = max(((n, b) for n, b, p in e.parts if p == (DEVICE if on_device else HOST)), key=lambda t: t[1])
        if on_device:
            share = f" ({self.workers.per_gpu} workers share it)" if self.workers.per_gpu > 1 else ""
            return (f"a worker needs {gib(e.per_gpu)} on each GPU{share} ({top[0]} {gib(top[1])} of it), which has "
                    f"{gib(self.workers.device_free or 0)} free")
        n = self.workers.per_node
        who = f"{n} workers on a node need" if n > 1 else "a worker needs"
        return (f"{who} {gib(e.host_node)} of host RAM ({top[0]} {gib(top[1])} per worker), which has "
                f"{gib(self.workers.host_available or 0)} available")

    def _no_fix(self) -> str:
        smallest = min(self.estimates, key=lambda e: (e.per_gpu, e.host_node))
        return (f"even {_listed(smallest.setting.fields(self.workload))} needs {self._need(smallest)}: use a "
                "machine with more memory (run `evomerge plan` to see the parts)")

    # -- the table -----------------------------------------------------------------------------------------------
    def table(self) -> tuple[list[str], list[list[str]]]:
        """Column headers (one per setting) and rows (component, then one cell per setting) of `evomerge plan`."""
        w, wk = self.workload, self.workers
        headers = ["component"]
        for e in self.estimates:
            st = e.setting
            lines = [st.placement, f"auto ({_SHORT[w.auto_dtype]})" if st.storage_dtype == "auto"
                     else _SHORT[st.storage_dtype]]
            if "sources.selection_cache" in st.fields(w):
                lines.append(f"cache {'on' if st.selection_cache else 'off'}")
            headers.append("\n".join(lines) + (" *" if e is self.configured else ""))
        present = {n for e in self.estimates for n, _, _ in e.parts}
        names = [n for n in COMPONENTS if n in present]
        rows = []
        for name in names:
            cells = []
            for e in self.estimates:
                found = [(b, p) for n, b, p in e.parts if n == name]
                cells.append(" + ".join(f"[{gib(b)}]" if wk.gpu and p == HOST else gib(b) for b, p in found) or "-")
            rows.append([name, *cells])
        if wk.gpu:
            rows.append([f"= per GPU ({wk.per_gpu} worker(s))" if wk.per_gpu > 1 else "= per GPU",
                         *(gib(e.per_gpu) for e in self.estimates)])
            rows.append(["GPU free", *([gib(wk.device_free) if wk.device_free is not None else "unknown"]
                                       * len(self.estimates))])
        rows.append([f"= host RAM, {wk.per_node} worker(s)", *(gib(e.host_node) for e in self.estimates)])
        rows.append(["host RAM available", *([gib(wk.host_available) if wk.host_available is not None
                                              else "unknown"] * len(self.estimates))])
        rows.append(["fits", *({True: "yes", False: "NO", None: "?"}[e.fits] for e in self.estimates)])
        return headers, rows

    def title(self) -> str:
        w, wk = self.workload, self.workers
        what = (f"{w.kind} search, {', '.join(w.methods)}: base + {w.k} fine-tunes" if w.kind != "dfs"
                else f"dfs search of {len(w.held)} sources")
        kind = (f"GPU worker(s), {wk.split} GPU(s) each" if wk.gpu and wk.split > 1 else
                "GPU worker(s)" if wk.gpu else "CPU worker(s)")
        return (f"memory per worker: {what} ({_count(w.params)} parameters, {w.auto_dtype}); "
                f"{wk.per_node} {kind} per node")

    def caption(self) -> str:
        w = self.workload
        batch = f"batch {w.batch}" + (" (auto: planned at 1)" if w.batch_auto else "")
        where = "[...]: in host RAM; " if self.workers.gpu else ""
        return (f"*: as configured; {where}activations: {batch} x {w.seq_len} tokens x {w.path_layers} layers; "
                f"{self.workers.source}")


COMPONENTS = ("sources", "routed sources", "live model", "scratch", "staging", "selection caches", "activations",
              "CUDA runtime", "worker process")  # the table's order
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _listed(fields: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def gib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{1 if n >= 10 * size else 2}f} {unit}"  # close calls show in small numbers
    return f"{n} B"


def _settings(config: RunConfig, w: Workload, workers: Workers) -> tuple[Setting, list[Setting], list[str]]:
    """The configured setting (as the workers will read it) and the others worth showing."""
    src, notes = config.sources, []
    host_helps = workers.gpu and w.kind == "ps"  # elsewhere it holds the sources twice, or adds staging to RAM
    placement = src.placement
    if placement == HOST and not host_helps:
        why = "CPU workers hold the sources in RAM either way" if not workers.gpu else \
            "the routed models copy their sources onto the device"
        notes.append(f"sources.placement: host needs more memory than device here ({why}): set device")
    # auto: caches on for CPU workers and with host placement (they live in host RAM), off on GPUs
    cache_of = lambda p: src.selection_cache == "on" or (src.selection_cache == "auto" and (not workers.gpu or p == HOST))
    configured = Setting(placement, src.storage_dtype, cache_of(placement))
    auto_bytes = STORAGE_BYTES[w.auto_dtype]
    dtypes = ["auto"] + [d for d in ("bfloat16", "float32") if STORAGE_BYTES[d] != auto_bytes]
    dtypes = list(dict.fromkeys([src.storage_dtype, *dtypes]))
    caches = lambda p: [cache_of(p), False] if cache_of(p) and w.cache_bytes and w.kind != "dfs" else [cache_of(p)]
    placements = list(dict.fromkeys([placement, DEVICE, HOST] if host_helps else [placement, DEVICE]))
    others = [Setting(p, d, c) for p in placements for d in dtypes for c in caches(p)]
    return configured, [s for s in others if s != configured], notes


def plan_search(config: RunConfig, config_dir: Path, where: str, workers: Workers) -> Plan:
    """The memory plan of `config` on `workers`: every setting worth showing, the configured one first."""
    w = read_workload(config, config_dir, where)
    configured, others, notes = _settings(config, w, workers)
    first = estimate(w, configured, workers)
    return Plan(w, workers, first, [first, *(estimate(w, s, workers) for s in others)], notes)


__all__ = ["Estimate", "ModelShape", "Plan", "Setting", "Workload", "activation_bytes", "estimate", "gib",
           "live_dtype", "plan_search", "read_workload", "scratch_fp32_entries"]
