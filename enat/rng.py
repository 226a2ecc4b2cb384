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


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mixer (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_uniform(*keys) -> np.ndarray:
    """Uniform [0, 1) floats from integer keys, vectorised: the last key may be an array (one
    draw per element). For per-sample draws in hot paths, where a generator per sample is too slow."""
    with np.errstate(over="ignore"):
        h = np.zeros(np.shape(keys[-1]), dtype=np.uint64)
        for k in keys:
            h = _mix64(h + _GOLDEN + np.asarray(k).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
