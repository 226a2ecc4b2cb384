"""The metrics writer starts wandb off the training's path: nothing waits for wandb.init (about
2 s of the demo's start-up) before start() (the trainer's, after its first step) and nothing
after it but a record handed to wandb; metrics.jsonl is written at once, and wandb gets every
record, after the axes declared before it was up."""

import json
import sys
import threading
import types

import pytest

from enat.config import WandbConfig
from enat.train.metrics import MetricsWriter


class FakeRun:
    def __init__(self):
        self.calls = []

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define", name, step_metric))

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def slow_wandb(monkeypatch):
    """A wandb whose init() waits until the test opens the gate (or raises, when told to)."""
    gate, run = threading.Event(), FakeRun()
    fake = types.SimpleNamespace(gate=gate, run=run, error=None)

    def init(**kwargs):
        assert gate.wait(30)
        if fake.error:
            raise fake.error
        return run

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def start(tmp_path):
    """MetricsWriter(...).start() in a thread -> (thread, box holding the writer once started)."""
    def run():
        w = MetricsWriter(tmp_path, True, WandbConfig(mode="offline"), "rid", {"a": 1})
        w.start()
        box.append(w)

    box = []
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_wandb_starts_in_the_background_and_gets_every_record(tmp_path, slow_wandb):
    t, box = start(tmp_path)
    t.join(10)
    assert not t.is_alive(), "the writer (or its start()) waited for wandb.init"
    w = box[0]
    w.define_axis("flops_seen", ["loss"])
    w.truncate_after(0)
    assert slow_wandb.run.calls == []
    slow_wandb.gate.set()  # wandb is up
    w.log({"kind": "train", "step": 1, "loss": 2.5, "flops_seen": 10})
    w.log({"kind": "train", "step": 2, "loss": 2.0, "flops_seen": 20})
    w.finish()
    assert slow_wandb.run.calls == [("define", "flops_seen", None), ("define", "loss", "flops_seen"),
                                    ("log", 1, {"loss": 2.5, "flops_seen": 10}),
                                    ("log", 2, {"loss": 2.0, "flops_seen": 20}), ("finish",)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_metrics_jsonl_does_not_wait_for_wandb(tmp_path, slow_wandb):
    """The first record reaches metrics.jsonl while wandb is still starting (its time stamp is
    the step's, which is what README's start-up figure reads)."""
    t, box = start(tmp_path)
    t.join(10)
    w = box[0]
    logger = threading.Thread(target=w.log, args=({"kind": "train", "step": 1, "loss": 1.0},), daemon=True)
    logger.start()
    logger.join(2)
    assert logger.is_alive()  # waiting for wandb, with the line already written
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1
    slow_wandb.gate.set()
    logger.join(10)
    assert slow_wandb.run.calls == [("log", 1, {"loss": 1.0})]


def test_wandb_waits_for_start(tmp_path, slow_wandb):
    """Before start(), wandb is not even imported (the trainer's first step runs alone); a record
    before it starts wandb itself."""
    slow_wandb.gate.set()
    calls = []
    slow_wandb.init = lambda **kw: calls.append(kw) or slow_wandb.run
    w = MetricsWriter(tmp_path, True, WandbConfig(mode="offline"), "rid", {"a": 1})
    w.define_axis("flops_seen", ["loss"])
    assert calls == []
    w.log({"kind": "train", "step": 1, "loss": 1.0, "flops_seen": 5})
    assert len(calls) == 1 and calls[0]["id"] == "rid"
    assert slow_wandb.run.calls == [("define", "flops_seen", None), ("define", "loss", "flops_seen"),
                                    ("log", 1, {"loss": 1.0, "flops_seen": 5})]


def test_a_failed_wandb_start_is_raised_where_wandb_is_used(tmp_path, slow_wandb):
    slow_wandb.error = ValueError("bad entity")
    t, box = start(tmp_path)
    t.join(10)
    slow_wandb.gate.set()
    with pytest.raises(ValueError, match="bad entity"):
        box[0].log({"kind": "train", "step": 1, "loss": 1.0})
