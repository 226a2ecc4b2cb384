"""The embedded demo dataset: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels,
10 classes), shipped inside the package, so the default needs no download.

Images are upscaled to 32x32 (bilinear on the 8x8 grid scaled to [0, 1]) and repeated to 3
channels; with the demo tokenizer (f4) that gives an 8x8 token grid. The fixed validation split
(also the FID reference set) is every image whose index in load_digits() order is 5 mod 6:
299 images; the other 1,498 are the training split.

The augmented digits (`augmented_digits`, `AugmentedDigits`; data.dataset=digits_aug) are an
unlimited, deterministic, embedded stream of fresh images drawn from these: image i of a split
uses the base digit of pass p = i // n_base, slot i % n_base, of a seeded permutation of the
split's base images (train: the 1,498 training digits; val: the 299 held-out ones, so the held-out
writers stay held out), so every base digit is used equally (counts differ by at most one). Its
transform depends only on (seed, split, i) (counter-based hashing, no global RNG state), so any
slice can be regenerated and tokenizing in parts gives the same images. Ranges at 32 px (the
pixel ones scale with resolution / 32), all uniform and independent per image:

    rotation        +-15 degrees about the image centre
    scale           0.85 .. 1.15 (isotropic)
    shear           x += h * y, h in -0.2 .. 0.2
    translation     +-2 px on each axis
    elastic         a smooth random displacement field: each component is Gaussian-filtered
                    white noise (sigma 3.5 px; synthesised as Gaussian bumps with normal weights
                    on a 2 px lattice: the same smooth field up to negligible aliasing, with 8x
                    fewer random numbers), scaled so the RMS displacement length is `a` (each
                    component's per-pixel std a / sqrt 2), a in 1 .. 2 px per image

The affine transform and the displacement field make one sampling grid, applied with a single
bilinear `grid_sample` (zeros outside) to the 1-channel base image at the target resolution
(the bilinear upscale of the 8x8 digit, as above), then clamped to [0, 1] and repeated to 3
channels. `strength` scales every range (0: the base image exactly; tests use it). Images are
generated in aligned blocks of BLOCK, so a given image is computed with the same arithmetic
(bit-identical on one machine and library build) whatever slice or batch asked for it; across
machines or builds the float rounding may differ in the last bits. No flips: a mirrored digit is
not a digit.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 32
NUM_CLASSES = 10


def split_indices(split: str) -> np.ndarray:
    n = 1797
    idx = np.arange(n)
    if split == "train":
        return idx[idx % 6 != 5]
    if split == "val":
        return idx[idx % 6 == 5]
    if split == "all":
        return idx
    raise ValueError(f"digits split must be train, val or all, got {split!r}")


def load_digits(split: str = "train", resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """-> images (n, 3, R, R) float32 in [0, 1], labels (n,) int64, and the dataset indices
    (the stable identity of each image)."""
    # scikit-learn: about 1.5 s to import, only when the digits are read (the data, train and eval
    # commands import this module whatever the dataset)
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    idx = split_indices(split)
    x = torch.from_numpy(data.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.repeat(1, 3, 1, 1).contiguous(), torch.from_numpy(data.target[idx].astype(np.int64)), idx


# ---------------------------------------------------------------------------------------------
# Augmented digits (data.dataset=digits_aug)
# ---------------------------------------------------------------------------------------------

AUGMENT_VERSION = 1  # bump when the generator changes: shards record it (manifest source)
# The transform ranges at 32 px (module docstring); pixel quantities scale with resolution / 32.
AUGMENT_RANGES = {"rotation_deg": 15.0, "scale": [0.85, 1.15], "shear": 0.2, "translate_px": 2.0,
                  "elastic_rms_px": [1.0, 2.0], "elastic_sigma_px": 3.5, "elastic_lattice_px": 2.0}
BLOCK = 256  # images per generation block (aligned: block b holds images b*BLOCK .. (b+1)*BLOCK-1)
_SPLIT_CODES = {"train": 1, "val": 2}
_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_N_AFFINE = 6  # uniforms per image for the affine part (5 used, one spare) and the elastic amplitude


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, split: str, domain: int) -> np.uint64:
    """The key of one random stream: (seed, split, domain) hashed to 64 bits."""
    z = np.uint64(seed & _MASK64)
    z = _mix64(np.array([z ^ _mix64(np.array([np.uint64(_SPLIT_CODES[split] * 16 + domain)]))[0]]))[0]
    return z


def _uniforms(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1), one per uint64 counter: splitmix64 output `counter + 1` of stream `key`."""
    with np.errstate(over="ignore"):
        z = _mix64(key + (counters.astype(np.uint64) + np.uint64(1)) * _GAMMA)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=8)
def _base(split: str, resolution: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The split's base images, 1 channel (n, 1, R, R), labels and dataset indices (cached, read-only)."""
    x, y, idx = load_digits(split, resolution)
    return x[:, :1].contiguous(), y.numpy(), idx


class AugmentedDigits:
    """The augmented stream of one split (module docstring): `images(start, count)`, `bases(i)`.
    Holds only the base digits; images are made on demand, a block at a time."""

    def __init__(self, split: str, seed: int = 0, resolution: int = RESOLUTION, strength: float = 1.0):
        if split not in _SPLIT_CODES:
            raise ValueError(f"augmented digits split must be train or val, got {split!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"the augmentation seed must be an integer >= 0, got {seed!r}")
        seed = int(seed)
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.split, self.seed, self.resolution, self.strength = split, seed, resolution, float(strength)
        self.base_images, self.base_labels, self.base_indices = _base(split, resolution)
        self.n_base = len(self.base_labels)
        self._perm_key = _stream_key(seed, split, 1)
        self._key = _stream_key(seed, split, 2)
        self._perms: dict[int, np.ndarray] = {}
        # The elastic field: Gaussian bumps of std sigma on a lattice (spacing h) covering the image
        # plus 3 sigma; G[x, k] = exp(-(x - c_k)^2 / 2 sigma^2) at pixel centres x (in px).
        s = resolution / 32
        self.sigma = AUGMENT_RANGES["elastic_sigma_px"] * s
        h = AUGMENT_RANGES["elastic_lattice_px"] * s
        k = int(math.ceil((resolution + 6 * self.sigma) / h)) + 1
        centres = -3 * self.sigma + h * np.arange(k)
        x = np.arange(resolution) + 0.5
        g = np.exp(-((x[:, None] - centres[None, :]) ** 2) / (2 * self.sigma ** 2))
        self._g = g.astype(np.float32)  # (R, K)
        # per-pixel std of the unnormalised field: sqrt(sum_k G[y,k]^2 * sum_l G[x,l]^2)
        norm = np.sqrt((g ** 2).sum(1))
        self._field_std = (norm[:, None] * norm[None, :]).astype(np.float32)  # (R, R)
        self.lattice = k
        self.draws = _N_AFFINE + 2 * k * k  # uniforms per image (Box-Muller: two per pair of normals)
        # pixel centres in grid_sample's [-1, 1] (align_corners=False)
        self._coords = ((2 * np.arange(resolution) + 1) / resolution - 1).astype(np.float32)
        self._cache: tuple[int, torch.Tensor] | None = None

    def describe(self) -> dict:
        return {"augment_version": AUGMENT_VERSION, "seed": self.seed, "split": self.split,
                "base_images": self.n_base, "resolution": self.resolution, "strength": self.strength,
                "ranges_at_32px": {k: list(v) if isinstance(v, list) else v for k, v in AUGMENT_RANGES.items()}}

    # --- which base digit ----------------------------------------------------------------------

    def _perm(self, p: int) -> np.ndarray:
        perm = self._perms.get(p)
        if perm is None:
            counters = np.uint64(p) * np.uint64(self.n_base) + np.arange(self.n_base, dtype=np.uint64)
            perm = np.argsort(_uniforms(self._perm_key, counters), kind="stable")
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[p] = perm
        return perm

    def bases(self, indices) -> np.ndarray:
        """Positions (into the split's base images) of the base digits of images `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise IndexError("augmented image indices must be >= 0")
        out = np.empty(indices.shape, dtype=np.int64)
        passes = indices // self.n_base
        for p in np.unique(passes).tolist():
            sel = passes == p
            out[sel] = self._perm(p)[indices[sel] % self.n_base]
        return out

    def labels(self, indices) -> np.ndarray:
        return self.base_labels[self.bases(indices)]

    # --- the transforms ------------------------------------------------------------------------

    def _block(self, b: int) -> torch.Tensor:
        """(BLOCK, 1, R, R) float32: images b*BLOCK .. (b+1)*BLOCK-1 (the last one made is cached).
        The sampling grid is computed in numpy (small arrays: torch's intra-op threads only cost
        here), the resampling with one torch grid_sample."""
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        n, R, K, st, r = BLOCK, self.resolution, self.lattice, self.strength, AUGMENT_RANGES
        idx = b * BLOCK + np.arange(n, dtype=np.uint64)
        u = _uniforms(self._key, idx[:, None] * np.uint64(self.draws) + np.arange(self.draws, dtype=np.uint64))
        a = u[:, :_N_AFFINE] * 2 - 1  # (n, 6) float64 in [-1, 1)
        theta = np.deg2rad(a[:, 0] * r["rotation_deg"] * st)
        lo, hi = r["scale"]
        scale = 1 + st * ((lo + hi) / 2 - 1 + a[:, 1] * (hi - lo) / 2)
        shear = a[:, 2] * r["shear"] * st
        shift = a[:, 3:5] * (r["translate_px"] * (R / 32) * st * (2 / R))  # (n, 2) in grid units
        elo, ehi = r["elastic_rms_px"]
        # RMS displacement length a -> per-component std a / sqrt(2), in grid units
        amp = (elo + (ehi - elo) * (a[:, 5] + 1) / 2) * ((R / 32) * st * (2 / R) / math.sqrt(2))
        # The forward content map A = Rot(theta) Shear(h) scale, then the shift t; grid_sample
        # needs where each output pixel comes from: p_in = M (p_out - t), M = A^-1.
        c, s = np.cos(theta), np.sin(theta)
        A = np.stack([np.stack([c * scale, (c * shear - s) * scale], -1),
                      np.stack([s * scale, (s * shear + c) * scale], -1)], -2)  # (n, 2, 2)
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        M = np.stack([np.stack([A[:, 1, 1], -A[:, 0, 1]], -1),
                      np.stack([-A[:, 1, 0], A[:, 0, 0]], -1)], -2) / det[:, None, None]
        t = -np.einsum("nij,nj->ni", M, shift)
        M, t, amp = M.astype(np.float32), t.astype(np.float32), amp.astype(np.float32)
        # elastic: normals by Box-Muller (float64) from the remaining uniforms, two K x K lattices (dx, dy)
        v = u[:, _N_AFFINE:].reshape(n, 2, K * K)
        rad = np.sqrt(-2 * np.log1p(-v[:, 0]))
        ang = (2 * math.pi) * v[:, 1]
        noise = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1).astype(np.float32).reshape(n, 2, K, K)
        field = self._g @ noise @ self._g.T  # (n, 2, R, R): sum_kl G[y,k] N[k,l] G[x,l]
        field *= amp[:, None, None, None] / self._field_std
        X, Y = self._coords[None, None, :], self._coords[None, :, None]  # x along columns, y along rows
        grid = np.empty((n, R, R, 2), dtype=np.float32)
        grid[..., 0] = M[:, 0, 0, None, None] * X + M[:, 0, 1, None, None] * Y + t[:, 0, None, None] + field[:, 0]
        grid[..., 1] = M[:, 1, 0, None, None] * X + M[:, 1, 1, None, None] * Y + t[:, 1, None, None] + field[:, 1]
        base = self.base_images[torch.from_numpy(self.bases(idx.astype(np.int64)))]
        out = F.grid_sample(base, torch.from_numpy(grid), mode="bilinear", padding_mode="zeros",
                            align_corners=False).clamp_(0, 1)
        self._cache = (b, out)
        return out

    def images(self, start: int, count: int, channels: int = 1) -> torch.Tensor:
        """(count, channels, R, R) float32 in [0, 1]: images start .. start+count-1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start}, {count}")
        out = torch.empty(count, 1, self.resolution, self.resolution)
        i = start
        while i < start + count:
            b = i // BLOCK
            j = min(start + count, (b + 1) * BLOCK)
            out[i - start:j - start] = self._block(b)[i - b * BLOCK:j - b * BLOCK]
            i = j
        return out.repeat(1, channels, 1, 1) if channels != 1 else out

    def image(self, i: int) -> torch.Tensor:
        """(1, R, R) float32: image i (a view into the cached block: do not modify)."""
        b = i // BLOCK
        return self._block(b)[i - b * BLOCK]


def augmented_digits(split: str, count: int, seed: int = 0, resolution: int = RESOLUTION, start: int = 0,
                     strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images start .. start+count-1 of the augmented split (module docstring) -> images
    (count, 3, R, R) float32 in [0, 1], labels (count,) int64, and each image's base digit (its
    index among the 1,797 digits, as load_digits returns them). Image i depends only on (seed, split, i) (and `strength`,
    which scales every range; 0 gives the base digits)."""
    gen = AugmentedDigits(split, seed, resolution, strength)
    idx = np.arange(start, start + count)
    pos = gen.bases(idx)
    return (gen.images(start, count, channels=3), torch.from_numpy(gen.base_labels[pos].astype(np.int64)),
            gen.base_indices[pos])
