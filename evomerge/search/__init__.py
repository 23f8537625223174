"""The driver side of the search: the ask/tell driver, run sessions, the ledger and run directory, preflight checks,
sources shipped through the object store, the Ray pool and the Ray jobs client.

Nothing under this package imports torch (the torch side is evomerge.worker); only `pool` and `jobs` import Ray
(import-linter checks both: pyproject.toml [tool.importlinter]).
"""

from __future__ import annotations

from evomerge.search.ledger import SCHEMA_VERSION, Ledger, LedgerError, Record, candidate_key, pareto_front
from evomerge.search.rundir import RunDir, RunDirError, RunDirLockedError

__all__ = [
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "Record",
    "RunDir",
    "RunDirError",
    "RunDirLockedError",
    "candidate_key",
    "pareto_front",
]
