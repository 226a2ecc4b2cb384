"""Files on the ground floor: checksums (shards, checkpoints, tokenizers, text encoders and
evaluation references are identified by the sha256 of their bytes; each token shard also by its
CRC-32) and the replace-by-rename
writes of results and reference statistics that several jobs may race to write."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_crc32(path: str | Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits: the per-shard checksum of token shards (several
    times faster than sha256 on GB files; it guards against damage, not tampering)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def replace_atomic(path: Path, write) -> None:
    """write(file) into a temp name of this writer's own, then rename over `path`. The eval jobs of
    one sweep start together and fill the same reference cache: a shared temp name would let one
    job rename away the file another is still writing."""
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_npz(path: Path, **arrays) -> None:
    replace_atomic(path, lambda f: np.savez(f, **arrays))


def write_json(path: Path, obj) -> None:
    replace_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))
