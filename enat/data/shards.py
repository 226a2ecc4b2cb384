"""Token shards on disk: webdataset tar files, a sidecar index per shard, and a manifest.

A sample in a shard is the webdataset triple `KEY.tokens.npy` (uint16 token ids, row-major grid,
shape (N,)), `KEY.cls` (class id as text) under a stable global key `IIIIIIIII_V` (image index in
the tokenize input order, V = 0 as-is, 1 horizontally flipped). Any webdataset pipeline reads the
tars. Next to each `X.tar` lies `X.tar.idx.npy`: per sample the byte offset and size of the raw
token payload inside the tar, the class and the key, which lets the loader read samples by
random access in any global order. A shard without an index is scanned once.

`manifest.json` describes the set: sample count, grid and codebook size, the tokenizer's hash,
the shard list with sample counts and byte sizes, and the images that could not be read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "enat-token-shards"
VERSION = 1
INDEX_SUFFIX = ".idx.npy"
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("nbytes", "<i4"), ("label", "<i4"), ("key", "S24")])


class ShardError(ValueError):
    """A shard, index or manifest that is missing, corrupt or does not fit the model."""


@dataclass
class Manifest:
    num_samples: int
    grid_size: int
    codebook_size: int
    num_classes: int
    shards: list[dict]  # {"name", "num_samples", "bytes"}
    tokenizer: dict = field(default_factory=dict)  # {"path", "sha256"}
    source: dict = field(default_factory=dict)  # dataset, split, resolution, flip, parts
    failed: list[dict] = field(default_factory=list)  # {"path", "error"}: unreadable inputs

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    def save(self, shard_dir: str | Path) -> Path:
        path = Path(shard_dir) / MANIFEST
        data = {"format": FORMAT, "version": VERSION, **self.__dict__}
        write_atomic(path, json.dumps(data, indent=1).encode())
        return path

    @classmethod
    def load(cls, shard_dir: str | Path) -> "Manifest":
        path = Path(shard_dir) / MANIFEST
        if not path.is_file():
            raise ShardError(f"no {MANIFEST} in {shard_dir}: tokenize the data first (`enat tokenize`), "
                             f"or finish a partitioned run with `enat tokenize --merge`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e}); re-run `enat tokenize --merge`") from None
        if data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
            raise ShardError(f"{path} is not an {FORMAT} v{VERSION} manifest")
        return cls(**data)

    def check_model(self, model_cfg, source: str = "") -> None:
        """Fail with both sides named when the shards do not fit the model config."""
        problems = []
        if self.grid_size != model_cfg.grid_size:
            problems.append(f"token grid {self.grid_size}x{self.grid_size} vs model.grid_size {model_cfg.grid_size}")
        if self.codebook_size != model_cfg.codebook_size:
            problems.append(f"codebook size {self.codebook_size} vs model.codebook_size {model_cfg.codebook_size}")
        if self.num_classes > model_cfg.num_classes:
            problems.append(f"{self.num_classes} classes vs model.num_classes {model_cfg.num_classes}")
        if problems:
            raise ShardError(f"shards {source} do not fit the model: " + "; ".join(problems))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_path(tar_path: str | Path) -> Path:
    return Path(str(tar_path) + INDEX_SUFFIX)


def scan_shard(tar_path: str | Path, seq_len: int) -> tuple[np.ndarray, list[str]]:
    """Index a webdataset token shard by reading its tar headers. Returns the index of the valid
    samples and a list of problems (samples with a wrong token count or dtype, missing fields,
    a truncated or unreadable tar) — each naming the shard."""
    tar_path = Path(tar_path)
    entries: dict[str, dict] = {}
    order: list[str] = []
    problems: list[str] = []
    try:
        with open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key not in entries:
                    entries[key] = {}
                    order.append(key)
                raw.seek(member.offset_data)
                if ext == "tokens.npy":
                    head = raw.read(min(member.size, 256))
                    try:
                        buf = io.BytesIO(head)
                        major, _ = np.lib.format.read_magic(buf)
                        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                       else np.lib.format.read_array_header_2_0)
                        shape, fortran, dtype = read_header(buf)
                    except Exception as e:  # not an npy payload
                        problems.append(f"{tar_path.name}: sample {key}: unreadable tokens.npy ({e})")
                        entries[key]["bad"] = True
                        continue
                    hdr = buf.tell()
                    if dtype != np.uint16 or shape != (seq_len,) or fortran:
                        problems.append(f"{tar_path.name}: sample {key}: tokens {dtype}{list(shape)}, expected "
                                        f"uint16[{seq_len}] (wrong token count for this grid)")
                        entries[key]["bad"] = True
                    elif member.size - hdr != 2 * seq_len:
                        problems.append(f"{tar_path.name}: sample {key}: payload size {member.size - hdr} bytes")
                        entries[key]["bad"] = True
                    else:
                        entries[key]["offset"] = member.offset_data + hdr
                elif ext == "cls":
                    try:
                        entries[key]["label"] = int(raw.read(member.size).decode().strip())
                    except ValueError:
                        problems.append(f"{tar_path.name}: sample {key}: class is not an integer")
                        entries[key]["bad"] = True
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{tar_path.name}: unreadable or truncated tar ({type(e).__name__}: {e})")
    size = tar_path.stat().st_size if tar_path.exists() else 0
    rows = []
    for key in order:
        e = entries[key]
        if e.get("bad"):
            continue
        if "offset" not in e or "label" not in e:
            problems.append(f"{tar_path.name}: sample {key}: missing {'tokens.npy' if 'offset' not in e else 'cls'}")
            continue
        if e["offset"] + 2 * seq_len > size:
            problems.append(f"{tar_path.name}: sample {key}: beyond the end of the file (truncated shard)")
            continue
        rows.append((e["offset"], 2 * seq_len, e["label"], key.encode()))
    return np.array(rows, dtype=INDEX_DTYPE), problems


def write_index(tar_path: str | Path, index: np.ndarray) -> None:
    path = index_path(tar_path)
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def read_index(tar_path: str | Path, seq_len: int, expected_bytes: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The shard's index: from its sidecar when that matches the tar, else by scanning it.
    A tar whose size differs from the manifest's record is scanned (and so its truncation found)."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        return np.empty(0, INDEX_DTYPE), [f"{tar_path.name}: shard file missing"]
    size = tar_path.stat().st_size
    idx = index_path(tar_path)
    if idx.is_file() and (expected_bytes is None or expected_bytes == size):
        try:
            index = np.load(idx, allow_pickle=False)
            if index.dtype == INDEX_DTYPE and (len(index) == 0 or int(index["offset"].max()) + 2 * seq_len <= size) \
                    and (len(index) == 0 or int(index["nbytes"].max()) == 2 * seq_len):
                return index, []
        except (ValueError, OSError):
            pass  # a broken sidecar: fall back to scanning the tar itself
    index, problems = scan_shard(tar_path, seq_len)
    if expected_bytes is not None and size != expected_bytes:
        problems.insert(0, f"{tar_path.name}: {size} bytes on disk, {expected_bytes} in the manifest "
                           f"(truncated or replaced shard)")
    return index, problems
