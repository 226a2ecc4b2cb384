"""Counter-based seeds: randomness that must not depend on batch size, world size or how far a
process got comes from (seed, stream, counters...), never from a process-wide RNG stream."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of non-negative ints and short strings (stream names).
    Distinct tuples give independent seeds (numpy's SeedSequence hashing)."""
    entropy = []
    for k in keys:
        if isinstance(k, str):
            entropy.append(zlib.crc32(k.encode()))
        elif isinstance(k, (int, np.integer)) and k >= 0:
            entropy.append(int(k))
        else:
            raise ValueError(f"seed keys must be non-negative ints or strings, got {k!r}")
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded from derive_seed(*keys)."""
    return torch.Generator().manual_seed(derive_seed(*keys))
