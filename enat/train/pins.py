"""Reader pins: a checkpoint that an FID job, an analysis or an export is reading is not pruned.

Retention (`train.keep_last`) deletes old checkpoints while the run goes on, and `launch/eval.py
--watch` evaluates a run one interval behind its trainer, so a reader and the pruner meet on
every long run. A reader pins the tag it reads:

    RUN/checkpoints/pins/<tag>.<token>.pin     the reader's record (host, pid, SLURM job, ...),
                                               its mtime the reader's heartbeat
    RUN/checkpoints/pins/<tag>.condemned       the pruner is about to delete <tag>

Both sides write their file first and then list the folder (a listing, not a stat of a name: NFS
caches that a name is absent, while a changed folder is re-read):
- the pruner creates `<tag>.condemned`, then lists the pins: any live pin of <tag>, and it takes
  its mark back and keeps the tag (it is removed by a later prune, once unpinned);
- the reader writes its pin, then lists: `<tag>.condemned` there, or the tag's manifest gone, and
  it drops its pin and resolves again (`latest` names a newer tag by then).
Whatever the interleaving, one of the two sees the other's file, so a pinned tag is never deleted
and a reader never starts on a tag being deleted. A pin whose reader is dead (the lease's rules:
a gone pid on this host, a job SLURM no longer runs, a heartbeat older than the timeout) is
removed by the pruner, so a killed reader blocks retention for at most the lease timeout.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from enat.train.lease import _parse_record, describe_holder, holder_record, stale_reason

PINS = "pins"
CONDEMNED = ".condemned"
CONDEMNED_STALE_S = 120.0  # a pruner marks, checks the pins and deletes within seconds


def pins_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / PINS


def _listing(ckpt_dir: Path) -> list[str]:
    try:
        return os.listdir(pins_dir(ckpt_dir))
    except FileNotFoundError:
        return []


class Pin:
    """One reader's pin on one tag; a daemon thread bumps its mtime every `heartbeat_s`."""

    def __init__(self, ckpt_dir: Path, tag: str, heartbeat_s: float = 30.0, purpose: str = ""):
        self.ckpt_dir, self.tag, self.heartbeat_s = Path(ckpt_dir), tag, float(heartbeat_s)
        token = uuid.uuid4().hex
        self.path = pins_dir(ckpt_dir) / f"{tag}.{token}.pin"
        self.record = {**holder_record(self.heartbeat_s, token), "tag": tag, "purpose": purpose}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Pin:
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # whole or absent: the pruner never reads half a record
        self._thread = threading.Thread(target=self._beat, name="enat-pin-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return  # removed as stale (we stalled past the timeout): the pruner may delete the tag now
            except OSError:
                continue  # a network filesystem hiccup: the next beat tries again

    def condemned(self) -> bool:
        """After taking the pin: is the tag being deleted, or gone? Then the reader must not use it.
        The mark is looked for before the manifest: a pruner that marked before our pin existed
        either is still before its deletion (the mark is there) or has deleted the tag, manifest
        first (then the manifest is gone). A mark older than CONDEMNED_STALE_S was left by a
        pruner that died before deleting."""
        marked = f"{self.tag}{CONDEMNED}" in _listing(self.ckpt_dir)
        if not (self.ckpt_dir / self.tag / "enat_meta.json").is_file():
            return True
        if not marked:
            return False
        try:
            age = time.time() - os.stat(pins_dir(self.ckpt_dir) / f"{self.tag}{CONDEMNED}").st_mtime
        except FileNotFoundError:
            return False  # taken back meanwhile: the pruner saw our pin
        return age < CONDEMNED_STALE_S

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def live_pins(ckpt_dir: Path, tag: str, timeout_s: float, log=print) -> list[dict]:
    """The records of the live pins on `tag`; pins of dead readers are removed (and said)."""
    me = holder_record(0.0, "")
    live = []
    for name in _listing(ckpt_dir):
        if not (name.startswith(f"{tag}.") and name.endswith(".pin")):
            continue
        path = pins_dir(ckpt_dir) / name
        try:
            with open(path, "rb") as f:
                info = _parse_record(f.read(), os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            continue  # released meanwhile
        # A pin without a heartbeat for the timeout is dead whatever SLURM says of its job (a
        # reader killed inside a long allocation: a notebook, an salloc), then the lease's rules.
        beat = info.get("heartbeat_s")
        limit = max(timeout_s, 3 * beat) if isinstance(beat, (int, float)) else timeout_s
        why = (f"heartbeat {info['heartbeat_age_s']:.0f} s old, timeout {limit:g} s"
               if info["heartbeat_age_s"] > limit else stale_reason(info, me, info["heartbeat_age_s"], timeout_s))
        if why is None:
            live.append(info)
            continue
        log(f"removing the pin of a dead reader of {tag} ({describe_holder(info)}): {why}")
        path.unlink(missing_ok=True)
    return live


def condemn(ckpt_dir: Path, tag: str, timeout_s: float, log=print) -> dict | None:
    """The pruner's half. None when `tag` may be deleted now: it is marked condemned (call
    absolve() once it is deleted). Else the record of a live reader pinning it: leave it."""
    readers = live_pins(ckpt_dir, tag, timeout_s, log)  # a cheap first look: most pinned tags stop here
    if readers:
        return readers[0]
    pins_dir(ckpt_dir).mkdir(exist_ok=True)
    mark = pins_dir(ckpt_dir) / f"{tag}{CONDEMNED}"
    mark.write_text(f"{os.getpid()} {time.time()}")
    readers = live_pins(ckpt_dir, tag, timeout_s, log)  # after the mark: a reader pinning from now on sees it
    if readers:
        mark.unlink(missing_ok=True)
        return readers[0]
    return None


def absolve(ckpt_dir: Path, tag: str) -> None:
    (pins_dir(ckpt_dir) / f"{tag}{CONDEMNED}").unlink(missing_ok=True)


def clear_marks(ckpt_dir: Path) -> None:
    """The run's new writer, before its first prune: marks of a pruner that died mid-prune go."""
    for name in _listing(ckpt_dir):
        if name.endswith(CONDEMNED):
            (pins_dir(ckpt_dir) / name).unlink(missing_ok=True)


def pinned_tags(ckpt_dir: Path) -> set[str]:
    """Tags with a pin file (live or not), for `enat ckpt list`."""
    return {n.split(".")[0] for n in _listing(ckpt_dir) if n.endswith(".pin")}
