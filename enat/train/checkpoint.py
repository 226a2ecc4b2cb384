"""Training checkpoints: DeepSpeed engine state (ZeRO shards, optimizer, LR schedule) plus this
project's state in `client_state["enat"]`: step, samples seen, the data loader position, the
gathered EMA, the wandb run id, the resolved config and the git commit.

    RUN/checkpoints/step00001000/...              one DeepSpeed checkpoint per tag
    RUN/checkpoints/step00001000/enat_meta.json   world size, ZeRO stage, step, and the size and
                                                  CRC-32 of every file of the tag: written last
    RUN/checkpoints/latest                        the tag to resume from (the commit point)
    RUN/checkpoints/damaged/<tag>-<time>/         tags that failed verification, set aside

A save is committed in this order: every rank writes its shards, fsyncs and checksums the files it
wrote; rank 0 writes the manifest (`enat_meta.json`, atomically, fsynced), then replaces `latest`
(atomically, fsynced). A save killed at any moment leaves either a tag without a manifest (a
partial: never counted as a checkpoint, removed by the next run) or a complete one, and `latest`
names a complete tag throughout.

Loading is verifying: resume checks the sizes and checksums of the tag `latest` names and falls
back to the newest earlier tag that verifies, with a warning naming the damaged files; with no
intact tag it stops with an error instead of starting over. CRC-32 (zlib) runs at ~4 GB/s per
core here, above what a node writes to a parallel filesystem, and every rank hashes its own files,
so a save stays I/O-bound. It detects truncation and flipped bits; it is not a defence against
tampering.

The last `keep_last` checkpoints and every `keep_every`-th step are kept, and the one `latest`
names never goes; partial tags and tags newer than `latest` are not counted. A tag a reader has
pinned (FID job, analysis, export, verify: `pinned()`, enat/train/pins.py) is kept until a prune
after its reader let go. A checkpoint from
another world size is resumed through DeepSpeed's universal format (converted once, next to the
original).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from enat.config import ModelConfig, from_dict
from enat.dist import all_gather_object, barrier, broadcast_object, import_deepspeed
from enat.files import file_sha256
from enat.models.weights import save_weights
from enat.train.lease import LeaseLost, describe_holder
from enat.train.pins import Pin, absolve, clear_marks, condemn

LATEST = "latest"
META = "enat_meta.json"
CLIENT_KEY = "enat"
CHECKSUM = "crc32"
DAMAGED = "damaged"
TAG_RE = re.compile(r"^step(\d{8})$")
WRITER_RE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed puts the data-parallel rank in its shard names
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    pass


class SaveError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, I/O error); nothing was committed."""

    def __init__(self, message: str, tag: str):
        super().__init__(message)
        self.tag = tag


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _write_error(e: BaseException) -> str:
    """What a failed write says, the lack of space named: an OSError's errno, or torch.save's
    RuntimeError (its C++ writer reports a failed write without the errno)."""
    if isinstance(e, OSError):
        what = "out of space" if e.errno in NO_SPACE else "write failed"
        return f"{what}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    text = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return f"write failed: {text}"


def _tree_size(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*") if Path(path).is_dir() else []:
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step").split("_")[0])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def ckpt_dir_of(run_or_ckpt: str | Path) -> Path:
    """A run directory or its checkpoints/ folder -> the checkpoints folder."""
    path = Path(run_or_ckpt)
    return path if (path / LATEST).is_file() or path.name == "checkpoints" else checkpoint_dir(path)


def tag_dirs(ckpt_dir: Path) -> list[str]:
    """Tags of the checkpoint folder (complete or not), oldest first; universal conversions and
    set-aside damaged tags excluded."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and p.is_dir()), key=step_of)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished (manifest written), oldest first."""
    return [t for t in tag_dirs(ckpt_dir) if (ckpt_dir / t / META).is_file()]


# ---------------------------------------------------------------------------------------------
# durable writes and checksums


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the folder: readers see the old or the new file,
    never a part, and after a crash the rename is on disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_checksum(path: Path, fsync: bool = False) -> dict:
    """{"size", "crc32"} of a file, read in 16 MiB chunks; `fsync` also flushes it to disk first
    (from the node that wrote it, which is where its dirty pages are)."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if fsync:
            os.fsync(f.fileno())
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, CHECKSUM: f"{crc:08x}"}


def remove_tag(tag_dir: Path) -> None:
    """Delete a tag, manifest first: interrupted, it leaves a partial (never counted), not a
    complete-looking tag with files missing."""
    (tag_dir / META).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)
    shutil.rmtree(tag_dir.with_name(f"{tag_dir.name}_universal"), ignore_errors=True)


def writer_rank(name: str) -> int:
    """The rank that wrote a file of a DeepSpeed tag: per-rank shards carry their rank, the rest
    (the model states at ZeRO-0/1/2) are rank 0's."""
    m = WRITER_RE.search(name)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------------------------
# verification


@dataclass
class TagStatus:
    tag: str
    state: str  # ok | damaged | partial | unverified (a manifest without checksums) | unchecked (sizes only)
    problems: list[str] = field(default_factory=list)
    size: int = 0
    files: int = 0

    @property
    def usable(self) -> bool:
        return self.state in ("ok", "unverified", "unchecked")


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    path = ckpt_dir / tag / META
    if not path.is_file():
        raise CheckpointError(f"{path} missing: {tag} is not a complete enat checkpoint (an interrupted save)")
    return json.loads(path.read_text())


def content_id(ckpt_dir: Path, tag: str) -> str:
    """What a tag's bytes are, as one sha256: of its manifest's entries (every file's name, size
    and CRC-32), so known without reading the files, which may be many GB (a reader verifies them
    against the manifest before loading: `require_intact`). A tag written without checksums (an
    older enat) is identified by the sha256 of its model-states file instead."""
    files = read_meta(ckpt_dir, tag).get("files")
    if files:
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    states = sorted((ckpt_dir / tag).glob("*model_states.pt"))
    if not states:
        raise CheckpointError(f"no model states file in {ckpt_dir / tag}")
    return file_sha256(states[0])


def check_files(tag_dir: Path, manifest: dict, names: list[str], checksums: bool = True) -> list[str]:
    """Problems of the named files of a tag against its manifest: missing, unreadable, wrong size,
    changed contents."""
    problems = []
    for name in names:
        path = tag_dir / name
        try:
            want = manifest[name]
            size = path.stat().st_size
            if size != want["size"]:
                problems.append(f"{path}: {size} bytes, {want['size']} written "
                                f"({'short' if size < want['size'] else 'long'})")
            elif checksums and (got := file_checksum(path)[CHECKSUM]) != want[CHECKSUM]:
                problems.append(f"{path}: {CHECKSUM} {got}, {want[CHECKSUM]} written (contents changed)")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except OSError as e:  # EIO from a failed disk or a lost object, ESTALE, EACCES
            problems.append(f"{path}: unreadable ({e.strerror or e})")
        except (KeyError, TypeError) as e:
            problems.append(f"{tag_dir / META}: malformed entry for {name} ({e!r})")
    return problems


_RANK = {"partial": 3, "damaged": 2, "unverified": 1, "ok": 0, "unchecked": 0}


def _verify_part(ckpt_dir: Path, tag: str, checksums: bool, rank: int, world: int) -> TagStatus:
    """This rank's share of verify_tag; never raises (every rank must reach the gather)."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        return TagStatus(tag, "damaged", [f"{tag_dir}: missing"])
    if not (tag_dir / META).is_file():
        return TagStatus(tag, "partial", [f"{tag_dir}: no {META} (an interrupted save)"])
    try:
        manifest = json.loads((tag_dir / META).read_text()).get("files")
        if manifest is None:
            return TagStatus(tag, "unverified", [f"{tag_dir}: written without checksums"])
        names = sorted(manifest)
        size = sum(f["size"] for f in manifest.values())
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        return TagStatus(tag, "damaged", [f"{tag_dir / META}: unreadable ({e})"])
    problems = check_files(tag_dir, manifest, names[rank::world], checksums)
    return TagStatus(tag, "damaged" if problems else ("ok" if checksums else "unchecked"), problems, size, len(names))


def verify_tag(ckpt_dir: Path, tag: str, checksums: bool = True, rank: int = 0, world: int = 1) -> TagStatus:
    """Check a tag against its manifest. Called by every rank of a group with rank/world, the
    files are split among them and the verdicts merged in one gather: every rank gets the same
    answer, whatever each one saw."""
    part = _verify_part(ckpt_dir, tag, checksums, rank, world)
    if world == 1:
        return part
    parts = all_gather_object(part)
    worst = max(parts, key=lambda p: _RANK[p.state])
    return TagStatus(tag, worst.state, sorted({q for p in parts for q in p.problems}), parts[0].size, parts[0].files)


def require_intact(ckpt_dir: Path, tag: str, log=print, rank: int = 0, world: int = 1) -> TagStatus:
    """Readers (eval, export): the tag must verify; say so, or stop naming the damage. Under a
    process group every rank calls it with rank/world and the reading is shared."""
    status = verify_tag(ckpt_dir, tag, rank=rank, world=world)
    if not status.usable:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} is {status.state}:\n  " + "\n  ".join(status.problems)
                              + f"\nPick another one (`enat ckpt list {ckpt_dir.parent}`).")
    if status.state == "ok":
        log(f"verified {ckpt_dir / tag}: {status.files} files, {status.size / 1e6:.1f} MB, {CHECKSUM} match")
    else:
        log(f"warning: {ckpt_dir / tag} has no checksums (written by an older enat): not verified")
    return status


def latest_pointer(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names (None before the first checkpoint); readers use it, resume uses
    find_resume_tag (which verifies and falls back)."""
    tag = latest_pointer(Path(ckpt_dir))
    if tag is not None and not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{Path(ckpt_dir) / LATEST} names {tag}, which is missing: restore it or point "
                              f"latest at another tag (`enat ckpt list {Path(ckpt_dir).parent}`)")
    return tag


def latest_step(run_dir: str | Path) -> int | None:
    """The step of a run's newest complete checkpoint (None before the first)."""
    tag = latest_tag(checkpoint_dir(run_dir))
    return None if tag is None else step_of(tag)


def resolve_tag(ckpt_dir: Path, which: str | None) -> str:
    """'latest'/None, a step number or a tag -> an existing tag."""
    if which in (None, "latest"):
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"no checkpoint in {ckpt_dir} (no '{LATEST}' pointer)")
        return tag
    tag = tag_for(int(which)) if str(which).isdigit() else str(which)
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"checkpoint {tag} not found in {ckpt_dir}; "
                              f"available: {complete_tags(ckpt_dir) or 'none'}")
    return tag


PIN_WAIT_S = 150.0  # longer than a dead pruner's mark lasts (pins.CONDEMNED_STALE_S)
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def pinned(ckpt_dir: Path, which: str | None, purpose: str = "", log=print):
    """Resolve `which` ('latest'/None, a step, a tag) and pin the tag for as long as the block
    reads it: retention leaves a pinned tag alone. A tag pruned between resolving and pinning is
    resolved again ('latest' then names a newer one), so a reader trailing a trainer that saves
    every step with keep_last=1 always gets a checkpoint. Yields the tag."""
    deadline, attempt = time.time() + PIN_WAIT_S, 0
    while True:
        tag = resolve_tag(ckpt_dir, which)
        pin = Pin(ckpt_dir, tag, purpose=purpose)
        try:
            pin.take()
        except OSError as e:
            if e.errno not in READ_ONLY:
                raise
            pin = None  # a read-only copy of a run: nothing prunes it under us either
        if pin is None:
            log(f"note: cannot pin {ckpt_dir / tag} (read-only); reading it unpinned")
            yield tag
            return
        try:
            usable = not pin.condemned()
        except BaseException:
            pin.release()
            raise
        if usable:
            try:
                yield tag
            finally:
                pin.release()
            return
        pin.release()  # retention got there first: try again (the tag stays if it was kept after all)
        attempt += 1
        if time.time() > deadline:
            raise CheckpointError(f"could not pin {ckpt_dir / tag} ({which or LATEST}) within {PIN_WAIT_S:g} s: "
                                  f"retention is removing it. Read a tag kept by keep_every, or raise train.keep_last")
        time.sleep(min(0.05 * attempt, 1.0))


def find_resume_tag(ckpt_dir: Path, rank: int = 0, world: int = 1, log=print) -> tuple[str | None, list[TagStatus]]:
    """-> (the tag to resume from, the damaged tags passed over on the way). Every rank calls it:
    the candidates come from rank 0's listing, the verification is shared among the ranks.

    The tag `latest` names if it verifies, else the newest earlier complete tag that does (tags
    newer than `latest` were never committed). No `latest` and no complete tag: a fresh run (None).
    Tags but none intact: CheckpointError, never a silent restart from step 0."""
    candidates = None
    if rank == 0:
        pointer, complete = latest_pointer(ckpt_dir), complete_tags(ckpt_dir)
        if pointer is None:
            candidates = complete[::-1]
            if complete:
                log(f"warning: {ckpt_dir / LATEST} is missing; trying the complete checkpoints newest first")
        elif TAG_RE.match(pointer):
            candidates = [pointer] + [t for t in reversed(complete) if step_of(t) < step_of(pointer)]
        else:
            log(f"warning: {ckpt_dir / LATEST} holds {pointer!r}, not a tag; trying the complete checkpoints")
            candidates = complete[::-1]
    candidates = broadcast_object(candidates)
    passed: list[TagStatus] = []
    for tag in candidates:
        status = verify_tag(ckpt_dir, tag, rank=rank, world=world)
        if status.usable:
            if passed:
                log(f"warning: resuming from {tag}, the newest intact checkpoint: " + "; ".join(
                    f"{s.tag} is {s.state} ({', '.join(s.problems)})" for s in passed))
            if status.state == "unverified":
                log(f"warning: {ckpt_dir / tag} has no checksums (written by an older enat): resuming unverified")
            return tag, passed
        passed.append(status)
    if not passed:
        return None, []
    problems = "\n  ".join(p for s in passed for p in s.problems)
    raise CheckpointError(f"no intact checkpoint in {ckpt_dir}:\n  {problems}"
                          + "\nRestore the damaged files, or start afresh in another run directory (train.run_dir). "
                          "Nothing was changed.")


class Checkpointer:
    """Saves and loads one run's checkpoints; rank 0 also keeps the folder tidy. `fence()` (rank 0)
    returns why this process may no longer write the run directory (its writer lease is lost), or
    None: it is asked before a save starts and again before the save is committed."""

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int = 3, keep_every: int = 0, fence=None,
                 log=print, pin_timeout_s: float = 600.0):
        self.dir = checkpoint_dir(run_dir)
        self.rank, self.keep_last, self.keep_every = rank, keep_last, keep_every
        self.pin_timeout_s = pin_timeout_s  # a reader's pin without a heartbeat this long is a dead reader's
        self.fence = fence
        self.log = log

    def _check_fence(self) -> None:
        lost = self.fence() if self.rank == 0 and self.fence is not None else None
        lost = broadcast_object(lost)
        if lost:
            raise LeaseLost(f"not saving to {self.dir}: {lost}")

    def save(self, engine, step: int, client_state: dict, meta: dict) -> str:
        """Write, verify and commit the checkpoint of `step`; returns its tag. A failed write
        raises SaveError after the partial tag is removed, `latest` still on the previous one."""
        self._check_fence()
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0 and tag_dir.exists():  # a step saved again (after a fallback): no stale files or manifest
            remove_tag(tag_dir)
        # Room for it? Each rank needs what it wrote last time (from the newest manifest): a full
        # disk is refused before DeepSpeed writes anything, as one decision of all ranks.
        short = all_gather_object(self._short_of_space())
        if any(short):
            self._failed(tag, [s for s in short if s], written=0)
        barrier()
        error = None
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save wraps a failed write in a RuntimeError
            error = f"rank {self.rank}: {_write_error(e)}"
            if dist.is_initialized() and dist.get_world_size() > 1:
                barrier()  # the one DeepSpeed's save_checkpoint ends with, where the other ranks wait
        # Each rank flushes and checksums the files it wrote (its dirty pages live on its node),
        # in threads: zlib releases the GIL, so a rank's files are hashed side by side.
        mine = {}
        if error is None:
            try:
                paths = [p for p in sorted(tag_dir.iterdir()) if p.is_file() and writer_rank(p.name) == self.rank]
                with ThreadPoolExecutor(max(1, min(4, len(paths)))) as pool:
                    mine = dict(zip((p.name for p in paths), pool.map(lambda p: file_checksum(p, fsync=True), paths)))
            except OSError as e:
                error = f"rank {self.rank}: {_write_error(e)}"
        parts = all_gather_object((mine, error))
        errors = [e for _, e in parts if e]
        if errors:
            self._failed(tag, errors, written=_tree_size(tag_dir))
        files = {k: v for part, _ in parts for k, v in part.items()}
        # Fenced before the manifest: a writer that lost the lease leaves a partial, never a
        # complete tag that retention or an eval watcher would count.
        self._check_fence()
        if self.rank == 0:
            try:
                fsync_dir(tag_dir)
                write_atomic(tag_dir / META, json.dumps({**meta, "step": step, "tag": tag, "saved": time.time(),
                                                         "checksum": CHECKSUM, "files": files}, indent=1))
            except OSError as e:
                error = f"committing {tag_dir}: {_write_error(e)}"
        error = broadcast_object(error)
        if error:
            self._failed(tag, [error], written=_tree_size(tag_dir))
        if self.rank == 0:
            try:
                write_atomic(self.dir / LATEST, tag)  # the commit point
            except OSError as e:
                error = f"committing {tag_dir}: {_write_error(e)}"
        error = broadcast_object(error)
        if error:  # the tag is complete but `latest` was not moved: it is not the resume point
            self._failed(tag, [error], written=_tree_size(tag_dir))
        if self.rank == 0:
            try:
                self.prune()
            except OSError as e:  # the save is committed; old tags wait for the next prune
                self.log(f"warning: pruning {self.dir} failed ({e}); retried at the next save")
        return tag

    def _short_of_space(self) -> str | None:
        """Why this rank cannot expect to write its part of the next checkpoint, or None: its part
        of the newest one (from its manifest) exceeds the free space of the checkpoint folder."""
        tags = complete_tags(self.dir)
        if not tags:
            return None
        try:
            files = read_meta(self.dir, tags[-1]).get("files") or {}
            need = sum(f["size"] for name, f in files.items() if writer_rank(name) == self.rank)
            usage = shutil.disk_usage(self.dir)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no estimate: the save itself finds out
        free = usage.free
        if need <= free or usage.total == 0:  # (a filesystem that reports no sizes: FUSE, some object stores)
            return None
        return f"rank {self.rank}: {free / 1e6:.1f} MB free, its part of {tags[-1]} took {need / 1e6:.1f} MB"

    def _failed(self, tag: str, errors: list[str], written: int):
        """A save that could not finish: rank 0 removes what it wrote (a partial never counts, but
        it takes space the next save needs), and every rank raises the same SaveError."""
        if self.rank == 0:
            remove_tag(self.dir / tag)
        latest = latest_pointer(self.dir)
        try:
            usage = shutil.disk_usage(self.dir)
            space = f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB on its filesystem"
        except OSError:
            space = "free space unknown"
        previous = ""
        if latest is not None and (self.dir / latest / META).is_file():
            try:
                sizes = read_meta(self.dir, latest).get("files") or {}
                previous = f"; {latest} takes {sum(f['size'] for f in sizes.values()) / 1e6:.1f} MB"
            except (OSError, ValueError, KeyError, TypeError):
                pass
        raise SaveError(
            f"checkpoint {tag} not saved: " + "; ".join(sorted(set(errors))) + f". {written / 1e6:.1f} MB written "
            f"before it failed, removed; {space}{previous}. `latest` still names "
            f"{latest or 'nothing (no checkpoint yet)'}, intact. Free space (or raise the quota) and run again: the "
            f"run resumes from there (train.on_save_error=retry trains on and saves at the next interval)",
            tag=tag)

    def prune(self) -> None:
        """Retention over committed checkpoints only (partials, and complete tags newer than
        `latest`, which were never committed, are not counted): the last keep_last, every
        keep_every-th, and the one `latest` names."""
        latest = latest_pointer(self.dir)
        if latest is None or not TAG_RE.match(latest):
            return
        tags = [t for t in complete_tags(self.dir) if step_of(t) <= step_of(latest)]
        keep = set(tags[-self.keep_last:]) if self.keep_last > 0 else set()
        if self.keep_every:
            keep |= {t for t in tags if step_of(t) % self.keep_every == 0}
        keep.add(latest)
        for t in tags:
            if t in keep:
                continue
            reader = condemn(self.dir, t, self.pin_timeout_s, log=self.log)
            if reader is not None:
                self.log(f"keeping {t} past retention: read by {describe_holder(reader)} (pruned once it is done)")
                continue
            try:
                remove_tag(self.dir / t)
            finally:
                absolve(self.dir, t)

    def tidy(self, resume: str | None, passed: list[TagStatus]) -> None:
        """Rank 0, holding the run's lease, before training: `latest` names the resume point,
        damaged tags passed over go to damaged/ (kept for a post-mortem, never read again), and
        partial tags of interrupted saves are removed."""
        if self.rank != 0 or not self.dir.is_dir():
            return
        clear_marks(self.dir)  # left by a pruner killed mid-prune: they would turn readers away
        if resume is not None and latest_pointer(self.dir) != resume:
            write_atomic(self.dir / LATEST, resume)  # first: `latest` never names a tag being moved
        for status in passed:
            if (self.dir / status.tag).is_dir():
                dest = self.dir / DAMAGED / f"{status.tag}-{time.strftime('%Y%m%d-%H%M%S')}"
                dest.parent.mkdir(exist_ok=True)
                os.replace(self.dir / status.tag, dest)
                shutil.rmtree(self.dir / f"{status.tag}_universal", ignore_errors=True)
                self.log(f"moved damaged checkpoint {status.tag} to {dest} (delete it once inspected)")
        for tag in tag_dirs(self.dir):
            if not (self.dir / tag / META).is_file():
                self.log(f"removing {self.dir / tag}: an interrupted save (no {META})")
                remove_tag(self.dir / tag)
            elif resume is not None and step_of(tag) > step_of(resume):
                self.log(f"note: {self.dir / tag} is newer than {LATEST} ({resume}): never committed, left as it "
                         f"is; training writes that step again")

    def load(self, engine, tag: str) -> dict:
        path, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.dir / tag}")
        if CLIENT_KEY not in client:
            raise CheckpointError(f"{self.dir / tag} has no enat state: not written by this trainer")
        return client[CLIENT_KEY]


def to_universal(ckpt_dir: Path, tag: str, log=print) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent);
    returns the new tag. Idempotent."""
    out_tag = f"{tag}_universal"
    out = ckpt_dir / out_tag
    if (out / "done").is_file():
        return out_tag
    shutil.rmtree(out, ignore_errors=True)
    log(f"converting {ckpt_dir / tag} to the universal format (another world size)")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed for {ckpt_dir / tag}:\n{res.stderr[-3000:]}")
    shutil.copy(ckpt_dir / tag / META, out / META)
    (out / "done").write_text("ok")
    return out_tag


def read_client_state(ckpt_dir: Path, tag: str) -> dict:
    """The enat client state of a checkpoint, without an engine (rank 0's model-states file)."""
    files = sorted((ckpt_dir / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"no model states file in {ckpt_dir / tag}")
    # Our own checkpoint, written by DeepSpeed with non-tensor objects: a trusted full load.
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    if CLIENT_KEY not in state:
        raise CheckpointError(f"{files[0]} has no enat state")
    return state


def checkpoint_weights(ckpt_dir: Path, tag: str, kinds=("ema", "online")) -> tuple[dict, dict]:
    """-> (the checkpoint's enat state, {kind: fp32 state dict}) for kinds "ema" (kept gathered in
    the client state) and "online" (the module itself at ZeRO-0, consolidated by zero_to_fp32
    otherwise). Reads the model-states file once."""
    state = read_client_state(ckpt_dir, tag)
    weights = {}
    for kind in kinds:
        if kind == "ema":
            sd = state[CLIENT_KEY]["ema"]["model"]
        elif kind == "online" and read_meta(ckpt_dir, tag).get("zero_stage", 0) == 0:
            sd = state["module"]
        elif kind == "online":
            # deepspeed: slow to import, and only a ZeRO-sharded checkpoint needs it (the launchers
            # and evaluation import this module)
            import_deepspeed()
            import deepspeed.utils.zero_to_fp32 as zero_to_fp32

            # Its "Loading checkpoint shards" bar counts files, and its prints ("Processing zero
            # checkpoint ...") are its own progress: stderr, not the output of export or eval.
            zero_to_fp32.tqdm = functools.partial(tqdm, disable=True)
            with contextlib.redirect_stdout(sys.stderr):
                sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            raise ValueError(f"weights must be 'ema' or 'online', got {kind!r}")
        weights[kind] = {k: v.float() for k, v in sd.items()}
    return state[CLIENT_KEY], weights


def export_weights(run_or_ckpt: str | Path, out: str | Path, which: str | None = None, log=print) -> Path:
    """Consolidated fp32 EMA and online weights of a checkpoint -> one enat-weights file."""
    ckpt_dir = ckpt_dir_of(run_or_ckpt)
    with pinned(ckpt_dir, which, "export", log=log) as tag:
        require_intact(ckpt_dir, tag, log=log)
        enat_state, weights = checkpoint_weights(ckpt_dir, tag)
    model_cfg = from_dict(ModelConfig, enat_state["config"]["model"])
    save_weights(out, model_cfg, weights, meta={"step": enat_state["step"], "tag": tag, "run_dir": str(ckpt_dir.parent),
                                                "git_commit": enat_state.get("git_commit"),
                                                "samples_seen": enat_state["samples_seen"],
                                                "flops_seen": enat_state.get("flops_seen")})
    log(f"wrote {out}: EMA and online weights of {ckpt_dir / tag} (step {enat_state['step']})")
    return Path(out)
