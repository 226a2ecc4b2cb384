"""Faults a cluster throws, with real processes: readers against retention (pins), a full disk in
the middle of a save (a real tmpfs of a few MB), SIGTERM and SIGINT to `enat train`, and `enat
ckpt universal` beside a live writer. Each ends with the named error, or with a resumed run whose
losses equal an uninterrupted run's bit for bit. (SIGTERM to SLURM jobs: tests/test_slurm.py.)"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_for
from conftest import train_losses as losses
from enat.train.checkpoint import META, complete_tags, latest_pointer, tag_dirs
from test_run_integrity import ENV, args, data, enat, run, start, train_cmd  # noqa: F401 (data: a fixture)

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):  # noqa: F811
    """An uninterrupted 24-step run (ckpt_every does not change what is trained)."""
    d = tmp_path_factory.mktemp("ref") / "run"
    res = run(train_cmd(data, d, **{"train.steps": STEPS, "train.ckpt_every": 100}))
    assert res.returncode == 0, res.stderr[-4000:]
    return losses(d)


def latest_step(run_dir) -> int:
    tag = latest_pointer(run_dir / "checkpoints")
    return -1 if tag is None else int(tag.removeprefix("step"))


def logged_steps(run_dir) -> int:
    try:
        return max((json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()), default=0)
    except (OSError, ValueError, KeyError):
        return 0


# ---------------------------------------------------------------------------------------------
# 1. readers against retention


def test_fid_jobs_trailing_a_trainer_that_prunes_every_step(data, tmp_path):  # noqa: F811
    """`enat eval --checkpoint latest`, again and again, while the trainer saves every step with
    keep_last=1: every evaluation succeeds, and its FID is the one of that step's weights (a second
    run stopped at the same step, evaluated afterwards, gives the same numbers)."""
    from enat.eval.fidelity import train_digit_classifier

    fx = tmp_path / "digits.pt"
    train_digit_classifier(fx, steps=20, log=lambda *_: None)  # what it means does not matter here
    ev = [f"eval.extractor_weights={fx}", f"eval.cache_dir={tmp_path / 'cache'}", "eval.num_samples=20",
          "eval.batch_size=10", "sample.steps=4"]
    steps = 300
    d = tmp_path / "run"
    trainer = start(train_cmd(data, d, **{"train.steps": steps, "train.ckpt_every": 1, "train.keep_last": 1,
                                          "train.log_every": 10}), tmp_path / "train.log")
    results = []
    try:
        wait_for(lambda: latest_step(d) >= 1, 120, "the first checkpoint")
        while trainer.poll() is None and len(results) < 3:
            res = run([sys.executable, "-m", "enat.cli", "eval", "--run", str(d), "--checkpoint", "latest", *ev])
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
            results.append(res.stdout + res.stderr)
        assert trainer.poll() is None, "the trainer ended before the readers were done: make it longer"
    finally:
        trainer.send_signal(signal.SIGTERM)  # it checkpoints and stops (tested below)
        trainer.wait(timeout=120)
    log = (tmp_path / "train.log").read_text()
    assert len(complete_tags(d / "checkpoints")) == 1  # retention went on meanwhile, and caught up at the end
    records = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
    assert len(records) == len(results) >= 2
    last = records[-1]
    print(f"{len(records)} evaluations at steps {[r['step'] for r in records]}; "
          f"{log.count('past retention')} prunes met a reader")
    # The right result: the same step of an identical run, evaluated with nothing else running.
    twin = tmp_path / "twin"
    res = run(train_cmd(data, twin, extra=["--stop-at", str(last["step"])],
                        **{"train.steps": steps, "train.ckpt_every": 1000, "train.log_every": 10}))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run([sys.executable, "-m", "enat.cli", "eval", "--run", str(twin), "--checkpoint", "latest", *ev])
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((twin / "eval.jsonl").read_text().splitlines()[-1])
    metrics = lambda r: {k: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
    assert again["step"] == last["step"] and metrics(again) == metrics(last) and "eval/fid" in metrics(last)


READER = """
import sys, time
from pathlib import Path
from enat.train.checkpoint import pinned
with pinned(Path(sys.argv[1]), "latest", "test reader") as tag:
    print(tag, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_pinned_tag_outlives_retention_until_its_reader_ends_or_dies(data, tmp_path):  # noqa: F811
    d = tmp_path / "run"
    ckpt = d / "checkpoints"

    def train_to(n):
        res = run(train_cmd(data, d, **{"train.steps": n, "train.ckpt_every": 1, "train.keep_last": 1}))
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout + res.stderr

    def reader(seconds):
        p = subprocess.Popen([sys.executable, "-c", READER, str(ckpt), str(seconds)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "step00000004"
        return p

    train_to(4)
    killed, finished = reader(600), reader(600)
    out = train_to(6)
    assert "keeping step00000004 past retention: read by" in out, out[-3000:]
    assert complete_tags(ckpt) == ["step00000004", "step00000006"]  # kept, and keep_last=1 for the rest
    killed.kill()
    killed.wait()
    out = train_to(7)
    assert "keeping step00000004" in out  # the other reader still holds it
    assert f"removing the pin of a dead reader of step00000004 (host {os.uname().nodename} pid {killed.pid}" in out
    finished.terminate()  # SIGTERM: the reader's `with` block does not run to its end either...
    finished.wait()
    out = train_to(8)  # ...but its pid is gone: retention takes the tag at the next save
    assert complete_tags(ckpt) == ["step00000008"], out[-3000:]
    assert not any((ckpt / "pins").iterdir())


# ---------------------------------------------------------------------------------------------
# 2. a full disk


@pytest.fixture(scope="module")
def checkpoint_bytes(data, tmp_path_factory) -> int:  # noqa: F811
    """The size of one checkpoint of these runs."""
    d = tmp_path_factory.mktemp("sizing") / "run"
    res = run(train_cmd(data, d, **{"train.steps": 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    return sum(p.stat().st_size for p in (d / "checkpoints/step00000001").iterdir())


@pytest.fixture
def small_fs(tmp_path):
    """mount(bytes) -> a tmpfs of that size (root; remounted larger with resize(bytes))."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = []

    def mount(size):
        opts = f"remount,size={size}" if mounted else f"size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        assert res.returncode == 0 or not mounted, res.stderr
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): the in-save test covers a full disk "
                        f"through RLIMIT_FSIZE")
        mounted.append(size)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_stops_with_latest_intact_and_the_resume_is_exact(  # noqa: F811
        data, reference, checkpoint_bytes, tmp_path, small_fs):
    size = checkpoint_bytes
    fs = small_fs(int(size * 1.5))  # room for one checkpoint, not for the next one beside it
    d = fs / "run"
    cmd = train_cmd(data, d, **{"train.steps": STEPS, "train.ckpt_every": 4, "train.keep_last": 1})
    res = run(cmd)
    err = res.stderr
    assert res.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "error: checkpoint step00000008 not saved: rank 0: " in err and " MB free" in err, err[-3000:]
    assert "`latest` still names step00000004, intact" in err and "step00000004 takes " in err
    assert latest_pointer(d / "checkpoints") == "step00000004" and tag_dirs(d / "checkpoints") == ["step00000004"]
    small_fs(size * 4)  # space freed
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr and losses(d) == reference


def test_disk_full_with_retry_trains_on_and_saves_once_there_is_room(  # noqa: F811
        data, reference, checkpoint_bytes, tmp_path, small_fs):
    size = checkpoint_bytes
    fs = small_fs(int(size * 1.5))
    d = fs / "run"
    cmd = train_cmd(data, d, **{"train.steps": STEPS, "train.ckpt_every": 4, "train.keep_last": 1,
                                "train.on_save_error": "retry"})
    proc = start(cmd, tmp_path / "train.log")
    log = lambda: (tmp_path / "train.log").read_text()  # noqa: E731
    try:
        wait_for(lambda: "training on (train.on_save_error=retry)" in log() or proc.poll() is not None, 300,
                 "a failed save")
        assert proc.poll() is None, log()[-3000:]
        small_fs(size * 4)
        assert proc.wait(timeout=300) == 0, log()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "checkpoint step00000008 not saved" in log()
    assert latest_pointer(d / "checkpoints") == f"step{STEPS:08d}"
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "save_error"][:1] == [8]
    assert losses(d) == reference  # nothing lost or repeated in metrics.jsonl while the disk was full


def test_a_save_failing_mid_write_leaves_no_partial_and_names_the_sizes(data, checkpoint_bytes, tmp_path):  # noqa: F811
    """A file-size limit (RLIMIT_FSIZE: EFBIG, what a quota or a full disk does to a write) fails
    the first save inside torch.save: the partial tag is removed, nothing is committed, exit 2."""
    size = checkpoint_bytes
    d = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, size // 4))

    res = subprocess.run(train_cmd(data, d, **{"train.steps": 4, "train.ckpt_every": 2}), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600, preexec_fn=limit)
    err = res.stderr
    assert res.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "error: checkpoint step00000002 not saved: rank 0: " in err, err[-3000:]
    assert "MB written before it failed, removed" in err and "`latest` still names nothing" in err
    assert tag_dirs(d / "checkpoints") == [] and latest_pointer(d / "checkpoints") is None


# ---------------------------------------------------------------------------------------------
# 3. SIGTERM and SIGINT to `enat train`


def test_sigterm_and_sigint_checkpoint_the_step_and_exit_cleanly(data, reference, tmp_path):  # noqa: F811
    """Sent to the whole process group, as torchrun, SLURM and a terminal's Ctrl-C do: the data
    workers (two here) must leave the signal to the trainer."""
    d = tmp_path / "run"
    # no save on schedule before the end; the data workers do not change what is trained
    cmd = train_cmd(data, d, **{"train.steps": STEPS, "train.ckpt_every": 100, "data.num_workers": 2})
    stops = []
    for sig, at in ((signal.SIGTERM, 5), (signal.SIGINT, 12)):
        proc = start(cmd, tmp_path / f"{sig.name}.log")
        # a step of this start (the metrics of the last one go up to its stop): the handler is in place
        at = max(at, stops[-1] + 2 if stops else 0)
        wait_for(lambda: logged_steps(d) >= at, 300, f"step {at}")
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=120) == 128 + sig, (tmp_path / f"{sig.name}.log").read_text()[-3000:]
        out = (tmp_path / f"{sig.name}.log").read_text()
        assert "Traceback" not in out
        step = latest_step(d)
        assert f"{sig.name}: stopped at step {step} with a checkpoint of it" in out, out[-2000:]
        assert step >= at and (not stops or step > stops[-1])
        stops.append(step)
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {d / 'checkpoints' / f'step{stops[-1]:08d}'}" in res.stdout + res.stderr
    assert losses(d) == reference


# ---------------------------------------------------------------------------------------------
# 5. `enat ckpt universal` takes the lease


def test_ckpt_universal_is_refused_beside_a_live_writer(data, tmp_path):  # noqa: F811
    d = tmp_path / "run"
    trainer = start(train_cmd(data, d, **{"train.steps": 400, "train.ckpt_every": 2, "train.log_every": 20}),
                    tmp_path / "train.log")
    try:
        wait_for(lambda: latest_step(d) >= 2, 120, "a checkpoint")
        res = enat("ckpt", "universal", d)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert f"is being written by a training run (host {os.uname().nodename} pid {trainer.pid}" in res.stderr
        assert not list((d / "checkpoints").glob("*_universal"))
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
    res = enat("ckpt", "universal", d)
    assert res.returncode == 0, res.stderr[-3000:]
    tag = latest_pointer(d / "checkpoints")
    assert (d / "checkpoints" / f"{tag}_universal" / META).is_file() and not (d / "lease.json").exists()
