"""Fashion-MNIST (Xiao et al. 2017): the framework's real-image benchmark at the paper's
sequence length. 70,000 grey 28x28 photographs of clothing in 10 classes, read from the IDX files
of Debian's package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), by default
under /usr/share/datasets/fashion-mnist (data.fashion_dir):

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60,000 training images
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10,000 test images (the held-out
                                                             split: validation loss, FID reference)

IDX: a big-endian header (magic 0x00000803 for uint8 images (n, rows, cols), 0x00000801 for
uint8 labels (n,)), then the bytes; every header, count and size is checked, and a file that is
truncated, of another kind, or disagrees with its partner is a FashionError naming it.

Geometry: each 28x28 image is zero-padded by 2 px to 32x32 (the background is 0), then upsampled
2x with bilinear interpolation (align_corners=False) to 64x64, so that the f4 tokenizer gives
16x16 = 256 tokens, the paper's sequence length at 256 px. Grey is repeated to 3 channels.
Horizontal flips are a valid augmentation here (a mirrored shirt is a shirt): data.flip=true
tokenizes each training image as-is and flipped.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
RESOLUTION = 64
SIZE = 28  # the files' image size
PAD = 2  # 28 + 2 * 2 = 32, then 2x to 64
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
SPLITS = {"train": "train", "val": "test", "test": "test"}  # the project's val split is the test set
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
INSTALL = "apt-get install dataset-fashion-mnist"


class FashionError(ValueError):
    """Missing, truncated or foreign Fashion-MNIST files."""


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FashionError(f"Fashion-MNIST file {path} not found (the folder has "
                           f"{sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else 'nothing'}); "
                           f"reinstall with `{INSTALL}` or point data.fashion_dir at a complete copy")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()  # an unpacked copy reads the same
    except (OSError, EOFError) as e:  # gzip: a truncated stream or a bad CRC
        raise FashionError(f"cannot read {path}: {type(e).__name__}: {e}. The file is damaged or "
                           f"truncated; reinstall with `{INSTALL}`") from None


def read_idx(path: str | Path, magic: int, expect_count: int | None = None) -> np.ndarray:
    """One IDX file -> uint8 array ((n, rows, cols) for images, (n,) for labels), every field checked."""
    path = Path(path)
    raw = _read(path)
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FashionError(f"{path}: {len(raw)} bytes, shorter than an IDX header ({header} bytes); "
                           f"the file is truncated or not IDX")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
        raise FashionError(f"{path}: IDX magic 0x{got:08x}, expected 0x{magic:08x} ({kind[magic]}, uint8, "
                           f"{ndim}-d); it is {kind.get(got, 'not a Fashion-MNIST IDX file')}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if expect_count is not None and dims[0] != expect_count:
        raise FashionError(f"{path}: header says {dims[0]} items, Fashion-MNIST has {expect_count}")
    if ndim == 3 and dims[1:] != (SIZE, SIZE):
        raise FashionError(f"{path}: images are {dims[1]}x{dims[2]}, Fashion-MNIST's are {SIZE}x{SIZE}")
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise FashionError(f"{path}: {len(raw) - header} bytes of data after the header, the header's shape "
                           f"{tuple(dims)} needs {size}; the file is truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_dir(root: str | Path | None) -> Path:
    root = Path(root or DEFAULT_DIR)
    if not root.is_dir():
        raise FashionError(f"no Fashion-MNIST at {root}: install it with `{INSTALL}` (Debian/Ubuntu; it puts "
                           f"the IDX files under {DEFAULT_DIR}), or set data.fashion_dir to a folder holding "
                           f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and the t10k-* pair")
    return root


def read_split(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw files of a split ('train'; 'test' or 'val' for the 10,000 test images) ->
    images (n, 28, 28) uint8, labels (n,) uint8 (cached, read-only)."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be train, val or test, got {split!r}")
    return _read_files(SPLITS[split], str(check_dir(root)))


@functools.lru_cache(maxsize=4)
def _read_files(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    root_ = Path(root)
    images_name, labels_name, n = FILES[split]
    images = read_idx(root_ / images_name, IMAGES_MAGIC, n)
    labels = read_idx(root_ / labels_name, LABELS_MAGIC, n)
    if labels.max() >= NUM_CLASSES:
        raise FashionError(f"{root_ / labels_name}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    return images, labels


def to_resolution(images: np.ndarray | torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 1, R, R) in [0, 1]: zero-pad to 32x32, bilinear to R (64: 2x)."""
    x = torch.from_numpy(np.asarray(images).astype(np.float32)).div_(255.0).unsqueeze(1)  # a writable copy
    x = F.pad(x, (PAD, PAD, PAD, PAD))
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp_(0, 1)


def load_fashion(split: str = "train", resolution: int = RESOLUTION, root: str | None = None,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """-> images (n, 3, R, R) float32 in [0, 1] (a channel-expanded view: 1 channel in memory),
    labels (n,) int64, and each image's index in its file (its identity). `limit`: the first n."""
    images, labels = read_split(split, None if root is None else str(root))
    n = len(labels) if limit is None else min(limit, len(labels))
    x = torch.cat([to_resolution(images[i:min(i + 4096, n)], resolution) for i in range(0, n, 4096)])
    return x.expand(-1, 3, -1, -1), torch.from_numpy(labels[:n].astype(np.int64)), np.arange(n)


def split_size(split: str, subset: int | None = None) -> int:
    """How many images a split has (60,000 / 10,000), or the first `subset` of them."""
    n = FILES[SPLITS[split]][2]
    return n if subset is None else min(subset, n)


@functools.lru_cache(maxsize=8)
def files_id(split: str, root: str | None = None) -> str:
    """A short content id of a split's labels file: MNIST's IDX files have the same names, counts
    and shapes, so a cache or manifest keyed by path and size alone would take one for the other."""
    path = check_dir(root) / FILES[SPLITS[split]][1]
    if not path.is_file():
        _read(path)  # raises, naming the package
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
