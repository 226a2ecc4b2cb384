"""The writer lease (enat/train/lease.py) with real processes on this host: a live holder refuses a
second writer, a killed or reused pid is taken over at once, other hosts by heartbeat age, a SLURM
requeue at once, squeue verdicts, --takeover stopping the old holder, and six processes racing for
a fresh or a stale lease ending with exactly one holder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from enat.train import lease as lease_mod
from enat.train.lease import (LEASE_FILE, Lease, LeaseError, _parse_proc_stat, describe_holder, pid_namespace,
                              pid_start, read_lease, stale_reason)

REAL_SQUEUE_STATE = lease_mod.squeue_state
HOST = socket.gethostname()

# A process that takes the lease on argv[2], prints "held" and holds it until its stdin closes
# (exit 0, released), or exits 3 as soon as the lease is lost, or 2 on LeaseError. argv[5] is a
# wall-clock time to wait for, so racing processes start together.
HELPER = r"""
import select, sys, time
sys.path.insert(0, sys.argv[1])
from enat.train.lease import Lease, LeaseError

run_dir, heartbeat_s, takeover, start_at = sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", float(sys.argv[5])
lease = Lease(run_dir, heartbeat_s=heartbeat_s, log=lambda m: print(m, file=sys.stderr, flush=True))
time.sleep(max(0.0, start_at - time.time()))
try:
    lease.acquire(takeover=takeover)
except LeaseError as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(2)
print("held", flush=True)
while not select.select([sys.stdin], [], [], 0.02)[0]:
    if lease.lost:
        print("lost:", lease.lost, flush=True)
        sys.exit(3)
lease.release()
"""


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def spawn(run_dir, heartbeat_s=30.0, takeover=False, start_at=0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HELPER, str(ROOT), str(run_dir), str(heartbeat_s), "1" if takeover else "0",
         str(start_at)],
        cwd=ROOT, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_held(proc) -> None:
    line = proc.stdout.readline()
    assert line == "held\n", f"helper did not take the lease: {line!r} {proc.stderr.read()}"


def finish(proc, timeout=10) -> int:
    """Close a holder's stdin (it releases and exits 0) and return its exit code."""
    proc.stdin.close()
    return proc.wait(timeout=timeout)


def write_record(run_dir, age_s=0.0, **fields) -> dict:
    """A lease.json as another writer would leave it (by default: another host, fresh)."""
    rec = {"host": "elsewhere", "pid": 4242, "pid_start": None, "slurm_job_id": None,
           "slurm_array_job_id": None, "slurm_array_task_id": None, "slurm_restart_count": 0,
           "slurm_cluster": None, "pid_namespace": pid_namespace(), "started": time.time() - age_s,
           "heartbeat_s": 0.05,
           "token": "theirs", "argv": ["train"]}
    rec.update(fields)
    path = run_dir / LEASE_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "record.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return rec


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """No SLURM here: the test's own environment carries no job, and squeue gives no verdict."""
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(lease_mod, "squeue_state", lambda job_id: None)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def logs():
    return []


def me(**fields) -> dict:
    rec = {"host": HOST, "slurm_job_id": None, "slurm_array_task_id": None, "slurm_restart_count": 0,
           "slurm_cluster": None, "pid_namespace": pid_namespace()}
    rec.update(fields)
    return rec


# ---------------------------------------------------------------------------------------------


def test_parse_proc_stat_counts_fields_from_the_last_paren():
    rest = " ".join(str(i) for i in range(4, 30))  # fields 4.. after the state
    state, start = _parse_proc_stat(f"4242 (we) ird (name)) R {rest}\n")
    assert (state, start) == ("R", 22)
    assert pid_start(os.getpid()) is not None


def test_describe_holder():
    t = time.mktime((2026, 11, 29, 14, 3, 11, 0, 0, -1))
    info = {"host": "n12", "pid": 4242, "slurm_job_id": "1240", "slurm_array_job_id": "1234",
            "slurm_array_task_id": "7", "slurm_restart_count": 1, "started": t, "heartbeat_age_s": 12.3}
    assert describe_holder(info) == ("host n12 pid 4242 (SLURM job 1234_7, restart 1), "
                                     "started 2026-11-29 14:03:11, heartbeat 12 s ago")
    assert describe_holder({"host": "n1", "pid": 5, "started": t}) == "host n1 pid 5, started 2026-11-29 14:03:11"


def test_live_holder_refuses_a_second_writer(run_dir):
    holder = spawn(run_dir)
    try:
        wait_held(holder)
        t0 = time.time()
        with pytest.raises(LeaseError) as err:
            Lease(run_dir).acquire()
        assert time.time() - t0 < 5
        msg = str(err.value)
        assert str(run_dir) in msg and f"pid {holder.pid}" in msg and f"host {HOST}" in msg
        assert "--takeover" in msg and "600 s" in msg
        # a real second process fails too, and leaves the holder's lease alone
        second = spawn(run_dir)
        out, errout = second.communicate(timeout=10)
        assert second.returncode == 2, (out, errout)
        assert "in use by another training run" in errout
        assert read_lease(run_dir)["pid"] == holder.pid
    finally:
        assert finish(holder) == 0
    assert not (run_dir / LEASE_FILE).exists()  # released on the way out


def test_killed_holder_is_taken_over_at_once(run_dir, logs):
    holder = spawn(run_dir)
    wait_held(holder)
    old = read_lease(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = Lease(run_dir, log=logs.append)
    t0 = time.time()
    lease.acquire()
    assert time.time() - t0 < 2
    info = read_lease(run_dir)
    assert info["pid"] == os.getpid() and info["token"] == lease.token != old["token"]
    assert any(f"pid {holder.pid} is not running" in m for m in logs), logs
    lease.release()


def test_reused_pid_is_stale(run_dir, logs):
    # a record naming this very process: alive, so the start time decides
    mine = pid_start(os.getpid())
    rec = write_record(run_dir, host=HOST, pid=os.getpid(), pid_start=mine)
    with pytest.raises(LeaseError):
        Lease(run_dir).acquire()
    rec["pid_start"] = mine - 1
    assert "now another process" in stale_reason(rec, me(), 0.0, 600)
    write_record(run_dir, host=HOST, pid=os.getpid(), pid_start=mine - 1)
    lease = Lease(run_dir, log=logs.append)
    lease.acquire()
    assert read_lease(run_dir)["token"] == lease.token
    lease.release()


def test_other_host_is_broken_by_heartbeat_age(run_dir, logs):
    write_record(run_dir)
    with pytest.raises(LeaseError, match="host elsewhere pid 4242"):
        Lease(run_dir, timeout_s=600).acquire()
    assert read_lease(run_dir)["token"] == "theirs"
    write_record(run_dir, age_s=1200)
    lease = Lease(run_dir, timeout_s=600, log=logs.append)
    t0 = time.time()
    lease.acquire()
    assert time.time() - t0 < 1  # stale, not forced: no wait
    assert read_lease(run_dir)["token"] == lease.token
    assert any("taking over the lease of host elsewhere" in m and "heartbeat 1200 s old, timeout 600 s" in m
               for m in logs), logs
    lease.release()


@pytest.mark.parametrize("restart,task,taken", [
    ("1", None, True),    # our job, requeued: the holder is our previous incarnation
    ("0", None, False),   # same job, same restart: two steps of one allocation
    ("1", "3", False),    # another array task of the same job
])
def test_slurm_requeue_retakes_at_once(run_dir, monkeypatch, logs, restart, task, taken):
    write_record(run_dir, slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    if task is not None:
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
    lease = Lease(run_dir, log=logs.append)
    if taken:
        lease.acquire()
        assert read_lease(run_dir)["token"] == lease.token
        assert any("a requeue of the same job" in m for m in logs), logs
        lease.release()
    else:
        with pytest.raises(LeaseError, match="SLURM job 77, restart 0"):
            lease.acquire()
        assert read_lease(run_dir)["token"] == "theirs"


@pytest.mark.parametrize("answer,stale", [
    ((0, "", ""), True),                # gone from the queue
    ((0, "PENDING\n", ""), True),       # requeued: its processes are gone
    ((0, "COMPLETED\n", ""), True),
    ((0, "RUNNING\n", ""), False),
    ((0, "SUSPENDED\n", ""), False),    # resumes later and would write
    ((1, "", "slurm_load_jobs error: Invalid job id specified\n"), True),
    ((1, "", "slurm_load_jobs error: Unable to contact slurm controller\n"), False),
    (None, False),                      # no squeue, or it hung
])
def test_squeue_verdict(monkeypatch, answer, stale):
    asked = []
    monkeypatch.setattr(lease_mod, "squeue_state", lambda job_id: asked.append(job_id) or answer)
    info = {"host": "elsewhere", "pid": 4242, "slurm_job_id": "1240", "slurm_array_job_id": "1234",
            "slurm_array_task_id": "7", "slurm_restart_count": 0}
    reason = stale_reason(info, me(), 1.0, 600)
    assert asked == ["1234_7"]
    assert (reason is not None) == stale, reason
    # a holder on another cluster (or a taker outside any cluster): our squeue cannot speak for it
    for theirs, mine in (("a", "b"), ("a", None)):
        asked.clear()
        assert stale_reason({**info, "slurm_cluster": theirs}, me(slurm_cluster=mine), 1.0, 600) is None
        assert asked == []
    # SLURM says it may still run: not stale however old the heartbeat; gone: stale at once
    old = stale_reason(info, me(), 10_000.0, 600)
    live = answer is not None and answer[0] == 0 and answer[1].strip() in ("RUNNING", "SUSPENDED")
    assert (old is None) == live, old


def test_same_hostname_in_another_pid_namespace_is_not_judged_by_pid():
    dead = {"host": HOST, "pid": 2 ** 22 + 17, "pid_start": None, "pid_namespace": "other-boot/pid:[1]",
            "slurm_job_id": None, "heartbeat_s": 30.0}
    assert stale_reason(dead, me(), 1.0, 600) is None  # its pid means nothing here
    assert "pid" in stale_reason({**dead, "pid_namespace": pid_namespace()}, me(), 1.0, 600)
    # the holder's own (slower) heartbeat stretches the timeout
    assert stale_reason(dead, me(), 650.0, 600) is not None
    assert stale_reason({**dead, "heartbeat_s": 300.0}, me(), 650.0, 600) is None


def test_squeue_verdict_breaks_the_lease(run_dir, monkeypatch, logs):
    write_record(run_dir, slurm_job_id="555")
    monkeypatch.setattr(lease_mod, "squeue_state", lambda job_id: (0, "", ""))
    lease = Lease(run_dir, log=logs.append)
    lease.acquire()
    assert read_lease(run_dir)["token"] == lease.token
    assert any("SLURM job 555 is no longer in the queue" in m for m in logs), logs
    lease.release()


def test_squeue_probe(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho RUNNING\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert REAL_SQUEUE_STATE("1234_7") == (0, "RUNNING\n", "")
    assert (tmp_path / "args").read_text().split() == ["-h", "-j", "1234_7", "-o", "%T"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert REAL_SQUEUE_STATE("1234_7") is None


def test_takeover_stops_the_live_holder(run_dir, logs):
    holder = spawn(run_dir, heartbeat_s=0.2)
    try:
        wait_held(holder)
        lease = Lease(run_dir, heartbeat_s=0.2, log=logs.append)
        t0 = time.time()
        lease.acquire(takeover=True)
        assert time.time() - t0 >= 0.4  # waited two of the holder's heartbeats
        assert read_lease(run_dir)["token"] == lease.token
        assert holder.wait(timeout=5) == 3  # the old holder noticed and stopped
        out = holder.stdout.read()
        assert f"lost: taken over by host {HOST} pid {os.getpid()}" in out, out
        assert any("--takeover" in m for m in logs) and any("waiting 0.4 s" in m for m in logs), logs
        assert lease.check() is None and lease.lost is None
        lease.release()
        assert not (run_dir / LEASE_FILE).exists()
    finally:
        holder.kill()
        holder.wait()


def race(run_dir, n=6) -> None:
    """n processes take the lease at the same instant: exactly one holds it, the others fail."""
    start_at = time.time() + 1.0
    procs = [spawn(run_dir, start_at=start_at) for _ in range(n)]
    try:
        # the losers exit at once; a second holder would keep running (and time this out)
        deadline = time.time() + 20
        while sum(p.poll() is not None for p in procs) < n - 1 and time.time() < deadline:
            time.sleep(0.05)
        running = [p for p in procs if p.poll() is None]
        done = [p for p in procs if p.poll() is not None]
        assert len(running) == 1 and [p.returncode for p in done] == [2] * (n - 1), \
            [(p.returncode, p.stdout.read(), p.stderr.read()) for p in done]
        winner = running[0]
        wait_held(winner)
        assert read_lease(run_dir)["pid"] == winner.pid
        for p in procs:
            if p is not winner:
                assert f"pid {winner.pid}" in p.stderr.read()  # each loser names the winner
        assert finish(winner) == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert list(run_dir.iterdir()) == []  # no temp, guard or broken files left behind


def test_race_for_a_fresh_dir(run_dir):
    race(run_dir)


def test_race_for_a_stale_lease(run_dir):
    write_record(run_dir, host=HOST, pid=dead_pid(), token="dead")
    race(run_dir)


def test_heartbeat_touches_the_file(run_dir):
    lease = Lease(run_dir, heartbeat_s=0.1)
    lease.acquire()
    path = run_dir / LEASE_FILE
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.time() + 3
    while read_lease(run_dir)["heartbeat_age_s"] > 50 and time.time() < deadline:
        time.sleep(0.02)
    assert read_lease(run_dir)["heartbeat_age_s"] < 1
    assert lease.lost is None and lease.check() is None
    lease.release()
    assert not path.exists()
    lease.release()  # idempotent


def test_takeover_seen_by_heartbeat_and_release_keeps_the_new_lease(run_dir, logs):
    lease = Lease(run_dir, heartbeat_s=0.05, log=logs.append)
    lease.acquire()
    write_record(run_dir, token="newer")  # someone took it over
    deadline = time.time() + 3
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lease.lost.startswith("taken over by host elsewhere pid 4242")
    assert lease.check() == lease.lost
    lease.release()
    assert read_lease(run_dir)["token"] == "newer"  # not ours: left alone


def test_check_sees_a_removed_lease(run_dir, logs):
    lease = Lease(run_dir, heartbeat_s=30, log=logs.append)
    lease.acquire()
    (run_dir / LEASE_FILE).unlink()
    assert lease.check() == "lease file removed" == lease.lost
    lease.release()
    assert not (run_dir / LEASE_FILE).exists()  # the heartbeat never recreates it


def test_heartbeat_rides_out_transient_errors(run_dir, monkeypatch, logs):
    lease = Lease(run_dir, heartbeat_s=0.05, log=logs.append)
    lease.acquire()
    real = lease._verify
    calls = []

    def flaky(touch):
        calls.append(touch)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(lease, "_verify", flaky)
    deadline = time.time() + 3
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert len(calls) >= 3 and lease.lost is None and lease.check() is None
    monkeypatch.setattr(lease, "_verify", real)
    (run_dir / LEASE_FILE).unlink()
    deadline = time.time() + 3
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lease.lost == "lease file removed"  # the thread kept beating
    lease.release()


def test_context_manager(run_dir):
    with Lease(run_dir) as lease:
        assert read_lease(run_dir)["token"] == lease.token
        with pytest.raises(LeaseError):  # this process already writes here
            Lease(run_dir).acquire()
    assert not (run_dir / LEASE_FILE).exists()


def test_unreadable_lease_is_broken_only_by_age(run_dir, logs):
    run_dir.mkdir()
    path = run_dir / LEASE_FILE
    path.write_text("{not json")
    with pytest.raises(LeaseError, match="unreadable lease record"):
        Lease(run_dir).acquire()
    os.utime(path, (time.time() - 1200, time.time() - 1200))
    lease = Lease(run_dir, timeout_s=600, log=logs.append)
    lease.acquire()
    assert read_lease(run_dir)["token"] == lease.token
    lease.release()


def test_a_late_taker_leaves_the_newer_lease_alone(run_dir, monkeypatch):
    """Removing a lease goes through the guard .lease.break.<token> and re-reads under it: a taker
    that judged the stale lease "dead" finds the fresh one instead, and waits while another taker
    holds the guard (unless that guard was left long ago by a taker that died)."""
    write_record(run_dir, token="fresh")
    late = Lease(run_dir)
    late.record = late._new_record()
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a: renamed.append(a) or real_rename(*a))
    assert late._remove("dead") is False
    assert read_lease(run_dir)["token"] == "fresh" and renamed == []  # not even moved for a moment
    guard = run_dir / ".lease.break.fresh"
    guard.write_text("{}")
    assert late._remove("fresh") is None and read_lease(run_dir)["token"] == "fresh"
    os.utime(guard, (time.time() - 120, time.time() - 120))
    assert late._remove("fresh") is None and not guard.exists()  # the dead taker's guard is cleared
    assert late._remove("fresh") is True
    assert list(run_dir.iterdir()) == []


def test_removal_puts_back_a_lease_it_did_not_judge(run_dir, monkeypatch):
    """The second line of defence: should the re-read under the guard ever be outdated, the renamed
    file's token is checked and a newer lease goes back under its name."""
    write_record(run_dir, token="fresh")
    late = Lease(run_dir)
    late.record = late._new_record()
    monkeypatch.setattr(lease_mod, "read_lease", lambda d: {"token": "dead", "heartbeat_age_s": 9e9})
    assert late._remove("dead") is False
    assert read_lease(run_dir)["token"] == "fresh"
    assert [f.name for f in run_dir.iterdir()] == [LEASE_FILE]
