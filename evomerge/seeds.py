"""Seeds derived from a parent seed and names, so that any random draw can be reproduced from the
run seed and what it was for (a candidate, a tensor, a model), independent of the order of work."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object, bits: int = 63) -> int:
    """A non-negative `bits`-bit seed from the parts (e.g. derive_seed(run_seed, "model.layers.0.mlp"))."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)
