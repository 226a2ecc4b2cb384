"""Run integrity with real `enat train` processes: one writer per run directory, verified
checkpoints with fallback, crash-safe saves (SIGKILL at random moments of a save), readers beside
a live writer. Losses are compared bitwise with an uninterrupted run, as the resume tests do."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, demo_shards, train_losses as losses
from enat.dist import free_port
from enat.train.checkpoint import META, complete_tags, latest_pointer, tag_dirs, verify_tag

pytestmark = pytest.mark.slow
CONFIG = str(ROOT / "configs/experiments/demo.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("data"))


def args(data, run_dir, **kw):
    over = {"train.precision": "fp32", "train.zero_stage": 2, "train.log_every": 1, "train.val_every": 0,
            "train.sample_every": 0, "train.ckpt_every": 2, "train.keep_last": 2, "train.wandb.mode": "disabled",
            "train.micro_batch": 8, "train.steps": 8, "train.warmup_steps": 2, "train.ema_decay": 0.9,
            "data.num_workers": 0, "train.run_dir": str(run_dir)}
    over.update(kw)
    return ["--config", CONFIG] + data + [f"{k}={v}" for k, v in over.items()]


def train_cmd(data, run_dir, nproc=1, extra=(), **kw):
    if nproc == 1:
        launcher = [sys.executable, "-m", "enat.cli"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), "-m", "enat.cli"]
    return launcher + ["train", *extra] + args(data, run_dir, **kw)


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(cmd, log_path):
    f = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def enat(*a):
    return run([sys.executable, "-m", "enat.cli", *map(str, a)], timeout=300)


def wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def resumed_at(out: str, ckpt, tag: str) -> bool:
    """Whether the log says the run resumed from checkpoint `tag` at its step (a run that ignored its
    checkpoints and trained again from step 0 writes the same metrics.jsonl)."""
    return f"resumed from {ckpt / tag} at step {int(tag.removeprefix('step'))}" in out


def lease(run_dir):
    try:
        return json.loads((run_dir / "lease.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 24-step run: its losses and the wall time of one start."""
    d = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.time()
    res = run(train_cmd(data, d, **{"train.steps": 24, "train.ckpt_every": 1}))
    assert res.returncode == 0, res.stderr[-4000:]
    return losses(d), time.time() - t0


def test_second_writer_is_refused_and_the_first_finishes(data, tmp_path):
    d = tmp_path / "run"
    cmd = train_cmd(data, d, **{"train.steps": 400, "train.ckpt_every": 100, "train.log_every": 20,
                                "train.wandb.mode": "offline"})
    first = start(cmd, tmp_path / "first.log")
    try:
        wait_for(lambda: (lease(d) or {}).get("pid") == first.pid, 120, "the first run to take the lease")
        t0 = time.time()
        second = run(cmd, timeout=120)
        took = time.time() - t0
        assert first.poll() is None, "the first run ended before the second one checked: make it longer"
        out = second.stdout + second.stderr
        assert second.returncode != 0, out[-3000:]
        for part in (str(d), f"pid {first.pid}", socket.gethostname(), "--takeover"):
            assert part in out, f"{part!r} not in the refusal:\n{out[-3000:]}"
        assert "Traceback" not in out
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert list(losses(d)) == list(range(20, 401, 20))  # strictly increasing, each step once
    assert len(list((d / "wandb").glob("offline-run-*"))) == 1
    assert not (d / "lease.json").exists()  # released at the end
    print(f"second writer refused in {took:.1f} s")
    # "Within seconds": the refusal comes before the model, the data or DeepSpeed's engine are built
    # (measured 2-3 s on 2 cores; a start that reaches the first step takes 4-6 s).
    assert took < 10, f"the second writer was refused only after {took:.1f} s"


def test_train_builds_no_extension_at_start_up(data, tmp_path):
    """`enat train` compiles nothing when it starts (DeepSpeed's shared-memory all-reduce extension,
    which training never uses, would be JIT-built into TORCH_EXTENSIONS_DIR on a fresh machine)."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    res = subprocess.run(train_cmd(data, tmp_path / "run", **{"train.steps": 1}), cwd=ROOT,
                         env={**ENV, "TORCH_EXTENSIONS_DIR": str(ext)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(ext.iterdir()), f"built or loaded at start-up: {sorted(p.name for p in ext.iterdir())}"


def test_sigkilled_holder_is_taken_over_and_the_run_resumes_bitwise(data, reference, tmp_path):
    ref, _ = reference
    d = tmp_path / "run"
    cmd = train_cmd(data, d, **{"train.steps": 24, "train.ckpt_every": 1})
    proc = start(cmd, tmp_path / "killed.log")
    wait_for(lambda: (latest_pointer(d / "checkpoints") or "step0").removeprefix("step") >= "00000006", 120,
             "a checkpoint of step 6")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lease(d)["pid"] == proc.pid  # left behind by the dead holder
    latest = latest_pointer(d / "checkpoints")
    res = run(cmd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "taking over the lease" in out and f"pid {proc.pid}" in out
    assert resumed_at(out, d / "checkpoints", latest), out[-3000:]
    assert losses(d) == ref


def test_sigkill_at_random_moments_of_saves(data, reference, tmp_path):
    """Kill the run while a save is being written, several times: `latest` always names a
    checkpoint that verifies, every restart resumes, and the final losses are an uninterrupted
    run's."""
    ref, _ = reference
    d, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cmd = train_cmd(data, d, **{"train.steps": 24, "train.ckpt_every": 1})
    rng = random.Random(0)
    hits, starts = 0, 0
    partial = lambda: {t for t in tag_dirs(ckpt) if not (ckpt / t / META).exists()}  # noqa: E731
    while hits < 3 and starts < 10:
        starts += 1
        before, stale = latest_pointer(ckpt), partial()  # a save killed by the last start is stale
        log = tmp_path / f"start{starts}.log"
        proc = start(cmd, log)
        try:
            wait_for(lambda: partial() - stale or proc.poll() is not None, 120, "a save in progress")
            time.sleep(rng.uniform(0, 0.03))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if partial() - stale:  # killed inside a save of this start, which trained from `before` on
            hits += 1
            if before is not None:
                assert resumed_at(log.read_text(), ckpt, before), log.read_text()[-3000:]
        latest = latest_pointer(ckpt)
        if latest is not None:
            status = verify_tag(ckpt, latest)
            assert status.state == "ok", status.problems
    assert hits >= 2, f"only {hits} of {starts} kills landed inside a save"
    latest = latest_pointer(ckpt)
    res = run(cmd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert latest is not None and resumed_at(out, ckpt, latest), out[-3000:]
    assert losses(d) == ref
    assert all((ckpt / t / META).exists() for t in tag_dirs(ckpt))  # partial saves cleaned up
    verify = enat("ckpt", "verify", d)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _corrupt(path, how):
    if how == "truncate":
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))


def test_damaged_latest_falls_back_one_interval_on_two_ranks(data, tmp_path):
    d, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cmd = train_cmd(data, d, nproc=2, **{"train.keep_last": 3})
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-4000:]
    uninterrupted = losses(d)
    for how, name in (("truncate", "mp_rank_00_model_states.pt"),
                      ("flip", "zero_pp_rank_1_mp_rank_00_optim_states.pt")):  # verified by rank 1
        damaged = ckpt / "step00000008" / name
        _corrupt(damaged, how)
        verify = enat("ckpt", "verify", d)
        assert verify.returncode == 1 and str(damaged) in verify.stdout, verify.stdout + verify.stderr
        assert ("short" if how == "truncate" else "contents changed") in verify.stdout
        res = run(cmd)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert str(damaged) in out and "warning" in out, out[-4000:]
        assert f"resumed from {ckpt / 'step00000006'} at step 6" in out
        assert losses(d) == uninterrupted  # steps 7 and 8 again, bit for bit
        assert latest_pointer(ckpt) == "step00000008" and verify_tag(ckpt, "step00000008").state == "ok"
    assert len(list((ckpt / "damaged").iterdir())) == 2  # set aside, not deleted
    # Nothing intact at all: a named error, not a fresh start.
    for tag in complete_tags(ckpt):
        _corrupt(ckpt / tag / "mp_rank_00_model_states.pt", "flip")
    res = run(train_cmd(data, d))
    assert res.returncode == 2 and "no intact checkpoint" in res.stderr, res.stderr[-3000:]
    assert latest_pointer(ckpt) == "step00000008" and losses(d) == uninterrupted  # untouched


def test_readers_work_beside_a_live_writer(data, tmp_path):
    from enat.eval.fidelity import train_digit_classifier

    extractor = tmp_path / "digits.pt"
    train_digit_classifier(extractor, steps=5, log=lambda *_: None)
    d, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    writer = start(train_cmd(data, d, **{"train.steps": 100000, "train.ckpt_every": 10, "train.keep_every": 10,
                                         "train.log_every": 10}), tmp_path / "writer.log")
    try:
        wait_for(lambda: "step00000010" in complete_tags(ckpt) and lease(d), 120, "a first checkpoint")
        listing = enat("ckpt", "list", d)
        assert listing.returncode == 0 and f"pid {writer.pid}" in listing.stdout, listing.stdout + listing.stderr
        verify = enat("ckpt", "verify", d, "--tag", 10)
        assert verify.returncode == 0 and "step00000010  ok" in verify.stdout, verify.stdout + verify.stderr
        export = enat("export", d, tmp_path / "w.pt", "--checkpoint", 10)
        assert export.returncode == 0 and "verified" in export.stdout, export.stdout + export.stderr
        ev = enat("eval", "--run", d, "--checkpoint", 10, "--num-samples", 20, f"eval.extractor_weights={extractor}",
                  f"eval.cache_dir={tmp_path / 'cache'}", "eval.batch_size=10", "sample.steps=2")
        assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
        assert f"verified {ckpt / 'step00000010'}" in ev.stdout
        assert writer.poll() is None and lease(d)["pid"] == writer.pid  # the writer kept its lease throughout
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()


def test_takeover_of_a_stuck_writer_which_then_wakes_up(data, reference, tmp_path):
    """--takeover over a live but stuck run (SIGSTOP): the new run takes the lease, waits two of the
    holder's heartbeats and continues exactly; the old one, woken (SIGCONT), writes nothing more
    and exits non-zero."""
    ref, _ = reference
    d, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    over = {"train.ckpt_every": 1, "train.lease_heartbeat_s": 0.5}
    old = start(train_cmd(data, d, **{**over, "train.steps": 100000}), tmp_path / "old.log")
    try:
        wait_for(lambda: (latest_pointer(ckpt) or "step0") >= "step00000004", 120, "a checkpoint")
        os.killpg(old.pid, signal.SIGSTOP)
        stuck_tag = latest_pointer(ckpt)
        stuck_at = int(stuck_tag.removeprefix("step"))
        assert stuck_at + 6 <= len(ref)
        res = run(train_cmd(data, d, extra=["--takeover"], **{**over, "train.steps": stuck_at + 6}))
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert resumed_at(out, ckpt, stuck_tag), out[-3000:]  # continued, not restarted
        assert "forced by --takeover" in out and "waiting 1 s for the old holder" in out, out[-3000:]
        written = (d / "metrics.jsonl").read_text(), latest_pointer(ckpt)
        os.killpg(old.pid, signal.SIGCONT)
        assert old.wait(timeout=60) == 2
        old_log = (tmp_path / "old.log").read_text()
        assert "lost the lease" in old_log, old_log[-3000:]
        assert ((d / "metrics.jsonl").read_text(), latest_pointer(ckpt)) == written  # nothing more from it
    finally:
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
    assert losses(d) == {s: v for s, v in ref.items() if s <= stuck_at + 6}


def _rewrite_last_shard(shard_dir, keep):
    """Write the last shard again with its first `keep` samples and merge the manifest again, as a
    re-tokenize that changed the data would (another manifest, another sha256)."""
    import webdataset as wds

    from enat.data.shards import Manifest
    from enat.data.tokenize import _write_shard
    from enat.files import file_crc32

    m = Manifest.load(shard_dir)
    entry = m.shards[-1]
    path = shard_dir / entry["name"]
    samples = [(s["__key__"], s["tokens.npy"], int(s["cls"]))
               for s in wds.WebDataset([str(path)], shardshuffle=False).decode()][:keep]
    entry.update(num_samples=keep, bytes=_write_shard(path, samples, m.seq_len), crc32=file_crc32(path))
    m.num_samples = sum(e["num_samples"] for e in m.shards)
    m.save(shard_dir)
    return entry["name"], m.num_samples


def test_resume_on_changed_shards_stops_unless_allowed(data, reference, tmp_path):
    """A run paused and resumed on the same shards continues bit for bit; its shards rewritten
    while it is paused, the resume stops (exit 2) naming both manifest hashes, what changed and
    the fixes; data.allow_changed_shards=true resumes with a warning and records the new hash, on
    which a later plain resume goes on."""
    import shutil

    from enat.files import file_sha256

    ref, _ = reference
    shards = tmp_path / "train"
    shutil.copytree(data[1].split("=", 1)[1], shards)  # data: the tokenizer, data.shards, data.val_shards
    over = [data[0], f"data.shards={shards}", data[2]]
    d, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"

    def train(stop, **kw):
        res = run(train_cmd(over, d, extra=["--stop-at", str(stop)], **{"train.steps": 24, **kw}))
        return res.returncode, res.stdout + res.stderr

    old_sha = file_sha256(shards / "manifest.json")
    for stop in (4, 8):  # paused at 4, resumed on the same shards
        rc, out = train(stop)
        assert rc == 0 and f"manifest sha256 {old_sha}" in out, out[-3000:]
    assert resumed_at(out, ckpt, "step00000004") and "allow_changed_shards" not in out, out[-3000:]
    assert losses(d) == {s: v for s, v in ref.items() if s <= 8}

    name, count = _rewrite_last_shard(shards, keep=128)
    new_sha = file_sha256(shards / "manifest.json")
    rc, out = train(10)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, out[-3000:]
    for part in (old_sha, new_sha, f"1498 -> {count} samples", f"1 shard(s) rewritten: {name} (218 -> 128 samples",
                 "Restore the shards", "data.allow_changed_shards=true", "new run directory (train.run_dir)"):
        assert part in error[0], (part, error[0])
    assert latest_pointer(ckpt) == "step00000008" and max(losses(d)) == 8  # it trained nothing

    rc, out = train(9, **{"data.allow_changed_shards": "true"})
    assert rc == 0 and resumed_at(out, ckpt, "step00000008"), out[-3000:]
    warning = [line for line in out.splitlines() if line.startswith("warning: data.allow_changed_shards=true")]
    assert len(warning) == 1 and old_sha in warning[0] and new_sha in warning[0], out[-3000:]
    rc, out = train(10)  # the new hash is the run's now: no flag needed
    assert rc == 0 and resumed_at(out, ckpt, "step00000009") and "allow_changed_shards" not in out, out[-3000:]
    assert sorted(losses(d)) == list(range(1, 11))
