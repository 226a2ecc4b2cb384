"""Token shards on disk: webdataset tar files, a sidecar index per shard, and a manifest.

A sample in a shard is the webdataset triple `KEY.tokens.npy` (uint16 token ids, row-major grid,
shape (N,)), `KEY.cls` (class id as text) under a stable global key `IIIIIIIII_V` (image index in
the tokenize input order, V = 0 as-is, 1 horizontally flipped). Any webdataset pipeline reads the
tars. Next to each `X.tar` lies `X.tar.idx.npy`: per sample the byte offset and size of the raw
token payload inside the tar, the class and the key, which lets the loader read samples by
random access in any global order. A shard without an index is scanned once.

Caption shards (text-to-image) add per sample its K captions (K may differ per image, COCO has
5-7): `KEY.captions.json` (list of K strings), `KEY.ids.npy` (K x L int32 token ids of the text
encoder) and, with text.storage=embeddings, `KEY.context.npy` (K x L x C float16: the encoder's
last hidden states). cls is the class (the digit for the demo, 0 for COCO). Their index adds
per sample K and the byte offsets of the raw ids and context payloads and of the captions JSON,
so the loader reads only the caption it chose (one pread of L x C x 2 bytes).

`manifest.json` describes the set: sample count, grid and codebook size, the tokenizer's hash,
the shard list with sample counts, byte sizes and CRC-32s (8 hex digits; manifests of older enat
have none: they load, and `enat data verify` checks their sizes and counts only), and the images
that could not be read. The sha256 of the manifest file's bytes identifies the set: a training
run records it and refuses to resume on other shards (enat/data/identity.py). Caption
shards (manifest version 2; class shards stay version 1, unchanged) add `text`: the encoder's
description (path, weights sha256, config), L, C, dtype, storage, the null context (the encoding
of the empty caption '', (L, C) float16 in `null_context.npy`, with its sha256) and the ids of ''.
"""

from __future__ import annotations

import io
import threading
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "enat-token-shards"
VERSION = 1  # class shards (and every manifest written before caption shards existed)
TEXT_VERSION = 2  # caption shards: the same plus `text`
INDEX_SUFFIX = ".idx.npy"
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("nbytes", "<i4"), ("label", "<i4"), ("key", "S24")])
# Caption shards: K, and the byte offsets of the raw ids (K x L int32) and context (K x L x C
# float16; -1 with ids-only storage) payloads and of the captions JSON (offset, size).
TEXT_INDEX_DTYPE = np.dtype(INDEX_DTYPE.descr + [("num_captions", "<i4"), ("ids_offset", "<i8"),
                                                 ("ctx_offset", "<i8"), ("cap_offset", "<i8"),
                                                 ("cap_nbytes", "<i4")])
NULL_CONTEXT = "null_context.npy"


class ShardError(ValueError):
    """A shard, index or manifest that is missing, corrupt or does not fit the model."""


@dataclass(frozen=True)
class TextLayout:
    """The shape of a caption shard set's per-caption payloads."""

    length: int  # L: tokens per caption
    dim: int  # C: the encoder's hidden width
    storage: str  # "embeddings" (ids + contexts) or "ids" (ids only)

    @property
    def ids_bytes(self) -> int:  # one caption's ids, int32
        return 4 * self.length

    @property
    def context_bytes(self) -> int:  # one caption's context, float16
        return 2 * self.length * self.dim

    @property
    def has_context(self) -> bool:
        return self.storage == "embeddings"


@dataclass
class Manifest:
    num_samples: int
    grid_size: int
    codebook_size: int
    num_classes: int
    shards: list[dict]  # {"name", "num_samples", "bytes", "crc32"}; no crc32 from enat before issue 29
    tokenizer: dict = field(default_factory=dict)  # {"path", "sha256"}
    source: dict = field(default_factory=dict)  # dataset, split, resolution, flip, parts
    failed: list[dict] = field(default_factory=list)  # {"path", "error"}: unreadable inputs
    # Caption shards only (empty for class shards): encoder (describe()), length, dim, dtype,
    # storage, null_context (file name), null_context_sha256, null_ids, num_captions.
    text: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def text_layout(self) -> TextLayout | None:
        if not self.text:
            return None
        return TextLayout(int(self.text["length"]), int(self.text["dim"]), self.text["storage"])

    def save(self, shard_dir: str | Path) -> Path:
        path = Path(shard_dir) / MANIFEST
        data = {"format": FORMAT, "version": TEXT_VERSION if self.text else VERSION, **self.__dict__}
        if not self.text:
            del data["text"]  # class shards: byte for byte what earlier versions wrote
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
        fmt, version = data.pop("format", None), data.pop("version", None)
        if fmt != FORMAT or version not in (VERSION, TEXT_VERSION):
            raise ShardError(f"{path} is not an {FORMAT} manifest of version {VERSION} or {TEXT_VERSION} "
                             f"(found {fmt!r} version {version!r})")
        if (version == TEXT_VERSION) != bool(data.get("text")):
            raise ShardError(f"{path}: version {version} manifest {'without' if version == TEXT_VERSION else 'with'} "
                             f"a text section; re-run `enat tokenize --merge`")
        try:
            return cls(**data)
        except TypeError as e:  # unknown or missing fields
            raise ShardError(f"{path}: not a valid manifest ({e}); re-run `enat tokenize --merge`") from None

    def check_model(self, model_cfg, source: str = "") -> None:
        """Fail with both sides named when the shards do not fit the model config."""
        problems = []
        if self.grid_size != model_cfg.grid_size:
            problems.append(f"token grid {self.grid_size}x{self.grid_size} vs model.grid_size {model_cfg.grid_size}")
        if self.codebook_size != model_cfg.codebook_size:
            problems.append(f"codebook size {self.codebook_size} vs model.codebook_size {model_cfg.codebook_size}")
        condition = getattr(model_cfg, "condition", "class")
        if condition == "class" and self.num_classes > model_cfg.num_classes:
            problems.append(f"{self.num_classes} classes vs model.num_classes {model_cfg.num_classes}")
        layout = self.text_layout
        if layout is not None and condition != "text":
            problems.append(f"caption shards (text encoder {self.text.get('encoder', {}).get('path')}, "
                            f"L={layout.length}, C={layout.dim}) vs model.condition={condition}: set "
                            f"model.condition=text model.text_len={layout.length} model.text_dim={layout.dim}, "
                            f"or train on class shards")
        elif layout is None and condition == "text":
            problems.append("class shards (no captions) vs model.condition=text: tokenize captioned data into "
                            "them (data.dataset=coco, or digits with model.condition=text; a fresh data.shards "
                            "folder), or set model.condition=class")
        elif layout is not None:
            if layout.length != model_cfg.text_len:
                problems.append(f"text length L={layout.length} vs model.text_len {model_cfg.text_len}")
            if layout.dim != model_cfg.text_dim:
                problems.append(f"text width C={layout.dim} vs model.text_dim {model_cfg.text_dim}")
            if problems and (layout.length != model_cfg.text_len or layout.dim != model_cfg.text_dim):
                problems[-1] += (f" (the shards were encoded with {self.text.get('encoder', {}).get('path')}: "
                                 f"set model.text_len/text_dim to match, or re-tokenize with the model's encoder)")
        if problems:
            raise ShardError(f"shards {source} do not fit the model: " + "; ".join(problems))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def index_path(tar_path: str | Path) -> Path:
    return Path(str(tar_path) + INDEX_SUFFIX)


# numpy parses .npy headers with ast.literal_eval, which CPython 3.11 does not make thread-safe
# ("AST constructor recursion depth mismatch" under `enat data verify`'s threads): one at a time.
NPY_HEADER_LOCK = threading.Lock()


def _npy_header(raw, member) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran, dtype, header length) of an .npy member, read from its first bytes."""
    raw.seek(member.offset_data)
    buf = io.BytesIO(raw.read(min(member.size, 1024)))
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    with NPY_HEADER_LOCK:
        shape, fortran, dtype = read_header(buf)
    return shape, fortran, dtype, buf.tell()


def _check_npy(raw, member, dtype, trailing: tuple, what: str, expect: str) -> tuple[int, int] | str:
    """(K, payload offset) of a (K, *trailing) array of `dtype`, or the problem (a string)."""
    try:
        shape, fortran, found, hdr = _npy_header(raw, member)
    except Exception as e:  # not an npy payload
        return f"unreadable {what} ({e})"
    if found != dtype or fortran or len(shape) != 1 + len(trailing) or tuple(shape[1:]) != trailing:
        return f"{what} {found}{list(shape)}, expected {expect}"
    k = int(shape[0])
    if member.size - hdr != k * int(np.prod(trailing)) * dtype.itemsize:
        return f"{what} payload size {member.size - hdr} bytes"
    return k, member.offset_data + hdr


def scan_shard(tar_path: str | Path, seq_len: int, text: TextLayout | None = None) -> tuple[np.ndarray, list[str]]:
    """Index a webdataset token shard by reading its tar headers. Returns the index of the valid
    samples and a list of problems (samples with a wrong token count or dtype, missing fields,
    a truncated or unreadable tar; for caption shards also captions, ids or contexts of the
    wrong dtype or shape, or disagreeing caption counts) — each naming the shard and sample."""
    tar_path = Path(tar_path)
    entries: dict[str, dict] = {}
    order: list[str] = []
    problems: list[str] = []

    def bad(key, why):
        problems.append(f"{tar_path.name}: sample {key}: {why}")
        entries[key]["bad"] = True

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
                    try:
                        shape, fortran, dtype, hdr = _npy_header(raw, member)
                    except Exception as e:  # not an npy payload
                        bad(key, f"unreadable tokens.npy ({e})")
                        continue
                    if dtype != np.uint16 or shape != (seq_len,) or fortran:
                        bad(key, f"tokens {dtype}{list(shape)}, expected uint16[{seq_len}] (wrong token count "
                                 f"for this grid)")
                    elif member.size - hdr != 2 * seq_len:
                        bad(key, f"payload size {member.size - hdr} bytes")
                    else:
                        entries[key]["offset"] = member.offset_data + hdr
                elif ext == "cls":
                    try:
                        entries[key]["label"] = int(raw.read(member.size).decode().strip())
                    except ValueError:
                        bad(key, "class is not an integer")
                elif text is not None and ext == "ids.npy":
                    r = _check_npy(raw, member, np.dtype("<i4"), (text.length,), "ids",
                                   f"int32[K, {text.length}] (L={text.length} of the manifest's text encoder)")
                    if isinstance(r, str):
                        bad(key, r)
                    else:
                        entries[key]["ids"] = r
                elif text is not None and text.has_context and ext == "context.npy":
                    r = _check_npy(raw, member, np.dtype("<f2"), (text.length, text.dim), "context",
                                   f"float16[K, {text.length}, {text.dim}] (L x C of the manifest's text encoder)")
                    if isinstance(r, str):
                        bad(key, r)
                    else:
                        entries[key]["ctx"] = r
                elif text is not None and ext == "captions.json":
                    try:
                        caps = json.loads(raw.read(member.size).decode())
                        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                            raise ValueError("not a list of strings")
                    except ValueError as e:
                        bad(key, f"captions.json unreadable ({e})")
                        continue
                    entries[key]["captions"] = (len(caps), member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{tar_path.name}: unreadable or truncated tar ({type(e).__name__}: {e})")
    size = tar_path.stat().st_size if tar_path.exists() else 0
    rows = []
    need = ["offset", "label"]
    if text is not None:
        need += ["captions", "ids"] + (["ctx"] if text.has_context else [])
    names = {"offset": "tokens.npy", "label": "cls", "captions": "captions.json", "ids": "ids.npy",
             "ctx": "context.npy"}
    for key in order:
        e = entries[key]
        if e.get("bad"):
            continue
        missing = [names[f] for f in need if f not in e]
        if missing:
            problems.append(f"{tar_path.name}: sample {key}: missing {', '.join(missing)}")
            continue
        end = e["offset"] + 2 * seq_len
        if text is None:
            if end > size:
                problems.append(f"{tar_path.name}: sample {key}: beyond the end of the file (truncated shard)")
                continue
            rows.append((e["offset"], 2 * seq_len, e["label"], key.encode()))
            continue
        k, cap_off, cap_n = e["captions"]
        ids_k, ids_off = e["ids"]
        ctx_k, ctx_off = e["ctx"] if text.has_context else (k, -1)
        if not k or len({k, ids_k, ctx_k}) != 1:
            problems.append(f"{tar_path.name}: sample {key}: {k} captions, {ids_k} rows of ids"
                            + (f", {ctx_k} contexts" if text.has_context else "") + " (must agree, at least 1)")
            continue
        end = max(end, cap_off + cap_n, ids_off + k * text.ids_bytes,
                  ctx_off + k * text.context_bytes if text.has_context else 0)
        if end > size:
            problems.append(f"{tar_path.name}: sample {key}: beyond the end of the file (truncated shard)")
            continue
        rows.append((e["offset"], 2 * seq_len, e["label"], key.encode(), k, ids_off, ctx_off, cap_off, cap_n))
    return np.array(rows, dtype=INDEX_DTYPE if text is None else TEXT_INDEX_DTYPE), problems


def write_index(tar_path: str | Path, index: np.ndarray) -> None:
    path = index_path(tar_path)
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def _index_fits(index: np.ndarray, size: int, seq_len: int, text: TextLayout | None) -> bool:
    """Whether a sidecar index is of the right kind and points inside a tar of `size` bytes."""
    if index.dtype != (INDEX_DTYPE if text is None else TEXT_INDEX_DTYPE):
        return False
    if len(index) == 0:
        return True
    if int(index["offset"].max()) + 2 * seq_len > size or int(index["nbytes"].max()) != 2 * seq_len:
        return False
    if text is not None:
        k = index["num_captions"].astype(np.int64)
        if int(k.min()) < 1 or int((index["ids_offset"] + k * text.ids_bytes).max()) > size \
                or int((index["cap_offset"] + index["cap_nbytes"]).max()) > size:
            return False
        if text.has_context and (int(index["ctx_offset"].min()) < 0
                                 or int((index["ctx_offset"] + k * text.context_bytes).max()) > size):
            return False
    return True


def read_index(tar_path: str | Path, seq_len: int, expected_bytes: int | None = None,
               text: TextLayout | None = None) -> tuple[np.ndarray, list[str]]:
    """The shard's index: from its sidecar when that matches the tar, else by scanning it.
    A tar whose size differs from the manifest's record is scanned (and so its truncation found)."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        return np.empty(0, INDEX_DTYPE if text is None else TEXT_INDEX_DTYPE), [f"{tar_path.name}: shard file missing"]
    size = tar_path.stat().st_size
    idx = index_path(tar_path)
    if idx.is_file() and (expected_bytes is None or expected_bytes == size):
        try:
            index = np.load(idx, allow_pickle=False)
            if _index_fits(index, size, seq_len, text):
                return index, []
        except (ValueError, OSError):
            pass  # a broken sidecar: fall back to scanning the tar itself
    index, problems = scan_shard(tar_path, seq_len, text)
    if expected_bytes is not None and size != expected_bytes:
        problems.insert(0, f"{tar_path.name}: {size} bytes on disk, {expected_bytes} in the manifest "
                           f"(truncated or replaced shard)")
    return index, problems
