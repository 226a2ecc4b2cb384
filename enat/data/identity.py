"""Which shards a run trains on, and whether shards are still what their manifest says.

A shard set's identity is the sha256 of its manifest file's bytes (`manifest.json` as written,
not a canonical form: the merge writes it once and nothing rewrites it). The manifest records
every shard's sample count, size and CRC-32 and the tokenizer's sha256, so re-tokenized or
rewritten shards come with another manifest, hence another hash. The loader's state, which every
checkpoint holds, carries `shard_identity()`: the hash, the tokenizer's sha256 and the shard list
(a few bytes per shard), so that a resume on other shards can say what changed.

`resume_data_state` is the check a resume makes: other shards stop it with DataChangedError
unless data.allow_changed_shards=true. `verify_shards` (`enat data verify DIR`) reads every
shard and checks it against its manifest entry.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from enat.data.shards import NPY_HEADER_LOCK, MANIFEST, Manifest, ShardError, index_path, scan_shard
from enat.files import file_crc32, file_sha256

NO_CHECKSUMS = "no checksums recorded (written by an older enat): sizes and sample counts checked"


class DataChangedError(ShardError):
    """A resume whose training shards are not the ones its checkpoint was trained on."""


def shard_identity(shard_dir: str | Path, manifest: Manifest) -> dict:
    """What a checkpoint records of its training shards: the manifest's sha256 (of the file's
    bytes), the tokenizer's sha256 (None when the merge was not told the tokenizer) and per
    shard [samples, bytes, crc32] (crc32 None for shards of an older enat)."""
    shard_dir = Path(shard_dir)
    return {"dir": str(shard_dir), "manifest_sha256": file_sha256(shard_dir / MANIFEST),
            "tokenizer_sha256": manifest.tokenizer.get("sha256"), "num_samples": manifest.num_samples,
            "shards": {s["name"]: [s["num_samples"], s["bytes"], s.get("crc32")] for s in manifest.shards}}


def describe(identity: dict) -> str:
    """One log line: where the shards are and their hashes."""
    return (f"training shards {identity['dir']}: {identity['num_samples']} samples in {len(identity['shards'])} "
            f"shards, manifest sha256 {identity['manifest_sha256']}, tokenizer sha256 "
            f"{identity['tokenizer_sha256'] or '(not recorded)'}")


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def what_changed(was: dict, now: dict) -> str:
    """The differences of two identities that their records show, in words."""
    out = []
    if was.get("tokenizer_sha256") != now.get("tokenizer_sha256"):
        out.append(f"tokenizer sha256 {was.get('tokenizer_sha256')} -> {now.get('tokenizer_sha256')} (the token "
                   f"ids mean something else now)")
    if was["num_samples"] != now["num_samples"]:
        out.append(f"{was['num_samples']} -> {now['num_samples']} samples")
    a, b = was["shards"], now["shards"]
    removed = [n for n in a if n not in b]
    added = [n for n in b if n not in a]
    # lists, not tuples, in both: a state read back from JSON compares equal
    changed = [n for n in a if n in b and list(a[n]) != list(b[n])]
    if removed:
        out.append(f"{len(removed)} shard(s) gone: {_listed(removed)}")
    if added:
        out.append(f"{len(added)} new shard(s): {_listed(added)}")
    if changed:
        fields = ("{} -> {} samples", "{} -> {} bytes", "crc32 {} -> {}")  # [samples, bytes, crc32]
        detail = [f"{n} (" + ", ".join(f.format(x, y) for f, x, y in zip(fields, a[n], b[n]) if x != y) + ")"
                  for n in changed]
        out.append(f"{len(changed)} shard(s) rewritten: {_listed(detail, 3)}")
    if not out:
        out.append("the same shards, sample counts and tokenizer checksum; other manifest fields differ (the "
                   "tokenizer's path, source, failed images, grid or text section: compare the manifests)")
    return "; ".join(out)


def resume_data_state(saved: dict, loader, allow_changed: bool, log=print) -> dict:
    """The loader state to restore from a checkpoint's `saved` loader state, after checking that
    the loader's shards are the ones the checkpoint trained on. Other shards raise
    DataChangedError naming both hashes, what changed and the fixes; with `allow_changed` they are
    accepted with a warning (the position carries over, the samples come from the new shards; an
    exact resume it is not), and the next checkpoint records the new identity. A checkpoint of an
    older enat (no identity recorded) resumes with a note."""
    now = loader.data.identity
    was = saved.get("identity")
    if was is None:
        log(f"note: the checkpoint records no training-shard identity (saved by an older enat), so the shards "
            f"are not checked on this resume; checkpoints record it from now on ({describe(now)})")
        return saved
    if was["manifest_sha256"] == now["manifest_sha256"]:
        return saved
    changes = what_changed(was, now)
    if not allow_changed:
        raise DataChangedError(
            f"the training shards changed since the checkpoint: {Path(now['dir']) / MANIFEST} has sha256 "
            f"{now['manifest_sha256']}, the run trained on sha256 {was['manifest_sha256']} ({was['dir']}). "
            f"What changed: {changes}. Restore the shards the run trained on; or set "
            f"data.allow_changed_shards=true to resume on these knowingly (not an exact resume: the data "
            f"position carries over, the samples come from the new shards); or start a new run directory "
            f"(train.run_dir)")
    log(f"warning: data.allow_changed_shards=true: resuming on changed training shards (not an exact resume). "
        f"The run trained on manifest sha256 {was['manifest_sha256']}, {Path(now['dir']) / MANIFEST} has "
        f"{now['manifest_sha256']} ({changes}). The data position carries over; checkpoints record the new "
        f"sha256 from now on")
    # the loader refuses another sample count as an inexact position: here that is accepted
    return {**saved, "num_samples": len(loader.data)}


# ---------------------------------------------------------------------------------------------
# enat data verify
# ---------------------------------------------------------------------------------------------


def _verify_shard(path: Path, entry: dict, seq_len: int, text) -> tuple[str, list[str]]:
    """(report line, problems) of one shard against its manifest entry: present, its size, its
    CRC-32 (when recorded), its samples (a scan of the tar), and its sidecar index."""
    name, want_n, want_bytes, want_crc = entry["name"], entry["num_samples"], entry["bytes"], entry.get("crc32")
    if not path.is_file():
        return f"{name}: MISSING (the manifest lists it with {want_n} samples)", [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != want_bytes:
        problems.append(f"{name}: {size} bytes on disk, {want_bytes} in the manifest (truncated or replaced)")
    crc = None
    if want_crc is not None and not problems:  # (a file of another size has another checksum anyway)
        crc = file_crc32(path)
        if crc != want_crc:
            problems.append(f"{name}: crc32 {crc}, {want_crc} in the manifest (contents changed: a flipped byte "
                            f"or a rewrite)")
    index, scan = scan_shard(path, seq_len, text)
    problems += scan[:3] + ([f"{name}: +{len(scan) - 3} more problems"] if len(scan) > 3 else [])
    if len(index) != want_n:
        problems.append(f"{name}: {len(index)} readable samples, {want_n} in the manifest")
    side = index_path(path)
    if not problems and side.is_file():  # (a damaged tar's index differs anyway)
        try:
            with NPY_HEADER_LOCK:
                saved = np.load(side, allow_pickle=False)
            stale = not np.array_equal(saved, index)
        except (ValueError, OSError):
            stale = True
        if stale:
            problems.append(f"{name}: its index {side.name} does not match the tar (delete it: the loader then "
                            f"scans the tar)")
    if problems:
        return f"{name}: DAMAGED: " + "; ".join(p.removeprefix(f"{name}: ") for p in problems), problems
    checked = f"crc32 {crc}" if crc is not None else "no checksum recorded"
    return f"{name}: ok, {len(index)} samples, {size} bytes, {checked}", []


def verify_shards(shard_dir: str | Path, log=print, workers: int = 4) -> list[str]:
    """Check every shard of `shard_dir` against its manifest; log one line per shard (in manifest
    order) and a summary; return the problems (empty: intact). Shards are read in `workers`
    threads (zlib's CRC and file reads release the GIL)."""
    shard_dir = Path(shard_dir)
    m = Manifest.load(shard_dir)
    text = m.text_layout
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda e: _verify_shard(shard_dir / e["name"], e, m.seq_len, text), m.shards)
        problems = []
        for line, found in results:
            log(line)
            problems += found
    damaged = sorted({p.split(":")[0] for p in problems})
    others = []  # of the set, not of a shard
    listed = sum(s["num_samples"] for s in m.shards)
    if listed != m.num_samples:
        others.append(f"{MANIFEST}: num_samples {m.num_samples}, its shards list {listed}")
    if m.text:
        path = shard_dir / m.text["null_context"]
        if not path.is_file():
            others.append(f"{path.name}: missing (the null context of these caption shards)")
        elif file_sha256(path) != m.text.get("null_context_sha256"):
            others.append(f"{path.name}: sha256 differs from the manifest's null_context_sha256")
    for p in others:
        log(p)
    extra = sorted({p.name for p in shard_dir.glob("*.tar")} - {s["name"] for s in m.shards})
    if extra:
        log(f"note: {len(extra)} .tar file(s) not in the manifest (not read by the loader): {_listed(extra)}")
    unchecked = sum(1 for s in m.shards if s.get("crc32") is None)
    if unchecked:
        log(NO_CHECKSUMS if unchecked == len(m.shards) else
            f"{unchecked} of {len(m.shards)} shards: {NO_CHECKSUMS}")
    problems += others
    if problems:
        log(f"{shard_dir}: " + (f"{len(damaged)} of {len(m.shards)} shards damaged or missing ({_listed(damaged)})"
                                if damaged else "the manifest does not add up")
            + (f"; {'; '.join(others)}" if others and damaged else "")
            + ". Restore them from a copy, or tokenize again into a fresh folder (`enat data prepare` / "
              "`enat tokenize`): rewritten shards get a new manifest, on which a resumed run stops unless "
              "data.allow_changed_shards=true")
    else:
        log(f"{shard_dir}: {len(m.shards)} shards, {m.num_samples} samples intact (manifest sha256 "
            f"{file_sha256(shard_dir / MANIFEST)})")
    return problems
