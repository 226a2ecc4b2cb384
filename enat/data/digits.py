"""The embedded demo dataset: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels,
10 classes), shipped inside the package, so the default needs no download.

Images are upscaled to 32x32 (bilinear on the 8x8 grid scaled to [0, 1]) and repeated to 3
channels; with the demo tokenizer (f4) that gives an 8x8 token grid. The fixed validation split
(also the FID reference set) is every image whose index in load_digits() order is 5 mod 6:
299 images; the other 1,498 are the training split.
"""

from __future__ import annotations

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
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    idx = split_indices(split)
    x = torch.from_numpy(data.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.repeat(1, 3, 1, 1).contiguous(), torch.from_numpy(data.target[idx].astype(np.int64)), idx
