"""Images -> token shards, partitioned and restartable.

The input (an ImageFolder tree, the embedded digits, the augmented digits (generated on demand,
enat/data/digits.py), or COCO: an image folder + a captions JSON) is listed in a fixed order;
part i of K
takes a contiguous slice of it. Each part writes its shards one by one (temp file, index, then
rename), recording finished shards in `part-IIII-of-KKKK.json`; a rerun skips shards recorded
there whose file is intact. Unreadable images are counted and listed, never silently dropped.
The merge step checks that every part finished and writes `manifest.json`, with each shard's
sample count, size and CRC-32 (`enat data verify` checks the shards against them).

Images are centre-cropped the ADM way (box-halve while the short side is >= 2x the target,
bicubic resize of the short side to the target, centre crop), tokenized as-is and (optionally)
horizontally flipped. Sample keys are `IIIIIIIII_V`: the image's index in the input order and
V = 0 (as-is) or 1 (flipped).

Captioned sources (COCO; the digits with model.condition=text) make caption shards
(enat/data/shards.py): every caption goes through the frozen text encoder (`text_batch_size` at
a time) and its ids, and with text.storage=embeddings its L x C context at float16, are stored
beside the tokens; each part also writes the null context (the encoding of '') that the merge
records. COCO images are centre-cropped as U-ViT does (the central square of the short side,
resized to the target; no flips). Disk cost of the contexts: images x captions x L x C x 2 bytes,
for COCO train2014 82,783 x ~5 x 77 x 768 x 2 B ~= 49 GB; text.storage=ids keeps only the ids,
82,783 x ~5 x 77 x 4 B ~= 127 MB (the trainer then encodes on the fly). The estimate is logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from enat.data.captions import digit_captions
from enat.data.digits import NUM_CLASSES as DIGITS_CLASSES
from enat.data.digits import AugmentedDigits, load_digits
from enat.data.fashion import DEFAULT_DIR as FASHION_DIR
from enat.data.fashion import NUM_CLASSES as FASHION_CLASSES
from enat.data.fashion import FashionError, files_id, load_fashion
from enat.data.shards import (NULL_CONTEXT, Manifest, ShardError, TextLayout, scan_shard, write_atomic,
                              write_index)
from enat.files import file_crc32, file_sha256

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def adm_center_crop(image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8, the crop of ADM's (and ENAT's) data pipeline."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def uvit_center_crop(image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8, U-ViT's MS-COCO crop: the central square of the short
    side, resized to size x size with Lanczos (the filter of U-ViT's `center_crop`, which its
    COCO reference statistics were computed with)."""
    arr = np.asarray(image.convert("RGB"))
    crop = min(arr.shape[:2])
    h, w = arr.shape[:2]
    arr = arr[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    return np.asarray(Image.fromarray(arr).resize((size, size), resample=Image.LANCZOS))


class ImageFolderSource:
    """root/<class name>/<image>: classes in sorted order get ids 0..C-1, images sorted by name."""

    def __init__(self, root: str | Path, resolution: int):
        root = Path(root)
        if not root.is_dir():
            raise ShardError(f"image folder {root} not found")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ShardError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
        self.items = [(str(p), c) for c, name in enumerate(classes)
                      for p in sorted((root / name).iterdir()) if p.suffix in IMAGE_EXTENSIONS]
        if not self.items:
            raise ShardError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
        self.num_classes = len(classes)
        self.resolution = resolution
        self.description = {"dataset": "imagefolder", "input": str(root), "classes": classes}

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.items[i][0]

    def label(self, i: int) -> int:
        return self.items[i][1]

    def load(self, i: int) -> torch.Tensor:
        with Image.open(self.items[i][0]) as im:
            arr = adm_center_crop(im, self.resolution)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class DigitsSource:
    """The embedded digits split (enat/data/digits.py)."""

    def __init__(self, split: str, resolution: int):
        self.images, self.labels, self.indices = load_digits(split, resolution)
        self.num_classes = DIGITS_CLASSES
        self.description = {"dataset": "digits", "split": split}

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"digits[{int(self.indices[i])}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


class AugmentedDigitsSource:
    """`count` augmented digits of a split (data.dataset=digits_aug, enat/data/digits.py): image i
    is a pure function of (seed, split, i), made on demand a block at a time (never the whole set
    in memory), so any part of any size tokenizes the same images. Never flipped (flip_allowed:
    a mirrored digit is not a digit). Its description (the manifest's source) records the count,
    seed, generator version and transform ranges."""

    flip_allowed = False
    no_flip_reason = "a mirrored digit is not a digit"

    def __init__(self, split: str, count: int, seed: int, resolution: int):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ShardError(f"digits_aug needs a positive image count for the {split} split "
                             f"(data.augmented_{split}), got {count!r}")
        try:
            self.gen = AugmentedDigits(split, seed, resolution)
        except ValueError as e:
            raise ShardError(f"digits_aug: {e} (data.augment_seed)") from None
        self.count = count
        self.num_classes = DIGITS_CLASSES
        self._bases = self.gen.bases(np.arange(count))  # positions into the split's base digits
        self._labels = self.gen.base_labels[self._bases]
        self.description = {"dataset": "digits_aug", "split": split, "count": count, **self.gen.describe()}
        self.identity = self.description  # what a rerun or another part must share (tokenize_part)

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return (f"digits_aug[{self.gen.split}, seed {self.gen.seed}, {i}] "
                f"(digits[{int(self.gen.base_indices[self._bases[i]])}])")

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def load(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(f"augmented digit {i} out of range [0, {self.count})")
        return self.gen.image(i).repeat(3, 1, 1)  # a copy: the cached block stays the generator's


class FashionSource:
    """A Fashion-MNIST split (enat/data/fashion.py: train = the 60,000 training images, val = the
    10,000 test images), at `resolution` (64: 28 px zero-padded to 32, bilinear 2x). Flips allowed."""

    def __init__(self, split: str, resolution: int, root: str | None = None, limit: int | None = None):
        try:
            self.images, self.labels, self.indices = load_fashion(split, resolution, root, limit=limit)
            files = files_id(split, root)
        except FashionError as e:
            raise ShardError(str(e)) from None
        self.num_classes = FASHION_CLASSES
        self.split = split
        self.description = {"dataset": "fashion_mnist", "split": split, "dir": str(root or FASHION_DIR),
                            "geometry": "28 px zero-padded to 32, bilinear (align_corners=False) to "
                                        f"{resolution}", "images": len(self.labels), "subset": limit,
                            "files": files}
        self.identity = {k: v for k, v in self.description.items() if k != "dir"}

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"fashion_mnist[{'train' if self.split == 'train' else 't10k'}, {int(self.indices[i])}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


class CaptionedDigitsSource(DigitsSource):
    """The embedded digits with captions from enat/data/captions.py (K = 5 per image, true of its
    pixels, flip-invariant); the class stays the digit (for evaluation)."""

    captioned = True
    flip_allowed = True  # thickness and width do not change under a horizontal flip

    def __init__(self, split: str, resolution: int):
        super().__init__(split, resolution)
        self._captions = digit_captions(self.images, self.labels.numpy())
        self.description = {"dataset": "digits", "split": split, "captions": "enat.data.captions"}

    def captions(self, i: int) -> list[str]:
        return self._captions[i]


class CocoSource:
    """MS-COCO captions: `image_dir` + a captions JSON in COCO format (images [{id, file_name}],
    annotations [{image_id, caption}]). Images in order of id, captions in the file's order;
    images without any caption are left out (counted). Class 0 for all; no flips."""

    captioned = True
    flip_allowed = False

    def __init__(self, image_dir: str | Path, captions_json: str | Path, resolution: int):
        image_dir, captions_json = Path(image_dir), Path(captions_json)
        if not image_dir.is_dir():
            raise ShardError(f"COCO image folder {image_dir} not found (data.image_dir / data.val_image_dir)")
        try:
            data = json.loads(captions_json.read_text())
            caps: dict[int, list[str]] = {}
            for a in data["annotations"]:
                caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            self.items = [(str(image_dir / im["file_name"]), caps[int(im["id"])]) for im in images
                          if int(im["id"]) in caps]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{captions_json} is not a readable COCO captions file "
                             f"(images[{{id, file_name}}], annotations[{{image_id, caption}}]): "
                             f"{type(e).__name__}: {e}") from None
        if not self.items:
            raise ShardError(f"{captions_json}: no image with a caption")
        self.uncaptioned = len(images) - len(self.items)
        self.num_classes = 1
        self.resolution = resolution
        self.description = {"dataset": "coco", "input": str(image_dir), "captions": str(captions_json),
                            "crop": "uvit-center", "uncaptioned_images": self.uncaptioned}

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.items[i][0]

    def label(self, i: int) -> int:
        return 0

    def captions(self, i: int) -> list[str]:
        return self.items[i][1]

    def load(self, i: int) -> torch.Tensor:
        with Image.open(self.items[i][0]) as im:
            arr = uvit_center_crop(im, self.resolution)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def make_source(input_: str, resolution: int, split: str = "train", captions: str | None = None,
                captioned: bool = False, count: int | None = None, seed: int = 0, root: str | None = None,
                limit: int | None = None):
    """The source of a split: COCO when a captions JSON is given, the digits (captioned or not),
    the augmented digits ("digits_aug": `count` images from `seed`), Fashion-MNIST
    ("fashion_mnist", from the IDX files in `root`; its first `limit` images), else an image folder."""
    if captions is not None:
        return CocoSource(input_, captions, resolution)
    if input_ == "fashion_mnist":
        if captioned:
            raise ShardError("data.dataset=fashion_mnist has class labels, no captions: use model.condition=class")
        return FashionSource(split, resolution, root, limit)
    if input_ == "digits_aug":
        if captioned:
            raise ShardError("data.dataset=digits_aug has no captions (the captioned demo is data.dataset=digits "
                             "with model.condition=text): use model.condition=class")
        return AugmentedDigitsSource(split, count, seed, resolution)
    if input_ == "digits":
        return CaptionedDigitsSource(split, resolution) if captioned else DigitsSource(split, resolution)
    if captioned:
        raise ShardError(f"{input_}: an image folder has no captions; for text-to-image give a COCO captions "
                         f"JSON (data.dataset=coco, data.captions / data.val_captions)")
    return ImageFolderSource(input_, resolution)


class _Loading(torch.utils.data.Dataset):
    """Loads images of given indices in DataLoader workers; a failure becomes a record."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            return i, self.source.load(i), ""
        except Exception as e:  # any unreadable image is reported, not fatal
            return i, None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Parts and shards
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which images go into which shard of which part (a pure function of the sizes)."""

    num_items: int
    num_parts: int
    shard_size: int
    flip: bool

    @property
    def per_item(self) -> int:
        return 2 if self.flip else 1

    def part_range(self, part: int) -> tuple[int, int]:
        return self.num_items * part // self.num_parts, self.num_items * (part + 1) // self.num_parts

    def shards(self, part: int) -> list[tuple[str, int, int]]:
        """[(shard name, first item, end item)] of one part."""
        a, b = self.part_range(part)
        per_shard = self.shard_size // self.per_item
        return [(f"shard-{part:04d}-{j:05d}.tar", a + j * per_shard, min(b, a + (j + 1) * per_shard))
                for j in range(math.ceil((b - a) / per_shard))]


def part_file(out_dir: Path, part: int, num_parts: int) -> Path:
    return out_dir / f"part-{part:04d}-of-{num_parts:04d}.json"


def _write_shard(path: Path, samples: list[tuple], seq_len: int, text: TextLayout | None = None) -> int:
    """samples: (key, tokens, label[, {"captions.json": [...], "ids.npy": ..., "context.npy": ...}])."""
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for key, tokens, label, *extra in samples:
            sink.write({"__key__": key, "tokens.npy": tokens, "cls": label, **(extra[0] if extra else {})})
    index, problems = scan_shard(tmp, seq_len, text)
    if problems or len(index) != len(samples):
        raise ShardError(f"shard {path.name} did not read back ({problems[:3]})")
    write_index(path, index)
    os.replace(tmp, path)
    return path.stat().st_size


def _write_null_context(text_encoder, text: TextLayout, out_dir: Path, part: int) -> dict:
    """Encode '' and write null_context.npy (every part writes the same bytes; a part-named temp
    file keeps parallel parts from colliding); -> the part's text record."""
    ids = text_encoder.tokenize([""])
    ctx = text_encoder.encode_ids(ids)[0].cpu().numpy().astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, ctx, allow_pickle=False)
    tmp = out_dir / f"{NULL_CONTEXT}.part{part}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_dir / NULL_CONTEXT)
    return {"encoder": text_encoder.describe(), "length": text.length, "dim": text.dim, "dtype": "float16",
            "storage": text.storage, "null_context": NULL_CONTEXT,
            "null_context_sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "null_ids": ids[0].tolist()}


def _add_captions(samples: list[tuple], source, text_encoder, text: TextLayout, batch_size: int) -> list[tuple]:
    """Attach every sample's captions, ids and (embeddings storage) contexts; the views of one
    image share its captions, encoded once."""
    images = sorted({int(key[:9]) for key, *_ in samples})
    caps = {i: list(source.captions(i)) for i in images}
    flat = [(i, c) for i in images for c in caps[i]]
    ids = np.empty((len(flat), text.length), dtype=np.int32)
    ctx = np.empty((len(flat), text.length, text.dim), dtype=np.float16) if text.has_context else None
    for a in range(0, len(flat), batch_size):
        chunk = text_encoder.tokenize([c for _, c in flat[a:a + batch_size]])
        ids[a:a + len(chunk)] = chunk.numpy()
        if ctx is not None:
            ctx[a:a + len(chunk)] = text_encoder.encode_ids(chunk).half().cpu().numpy()
    if ctx is not None and not np.isfinite(ctx).all():  # beyond float16's range: say so, do not store inf
        raise ShardError("the text encoder's hidden states overflow float16; use text.storage=ids")
    start, pos = {}, 0
    for i in images:
        start[i] = pos
        pos += len(caps[i])
    out = []
    for key, tokens, label in samples:
        i = int(key[:9])
        sl = slice(start[i], start[i] + len(caps[i]))
        extra = {"captions.json": caps[i], "ids.npy": ids[sl]}
        if ctx is not None:
            extra["context.npy"] = ctx[sl]
        out.append((key, tokens, label, extra))
    return out


def tokenize_part(source, tokenizer, out_dir: str | Path, part: int = 0, num_parts: int = 1,
                  shard_size: int = 10000, flip: bool = True, batch_size: int = 64, num_workers: int = 0,
                  device: str | torch.device = "cpu", progress: bool = True, log=print, text_encoder=None,
                  text_storage: str = "embeddings", text_batch_size: int = 256) -> dict:
    """Tokenize part `part` of `num_parts` of `source` into `out_dir`; returns the part record.
    A captioned source needs `text_encoder` (enat.text.TextEncoder) and makes caption shards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}), got {part}")
    plan = Plan(len(source), num_parts, shard_size, flip)
    if shard_size % plan.per_item:
        raise ValueError(f"data.shard_size {shard_size} must be even when flipping (2 samples per image)")
    seq_len = tokenizer.cfg.grid_size ** 2
    record_path = part_file(out_dir, part, num_parts)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("plan") not in (None, plan.__dict__):
        raise ShardError(f"{record_path} was written for another plan ({record['plan']}); "
                         f"use a fresh output folder or the same settings")
    captioned = getattr(source, "captioned", False)
    if flip and not captioned and not getattr(source, "flip_allowed", True):
        raise ShardError(f"data.flip=true with {source.description.get('dataset')}: "
                         f"{getattr(source, 'no_flip_reason', 'this source must not be flipped')}; "
                         f"set data.flip=false")
    # a generated source (digits_aug) has an identity (count, seed, generator version) that a rerun
    # or another part must share, or the shards would mix two image sets under one plan
    identity = _json_roundtrip(getattr(source, "identity", None))
    if record.get("identity") not in (None, identity):
        raise ShardError(f"{record_path} was written from another image set ({record['identity']}, now "
                         f"{identity}); use a fresh output folder or the same data settings")
    text, text_plan = None, None
    if captioned != (text_encoder is not None):
        raise ShardError("a captioned source (COCO, captioned digits) needs a text encoder (text.encoder) and "
                         "only a captioned one takes it" if captioned else
                         f"{source.description.get('dataset')} images have no captions: no text encoder wanted")
    if captioned:
        if flip and not source.flip_allowed:
            raise ShardError(f"data.flip=true with {source.description['dataset']}: a flip can contradict the "
                             f"caption ('on the left'); set data.flip=false")
        if text_storage not in ("embeddings", "ids"):
            raise ValueError(f"text.storage must be embeddings or ids, got {text_storage!r}")
        text = TextLayout(text_encoder.length, text_encoder.dim, text_storage)
        text_plan = {"storage": text_storage, "length": text.length, "dim": text.dim,
                     "encoder_sha256": text_encoder.sha256()}
    if record and record.get("text_plan") != text_plan:  # class vs caption shards, or another encoder
        raise ShardError(f"{record_path} was written with other captions settings ({record.get('text_plan')}, "
                         f"now {text_plan}); use a fresh output folder or the same text.encoder and text.storage")
    done = {s["name"]: s for s in record.get("shards", [])}
    record = {"part": part, "num_parts": num_parts, "plan": plan.__dict__, "complete": False,
              "shards": [], "num_samples": 0}
    if identity is not None:
        record["identity"] = identity
    if captioned:
        record["text_plan"] = text_plan
        text_encoder = text_encoder.to(device)
        record["text"] = _write_null_context(text_encoder, text, out_dir, part)
        a, b = plan.part_range(part)
        n_caps = sum(len(source.captions(i)) for i in range(a, b)) * plan.per_item
        log(f"part {part}/{num_parts}: {n_caps} captions to store ({plan.per_item} view(s) per image) -> "
            + (f"contexts {n_caps} x {text.length} x {text.dim} x 2 B = {n_caps * text.context_bytes / 1e9:.2f} GB "
               f"at float16, plus ids {n_caps * text.ids_bytes / 1e6:.1f} MB" if text.has_context else
               f"ids only (text.storage=ids): {n_caps * text.ids_bytes / 1e6:.1f} MB; contexts would take "
               f"{n_caps * text.context_bytes / 1e9:.2f} GB"))
    tokenizer = tokenizer.to(device).eval()
    shards = plan.shards(part)
    skipped = 0
    bar = tqdm(total=plan.part_range(part)[1] - plan.part_range(part)[0], desc=f"tokenize part {part}",
               unit="img", disable=not progress)
    for name, a, b in shards:
        path = out_dir / name
        prev = done.get(name)
        if prev is not None and path.is_file() and path.stat().st_size == prev["bytes"]:
            record["shards"].append(prev)
            skipped += 1
            bar.update(b - a)
            continue
        samples, failed = [], []
        loader = torch.utils.data.DataLoader(_Loading(source, list(range(a, b))), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=lambda x: x)
        for batch in loader:
            ok = [(i, img) for i, img, err in batch if img is not None]
            failed += [{"path": source.name(i), "error": err} for i, img, err in batch if img is None]
            if ok:
                images = torch.stack([img for _, img in ok]).to(device)
                views = [images, images.flip(-1)] if flip else [images]
                ids = [tokenizer.encode(v).flatten(1).cpu().numpy().astype(np.uint16) for v in views]
                for k, (i, _) in enumerate(ok):
                    for v in range(len(views)):
                        samples.append((f"{i:09d}_{v}", ids[v][k], source.label(i)))
            bar.update(len(batch))
        if captioned:
            samples = _add_captions(samples, source, text_encoder, text, text_batch_size)
        nbytes = _write_shard(path, samples, seq_len, text)
        # the checksum `enat data verify` checks the shard against (read back while in the page cache)
        entry = {"name": name, "num_samples": len(samples), "bytes": nbytes, "crc32": file_crc32(path),
                 "failed": failed}
        if captioned:
            entry["num_captions"] = sum(len(x[3]["captions.json"]) for x in samples)
        record["shards"].append(entry)
        for f in failed:
            log(f"warning: could not read {f['path']}: {f['error']}")
        write_atomic(record_path, json.dumps(record, indent=1).encode())  # progress survives a crash
    bar.close()
    record["complete"] = True
    record["num_samples"] = sum(s["num_samples"] for s in record["shards"])
    record["num_classes"] = source.num_classes
    record["grid_size"] = tokenizer.cfg.grid_size
    record["codebook_size"] = tokenizer.cfg.codebook_size
    record["source"] = source.description
    if captioned:
        record["text"]["num_captions"] = sum(s.get("num_captions", 0) for s in record["shards"])
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    n_failed = sum(len(s["failed"]) for s in record["shards"])
    log(f"part {part}/{num_parts}: {record['num_samples']} samples in {len(shards)} shards "
        f"({skipped} already done), {n_failed} unreadable images")
    return record


def _json_roundtrip(obj):
    """obj as it reads back from a part record (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(obj))


def _merge_text(out_dir: Path, parts: list[dict]) -> dict:
    """The manifest's text section from the part records (all the same encoder and storage) and
    null_context.npy (checked: present, of the right shape, one of the parts' checksums)."""
    texts = [r.get("text") for r in parts]
    if not any(texts):
        return {}
    if not all(texts):
        raise ShardError(f"{out_dir} mixes caption and class parts; tokenize into a fresh folder")
    plans = {json.dumps(r["text_plan"], sort_keys=True) for r in parts}
    if len(plans) != 1:
        raise ShardError(f"{out_dir}: parts were tokenized with different text encoders or storage: {sorted(plans)}")
    path = out_dir / NULL_CONTEXT
    if not path.is_file():
        raise ShardError(f"{path} missing (each part writes it): re-run one part")
    first = texts[0]
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.float16 or arr.shape != (first["length"], first["dim"]):
        raise ShardError(f"{path}: {arr.dtype}{list(arr.shape)}, expected float16[{first['length']}, {first['dim']}]")
    sha = file_sha256(path)
    if sha not in {t["null_context_sha256"] for t in texts}:
        raise ShardError(f"{path} matches no part's null context (replaced?); re-run one part")
    return {**{k: v for k, v in first.items() if k != "num_captions"}, "null_context_sha256": sha,
            "num_captions": sum(t.get("num_captions", 0) for t in texts)}


def merge_parts(out_dir: str | Path, tokenizer_path: str | Path | None = None, extra: dict | None = None) -> Manifest:
    """Check every part finished and write manifest.json."""
    out_dir = Path(out_dir)
    records = sorted(out_dir.glob("part-*-of-*.json"))
    if not records:
        raise ShardError(f"no part records in {out_dir}: run `enat tokenize` first")
    parts = [json.loads(p.read_text()) for p in records]
    num_parts = {r["num_parts"] for r in parts}
    if len(num_parts) != 1:
        raise ShardError(f"{out_dir} mixes runs with different --num-parts {sorted(num_parts)}")
    K = num_parts.pop()
    have = {r["part"] for r in parts if r.get("complete")}
    missing = [i for i in range(K) if i not in have]
    if missing:
        raise ShardError(f"parts {missing} of {K} have not finished in {out_dir}; run them "
                         f"(`enat tokenize ... --num-parts {K} --part I`) before merging")
    parts.sort(key=lambda r: r["part"])
    identities = {json.dumps(r.get("identity"), sort_keys=True) for r in parts}
    if len(identities) != 1:
        raise ShardError(f"{out_dir}: parts were tokenized from different image sets ({sorted(identities)}); "
                         f"re-run them with the same data settings into a fresh folder")
    # crc32: absent from shards that an older enat wrote (a part resumed across versions)
    shards = [{k: s[k] for k in ("name", "num_samples", "bytes", "crc32") if k in s}
              for r in parts for s in r["shards"]]
    failed = [f for r in parts for s in r["shards"] for f in s["failed"]]
    first = parts[0]
    text = _merge_text(out_dir, parts)
    tok = {}
    if tokenizer_path is not None:
        tok = {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path)}
    manifest = Manifest(num_samples=sum(s["num_samples"] for s in shards), grid_size=first["grid_size"],
                        codebook_size=first["codebook_size"], num_classes=first["num_classes"], shards=shards,
                        tokenizer=tok, source={**first["source"], "num_parts": K, **(extra or {})}, failed=failed,
                        text=text)
    manifest.save(out_dir)
    return manifest
