"""The optimizer side: run directory, evaluation ledger, algorithm checkpoint (and later the driver).

Nothing under this package imports torch; only `search/workers*` may import Ray.
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
