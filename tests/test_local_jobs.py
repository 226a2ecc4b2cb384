"""Training jobs as local processes (`--cluster local`, what `auto` falls back to without SLURM),
under launch/local.py's controller: the same preemption guarantees as on SLURM, real processes
(2 ranks, gloo, the tiny demo model).

- `kill -USR2 JOBID` (JOBID: the controller's pid): every rank stops after the same step, that
  checkpoint is written, the job requeues and continues it;
- `kill -TERM JOBID`: every rank stops after the same step with that checkpoint, and the job ends;
- `kill -KILL JOBID`: no task outlives the controller (they checkpoint and end);
- resubmitting continues each time, bit for bit against an uninterrupted run;
- a job refused by a held lease logs the CLI's `error: ...` line, not a traceback;
- no library noise in the logs (DeepSpeed's accelerator note, torch's all_gather FutureWarning)
  or in `enat export`'s output."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, demo_shards, train_losses, wait_for

pytestmark = pytest.mark.slow
CONFIG = ROOT / "configs/experiments/demo.yaml"
STEPS = 100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("local_jobs")
    return d, demo_shards(d / "data")


def overrides(data, name: str, **kw) -> list[str]:
    d, over = data
    o = {"train.run_dir": str(d / name), "train.steps": STEPS, "train.log_every": 1, "train.val_every": 0,
         "train.sample_every": 0, "train.ckpt_every": 0, "train.wandb.mode": "disabled", "launch.cluster": "local",
         "launch.time_min": 10}
    o.update(kw)
    return over + [f"{k}={v}" for k, v in o.items()]


def submit(data, name: str, **kw):
    from enat.config import load_config
    from launch.train import submit_train

    return submit_train(load_config(CONFIG, overrides(data, name, **kw)))




def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or a line being written


def logs(job) -> list[str]:
    """Every rank's stdout log of a job (both starts, after a requeue)."""
    paths = [Path(job.paths.stdout).with_name(f"{job.job_id}_{r}_log.out") for r in (0, 1)]
    return [p.read_text() if p.is_file() else "" for p in paths]


def stopped_at(job, why: str) -> list[int]:
    """The steps every rank says it stopped at (one entry per rank and stop)."""
    return [int(m) for log in logs(job) for m in re.findall(rf"rank \d: stopped at step (\d+) \({why}\)", log)]


def latest(run: Path) -> int:
    return int((run / "checkpoints/latest").read_text().strip().removeprefix("step"))


def resumed_at(log: str, step: int) -> bool:
    return re.search(rf"resumed from \S*step{step:08d} at step {step}\b", log) is not None


def task_pids(job_id: str) -> list[int]:
    """The processes that submitit's controller `job_id` started (its tasks carry its id)."""
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in env:
            pids.append(int(p.name))
    return pids


@pytest.fixture(scope="module")
def reference(data):
    """An uninterrupted run of the same job."""
    job = submit(data, "ref")
    job.results()
    return data[0] / "ref", job


def test_local_job_preemption_termination_and_controller_death(data, reference):
    run = data[0] / "run"

    # 1. USR2 to the job: both ranks stop at one step, checkpoint it, the job requeues itself
    job = submit(data, "run")
    wait_for(lambda: last_step(run) >= 5, 120, "step 5")
    os.kill(int(job.job_id), signal.SIGUSR2)
    wait_for(lambda: "resumed from" in logs(job)[0], 120, "the requeued start")
    k1 = stopped_at(job, "SIGUSR2")
    assert len(k1) == 2 and k1[0] == k1[1] and 5 <= k1[0] < STEPS, logs(job)
    assert resumed_at(logs(job)[0], k1[0]), logs(job)[0][-3000:]
    assert "(restart 1)" in logs(job)[1]  # rank 1 was ended with the requeue and restarted, not left waiting

    # 2. TERM to the (requeued) job: both ranks stop at one step with its checkpoint, and the job ends
    wait_for(lambda: last_step(run) >= k1[0] + 5, 120, "steps after the requeue")
    os.kill(int(job.job_id), signal.SIGTERM)
    result = job.results()[0]
    k2 = stopped_at(job, "SIGTERM")
    assert len(k2) == 2 and k2[0] == k2[1] and k1[0] < k2[0] < STEPS, logs(job)
    assert result["interrupted"] and result["step"] == k2[0] == latest(run)
    assert "(restart 2)" not in logs(job)[0]
    assert task_pids(job.job_id) == []

    # 3. The controller killed: its tasks end too (with a checkpoint), none survives it
    job = submit(data, "run")
    wait_for(lambda: resumed_at(logs(job)[0], k2[0]) and last_step(run) >= k2[0] + 5, 120, "the resumed run")
    tasks = task_pids(job.job_id)
    assert len(tasks) == 2
    os.kill(int(job.job_id), signal.SIGKILL)
    job._process.wait()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in tasks), 60,
             "the tasks to end after their controller")
    k3 = stopped_at(job, "SIGTERM")
    assert len(k3) == 2 and k3[0] == k3[1] and k2[0] < k3[0] < STEPS, logs(job)
    assert latest(run) == k3[0]

    # 4. Submitted again: it finishes, every step once, bit for bit against the uninterrupted run
    job = submit(data, "run")
    assert job.results()[0]["step"] == STEPS
    assert resumed_at(logs(job)[0], k3[0])
    ref = train_losses(reference[0])
    got = train_losses(run)
    assert list(got) == list(range(1, STEPS + 1)) and got == ref


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_no_library_noise_in_job_logs_or_export(data, reference):
    run, job = reference
    for r in (0, 1):
        for path in (Path(job.paths.stdout).with_name(f"{job.job_id}_{r}_log.{ext}") for ext in ("out", "err")):
            text = path.read_text()
            assert "all_gather_into_tensor" not in text and "FutureWarning" not in text, path
            assert "Setting accelerator" not in text, path
    out = data[0] / "exported.pt"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    res = subprocess.run([sys.executable, "-m", "enat.cli", "export", str(run), str(out)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # stdout: what the command says, two lines; DeepSpeed's accelerator note and zero_to_fp32's
    # progress (online weights of a ZeRO-2 checkpoint) are not on it, and its bar nowhere
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("verified ") and lines[1].startswith(f"wrote {out}"), res.stdout
    assert "Loading checkpoint shards" not in res.stderr


def test_refused_job_logs_the_named_error_not_a_traceback(data):
    """A launched job refused by a held lease: the `error: ...` line the command prints, in both
    ranks' logs, no traceback; the launcher exits non-zero naming the job; nothing written."""
    from enat.train.lease import Lease

    d, _ = data
    run = d / "held"
    lease = Lease(run, log=lambda *_: None)
    lease.acquire()
    try:
        res = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(CONFIG), "--wait",
                              *overrides(data, "held")], capture_output=True, text=True, timeout=300)
    finally:
        lease.release()
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is in use by another training run" in res.stderr
    job_dir = next(p for p in (run / "slurm").iterdir() if p.name.isdigit())  # not submitit's "%j"
    for r in (0, 1):
        err = (job_dir / f"{job_dir.name}_{r}_log.err").read_text()
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert "Traceback" not in err and "LeaseError" not in err, err
    assert "in use by another training run" in (job_dir / f"{job_dir.name}_0_log.err").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["slurm", "submissions"]
