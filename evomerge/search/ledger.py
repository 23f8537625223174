"""The evaluation ledger: one SQLite row per candidate evaluation, the run's durable memory.

Every evaluation the driver asks for is recorded here (genome, recipe, per-item responses, estimates,
objectives, status, where and how long it ran, its seed). Rows are keyed by `candidate_key(generation,
index, genome)`, which is deterministic: a driver resumed from the algorithm checkpoint re-asks the same
generation, gets the same genomes, computes the same keys and finds the evaluations that finished before
the crash, so they are read back instead of recomputed.

Durability: WAL journal, synchronous=FULL, one transaction per write. A driver killed mid-write (kill -9,
power loss) leaves the database at the last committed row; a row is either all there or not there.
One writer (the driver); readers (`evomerge status`) may open the same file concurrently.

A finished row (status "ok" or "failed") is immutable: the ledger is append-only. A "running" row (an
evaluation handed to a worker, e.g. by a driver that then crashed) may be overwritten by its result.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import EvomergeError

SCHEMA_VERSION = 1
STATUSES = ("running", "ok", "failed")
FINISHED = ("ok", "failed")

Status = Literal["running", "ok", "failed"]
Direction = Literal["max", "min"]


class LedgerError(EvomergeError):
    """The ledger file is missing, not a ledger, of another schema version, or a write breaks its rules."""


def candidate_key(generation: int, index: int, genome: Sequence[float]) -> str:
    """Deterministic id of a candidate: 'g0003-0007-<12 hex>' (generation, index in it, genome hash).

    The hash is over the exact IEEE-754 bits of the genome, so the same floats always give the same key
    and any change, however small, gives another.
    """
    if generation < 0 or index < 0:
        raise ValueError(f"generation and index must be >= 0, got {generation}, {index}")
    bits = struct.pack(f"<{len(genome)}d", *map(float, genome))
    digest = hashlib.blake2b(bits, digest_size=6).hexdigest()
    return f"g{generation:04d}-{index:04d}-{digest}"


@dataclass(frozen=True)
class Record:
    """One evaluation. JSON-able fields hold plain Python data; genome floats round-trip exactly."""

    key: str
    generation: int
    index: int
    genome: tuple[float, ...]
    status: Status
    seed: int | None = None
    recipe: Any = None  # the decoded recipe, as JSON data (what export and mergekit YAML are made from)
    responses: dict[str, dict[str, int]] | None = None  # task -> {item id: 0/1}
    estimates: dict[str, Any] | None = None  # task -> estimated accuracy (or estimator details)
    objectives: dict[str, float] | None = None  # objective name -> value
    error: str | None = None  # why a "failed" evaluation failed (one line or a traceback)
    worker: str | None = None
    node: str | None = None
    timings: dict[str, float] | None = None  # seconds: materialize, score, total, ...
    created: float | None = None  # unix time the row was first written (set by the ledger)
    finished: float | None = None  # unix time the result was written (set by the ledger)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (JSON)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED


_COLUMNS = (
    "key", "generation", "idx", "genome", "status", "seed", "recipe", "responses", "estimates",
    "objectives", "error", "worker", "node", "timings", "created", "finished", "extra",
)
_JSON_COLUMNS = ("genome", "recipe", "responses", "estimates", "objectives", "timings", "extra")

_SCHEMA = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE evaluations (
    key        TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    genome     TEXT NOT NULL,     -- JSON list of floats (repr, exact)
    status     TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed')),
    seed       INTEGER,
    recipe     TEXT,              -- JSON
    responses  TEXT,              -- JSON task -> {item: 0/1}
    estimates  TEXT,              -- JSON
    objectives TEXT,              -- JSON name -> value
    error      TEXT,
    worker     TEXT,
    node       TEXT,
    timings    TEXT,              -- JSON name -> seconds
    created    REAL NOT NULL,
    finished   REAL,
    extra      TEXT               -- JSON
);
CREATE INDEX evaluations_by_generation ON evaluations (generation, idx);
"""


def _dumps(value: Any) -> str | None:
    # json writes floats with repr(), which round-trips every finite float exactly; NaN and +-inf are
    # written as the non-standard tokens NaN/Infinity that json.loads reads back.
    return None if value is None else json.dumps(value, allow_nan=True)


class Ledger:
    """The SQLite ledger of a run. Open with `Ledger.open(path)`; use as a context manager or close()."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> Ledger:
        """Open the ledger at `path`, creating it (and its schema) if missing and `create` is true."""
        path = Path(path)
        exists = path.exists()
        if not exists and not create:
            raise LedgerError(f"{path}: no ledger here; is this a run directory made by `evomerge search`?")
        if exists and not path.is_file():
            raise LedgerError(f"{path}: is not a file; expected the SQLite ledger of a run")
        try:
            # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as e:
            raise LedgerError(f"{path}: cannot open the ledger ({e})") from e
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed evaluation survives power loss too
            conn.execute("PRAGMA foreign_keys=ON")
            cls._check_or_create_schema(conn, path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LedgerError(f"{path}: not a readable SQLite ledger ({e}); point at a run's ledger.sqlite") from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @staticmethod
    def _check_or_create_schema(conn: sqlite3.Connection, path: Path) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            # executescript() would COMMIT first; run the statements one by one inside the transaction.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT INTO meta (name, value) VALUES ('created', ?)", (repr(time.time()),))
            conn.execute("COMMIT")
            return
        if "meta" not in tables or "evaluations" not in tables:
            raise LedgerError(f"{path}: an SQLite file but not an evomerge ledger (tables: {sorted(tables)})")
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        version = row[0] if row else None
        if version != str(SCHEMA_VERSION):
            raise LedgerError(
                f"{path}: ledger schema version {version}, this evomerge reads version {SCHEMA_VERSION}; "
                "resume the run with the evomerge version that started it, or start a new run"
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------------

    def record(self, rec: Record) -> Record:
        """Write `rec` in one transaction and return it as stored (with timestamps filled in).

        A new key is inserted. An existing "running" row is replaced by `rec` (its `created` kept).
        An existing finished row is never changed: LedgerError.
        """
        if rec.status not in STATUSES:
            raise LedgerError(f"record {rec.key}: status {rec.status!r} is not one of {', '.join(STATUSES)}")
        genome = tuple(float(x) for x in rec.genome)
        expected = candidate_key(rec.generation, rec.index, genome)
        if rec.key != expected:
            raise LedgerError(
                f"record {rec.key}: key does not match generation {rec.generation}, index {rec.index} and the "
                f"genome (expected {expected}); build keys with candidate_key()"
            )
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = conn.execute("SELECT status, created FROM evaluations WHERE key=?", (rec.key,)).fetchone()
            if old is not None and old[0] in FINISHED:
                raise LedgerError(
                    f"record {rec.key}: already finished with status {old[0]!r}; the ledger is append-only"
                )
            created = old[1] if old is not None else (rec.created if rec.created is not None else now)
            finished = (rec.finished if rec.finished is not None else now) if rec.status in FINISHED else None
            stored = replace(rec, genome=genome, created=created, finished=finished)
            values = self._to_row(stored)
            placeholders = ", ".join("?" for _ in _COLUMNS)
            conn.execute(f"INSERT OR REPLACE INTO evaluations ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return stored

    def set_meta(self, name: str, value: Any) -> None:
        """Store a JSON value under `name` in the meta table (e.g. the run seed, the objective names)."""
        if name in ("schema_version", "created"):
            raise LedgerError(f"meta {name!r} is managed by the ledger itself")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def get_meta(self, name: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        if row is None:
            return default
        return json.loads(row[0])

    # ---- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """The record with this key, or None if it was never written."""
        row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM evaluations WHERE key=?", (key,)).fetchone()
        return None if row is None else self._from_row(row)

    def __contains__(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM evaluations WHERE key=?", (key,)).fetchone() is not None

    def done(self, generation: int) -> dict[str, Record]:
        """Finished records (ok or failed) of one generation, by key."""
        return {r.key: r for r in self._select("WHERE generation=? AND status IN ('ok', 'failed')", (generation,))}

    def all(self, status: Status | None = None) -> list[Record]:
        """All records (or those with `status`), by generation then index."""
        if status is None:
            return self._select("", ())
        if status not in STATUSES:
            raise LedgerError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        return self._select("WHERE status=?", (status,))

    def counts(self) -> dict[str, int]:
        """Number of records per status: {'running': .., 'ok': .., 'failed': ..}."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn.execute("SELECT status, COUNT(*) FROM evaluations GROUP BY status"):
            counts[status] = n
        return counts

    def last_generation(self) -> int | None:
        """The highest generation with any record, or None for an empty ledger."""
        return self._conn.execute("SELECT MAX(generation) FROM evaluations").fetchone()[0]

    def front(self, objectives: Mapping[str, Direction]) -> list[Record]:
        """The non-dominated "ok" records over `objectives` (name -> 'max' or 'min')."""
        return pareto_front(self.all("ok"), objectives)

    # ---- rows <-> records ----------------------------------------------------------------------

    def _select(self, where: str, params: tuple) -> list[Record]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM evaluations {where} ORDER BY generation, idx, key"
        return [self._from_row(row) for row in self._conn.execute(sql, params)]

    @staticmethod
    def _to_row(rec: Record) -> tuple:
        values: dict[str, Any] = {
            "key": rec.key, "generation": int(rec.generation), "idx": int(rec.index), "genome": list(rec.genome),
            "status": rec.status, "seed": None if rec.seed is None else int(rec.seed), "recipe": rec.recipe,
            "responses": rec.responses, "estimates": rec.estimates, "objectives": rec.objectives,
            "error": rec.error, "worker": rec.worker, "node": rec.node, "timings": rec.timings,
            "created": rec.created, "finished": rec.finished, "extra": rec.extra or None,
        }
        for name in _JSON_COLUMNS:
            values[name] = _dumps(values[name])
        return tuple(values[c] for c in _COLUMNS)

    @staticmethod
    def _from_row(row: tuple) -> Record:
        values = dict(zip(_COLUMNS, row))
        for name in _JSON_COLUMNS:
            if values[name] is not None:
                values[name] = json.loads(values[name])
        return Record(
            key=values["key"], generation=values["generation"], index=values["idx"],
            genome=tuple(values["genome"]), status=values["status"], seed=values["seed"],
            recipe=values["recipe"], responses=values["responses"], estimates=values["estimates"],
            objectives=values["objectives"], error=values["error"], worker=values["worker"], node=values["node"],
            timings=values["timings"], created=values["created"], finished=values["finished"],
            extra=values["extra"] or {},
        )


def pareto_front(records: Iterable[Record], objectives: Mapping[str, Direction]) -> list[Record]:
    """Records not dominated by any other over `objectives` (name -> 'max'|'min').

    Records lacking an objective, or with a non-finite value, are left out. Duplicates (equal objective
    vectors) are all kept. O(n^2), fine for the few thousand evaluations of a run.
    """
    for name, direction in objectives.items():
        if direction not in ("max", "min"):
            raise ValueError(f"objective {name!r}: direction {direction!r} must be 'max' or 'min'")
    sign = {name: (1.0 if d == "min" else -1.0) for name, d in objectives.items()}
    points: list[tuple[Record, tuple[float, ...]]] = []
    for rec in records:
        obj = rec.objectives or {}
        vals = [obj.get(name) for name in objectives]
        if any(v is None or not math.isfinite(v) for v in vals):
            continue
        points.append((rec, tuple(sign[n] * float(v) for n, v in zip(objectives, vals))))  # minimise all

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [rec for rec, p in points if not any(dominates(q, p) for _, q in points)]


def collapse_ties(front: Sequence[Record], names: Sequence[str]) -> list[tuple[Record, list[Record]]]:
    """Front members with equal values of every objective in `names`, grouped: (representative, the others).
    The representative is the earliest evaluated (generation, then index); groups come in the front's order.
    A search breeds clones of a good genome, so a long run's front can hold dozens of equal score vectors."""
    groups: dict[tuple[float, ...], list[Record]] = {}
    for rec in front:
        groups.setdefault(tuple(float(rec.objectives[n]) for n in names), []).append(rec)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: (r.generation, r.index))
        out.append((members[0], members[1:]))
    return out

