"""Images -> token shards, partitioned and restartable.

The input (an ImageFolder tree or the embedded digits) is listed in a fixed order; part i of K
takes a contiguous slice of it. Each part writes its shards one by one (temp file, index, then
rename), recording finished shards in `part-IIII-of-KKKK.json`; a rerun skips shards recorded
there whose file is intact. Unreadable images are counted and listed, never silently dropped.
The merge step checks that every part finished and writes `manifest.json`.

Images are centre-cropped the ADM way (box-halve while the short side is >= 2x the target,
bicubic resize of the short side to the target, centre crop), tokenized as-is and (optionally)
horizontally flipped. Sample keys are `IIIIIIIII_V`: the image's index in the input order and
V = 0 (as-is) or 1 (flipped).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from enat.data.shards import Manifest, ShardError, file_sha256, scan_shard, write_atomic, write_index

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def adm_center_crop(image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8, the crop of ADM's (and ENAT's) data pipeline."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


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
        from PIL import Image

        with Image.open(self.items[i][0]) as im:
            arr = adm_center_crop(im, self.resolution)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class DigitsSource:
    """The embedded digits split (enat/data/digits.py)."""

    def __init__(self, split: str, resolution: int):
        from enat.data.digits import NUM_CLASSES, load_digits

        self.images, self.labels, self.indices = load_digits(split, resolution)
        self.num_classes = NUM_CLASSES
        self.description = {"dataset": "digits", "split": split}

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"digits[{int(self.indices[i])}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


def make_source(input_: str, resolution: int, split: str = "train"):
    if input_ == "digits":
        return DigitsSource(split, resolution)
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


def _write_shard(path: Path, samples: list[tuple[str, np.ndarray, int]], seq_len: int) -> int:
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for key, tokens, label in samples:
            sink.write({"__key__": key, "tokens.npy": tokens, "cls": label})
    index, problems = scan_shard(tmp, seq_len)
    if problems or len(index) != len(samples):
        raise ShardError(f"shard {path.name} did not read back ({problems[:3]})")
    write_index(path, index)
    os.replace(tmp, path)
    return path.stat().st_size


def tokenize_part(source, tokenizer, out_dir: str | Path, part: int = 0, num_parts: int = 1,
                  shard_size: int = 10000, flip: bool = True, batch_size: int = 64, num_workers: int = 0,
                  device: str | torch.device = "cpu", progress: bool = True, log=print) -> dict:
    """Tokenize part `part` of `num_parts` of `source` into `out_dir`; returns the part record."""
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
    done = {s["name"]: s for s in record.get("shards", [])}
    record = {"part": part, "num_parts": num_parts, "plan": plan.__dict__, "complete": False,
              "shards": [], "num_samples": 0}
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
        nbytes = _write_shard(path, samples, seq_len)
        record["shards"].append({"name": name, "num_samples": len(samples), "bytes": nbytes, "failed": failed})
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
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    n_failed = sum(len(s["failed"]) for s in record["shards"])
    log(f"part {part}/{num_parts}: {record['num_samples']} samples in {len(shards)} shards "
        f"({skipped} already done), {n_failed} unreadable images")
    return record


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
    shards = [{k: s[k] for k in ("name", "num_samples", "bytes")} for r in parts for s in r["shards"]]
    failed = [f for r in parts for s in r["shards"] for f in s["failed"]]
    first = parts[0]
    tok = {}
    if tokenizer_path is not None:
        tok = {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path)}
    manifest = Manifest(num_samples=sum(s["num_samples"] for s in shards), grid_size=first["grid_size"],
                        codebook_size=first["codebook_size"], num_classes=first["num_classes"], shards=shards,
                        tokenizer=tok, source={**first["source"], "num_parts": K, **(extra or {})}, failed=failed)
    manifest.save(out_dir)
    return manifest
