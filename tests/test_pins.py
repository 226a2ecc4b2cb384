"""Reader pins against retention (enat/train/pins.py), each interleaving of pruner and reader, in
process. Real reader processes against a real trainer: tests/test_cluster_faults.py."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from enat.train.checkpoint import LATEST, META, CheckpointError, Checkpointer, pinned, tag_for
from enat.train.pins import CONDEMNED, Pin, absolve, condemn, live_pins, pins_dir


def make_tag(ckpt, step):
    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    (d / "model_states.pt").write_bytes(b"x" * 10)
    (d / META).write_text(json.dumps({"step": step, "files": {}}))
    (ckpt / LATEST).write_text(tag_for(step))


@pytest.fixture
def ckpt(tmp_path):
    c = tmp_path / "run" / "checkpoints"
    for s in (1, 2, 3):
        make_tag(c, s)
    return c


def test_a_pinned_tag_survives_prunes_and_goes_once_released(ckpt):
    logs = []
    keeper = Checkpointer(ckpt.parent, 0, keep_last=1, log=logs.append)
    with pinned(ckpt, "1", "test") as tag:
        assert tag == "step00000001"
        keeper.prune()
        assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step00000001", "step00000003"]
        assert any("keeping step00000001 past retention: read by host" in m for m in logs)
    keeper.prune()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step00000003"]
    assert os.listdir(pins_dir(ckpt)) == []


def test_pin_then_condemn_and_condemn_then_pin_never_both_go_ahead(ckpt):
    pin = Pin(ckpt, "step00000001").take()  # the reader first: the pruner sees it and backs off
    try:
        assert condemn(ckpt, "step00000001", 600, log=lambda *_: None) is not None
        assert not pin.condemned() and not (pins_dir(ckpt) / f"step00000001{CONDEMNED}").exists()
    finally:
        pin.release()
    assert condemn(ckpt, "step00000002", 600) is None  # the pruner first: a reader pinning now backs off
    late = Pin(ckpt, "step00000002").take()
    try:
        assert late.condemned()
    finally:
        late.release()
        absolve(ckpt, "step00000002")


def test_a_mark_left_by_a_dead_pruner_turns_no_reader_away(ckpt):
    assert condemn(ckpt, "step00000001", 600) is None  # ... and the pruner died here
    mark = pins_dir(ckpt) / f"step00000001{CONDEMNED}"
    old = time.time() - 3600
    os.utime(mark, (old, old))
    with pinned(ckpt, "1") as tag:
        assert tag == "step00000001"


def test_latest_is_resolved_again_when_its_tag_is_pruned_before_the_pin(ckpt):
    """The reader read `latest` (step 3); retention condemned and deleted it before the pin held
    (a trainer saving every step with keep_last=1): the reader gets the next one."""
    assert condemn(ckpt, "step00000003", 600) is None

    def trainer():
        time.sleep(0.2)
        make_tag(ckpt, 4)
        shutil.rmtree(ckpt / "step00000003")
        absolve(ckpt, "step00000003")

    t = threading.Thread(target=trainer)
    t.start()
    with pinned(ckpt, "latest") as tag:
        assert tag == "step00000004"
    t.join()
    with pytest.raises(CheckpointError, match="step00000003 not found"):
        with pinned(ckpt, "3"):
            pass


def test_dead_and_silent_readers_lose_their_pins(ckpt):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pins_dir(ckpt).mkdir(exist_ok=True)
    me = Pin(ckpt, "step00000001").record
    dead = {**me, "pid": proc.pid, "pid_start": None}  # this host, a pid that is gone
    far = {**me, "host": "node-elsewhere", "pid": 1}  # another host: only its heartbeat tells
    (pins_dir(ckpt) / "step00000001.dead.pin").write_text(json.dumps(dead))
    (pins_dir(ckpt) / "step00000001.far.pin").write_text(json.dumps(far))
    logs = []
    live = live_pins(ckpt, "step00000001", timeout_s=600, log=logs.append)
    assert [p["host"] for p in live] == ["node-elsewhere"]
    assert any(f"pid {proc.pid} is not running on this host" in m for m in logs)
    old = time.time() - 3600
    os.utime(pins_dir(ckpt) / "step00000001.far.pin", (old, old))
    assert live_pins(ckpt, "step00000001", timeout_s=600, log=logs.append) == []
    assert os.listdir(pins_dir(ckpt)) == []


def test_a_read_only_run_is_read_unpinned(ckpt, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Pin, "take", refuse)
    logs = []
    with pinned(ckpt, "latest", log=logs.append) as tag:
        assert tag == "step00000003"
    assert "reading it unpinned" in logs[0]
