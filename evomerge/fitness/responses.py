"""Responses matrices: which model answered which item correctly (models x items, NaN = not observed).

On disk a CSV or Parquet file with a header `model,<item id>,<item id>,...`, one row per model, values 0 or 1
(empty = not observed). Everything is validated here, once, with errors that name the file, the row or column and
the fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.errors import FitnessError

# Spellings accepted as correct / wrong / not observed. Parquet booleans and integers map onto the same values.
_ONE = ("1", "1.0", "true", "True", "TRUE")
_ZERO = ("0", "0.0", "false", "False", "FALSE")
_MISSING = ("", "nan", "NaN", "NA")


@dataclass(frozen=True)
class Responses:
    """models x items correctness: 1.0 right, 0.0 wrong, NaN not observed."""

    models: list[str]
    items: list[str]
    values: np.ndarray  # (M, N) float64
    source: str = "<memory>"  # the file it came from, for error messages

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.models), len(self.items)):
            raise ValueError(f"values {self.values.shape} do not match "
                             f"{len(self.models)} models x {len(self.items)} items")
        _check_unique(self.models, "model name", self.source, "rows")
        _check_unique(self.items, "item id", self.source, "columns")
        bad = ~(np.isnan(self.values) | (self.values == 0) | (self.values == 1))
        if bad.any():
            r, c = map(int, np.argwhere(bad)[0])
            raise FitnessError(
                f"{self.source}: row {self.models[r]!r}, column {self.items[c]!r} is {float(self.values[r, c])!r}: "
                "responses must be 0 or 1 (empty = not observed)"
            )

    @classmethod
    def from_array(cls, values: np.ndarray, models: list[str] | None = None, items: list[str] | None = None,
                   source: str = "<memory>") -> Responses:
        """Wrap an (M, N) array; default names are m0.. and i0.."""
        values = np.asarray(values, dtype=np.float64)
        m, n = values.shape
        return cls(models or [f"m{i}" for i in range(m)], items or [f"i{j}" for j in range(n)], values, source)

    @property
    def observed(self) -> np.ndarray:
        return ~np.isnan(self.values)

    def accuracy(self) -> np.ndarray:
        """(M,) mean correctness over each model's observed items (NaN for a model with none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nansum(self.values, axis=1) / self.observed.sum(axis=1)

    def rows(self, models: list[str]) -> Responses:
        index = {m: i for i, m in enumerate(self.models)}
        missing = [m for m in models if m not in index]
        if missing:
            raise FitnessError(f"{self.source}: no row for model(s) {', '.join(map(repr, missing))}: "
                               f"the models are {', '.join(self.models[:8])}{' ...' if len(self.models) > 8 else ''}")
        return Responses(list(models), self.items, self.values[[index[m] for m in models]], self.source)


def read_responses(path: str | Path) -> Responses:
    """Read a responses matrix from CSV (.csv, .tsv is not accepted) or Parquet (.parquet, .pq)."""
    path = Path(path)
    if not path.is_file():
        raise FitnessError(f"{path}: no such responses file: give a CSV or Parquet file (header model,<item ids>)")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path)
    return _read_csv(path)


def _read_csv(path: Path) -> Responses:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]  # blank lines carry nothing
    except (UnicodeDecodeError, csv.Error) as e:
        raise FitnessError(f"{path}: not a readable CSV file ({e}): write it as UTF-8 CSV, "
                           "or give a .parquet file") from None
    if not rows:
        raise FitnessError(f"{path}: the file is empty: write a header `model,<item id>,...` and one row per model")
    header, body = rows[0], rows[1:]
    _check_header(header, path)
    if not body:
        raise FitnessError(f"{path}: the header has no model rows under it: add one row per model")
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise FitnessError(f"{path}: line {lineno} (model {row[0]!r}) has {len(row)} fields but the header has "
                               f"{len(header)}: give every row one value per item (empty = not observed)")
    cells = np.array([row[1:] for row in body], dtype=str)  # (M, N)
    cells = np.char.strip(cells)
    values = np.full(cells.shape, np.nan)
    values[np.isin(cells, _ONE)] = 1.0
    values[np.isin(cells, _ZERO)] = 0.0
    bad = ~np.isin(cells, _ONE + _ZERO + _MISSING)
    models = [row[0].strip() for row in body]
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise FitnessError(f"{path}: line {r + 2} (model {models[r]!r}), column {header[c + 1]!r} is "
                           f"{str(cells[r, c])!r}: responses must be 0 or 1 (empty = not observed)")
    return Responses(models, [h.strip() for h in header[1:]], values, str(path))


def _read_parquet(path: Path) -> Responses:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FitnessError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}): "
                           "write it with pandas.DataFrame.to_parquet or pyarrow") from None
    header = [str(n) for n in table.column_names]
    if not header:
        raise FitnessError(f"{path}: the file is empty: write a column `model` and one column per item")
    _check_header(header, path)
    if table.num_rows == 0:
        raise FitnessError(f"{path}: the table has no rows: add one row per model")
    models = [str(m) for m in table.column(0).to_pylist()]
    values = np.empty((table.num_rows, len(header) - 1))
    for j in range(1, len(header)):
        column = table.column(j)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                or pa.types.is_null(kind)):
            raise FitnessError(f"{path}: column {header[j]!r} has type {kind}: responses must be 0/1 numbers or "
                               "booleans (null = not observed)")
        values[:, j - 1] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return Responses(models, header[1:], values, str(path))


def _check_header(header: list[str], path: Path) -> None:
    if header[0].strip() != "model":
        raise FitnessError(f"{path}: the first column is {header[0]!r}: name it `model` (header model,<item id>,...)")
    if len(header) < 2:
        raise FitnessError(f"{path}: the header names no items: add one column per item after `model`")
    blank = [i for i, h in enumerate(header) if not h.strip()]
    if blank:
        raise FitnessError(f"{path}: column {blank[0] + 1} of the header is empty: give every item an id")


def _check_unique(names: list[str], what: str, source: str, where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FitnessError(f"{source}: duplicate {what} {name!r}: each of the {where} must have its own {what}")
        seen.add(name)
