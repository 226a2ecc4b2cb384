"""The token loader every rank uses.

Exact mode (default). Epoch e orders all N samples by a permutation derived from (seed, e).
Global batch t of the epoch is positions [t G, (t+1) G) of that order, G = micro x ranks x
accumulation; rank r's micro-batch a of step t is the slice at a (ranks x micro) + r micro. So
ranks and DataLoader workers split the data with no overlap and no gap, every rank yields the same
number of batches (the < G samples left at an epoch's end are skipped that epoch, logged; the next
epoch's order differs), and a global batch holds the same samples whatever the number of ranks.
Samples are read by random access through the shards' index (one pread each), so no worker reads
what it does not use. The state is one counter, the micro-batches consumed: restoring it continues
with exactly the next samples. It also records which shards those are (their manifest's sha256,
enat/data/identity.py), which a resume checks.

Resampled mode (`data.resampled=true`): webdataset's resampled pipeline, shards drawn with
replacement and a shuffle buffer, for corpora too large to index. Its resume is statistical: the
state only re-seeds the stream.

Labels are replaced by the null class with probability `cfg_drop` (classifier-free guidance), the
draw derived from (seed, epoch, sample key), so it is the same whatever rank reads the sample.

Caption shards (text-to-image): each read picks one of the sample's K captions,
k = floor(hash_uniform(seed, CAPTION_TAG, epoch, uid) * K), and the same cfg_drop draw as labels
(another counter) replaces it by the null caption ''. So the choice is the same on any number of
ranks and exact on resume, with no state beyond the position. Only the chosen caption's bytes are
read (one pread). The batch adds `caption` (B,) int64 (k, -1 when dropped) and `context`
(B, L, C) float16 (storage embeddings; dropped rows hold the manifest's null context) or
`caption_ids` (B, L) int64 (storage ids; dropped rows hold the ids of ''; the trainer encodes
them). Labels are the source classes (the digit, or 0 for COCO), never dropped. Resampled mode
is class-only.

Every batch carries `tokens`, `labels` and `uid` (the sample keys' ids). A `transform(batch, j)`
(j: the rank's micro-batch index) adds what the step needs from the host, in the workers: the
trainer's mask order. On a GPU the batches come in pinned memory, so the step copies them to the
device without blocking.
"""

from __future__ import annotations

import hashlib
import io
import signal
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from enat.data.identity import shard_identity
from enat.data.shards import Manifest, ShardError, read_index
from enat.files import file_sha256
from enat.rng import derive_seed, hash_uniform

CAPTION_TAG = 0xCA9  # the counter stream of the caption choice (the drop uses 0xCF6, as labels)
DROP_TAG = 0xCF6


def key_uid(keys: np.ndarray) -> np.ndarray:
    """Stable 63-bit ids of sample keys (bytes)."""
    return np.array([int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") >> 1 for k in keys],
                    dtype=np.int64)


class ShardSet:
    """All valid samples of a shard directory: where each one lies, its label and key id (and for
    caption shards: K and where the captions, ids and contexts lie). Corrupt shards and samples
    are skipped and counted (or raise, in strict mode), by name."""

    TEXT_FIELDS = ("num_captions", "ids_offset", "ctx_offset", "cap_offset", "cap_nbytes")

    def __init__(self, shard_dir: str | Path, strict: bool = False, log=print):
        self.dir = Path(shard_dir)
        self.manifest = Manifest.load(self.dir)
        self.identity = shard_identity(self.dir, self.manifest)  # what checkpoints record (enat/data/identity.py)
        self.text = self.manifest.text_layout  # None for class shards
        seq_len = self.manifest.seq_len
        shard_ids, offsets, labels, uids = [], [], [], []
        text_cols: dict[str, list] = {f: [] for f in self.TEXT_FIELDS}
        self.problems: list[str] = []
        self.skipped_samples = 0
        for s, entry in enumerate(self.manifest.shards):
            index, problems = read_index(self.dir / entry["name"], seq_len, entry.get("bytes"), self.text)
            if problems:
                if strict:
                    raise ShardError(f"corrupt input in {self.dir / entry['name']}: {problems[0]}"
                                     + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                                     + "; set data.strict=false to skip and count such samples")
                missing = max(0, entry["num_samples"] - len(index))
                self.skipped_samples += missing
                self.problems += problems
                for p in problems:
                    log(f"warning: skipping corrupt input: {p}")
            shard_ids.append(np.full(len(index), s, dtype=np.int32))
            offsets.append(index["offset"])
            labels.append(index["label"].astype(np.int64))
            uids.append(key_uid(index["key"]))
            if self.text is not None:
                for f in self.TEXT_FIELDS:
                    text_cols[f].append(index[f].astype(np.int64))
        self.shard = np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int32)
        self.offset = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        self.label = np.concatenate(labels) if labels else np.empty(0, np.int64)
        self.uid = np.concatenate(uids) if uids else np.empty(0, np.int64)
        self.paths = [str(self.dir / e["name"]) for e in self.manifest.shards]
        self.seq_len = seq_len
        if self.text is not None:
            cat = {f: np.concatenate(v) if v else np.empty(0, np.int64) for f, v in text_cols.items()}
            self.num_captions = cat["num_captions"]  # K per row
            self.ids_offset, self.ctx_offset = cat["ids_offset"], cat["ctx_offset"]
            self.cap_offset, self.cap_nbytes = cat["cap_offset"], cat["cap_nbytes"]
        self._null_context: np.ndarray | None = None
        if self.skipped_samples:
            log(f"warning: {self.skipped_samples} of {self.manifest.num_samples} samples in {self.dir} skipped "
                f"(corrupt input, listed above)")

    def __len__(self) -> int:
        return len(self.label)

    def tokens(self, rows: np.ndarray, reader: "_Reader | None" = None) -> np.ndarray:
        """(len(rows), N) int64 token ids of the given rows, read in file order."""
        reader = reader or _Reader(self.paths)
        order = np.lexsort((self.offset[rows], self.shard[rows]))
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        out[order] = reader.read(self.shard[rows][order], self.offset[rows][order], 2 * self.seq_len)
        return out

    # --- caption shards ---------------------------------------------------------------------

    def _need_text(self, what: str):
        if self.text is None:
            raise ShardError(f"{self.dir} holds class shards (no captions): {what} needs caption shards")
        return self.text

    def _chosen(self, rows, k) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        k = np.broadcast_to(np.asarray(k, dtype=np.int64), rows.shape)
        if len(rows) and ((k < 0).any() or (k >= self.num_captions[rows]).any()):
            raise IndexError("caption index out of range [0, K) of its sample")
        return rows, k

    def _read_captions(self, rows, k, base: np.ndarray, nbytes: int, dtype, reader) -> np.ndarray:
        rows, k = self._chosen(rows, k)
        reader = reader or _Reader(self.paths)
        offsets = base[rows] + k * nbytes
        order = np.lexsort((offsets, self.shard[rows]))
        out = np.empty((len(rows), nbytes // np.dtype(dtype).itemsize), dtype=dtype)
        if len(rows):
            out[order] = reader.read(self.shard[rows][order], offsets[order], nbytes, dtype)
        return out

    def contexts(self, rows, k, reader: "_Reader | None" = None) -> np.ndarray:
        """(n, L, C) float16: caption k[i] of row rows[i] (k: one int or one per row)."""
        t = self._need_text("contexts")
        if not t.has_context:
            raise ShardError(f"{self.dir} stores caption ids only (text.storage=ids): no contexts to read; "
                             f"encode caption_ids with the text encoder")
        return self._read_captions(rows, k, self.ctx_offset, t.context_bytes, "<f2", reader).reshape(
            -1, t.length, t.dim)

    def caption_ids(self, rows, k, reader: "_Reader | None" = None) -> np.ndarray:
        """(n, L) int64 token ids of caption k[i] of row rows[i]."""
        t = self._need_text("caption ids")
        return self._read_captions(rows, k, self.ids_offset, t.ids_bytes, "<i4", reader).astype(np.int64)

    def captions(self, row: int, reader: "_Reader | None" = None) -> list[str]:
        """The K caption strings of a row."""
        self._need_text("captions")
        reader = reader or _Reader(self.paths)
        n = int(self.cap_nbytes[row])
        data = reader.read(self.shard[row:row + 1], self.cap_offset[row:row + 1], n, "u1")
        return json.loads(data.tobytes().decode())

    def null_context(self) -> np.ndarray:
        """(L, C) float16: the encoding of '' recorded in the manifest (checked against its sha256)."""
        t = self._need_text("the null context")
        if self._null_context is None:
            path = self.dir / self.manifest.text["null_context"]
            if not path.is_file():
                raise ShardError(f"{path} missing: the null context of these caption shards; re-run the merge "
                                 f"(`enat tokenize --merge`) or tokenize again")
            want = self.manifest.text.get("null_context_sha256")
            if want and file_sha256(path) != want:
                raise ShardError(f"{path} does not match the sha256 in {self.dir / 'manifest.json'} (replaced or "
                                 f"corrupt); re-run the merge (`enat tokenize --merge`)")
            arr = np.load(path, allow_pickle=False)
            if arr.dtype != np.float16 or arr.shape != (t.length, t.dim):
                raise ShardError(f"{path}: {arr.dtype}{list(arr.shape)}, expected float16[{t.length}, {t.dim}]")
            self._null_context = arr
        return self._null_context

    def null_ids(self) -> np.ndarray:
        """(L,) int64: the ids of the empty caption ''."""
        t = self._need_text("the null ids")
        ids = np.asarray(self.manifest.text["null_ids"], dtype=np.int64)
        if ids.shape != (t.length,):
            raise ShardError(f"{self.dir / 'manifest.json'}: null_ids has {ids.size} ids, expected L={t.length}")
        return ids


class _Reader:
    """pread-based sample reads with a small cache of open files (one per process)."""

    def __init__(self, paths: list[str], max_open: int = 64):
        self.paths = paths
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.max_open = max_open

    def fd(self, shard: int) -> int:
        if shard in self.fds:
            self.fds.move_to_end(shard)
            return self.fds[shard]
        if len(self.fds) >= self.max_open:
            os.close(self.fds.popitem(last=False)[1])
        fd = self.fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def read(self, shards: np.ndarray, offsets: np.ndarray, nbytes: int, dtype="<u2") -> np.ndarray:
        chunks = []
        for s, off in zip(shards.tolist(), offsets.tolist()):
            data = os.pread(self.fd(s), nbytes, off)
            if len(data) != nbytes:
                raise ShardError(f"{self.paths[s]}: short read at byte {off} (the shard changed on disk)")
            chunks.append(data)
        return np.frombuffer(b"".join(chunks), dtype=dtype).reshape(len(chunks), nbytes // np.dtype(dtype).itemsize)

    def __del__(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


class _ExactStream(torch.utils.data.IterableDataset):
    def __init__(self, loader: "TokenLoader", start: int):
        self.ld, self.start = loader, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = _Reader(self.ld.data.paths)
        j = self.start + w
        while True:
            batch = self.ld.micro_batch(j, reader)
            yield self.ld.transform(batch, j) if self.ld.transform is not None else batch
            j += nw


def _ignore_stop_signals(_worker_id: int) -> None:
    """Data workers leave SIGTERM and SIGINT to the trainer, which checkpoints on them. torchrun,
    SLURM and Ctrl-C signal the whole process group; torch's own worker handler would end a worker
    at a SIGTERM from anyone but its parent, and the trainer's next batch would fail before the
    checkpoint. The workers still end with the trainer (torch's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TokenLoader:
    """Micro-batches of (tokens, labels) for one rank; iterate it, save/restore `state_dict()`."""

    def __init__(self, shard_dir: str | Path, micro_batch: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, seed: int = 0, cfg_drop: float = 0.0, null_class: int | None = None,
                 shuffle: bool = True, num_workers: int = 0, strict: bool = False, resampled: bool = False,
                 model_cfg=None, transform=None, log=print):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.data = ShardSet(shard_dir, strict=strict, log=log if rank == 0 else (lambda *_: None))
        self.manifest = self.data.manifest
        if model_cfg is not None:
            self.manifest.check_model(model_cfg, str(shard_dir))
        self.text = self.data.text  # caption shards: the layout; class shards: None
        if cfg_drop > 0 and null_class is None and self.text is None:
            raise ValueError("cfg_drop > 0 needs the null class id (model.num_classes)")
        if self.text is not None and resampled:
            raise ShardError(f"{shard_dir} holds caption shards; resampled mode (data.resampled=true) reads class "
                             f"shards only. Use the exact loader (data.resampled=false) for text-to-image")
        if self.text is not None:  # checked here, once, not in the first batch of a worker
            self.data.null_context() if self.text.has_context else self.data.null_ids()
        self.micro, self.rank, self.world, self.accum = micro_batch, rank, world_size, grad_accum
        self.seed, self.cfg_drop, self.null_class = seed, cfg_drop, null_class
        self.shuffle, self.num_workers, self.resampled, self.strict = shuffle, num_workers, resampled, strict
        self.global_batch = micro_batch * world_size * grad_accum
        self.batches_per_epoch = len(self.data) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ShardError(f"{shard_dir} has {len(self.data)} usable samples, fewer than one global batch "
                             f"({micro_batch} x {world_size} ranks x {grad_accum} accumulation = {self.global_batch})")
        self.transform = transform
        self.pin_memory = torch.cuda.is_available()
        self.position = 0  # micro-batches consumed by this rank
        self.log = log if rank == 0 else (lambda *_: None)
        self._perm: tuple[int, np.ndarray] | None = None

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"micro_batches": self.position, "num_samples": len(self.data), "global_batch": self.global_batch,
                "seed": self.seed, "shuffle": self.shuffle, "resampled": self.resampled,
                "identity": self.data.identity}  # which shards: a resume checks it (resume_data_state)

    def load_state_dict(self, state: dict) -> None:
        if not self.resampled:
            mine = self.state_dict()
            diff = [f"{k}: checkpoint {state.get(k)!r} vs now {mine[k]!r}"
                    for k in ("num_samples", "global_batch", "seed", "shuffle") if state.get(k) != mine[k]]
            if diff:
                raise ShardError("cannot resume the data position exactly: " + "; ".join(diff)
                                 + ". Keep the same shards, seed and global batch (ranks x micro x accumulation "
                                 "may be regrouped as long as the product stays).")
        self.position = int(state["micro_batches"])

    def steps_to_micro(self, steps: int) -> int:
        return steps * self.accum

    # --- the stream ---------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.data)
            order = (np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(n)
                     if self.shuffle else np.arange(n))
            self._perm = (epoch, order)
        return self._perm[1]

    def sample_ids(self, j: int) -> tuple[int, np.ndarray]:
        """(epoch, dataset rows) of this rank's micro-batch j (0-based over the whole run)."""
        t, a = divmod(j, self.accum)
        epoch, t = divmod(t, self.batches_per_epoch)
        start = t * self.global_batch + a * self.world * self.micro + self.rank * self.micro
        return epoch, self.epoch_order(epoch)[start:start + self.micro]

    def micro_batch(self, j: int, reader: _Reader) -> dict:
        epoch, rows = self.sample_ids(j)
        tokens = self.data.tokens(rows, reader)
        labels = self.data.label[rows].copy()
        uid = self.data.uid[rows]
        if self.text is not None:
            return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                    "uid": torch.from_numpy(uid.copy()), "epoch": epoch, **self._captions(epoch, rows, uid, reader)}
        if self.cfg_drop > 0:
            labels[hash_uniform(self.seed, DROP_TAG, epoch, uid) < self.cfg_drop] = self.null_class
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "uid": torch.from_numpy(uid.copy()), "epoch": epoch}

    def caption_choice(self, epoch: int, rows: np.ndarray, uid: np.ndarray) -> np.ndarray:
        """The caption index of each row this epoch, -1 where the caption is dropped."""
        k = np.floor(hash_uniform(self.seed, CAPTION_TAG, epoch, uid) * self.data.num_captions[rows]).astype(np.int64)
        if self.cfg_drop > 0:
            k[hash_uniform(self.seed, DROP_TAG, epoch, uid) < self.cfg_drop] = -1
        return k

    def _captions(self, epoch: int, rows: np.ndarray, uid: np.ndarray, reader: _Reader) -> dict:
        k = self.caption_choice(epoch, rows, uid)
        kept = k >= 0
        out = {"caption": torch.from_numpy(k)}
        if self.text.has_context:
            ctx = np.empty((len(rows), self.text.length, self.text.dim), dtype=np.float16)
            ctx[kept] = self.data.contexts(rows[kept], k[kept], reader)
            ctx[~kept] = self.data.null_context()
            out["context"] = torch.from_numpy(ctx)
        else:
            ids = np.empty((len(rows), self.text.length), dtype=np.int64)
            ids[kept] = self.data.caption_ids(rows[kept], k[kept], reader)
            ids[~kept] = self.data.null_ids()
            out["caption_ids"] = torch.from_numpy(ids)
        return out

    def __iter__(self):
        if self.resampled:
            yield from self._iter_resampled()
            return
        dl = torch.utils.data.DataLoader(_ExactStream(self, self.position), batch_size=None,
                                         num_workers=self.num_workers, pin_memory=self.pin_memory,
                                         persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                                         worker_init_fn=_ignore_stop_signals)
        for batch in dl:
            t = self.position // self.accum
            if self.position % self.accum == 0 and t % self.batches_per_epoch == 0 and t > 0:
                left = len(self.data) - self.batches_per_epoch * self.global_batch
                self.log(f"data: epoch {t // self.batches_per_epoch} begins; {left} samples (< one global batch) "
                         f"were not used in the previous epoch")
            self.position += 1
            yield batch

    def _iter_resampled(self):
        def worker_seed():
            info = torch.utils.data.get_worker_info()
            return derive_seed(self.seed, "resampled", self.rank, info.id if info else 0, self.position)

        handler = wds.reraise_exception if self.strict else wds.warn_and_continue
        seq_len = self.data.seq_len

        def decode(sample):
            tokens = np.load(io.BytesIO(sample["tokens.npy"]))
            if tokens.shape != (seq_len,):
                raise ShardError(f"{sample.get('__url__')}: sample {sample['__key__']} has {tokens.size} tokens, "
                                 f"expected {seq_len}")
            return tokens.astype(np.int64), int(sample["cls"]), key_uid([sample["__key__"].encode()])[0]

        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.data.paths, seed=self.seed, worker_seed=worker_seed, deterministic=True),
            wds.tarfile_to_samples(handler=handler),
            wds.shuffle(1000, initial=100),
            wds.map(decode, handler=handler),
            wds.batched(self.micro, partial=False),
        )
        dl = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, worker_init_fn=_ignore_stop_signals)
        for tokens, labels, uid in dl:
            tokens, labels, uid = torch.as_tensor(tokens), torch.as_tensor(labels), torch.as_tensor(uid)
            if self.cfg_drop > 0:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "resampled-drop", self.rank, self.position))
                labels = torch.where(torch.rand(labels.shape, generator=g) < self.cfg_drop, self.null_class, labels)
            batch = {"tokens": tokens, "labels": labels, "uid": uid}
            if self.transform is not None:
                batch = self.transform(batch, self.position)
            self.position += 1
            yield batch
