"""Whether a train job that checkpointed on a signal requeues (launch/jobs.py): a cancel is not
undone, a time limit or a preemption is requeued, and a job out of requeues ends FAILED (exit 2)
so that `afterok` jobs do not start. The real SLURM cases: tests/test_slurm.py."""

from types import SimpleNamespace

import pytest

import launch.jobs as jobs


@pytest.mark.parametrize("sacct, squeue, cancelled", [
    ("CANCELLED by 0", "", True),  # accounting knows at once
    ("CANCELLED+", "COMPLETING|None", True),
    ("TIMEOUT", "COMPLETING|None", False),  # the time limit
    ("PREEMPTED", "", False),
    ("RUNNING", "COMPLETING|None", True),  # accounting lagging: slurmctld says the job is ending, no reason
    ("RUNNING", "RUNNING|None", False),  # `scancel --signal=TERM`: the job goes on
    ("", "COMPLETING|TimeLimit", False),  # no accounting
    ("", "COMPLETING|Preemption", False),
    ("", "", False),  # no verdict: requeue, as submitit would
])
def test_a_cancel_is_told_from_a_time_limit_or_a_preemption(monkeypatch, sacct, squeue, cancelled):
    monkeypatch.setattr(jobs, "_ask", lambda cmd: sacct if cmd[0] == "sacct" else squeue)
    assert bool(jobs._cancelled("42")) == cancelled


def test_requeues_used_up_end_the_job_named_and_failed(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setattr(jobs, "_ask", lambda cmd: "TIMEOUT" if cmd[0] == "sacct" else "")
    cfg = lambda n: SimpleNamespace(launch=SimpleNamespace(max_requeues=n))  # noqa: E731
    env = SimpleNamespace(job_id="42")
    assert jobs._why_not_requeue(cfg(3), env, terminated=True, restarts=1) is None
    assert "requeueing off" in jobs._why_not_requeue(cfg(0), env, terminated=False, restarts=0)
    assert "3 times" in jobs._why_not_requeue(cfg(2), env, terminated=False, restarts=2)
