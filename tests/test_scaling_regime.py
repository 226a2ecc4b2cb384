"""scaling/baselines.py: frequency-table losses with known answers (and against a brute-force
reference), on the real demo shards, and the regime gate that stops a law fitted on runs that do
not beat them or ignore context."""

import math
import tracemalloc

import numpy as np
import pytest

from conftest import ROOT, demo_shards
from enat.config import load_config
from scaling import baselines as bl
from scaling.baselines import frequency_baselines, gate_markdown, regime_gate, sweep_baselines
from scaling.collect import ScalingError

CONFIG = ROOT / "configs/experiments/demo.yaml"


def reference(train, train_labels, val, val_labels, V, s):
    """The same losses from dense (classes, N, V) count tables, np.add.at: small inputs only."""
    n, N = train.shape
    pos = np.broadcast_to(np.arange(N), train.shape)
    uni = np.bincount(train.ravel(), minlength=V)
    per_pos = np.zeros((N, V))
    np.add.at(per_pos, (pos, train), 1)
    C = int(max(train_labels.max(), val_labels.max())) + 1
    per_cls = np.zeros((C, N, V))
    np.add.at(per_cls, (np.broadcast_to(train_labels[:, None], train.shape), pos, train), 1)
    vpos = np.broadcast_to(np.arange(N), val.shape)

    def ce(counts):  # counts: (..., V) tables indexed to each validation token
        return float(-np.log((counts[..., 0] + s) / (counts[..., 1] + s * V)).mean())

    return {"unigram": ce(np.stack([uni[val], np.full(val.shape, uni.sum())], -1)),
            "per_position": ce(np.stack([per_pos[vpos, val], per_pos.sum(-1)[vpos]], -1)),
            "per_class_position": ce(np.stack([per_cls[val_labels[:, None], vpos, val],
                                               per_cls.sum(-1)[val_labels[:, None], vpos]], -1))}


# --- frequency_baselines: known answers -------------------------------------------------------


def test_position_determines_the_code():
    """Position p always holds code p % V (N=8, V=5): every position's table saw its code n=4 times."""
    V, N = 5, 8
    train = np.tile(np.arange(N) % V, (4, 1))
    val = np.tile(np.arange(N) % V, (3, 1))
    b = frequency_baselines(train, np.zeros(4, int), val, np.zeros(3, int), V, smoothing=1.0)
    assert b["uniform"] == pytest.approx(math.log(5))
    assert b["per_position"] == pytest.approx(-math.log((4 + 1) / (4 + 1 * 5)))
    # A row holds codes 0,1,2,3,4,0,1,2: counts 8,8,8,4,4 of 32 over 4 rows, smoothed by 1 over 5 codes;
    # each validation row draws 6 tokens of the first three codes and 2 of the last two.
    assert b["unigram"] == pytest.approx(-(6 * math.log(9 / 37) + 2 * math.log(5 / 37)) / 8)
    assert b["per_class_position"] == pytest.approx(b["per_position"])  # one class: the same tables
    # Vanishing smoothing: the unigram tends to the code mix's entropy, the per-position table to 0.
    b = frequency_baselines(train, np.zeros(4, int), val, np.zeros(3, int), V, smoothing=1e-9)
    p = np.array([8, 8, 8, 4, 4]) / 32
    assert b["unigram"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6) == pytest.approx(2.25 * math.log(2))
    assert b["per_position"] == pytest.approx(0, abs=1e-6)


def test_class_determines_the_code():
    """Class c fills every position with code c: the per-class table knows the code, the per-position
    table only that it is 0 or 1."""
    V, N = 4, 6
    labels = np.repeat([0, 1], 6)
    train = np.repeat(labels[:, None], N, 1)
    val_labels = np.array([0, 1, 1, 0])
    val = np.repeat(val_labels[:, None], N, 1)
    b = frequency_baselines(train, labels, val, val_labels, V, smoothing=1.0)
    assert b["per_position"] == pytest.approx(-math.log((6 + 1) / (12 + 4)))
    assert b["per_class_position"] == pytest.approx(-math.log((6 + 1) / (6 + 4)))
    assert b["unigram"] == pytest.approx(-math.log((36 + 1) / (72 + 4)))
    assert b["per_class_position"] < b["per_position"] and b["uniform"] == pytest.approx(math.log(4))
    # Smoothing costs a table in proportion to V / (tokens it saw): with 12 rows per position, the
    # per-position table scores worse than the unigram (72 tokens), though it knows more.
    assert b["unigram"] < b["per_position"]


def test_unseen_codes_and_classes_stay_finite():
    V, N, n = 4, 3, 5
    train = np.zeros((n, N), int)  # training holds code 0 only, class 0 only
    val = np.full((2, N), 3)
    b = frequency_baselines(train, np.zeros(n, int), val, np.array([0, 7]), V, smoothing=1.0)
    assert b["unigram"] == pytest.approx(-math.log(1 / (n * N + 4)))
    assert b["per_position"] == pytest.approx(-math.log(1 / (n + 4)))
    # Class 0 scores the unseen code 1/(n + 4); class 7 was never trained on: the uniform table.
    assert b["per_class_position"] == pytest.approx((-math.log(1 / (n + 4)) + math.log(4)) / 2)
    with pytest.raises(ScalingError, match="infinite"):
        frequency_baselines(train, np.zeros(n, int), val, np.array([0, 7]), V, smoothing=0)
    with pytest.raises(ScalingError, match="codebook_size"):
        frequency_baselines(train, np.zeros(n, int), val, np.array([0, 7]), 3)


def test_dense_sparse_and_chunked_counts_match_the_reference(monkeypatch):
    """Random tokens, classes of 2..60 rows: small classes take the sorted-lookup path, the large ones
    and the per-position table the dense bincount (in chunks of 4 rows here)."""
    rng = np.random.default_rng(0)
    V, N = 32, 16  # dense from N * V / 8 = 64 tokens = 4 rows
    labels = np.repeat(np.arange(5), [2, 3, 10, 60, 25])
    train = rng.integers(0, V, (len(labels), N)) ** 2 % V  # a skewed mix
    val_labels = rng.integers(0, 6, 40)  # class 5 never trained on
    val = rng.integers(0, V, (40, N)) ** 2 % V
    monkeypatch.setattr(bl, "CHUNK", 4 * N)
    for s in (1.0, 0.1):
        got = frequency_baselines(train.astype(np.uint16), labels, val.astype(np.uint16), val_labels, V, s)
        for k, v in reference(train, labels, val, val_labels, V, s).items():
            assert got[k] == pytest.approx(v, rel=1e-12), (k, s)


def test_large_vocabulary_without_dense_class_tables():
    """N=1024, V=16384, 40 classes: code (7 p + class) % V, so each per-class table has seen its code
    n_c times. A dense (classes, N, V) table would take 5 GiB; the peak stays small and it is fast."""
    V, N, C, n_c = 16384, 1024, 40, 5
    labels = np.repeat(np.arange(C), n_c)
    tokens = ((7 * np.arange(N))[None, :] + labels[:, None]) % V
    tracemalloc.start()
    try:
        b = frequency_baselines(tokens.astype(np.uint16), labels, tokens[::n_c].astype(np.uint16), labels[::n_c], V)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert b["per_class_position"] == pytest.approx(-math.log((n_c + 1) / (n_c + V)))
    assert b["per_position"] == pytest.approx(-math.log((n_c + 1) / (n_c * C + V)))  # the 40 codes of a position
    assert b["uniform"] == pytest.approx(math.log(V))


# --- sweep_baselines on the real demo shards --------------------------------------------------


@pytest.fixture(scope="module")
def shard_overrides(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("regime"))


def test_sweep_baselines_on_demo_shards(shard_overrides):
    from enat.data.loader import ShardSet

    cfg = load_config(CONFIG, shard_overrides)
    b = sweep_baselines(cfg)
    train = ShardSet(cfg.data.shards, log=lambda *_: None)
    val = ShardSet(cfg.data.val_shards, log=lambda *_: None)
    assert b["train_tokens"] == len(train) * 64 and b["val_tokens"] == len(val) * 64  # 8x8 grids
    assert b["shards"] == str(cfg.data.shards) and b["val_shards"] == str(cfg.data.val_shards)
    assert b["uniform"] == pytest.approx(math.log(128))
    # Demo shards (random-weight tokenizer, ~150 training images a class, Laplace 1 over 128 codes):
    # uniform 4.85 > unigram 4.25 > per position 3.47 > per class 3.23; the margins are wide.
    assert b["uniform"] - 0.3 > b["unigram"] > b["per_position"] + 0.3 > b["per_class_position"] + 0.1
    ref = reference(train.tokens(np.arange(len(train))), train.label, val.tokens(np.arange(len(val))), val.label,
                    128, 1.0)
    for k, v in ref.items():
        assert b[k] == pytest.approx(v, rel=1e-12), k


def test_sweep_baselines_names_a_missing_path(shard_overrides, tmp_path):
    cfg = load_config(CONFIG, shard_overrides + [f"data.val_shards={tmp_path / 'nowhere'}"])
    with pytest.raises(ScalingError, match=r"data\.val_shards = .*nowhere.* is not a directory.*enat tokenize"):
        sweep_baselines(cfg)
    cfg = load_config(CONFIG, shard_overrides + [f"data.shards={tmp_path / 'nowhere'}"])
    with pytest.raises(ScalingError, match=r"data\.shards = .*is not a directory"):
        sweep_baselines(cfg)
    (tmp_path / "empty").mkdir()  # a directory, but no manifest: the shard reader's reason, named
    cfg = load_config(CONFIG, shard_overrides + [f"data.val_shards={tmp_path / 'empty'}"])
    with pytest.raises(ScalingError, match=r"data\.val_shards: no manifest\.json"):
        sweep_baselines(cfg)


# --- regime_gate --------------------------------------------------------------------------------

BASE = {"uniform": math.log(128), "unigram": 4.2, "per_position": 3.42, "per_class_position": 3.2}


def point(run, loss, l05, l09, **extra):
    row = {"run": run, "step": 1000, "final": True, "val_loss_r0.7": loss}
    row.update({k: v for k, v in (("val_loss_r0.5", l05), ("val_loss_r0.9", l09)) if v is not None})
    return {**row, **extra}


GOOD = [point("width32", 3.30, 3.25, 3.40), point("width64", 3.10, 3.05, 3.15), point("width96", 2.90, 2.80, 3.00)]


def test_gate_passes_runs_that_beat_the_tables_and_use_context():
    gate = regime_gate(GOOD, BASE, "val/loss_r0.7")  # "/" or "_": the collected column either way
    assert gate["passed"] and gate["reasons"] == [] and gate["margin"] == 0.02 and gate["baselines"] is BASE
    assert gate["per_run"][1] == {"run": "width64", "loss": 3.10, "beats_per_position": True, "l05": 3.05,
                                  "l09": 3.15, "uses_context": True}  # 3.05 < 0.98 x 3.15 = 3.087
    md = gate_markdown(gate)
    assert md[0] == "## Regime gate"
    assert "| per position | 3.420 |" in md and "| per class (and position) | 3.200 |" in md
    assert "| width64 | 3.100 | yes | 3.050 | 3.150 | yes |" in md
    assert any(line.startswith("Passed: all 3 runs") for line in md) and not any("Failed" in x for x in md)


def test_gate_trips_on_a_run_above_the_per_position_table():
    points = GOOD + [point("width16", 3.50, 3.30, 3.60), point("width8", 3.42, 3.20, 3.60)]  # equal: not below
    gate = regime_gate(points, BASE, "val_loss_r0.7")
    assert not gate["passed"] and len(gate["reasons"]) == 1
    reason = gate["reasons"][0]
    assert reason.startswith("2 of 5 runs do not beat the per-position frequency table (3.420 nats): "
                             "width16 3.500, width8 3.420 — ")
    assert "train longer" in reason and "width32" not in reason
    assert [r["beats_per_position"] for r in gate["per_run"]] == [True, True, True, False, False]
    md = gate_markdown(gate)
    assert "Failed: the report states no law." in md and f"- {reason}" in md
    assert "| width16 | 3.500 | **no** | 3.300 | 3.600 | yes |" in md


def test_gate_trips_on_a_run_that_ignores_context():
    points = GOOD + [point("flat", 3.10, 3.10, 3.15)]  # 3.10 is not below 0.98 x 3.15 = 3.087
    gate = regime_gate(points, BASE, "val_loss_r0.7")
    assert not gate["passed"] and len(gate["reasons"]) == 1
    assert gate["reasons"][0].startswith("1 of 4 runs do not use context: their loss at mask ratio 0.5 is not more "
                                         "than 2% below that at 0.9 (flat 3.100 vs 3.150)")
    assert [r["uses_context"] for r in gate["per_run"]] == [True, True, True, False]
    assert regime_gate(points, BASE, "val_loss_r0.7", margin=0.01)["passed"]  # 3.10 < 0.99 x 3.15


def test_gate_names_missing_keys():
    points = GOOD + [point("nine", 3.0, 2.9, None), point("noloss", None, 2.9, 3.1)]
    gate = regime_gate(points, BASE, "val_loss_r0.7")
    assert not gate["passed"]
    no_loss, missing = gate["reasons"]
    assert no_loss.startswith("1 of 5 runs have no finite val_loss_r0.7") and "noloss (missing)" in no_loss
    assert "nine (no val_loss_r0.9)" in missing and "train.val_mask_ratios must include 0.5 and 0.9" in missing
    nine = gate["per_run"][3]
    assert nine["l09"] is None and nine["uses_context"] is False and nine["beats_per_position"] is True
    assert "| nine | 3.000 | yes | 2.900 | missing | **no** |" in gate_markdown(gate)


def test_gate_uses_each_runs_final_point_and_needs_runs():
    early = point("width32", 5.0, 5.0, 5.0, step=200, final=False)  # an early point of a run: ignored
    gate = regime_gate([early] + GOOD, BASE, "val_loss_r0.7")
    assert gate["passed"] and [r["run"] for r in gate["per_run"]] == ["width32", "width64", "width96"]
    gate = regime_gate([], BASE, "val_loss_r0.7")
    assert not gate["passed"] and "no runs" in gate["reasons"][0]
    with pytest.raises(ScalingError, match="per_position"):
        regime_gate(GOOD, {"uniform": 1.0}, "val_loss_r0.7")
