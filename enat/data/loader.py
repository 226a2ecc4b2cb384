"""The token loader every rank uses.

Exact mode (default). Epoch e orders all N samples by a permutation derived from (seed, e).
Global batch t of the epoch is positions [t G, (t+1) G) of that order, G = micro x ranks x
accumulation; rank r's micro-batch a of step t is the slice at a (ranks x micro) + r micro. So
ranks and DataLoader workers split the data with no overlap and no gap, every rank yields the same
number of batches (the < G samples left at an epoch's end are skipped that epoch, logged; the next
epoch's order differs), and a global batch holds the same samples whatever the number of ranks.
Samples are read by random access through the shards' index (one pread each), so no worker reads
what it does not use. The state is one counter, the micro-batches consumed: restoring it continues
with exactly the next samples.

Resampled mode (`data.resampled=true`): webdataset's resampled pipeline, shards drawn with
replacement and a shuffle buffer, for corpora too large to index. Its resume is statistical: the
state only re-seeds the stream.

Labels are replaced by the null class with probability `cfg_drop` (classifier-free guidance), the
draw derived from (seed, epoch, sample key), so it is the same whatever rank reads the sample.

Every batch carries `tokens`, `labels` and `uid` (the sample keys' ids). A `transform(batch, j)`
(j: the rank's micro-batch index) adds what the step needs from the host, in the workers: the
trainer's mask order. On a GPU the batches come in pinned memory, so the step copies them to the
device without blocking.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from enat.data.shards import Manifest, ShardError, read_index
from enat.rng import derive_seed, hash_uniform


def key_uid(keys: np.ndarray) -> np.ndarray:
    """Stable 63-bit ids of sample keys (bytes)."""
    return np.array([int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") >> 1 for k in keys],
                    dtype=np.int64)


class ShardSet:
    """All valid samples of a shard directory: where each one lies, its label and key id.
    Corrupt shards and samples are skipped and counted (or raise, in strict mode), by name."""

    def __init__(self, shard_dir: str | Path, strict: bool = False, log=print):
        self.dir = Path(shard_dir)
        self.manifest = Manifest.load(self.dir)
        seq_len = self.manifest.seq_len
        shard_ids, offsets, labels, uids = [], [], [], []
        self.problems: list[str] = []
        self.skipped_samples = 0
        for s, entry in enumerate(self.manifest.shards):
            index, problems = read_index(self.dir / entry["name"], seq_len, entry.get("bytes"))
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
        self.shard = np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int32)
        self.offset = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        self.label = np.concatenate(labels) if labels else np.empty(0, np.int64)
        self.uid = np.concatenate(uids) if uids else np.empty(0, np.int64)
        self.paths = [str(self.dir / e["name"]) for e in self.manifest.shards]
        self.seq_len = seq_len
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

    def read(self, shards: np.ndarray, offsets: np.ndarray, nbytes: int) -> np.ndarray:
        chunks = []
        for s, off in zip(shards.tolist(), offsets.tolist()):
            data = os.pread(self.fd(s), nbytes, off)
            if len(data) != nbytes:
                raise ShardError(f"{self.paths[s]}: short read at byte {off} (the shard changed on disk)")
            chunks.append(data)
        return np.frombuffer(b"".join(chunks), dtype="<u2").reshape(len(chunks), nbytes // 2)

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
        if cfg_drop > 0 and null_class is None:
            raise ValueError("cfg_drop > 0 needs the null class id (model.num_classes)")
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
                "seed": self.seed, "shuffle": self.shuffle, "resampled": self.resampled}

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
        if self.cfg_drop > 0:
            labels[hash_uniform(self.seed, 0xCF6, epoch, uid) < self.cfg_drop] = self.null_class
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "uid": torch.from_numpy(uid.copy()), "epoch": epoch}

    def __iter__(self):
        if self.resampled:
            yield from self._iter_resampled()
            return
        dl = torch.utils.data.DataLoader(_ExactStream(self, self.position), batch_size=None,
                                         num_workers=self.num_workers, pin_memory=self.pin_memory,
                                         persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        for batch in dl:
            t = self.position // self.accum
            if self.position % self.accum == 0 and t % self.batches_per_epoch == 0 and t > 0:
                left = len(self.data) - self.batches_per_epoch * self.global_batch
                self.log(f"data: epoch {t // self.batches_per_epoch} begins; {left} samples (< one global batch) "
                         f"were not used in the previous epoch")
            self.position += 1
            yield batch

    def _iter_resampled(self):
        import webdataset as wds

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
                                         pin_memory=self.pin_memory)
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
