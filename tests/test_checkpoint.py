"""Checkpoint verification, fallback, retention and tidying on hand-made tag folders (the real
DeepSpeed saves, SIGKILLs and corruptions are in test_run_integrity.py)."""

import json

import pytest

from enat.train.checkpoint import (DAMAGED, LATEST, META, Checkpointer, CheckpointError, complete_tags,
                                   file_checksum, find_resume_tag, latest_pointer, tag_dirs, tag_for, verify_tag,
                                   write_atomic)
from enat.train.metrics import MetricsWriter


def make_tag(ckpt, step, manifest=True, latest=False):
    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    for name, size in (("mp_rank_00_model_states.pt", 3000), ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 5000)):
        (d / name).write_bytes(bytes((step * 7 + i) % 251 for i in range(size)))
    if manifest:
        files = {p.name: file_checksum(p) for p in d.iterdir()}
        (d / META).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 2, "files": files}))
    if latest:
        write_atomic(ckpt / LATEST, tag_for(step))
    return d


def flip(path, at=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    path.write_bytes(bytes(data))


def test_verify_names_each_kind_of_damage(tmp_path):
    d = make_tag(tmp_path, 2)
    ok = verify_tag(tmp_path, "step00000002")
    assert ok.state == "ok" and ok.files == 2 and ok.size == 8000 and ok.usable
    model, optim = d / "mp_rank_00_model_states.pt", d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip(optim)
    st = verify_tag(tmp_path, "step00000002")
    assert st.state == "damaged" and not st.usable and len(st.problems) == 1
    assert str(optim) in st.problems[0] and "contents changed" in st.problems[0]
    assert verify_tag(tmp_path, "step00000002", checksums=False).state == "unchecked"  # sizes only
    model.write_bytes(model.read_bytes()[:100])
    st = verify_tag(tmp_path, "step00000002", checksums=False)
    assert st.state == "damaged" and "100 bytes, 3000 written (short)" in st.problems[0]
    model.unlink()
    assert "missing" in verify_tag(tmp_path, "step00000002").problems[0]
    make_tag(tmp_path, 4, manifest=False)
    assert verify_tag(tmp_path, "step00000004").state == "partial"
    legacy = make_tag(tmp_path, 6)
    (legacy / META).write_text(json.dumps({"step": 6, "world_size": 2}))  # before manifests existed
    assert verify_tag(tmp_path, "step00000006").state == "unverified" and verify_tag(tmp_path, "step00000006").usable


def test_resume_falls_back_past_damage_and_never_restarts_silently(tmp_path):
    logs = []
    assert find_resume_tag(tmp_path / "none", log=logs.append) == (None, [])
    for s in (2, 4):
        make_tag(tmp_path, s)
    make_tag(tmp_path, 6, latest=True)
    make_tag(tmp_path, 8)  # complete but never committed (killed before `latest` moved)
    make_tag(tmp_path, 10, manifest=False)  # an interrupted save
    assert find_resume_tag(tmp_path, log=logs.append) == ("step00000006", [])
    flip(tmp_path / "step00000006" / "mp_rank_00_model_states.pt")
    (tmp_path / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    tag, passed = find_resume_tag(tmp_path, log=logs.append)
    assert tag == "step00000002" and [p.tag for p in passed] == ["step00000006", "step00000004"]
    assert "step00000006/mp_rank_00_model_states.pt" in logs[-1] and "resuming from step00000002" in logs[-1]
    write_atomic(tmp_path / LATEST, "step00000012")  # names a missing tag: fall back too
    assert find_resume_tag(tmp_path, log=logs.append)[0] == "step00000008"
    write_atomic(tmp_path / LATEST, "step00000006")
    flip(tmp_path / "step00000002" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        find_resume_tag(tmp_path, log=logs.append)
    assert "step00000002/mp_rank_00_model_states.pt" in str(e.value)


def test_retention_counts_complete_checkpoints_only(tmp_path):
    ck = Checkpointer(tmp_path, 0, keep_last=2, keep_every=4)
    for s in (2, 4, 6):
        make_tag(ck.dir, s)
    make_tag(ck.dir, 8, latest=True)
    make_tag(ck.dir, 10, manifest=False)  # partial: not a checkpoint, not counted, not deleted here
    ck.prune()
    assert tag_dirs(ck.dir) == ["step00000004", "step00000006", "step00000008", "step00000010"]
    ck.keep_last, ck.keep_every = 0, 0
    write_atomic(ck.dir / LATEST, "step00000006")
    ck.prune()  # the newest complete checkpoint and the one `latest` names always stay
    assert complete_tags(ck.dir) == ["step00000006", "step00000008"]


def test_tidy_sets_damage_aside_and_removes_partial_and_uncommitted(tmp_path):
    logs = []
    ck = Checkpointer(tmp_path, 0, log=logs.append)
    make_tag(ck.dir, 2)
    make_tag(ck.dir, 4, latest=True)
    make_tag(ck.dir, 6)
    make_tag(ck.dir, 8, manifest=False)
    flip(ck.dir / "step00000004" / "mp_rank_00_model_states.pt")
    tag, passed = find_resume_tag(ck.dir, log=logs.append)
    ck.tidy(tag, passed)
    # step 6 was never committed (newer than latest): left as it is; the partial step 8 is gone
    assert tag_dirs(ck.dir) == ["step00000002", "step00000006"] and latest_pointer(ck.dir) == "step00000002"
    aside = list((ck.dir / DAMAGED).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step00000004-")
    assert any("interrupted save" in m for m in logs) and any("never committed" in m for m in logs)


def test_metrics_drop_a_torn_last_line(tmp_path):
    w = MetricsWriter(tmp_path, True)
    for step in (1, 2, 3):
        w.log({"kind": "train", "step": step, "loss": 1.0})
    with open(w.path, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # killed mid-write
    assert w.truncate_after(2) == 2
    assert [json.loads(line)["step"] for line in w.path.read_text().splitlines()] == [1, 2]
