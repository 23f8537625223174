"""Gene layouts: what each position of a search space's genome means, declared once.

The gene names (ledger, logs), the decoder and the seed genomes all read the same layout, so they cannot
disagree. Order and names are part of stored runs (ledgers hold genomes): changing either
changes what old genomes mean. The layout, in genome order:

parameter-space block ("ps"):
  method=<m>                         one per candidate method when there are several (argmax picks one)
  weight/<source>/g<group>/<kind>    by layer group, then module kind, then source (if a method reads it)
  density/<source>/g<group>/<kind>   the same for density
  param/<name>                       one per merge-wide parameter searched as a range
data-flow block ("dfs"), after it:
  slot<t>/<source>.<layer>/r<r>      T = M * repeats slots; slot t runs pool layer t mod M
  scale/<source>.<layer>             per_layer: one per destination pool layer
  scale/<source>.<layer>><s>.<l>     matrix: one per (from, to) pool-layer pair, by from then to
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from evomerge.merge.layer_path import LayerRef

Role = Literal["method", "weight", "density", "param", "slot", "scale"]
RANGE_ROLES = ("weight", "density")  # per-source range genes, in genome order
DFS_ROLES = ("slot", "scale")


@dataclass(frozen=True)
class Gene:
    """One gene; only the fields of its role are set."""

    role: Role
    method: str | None = None  # method: the candidate this gene votes for
    param: str | None = None  # param: the merge-wide parameter
    source: str | None = None  # weight, density: the source model
    group: int | None = None  # weight, density: the layer group
    kind: str | None = None  # weight, density: the module kind (attention, mlp, other; all without filters)
    slot: int | None = None  # slot: t, its index among the T slots
    repeat: int | None = None  # slot: which pass over the pool (t // M)
    layer: LayerRef | None = None  # slot: the pool layer it runs; scale: the layer whose input it scales
    origin: LayerRef | None = None  # matrix scale: the layer the hidden state comes from

    @property
    def block(self) -> Literal["ps", "dfs"]:
        return "dfs" if self.role in DFS_ROLES else "ps"

    @property
    def name(self) -> str:
        if self.role == "method":
            return f"method={self.method}"
        if self.role in RANGE_ROLES:
            return f"{self.role}/{self.source}/g{self.group}/{self.kind}"
        if self.role == "param":
            return f"param/{self.param}"
        assert self.layer is not None
        if self.role == "slot":
            return f"slot{self.slot}/{_ref(self.layer)}/r{self.repeat}"
        if self.origin is not None:  # matrix form: from > to
            return f"scale/{_ref(self.origin)}>{_ref(self.layer)}"
        return f"scale/{_ref(self.layer)}"


def _ref(ref: LayerRef | None) -> str:
    assert ref is not None
    return f"{ref.source}.{ref.layer}"


class GeneLayout:
    """The genes of one genome, in order, with lookups by role and by the gene itself."""

    def __init__(self, genes: tuple[Gene, ...]) -> None:
        self.genes = genes
        self._by_role: dict[str, list[int]] = {}
        for i, g in enumerate(genes):
            self._by_role.setdefault(g.role, []).append(i)
        self._index: dict[Gene, int] | None = None  # built on first lookup (matrix scales make many genes)
        n_ps = sum(g.block == "ps" for g in genes)
        assert all(g.block == "ps" for g in genes[:n_ps]), "ps genes come first"
        self._blocks = {"ps": slice(0, n_ps), "dfs": slice(n_ps, len(genes))}
        self._scale_cells: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.genes)

    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def positions(self, role: Role) -> list[int]:
        """Where the genes of `role` are, in genome order."""
        return self._by_role.get(role, [])

    def index(self, gene: Gene) -> int:
        """Where `gene` is, e.g. layout.index(Gene("weight", source="math", group=0, kind="mlp"))."""
        if self._index is None:
            self._index = {g: i for i, g in enumerate(self.genes)}
        return self._index[gene]

    def scale_cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the scale genes, in genome order: their positions, the pool index of the layer each feeds,
        and of the layer before it (matrix form; -1 per_layer). Arrays, so decoding a matrix of M * M
        scales is one vector operation."""
        if self._scale_cells is None:
            # pool index of a layer: the slot that runs it in the first repeat
            pool = {g.layer: g.slot for g in (self.genes[i] for i in self.positions("slot")) if g.repeat == 0}
            scales = [self.genes[i] for i in self.positions("scale")]
            origins = [pool[g.origin] if g.origin is not None else -1 for g in scales]
            self._scale_cells = (np.array(self.positions("scale"), dtype=np.intp),
                                 np.array([pool[g.layer] for g in scales], dtype=np.intp), np.array(origins, dtype=np.intp))
        return self._scale_cells

    def block(self, name: Literal["ps", "dfs"]) -> slice:
        """The genome part of one block (ps genes come first)."""
        return self._blocks[name]


@dataclass(frozen=True)
class PSShape:
    """What the parameter-space genes depend on."""

    methods: tuple[str, ...]
    ranges: tuple[str, ...]  # the RANGE_ROLES some listed method reads
    groups: int
    kinds: tuple[str, ...]
    sources: tuple[str, ...]
    params: tuple[str, ...]  # merge-wide parameters searched as ranges

    def genes(self) -> list[Gene]:
        genes = [Gene("method", method=m) for m in self.methods] if len(self.methods) > 1 else []
        for role in RANGE_ROLES:
            if role in self.ranges:
                genes += [Gene(role, source=s, group=g, kind=k)
                          for g in range(self.groups) for k in self.kinds for s in self.sources]
        return genes + [Gene("param", param=p) for p in self.params]


@dataclass(frozen=True)
class DFSShape:
    """What the data-flow genes depend on."""

    pool: tuple[tuple[str, int], ...]  # (source, layer count) in pool order
    repeats: int
    scales: str  # none | per_layer | matrix

    def genes(self) -> list[Gene]:
        refs = [LayerRef(s, i) for s, n in self.pool for i in range(n)]
        genes = [Gene("slot", slot=r * len(refs) + i, repeat=r, layer=ref)
                 for r in range(self.repeats) for i, ref in enumerate(refs)]
        if self.scales == "per_layer":
            genes += [Gene("scale", layer=ref) for ref in refs]
        elif self.scales == "matrix":
            genes += [Gene("scale", origin=a, layer=b) for a in refs for b in refs]
        return genes


@lru_cache(maxsize=32)  # the driver decodes every candidate against the same layout
def gene_layout(ps: PSShape | None, dfs: DFSShape | None) -> GeneLayout:
    return GeneLayout(tuple((ps.genes() if ps else []) + (dfs.genes() if dfs else [])))
