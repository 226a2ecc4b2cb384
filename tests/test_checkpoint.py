"""Checkpoint verification, fallback, retention and tidying on hand-made tag folders (the real
DeepSpeed saves, SIGKILLs and corruptions are in test_run_integrity.py); and, with real DeepSpeed
on CPU (gloo), `enat ckpt universal RUN` by hand followed by a resume on another world size."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, demo_shards, train_losses

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


# --- `enat ckpt universal` by hand, then a resume on another world size ---------------------------

DEMO = ROOT / "configs/experiments/demo.yaml"


# What an in-process training or eval earlier in the session leaves in os.environ (enat.dist.setup_env
# sets them for a bare process, and that process may still hold the store on MASTER_PORT).
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")


def proc_env() -> dict:
    """The environment of the processes a test starts: no inherited rank/rendezvous variables, CPU
    DeepSpeed, one thread, and this checkout's `enat` first on the path (a scratch copy's wins over
    the installed one), then tests/."""
    path = [str(ROOT), str(ROOT / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(path)}


def overrides(data, run_dir, **kw) -> list[str]:
    """A short demo run as tests/test_train.py runs it (fp32, ZeRO-2, no dropout: dropout masks
    depend on the rank layout), checkpoints every 4 steps."""
    over = {"train.precision": "fp32", "train.log_every": 1, "train.val_every": 0, "train.sample_every": 0,
            "train.ckpt_every": 4, "train.wandb.mode": "disabled", "train.micro_batch": 16, "train.steps": 8,
            "train.warmup_steps": 2, "train.ema_decay": 0.9, "data.num_workers": 0, "train.run_dir": str(run_dir),
            "train.zero_stage": 2, "model.dropout": 0.0, **kw}
    return data + [f"{k}={v}" for k, v in over.items()]


def launch_two_ranks(tmp_path, jobs) -> dict:
    """tests/dist_harness.py under torch.distributed.run with 2 ranks -> its per-job results."""
    from enat.dist import free_port

    jobs_path, out = tmp_path / "jobs.json", tmp_path / "out.json"
    jobs_path.write_text(json.dumps([{"config": str(DEMO), **j} for j in jobs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests/dist_harness.py"), str(jobs_path), str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, env=proc_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and out.is_file(), res.stderr[-5000:]
    results = json.loads(out.read_text())
    for j in jobs:
        assert "error" not in results[j["name"]], results[j["name"]].get("traceback")
    return results


def enat_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "enat.cli", *map(str, args)], cwd=tmp_path, env=proc_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.mark.slow
def test_universal_by_hand_then_resume_on_one_rank(tmp_path):
    """README / SLURM.md: resuming on another number of ranks goes through DeepSpeed's universal
    checkpoint; `enat ckpt universal RUN` converts by hand. A 2-rank ZeRO-2 run stops at step 4
    (checkpointed), is converted by hand, then `enat train` on 1 rank (same global batch) resumes
    from the hand-made {tag}_universal (not converting again) and its losses continue those of a
    straight 2-rank run (the tolerance of the automatic case in tests/test_train.py)."""
    data = demo_shards(tmp_path / "data")
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    r = launch_two_ranks(tmp_path, [{"name": "straight", "overrides": overrides(data, straight)},
                                    {"name": "cut", "stop_at": 4, "overrides": overrides(data, cut)}])
    assert r["cut"]["step"] == 4 and r["straight"]["step"] == 8
    ckpt = cut / "checkpoints"
    universal = ckpt / "step00000004_universal"
    assert (ckpt / "step00000004").is_dir() and not universal.exists()

    out = enat_cli(tmp_path, "ckpt", "universal", cut)
    assert f"wrote {universal}" in out.stdout
    assert universal.is_dir() and (universal / "done").is_file()
    assert any(p.is_file() and p.stat().st_size > 0 for p in universal.rglob("*.pt"))  # DeepSpeed's files
    made = (universal / "done").stat().st_mtime_ns

    # One rank, the same global batch (micro-batch 32 = 2 x 16).
    res = enat_cli(tmp_path, "train", "--config", DEMO, *overrides(data, cut, **{"train.micro_batch": 32}))
    log = res.stdout + res.stderr
    assert f"resumed from {universal} at step 4" in log, log[-3000:]
    assert "converting" not in log and (universal / "done").stat().st_mtime_ns == made  # the hand-made one
    two, one = train_losses(straight), train_losses(cut)
    assert sorted(one) == list(range(1, 9))
    assert all(one[s] == two[s] for s in range(1, 5))  # the 2-rank part: bit for bit
    for step in range(5, 9):
        assert one[step] == pytest.approx(two[step], rel=1e-5), step
