"""The launchers against a real SLURM (launch/local_slurm.sh in CI): a 2-task DeepSpeed train job,
preemption -> checkpoint -> requeue -> exact continuation, a rank killed hard failing the job fast
and the resubmission resuming, an eval job chained with afterok, and a 2x2 sweep as a job array
whose manifest feeds scaling.report.

Without a reachable cluster these tests skip with the reason, except where ENAT_REQUIRE_SLURM=1
(.ci/run sets it): there they fail. The same train job also runs as local processes (--cluster
local), which needs no cluster."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from conftest import wait_for as _wait_for

pytestmark = pytest.mark.slow
CONFIG = "configs/experiments/demo.yaml"


@pytest.fixture(scope="module")
def cluster():
    from launch.submit import slurm_available

    if not slurm_available():
        reason = ("no SLURM cluster reachable (sinfo failed): run `launch/local_slurm.sh start` and "
                  "`eval \"$(launch/local_slurm.sh env)\"` first")
        if os.environ.get("ENAT_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (ENAT_REQUIRE_SLURM=1: these tests must run here)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch folder that sees the configs, with demo shards from a random tokenizer and a
    quickly trained FID classifier (what they mean does not matter to these tests)."""
    import torch

    from enat.config import load_config
    from enat.data.prepare import tokenize_split
    from enat.eval.fidelity import train_digit_classifier
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    d = tmp_path_factory.mktemp("slurm")
    (d / "configs").symlink_to(ROOT / "configs")
    data = [f"tokenizer.checkpoint={d}/data/tok.pt", f"data.shards={d}/data/train", f"data.val_shards={d}/data/val",
            f"eval.extractor_weights={d}/data/digits.pt", f"eval.cache_dir={d}/data/fid_cache"]
    cfg = load_config(ROOT / CONFIG, data)
    torch.manual_seed(0)
    save_tokenizer(d / "data/tok.pt", VQGAN(cfg.tokenizer), {})
    for split in ("train", "val"):
        tokenize_split(cfg, split, progress=False, log=lambda *_: None)
    train_digit_classifier(d / "data/digits.pt", steps=100, log=lambda *_: None)
    # As in the full suite (and in a notebook that used wandb): this process runs a wandb service
    # and its WANDB_SERVICE reaches the jobs through sbatch's environment export.
    import wandb

    wandb.init(mode="offline", dir=str(d), project="parent").finish()
    return d, data


def run_overrides(work, name, **kw):
    d, data = work
    over = {"train.run_dir": f"runs/{name}", "train.log_every": 1, "train.val_every": 0, "train.sample_every": 0,
            "train.ckpt_every": 0, "train.steps": 40, "train.wandb.mode": "offline", "launch.time_min": 10}
    over.update(kw)
    return data + [f"{k}={v}" for k, v in over.items()]


def launcher(work, script, *args, timeout=600):
    d, _ = work
    res = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=d, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def metrics(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def submit(work, name, **kw):
    """Submit a training run from the test process (the launcher's own function)."""
    from enat.config import load_config
    from launch.train import submit_train

    d, _ = work
    cwd = os.getcwd()
    os.chdir(d)  # run paths are relative to where the launcher runs, as on a cluster
    try:
        return submit_train(load_config(ROOT / CONFIG, run_overrides(work, name, **kw) + ["launch.cluster=slurm"]))
    finally:
        os.chdir(cwd)


def sacct_state(job_id):
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split()[0] if out.stdout.strip() else ""




# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(cluster, work):
    """An uninterrupted 2-task run through the train launcher's command line."""
    d, _ = work
    out = launcher(work, "train.py", "--config", CONFIG, "--cluster", "slurm", "--wait",
                   *run_overrides(work, "ref", **{"train.steps": 120}))
    assert "train: job" in out and "run directory: runs/ref" in out and "done: step 120" in out
    return d / "runs/ref"


def test_local_processes_run_the_same_train_job(work):
    """--cluster local (no SLURM): the same job as 2 local processes, then resumed to a later step."""
    d, _ = work
    over = run_overrides(work, "local", **{"train.steps": 12})
    out = launcher(work, "train.py", "--config", CONFIG, "--cluster", "local", "--wait", "--stop-at", "6", *over)
    assert "done: step 6" in out
    out = launcher(work, "train.py", "--config", CONFIG, "--cluster", "local", "--wait", *over)
    assert "done: step 12" in out
    assert [r["step"] for r in metrics(d / "runs/local")] == list(range(1, 13))
    sub = sorted((d / "runs/local/submissions").glob("*-train*.json"))
    assert len(sub) == 2 and json.loads(sub[0].read_text())["cluster"] == "local"
    # The second job resumed at step 6 (one that restarted from step 0 would log the same steps).
    log = (d / json.loads(sub[1].read_text())["jobs"][0]["stdout"]).read_text()
    assert resumed_at(log, 6), log[-3000:]


def resumed_at(log: str, step: int) -> bool:
    """Whether a job's log says it resumed from the checkpoint of `step` at that step."""
    return re.search(rf"resumed from \S*step{step:08d} at step {step}\b", log) is not None


def test_train_job_two_tasks_runs_checkpoints_and_completes(reference):
    assert (reference / "checkpoints/latest").read_text().strip() == "step00000120"
    meta = json.loads((reference / "checkpoints/step00000120/enat_meta.json").read_text())
    assert meta["world_size"] == 2
    assert [r["step"] for r in metrics(reference)] == list(range(1, 121))
    sub = json.loads(next((reference / "submissions").glob("*-train.json")).read_text())
    assert sub["cluster"] == "slurm" and sub["jobs"][0]["job_id"] and sub["config"]["train"]["steps"] == 120
    assert Path(sub["jobs"][0]["stdout"]).is_file()


def test_preemption_checkpoints_requeues_and_continues_exactly(cluster, work, reference):
    d, _ = work
    run = d / "runs/preempt"
    job = submit(work, "preempt", **{"train.steps": 120})
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 15, 180, "step 15")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    job.results()
    log = Path(job.paths.stdout).read_text()
    assert "requeuing job" in log, log[-3000:]
    ckpt_step = int(log.split("stop requested: checkpointed step ")[1].split()[0])
    assert 15 <= ckpt_step < 120
    assert resumed_at(log, ckpt_step), log[-3000:]  # the requeued job continued from the checkpoint it wrote
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 121)), "every step exactly once across the requeue"
    ref = {r["step"]: r["loss"] for r in metrics(reference)}
    got = {r["step"]: r["loss"] for r in metrics(run)}
    assert got == ref, "the requeued run continues bit for bit (same world size, same threads)"
    wandb_ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(wandb_ids) == 1, f"the requeued job continues the same wandb run: {wandb_ids}"


def test_sigterm_checkpoints_requeues_and_continues_exactly(cluster, work, reference):
    """SIGTERM without the USR2 warning (launch.signal_delay_s=0), as clusters that preempt with
    SIGTERM send it: every rank stops at one step, the checkpoint is written, the job requeues."""
    d, _ = work
    run = d / "runs/sigterm"
    job = submit(work, "sigterm", **{"train.steps": 120, "launch.signal_delay_s": 0})
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 15, 180, "step 15")
    subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True)
    job.results()
    log = Path(job.paths.stdout).read_text()
    assert "(SIGTERM)" in log and "requeuing job" in log, log[-3000:]
    ckpt_step = int(log.split("stop requested: checkpointed step ")[1].split()[0])
    assert 15 <= ckpt_step < 120 and resumed_at(log, ckpt_step), log[-3000:]
    ref = {r["step"]: r["loss"] for r in metrics(reference)}
    assert {r["step"]: r["loss"] for r in metrics(run)} == ref  # every step once, bit for bit


def test_time_limit_requeues_and_a_cancel_keeps_its_checkpoint_without_requeue(cluster, work, reference):
    """The job's time limit (SIGTERM, then SIGKILL KillWait later) checkpoints and requeues; then
    `scancel JOBID` (the same SIGTERM) checkpoints and ends the job: a cancel is not undone."""
    d, _ = work
    run = d / "runs/timelimit"
    # slower steps (the same losses): slurmctld checks time limits every 30 s
    job = submit(work, "timelimit",
                 **{"train.steps": 120, "launch.signal_delay_s": 0, "train.inject_step_delay_s": 0.3})
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 15, 180, "step 15")
    end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 1))
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", f"EndTime={end}"], check=True)  # the limit: now
    log = lambda: Path(job.paths.stdout).read_text()  # noqa: E731
    wait_for(lambda: "resumed from" in log(), 180, "the requeued start")
    k1 = int(log().split("stop requested: checkpointed step ")[1].split()[0])
    assert "(SIGTERM)" in log() and resumed_at(log(), k1), log()[-3000:]
    assert "DUE TO TIME LIMIT" in Path(job.paths.stderr).read_text()
    wait_for(lambda: len(metrics(run)) >= k1 + 10, 120, "steps after the requeue")
    subprocess.run(["scancel", job.job_id], check=True)
    wait_for(lambda: "not requeuing: SLURM is cancelling job" in log(), 60, "the cancelled job's checkpoint")
    wait_for(lambda: sacct_state(job.job_id) == "CANCELLED", 60, "the job to end")
    k2 = int(log().split("stop requested: checkpointed step ")[2].split()[0])
    assert (run / "checkpoints/latest").read_text().strip() == f"step{k2:08d}"
    time.sleep(5)
    assert sacct_state(job.job_id) == "CANCELLED"  # and it stays so
    ref = {r["step"]: r["loss"] for r in metrics(reference)}
    got = {r["step"]: r["loss"] for r in metrics(run)}
    assert list(got) == list(range(1, k2 + 1)) and got == {s: ref[s] for s in got}


def test_requeue_after_a_hard_kill_retakes_its_own_lease_and_continues_exactly(cluster, work, reference):
    """Rank 0 killed hard (its lease stays behind, heartbeat fresh), the job then requeued: the
    new incarnation (same job id, a higher restart count) retakes the lease at once and resumes."""
    d, _ = work
    run = d / "runs/requeue"
    job = submit(work, "requeue", **{"train.steps": 120, "train.ckpt_every": 10})
    lease = lambda: json.loads((run / "lease.json").read_text()) if (run / "lease.json").is_file() else {}  # noqa: E731
    wait_for(lambda: lease().get("slurm_job_id") == job.job_id and (run / "checkpoints/latest").is_file(), 180,
             "the job's lease and first checkpoint")
    assert lease()["slurm_restart_count"] == 0
    os.kill(wait_for(lambda: _task_pid(job.job_id, 0), 30, "rank 0's process"), signal.SIGKILL)
    wait_for(lambda: sacct_state(job.job_id) not in ("", "RUNNING", "PENDING", "COMPLETING"), 90, "the job to end")
    assert lease().get("slurm_job_id") == job.job_id  # left behind by the killed rank 0
    latest = int((run / "checkpoints/latest").read_text().strip().removeprefix("step"))
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    unfinished = ("", "RUNNING", "PENDING", "COMPLETING", "REQUEUED", "FAILED")
    state = wait_for(lambda: (s := sacct_state(job.job_id)) not in unfinished and s, 300, "the requeued job")
    log = Path(job.paths.stdout).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "taking over the lease" in log and "a requeue of the same job" in log, log[-3000:]
    assert resumed_at(log, latest), log[-3000:]  # continued from its last checkpoint, not from step 0
    ref = {r["step"]: r["loss"] for r in metrics(reference)}
    assert {r["step"]: r["loss"] for r in metrics(run)} == ref  # every step once, bit for bit
    assert not (run / "lease.json").exists()


def wait_for(predicate, timeout, what):
    return _wait_for(predicate, timeout, what, poll=0.5)


def _task_pid(job_id, procid):
    """The pid of a job's task with SLURM_PROCID=procid (the python process, not srun)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_text().split("\0") if "=" in kv)
            cmd = (p / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        # srun carries the batch step's SLURM_PROCID=0 and the task's command line: not the task
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid) and "submitit" in cmd
                and Path(cmd.split("\0")[0]).name != "srun"):
            return int(p.name)
    return None


def test_killed_rank_fails_the_job_fast_and_resubmission_resumes(cluster, work):
    d, _ = work
    run = d / "runs/killed"
    job = submit(work, "killed", **{"train.steps": 400, "train.ckpt_every": 20})
    wait_for(lambda: (run / "checkpoints/latest").is_file(), 180, "the first checkpoint")
    pid = wait_for(lambda: _task_pid(job.job_id, 1), 30, "rank 1's process")
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    state = wait_for(lambda: (s := sacct_state(job.job_id)) not in ("", "RUNNING", "PENDING", "COMPLETING") and s,
                     90, "the job to end")
    assert state == "FAILED" and time.time() - t0 < 60, state
    latest = (run / "checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step"))
    assert step % 20 == 0 and step < 400
    job2 = submit(work, "killed", **{"train.steps": 400, "train.ckpt_every": 20})
    job2.results()
    assert f"resumed from runs/killed/checkpoints/{latest} at step {step}" in Path(job2.paths.stdout).read_text()
    assert [r["step"] for r in metrics(run)] == list(range(1, 401))
    # --watch following the (finished) job: one array over the kept checkpoints, then it returns.
    out = launcher(work, "eval.py", "--run", "runs/killed", "--watch", "--after", job2.job_id, "--poll", "1",
                   "--cluster", "slurm", "--wait", "eval.num_samples=20")
    assert "new checkpoints: [380, 400]" in out and "run over" in out, out
    for s in (380, 400):
        assert list((run / f"eval/{s:08d}").glob("*.json"))
    out = launcher(work, "eval.py", "--run", "runs/killed", "--checkpoint", "all", "--cluster", "slurm",
                   "eval.num_samples=20")
    assert out.count("already evaluated") == 2 and "eval: job" not in out


def test_eval_job_after_train_job_writes_fid(cluster, work):
    d, _ = work
    job = submit(work, "chained", **{"train.steps": 30})
    out = launcher(work, "eval.py", "--run", "runs/chained", "--after", job.job_id, "--cluster", "slurm", "--wait",
                   "eval.num_samples=50")
    assert sacct_state(job.job_id) == "COMPLETED"
    result = json.loads(next((d / "runs/chained/eval/00000030").glob("*.json")).read_text())
    assert result["step"] == 30 and result["num_samples"] == 50 and result["metrics"]["fid"] > 0
    assert "eval job" in out and "00000030" in out
    # Already evaluated: nothing is submitted again.
    again = launcher(work, "eval.py", "--run", "runs/chained", "--checkpoint", "latest", "--cluster", "slurm",
                     "eval.num_samples=50")
    assert "already evaluated" in again and "eval: job" not in again


def test_sweep_array_manifest_and_scaling_report(cluster, work):
    d, data = work
    out = launcher(work, "sweep.py", "--sweep", "configs/sweeps/smoke.yaml", "--cluster", "slurm", "--wait",
                   "train.wandb.mode=disabled", *data)
    manifest = json.loads((d / "runs/sweeps/smoke/sweep.json").read_text())
    assert len(manifest["runs"]) == 4 and len({r["job_id"] for r in manifest["runs"]}) == 4
    assert {(r["params"]["model.width"], r["params"]["train.steps"]) for r in manifest["runs"]} == \
        {(32, 20), (32, 40), (64, 20), (64, 40)}
    for r in manifest["runs"]:
        assert "_" in r["job_id"], "submitted as one job array"
        assert (d / r["run_dir"] / "checkpoints/latest").read_text().strip() == f"step{r['steps']:08d}"
    assert "4 runs, 4 submitted" in out
    # 20-40 steps learn token statistics only: the regime gate refuses a law, saying why ...
    res = subprocess.run([sys.executable, "-m", "scaling.report", "--sweep", "runs/sweeps/smoke", "--out", "report"],
                         cwd=d, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (d / "report/report.md").read_text()
    assert "No law is stated" in text and "per-position frequency table" in text
    # ... and --ignore-gate fits one anyway, marked as such
    res = subprocess.run([sys.executable, "-m", "scaling.report", "--sweep", "runs/sweeps/smoke", "--out", "report",
                          "--ignore-gate", "--approach-bootstrap", "50"], cwd=d, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (d / "report/report.md").read_text()
    assert "alpha" in text and "beta" in text and list((d / "report").glob("*.png"))
    assert "fitted anyway (--ignore-gate)" in text


def test_tokenize_array_and_merge_match_one_part(cluster, work):
    d, data = work
    out = launcher(work, "tokenize.py", "--config", CONFIG, "--parts", "2", "--split", "train", "--cluster", "slurm",
                   "--wait", *data, f"data.shards={d}/tok2")
    assert "tokenize train: job" in out and "merge train: job" in out
    two = json.loads((d / "tok2/manifest.json").read_text())
    one = json.loads((d / "data/train/manifest.json").read_text())
    assert two["num_samples"] == one["num_samples"]
    import numpy as np

    from enat.data.loader import ShardSet

    a, b = ShardSet(str(d / "data/train")), ShardSet(str(d / "tok2"))
    oa, ob = np.argsort(a.uid), np.argsort(b.uid)
    assert (a.uid[oa] == b.uid[ob]).all() and (a.tokens(oa) == b.tokens(ob)).all()
    assert sorted(p.name for p in (d / "tok2").glob("part-*.json")) == ["part-0000-of-0002.json",
                                                                       "part-0001-of-0002.json"]


def require_or_skip(reason):
    """Skip with the reason, or fail where ENAT_REQUIRE_SLURM=1 (CI) says these tests must run."""
    if os.environ.get("ENAT_REQUIRE_SLURM") == "1":
        pytest.fail(reason + " (ENAT_REQUIRE_SLURM=1: these tests must run here)")
    pytest.skip(reason)


def local_slurm_state():
    """The state directory of the cluster launch/local_slurm.sh started, from the SLURM_CONF its
    `env` command exports (STATE/etc/slurm.conf) -> Path, or None where SLURM_CONF is unset or
    names another configuration."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return None
    conf = Path(conf)
    return conf.parent.parent if conf.name == "slurm.conf" and conf.parent.name == "etc" else None


def test_local_slurm_script_reports_its_daemons(cluster):
    state = local_slurm_state()
    if state is None or not (state / "run/slurmctld.pid").is_file():
        require_or_skip(f"the cluster was not started by launch/local_slurm.sh: SLURM_CONF="
                        f"{os.environ.get('SLURM_CONF')!r} is not STATE/etc/slurm.conf with STATE/run/slurmctld.pid "
                        f"(run `eval \"$(launch/local_slurm.sh env)\"` after `launch/local_slurm.sh start`)")
    # The script finds the same state directory as the shell that started it, whatever TMPDIR says now.
    res = subprocess.run(["bash", str(ROOT / "launch/local_slurm.sh"), "status"], capture_output=True, text=True,
                         env={**os.environ, "ENAT_SLURM_DIR": str(state)})
    assert res.returncode == 0, res.stdout + res.stderr
    for daemon in ("slurmdbd", "mariadb", "slurmctld", "slurmd"):
        pid = int((state / f"run/{daemon}.pid").read_text())
        os.kill(pid, 0)  # alive (raises if not)
        assert f"{daemon}: running (pid {pid})" in res.stdout.splitlines(), res.stdout
    assert "idle" in res.stdout, res.stdout


def test_cluster_flags_reach_sbatch(cluster, tmp_path):
    """The SLURM.md command's resource flags become the job's sbatch options (nothing submitted)."""
    import argparse

    from launch.submit import add_launch_args, executor, load

    p = argparse.ArgumentParser()
    add_launch_args(p)
    args = p.parse_args(["--config", str(ROOT / "configs/experiments/imagenet256_L.yaml"), "--nodes", "4",
                         "--gpus-per-node", "8", "--partition", "gpu", "--account", "myproj", "--qos", "normal",
                         "--time", "1440", "--cpus-per-task", "12", "--mem", "480", "--constraint", "h100",
                         "--exclude", "node017", "--additional", "mail-type=END", "--cluster", "slurm"])
    cfg = load(args)
    ex = executor(cfg, tmp_path, "train-x", tasks_per_node=cfg.launch.gpus_per_node, nodes=cfg.launch.nodes)
    text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=myproj", "#SBATCH --qos=normal",
                 "#SBATCH --time=1440", "#SBATCH --cpus-per-task=12", "#SBATCH --mem=480GB",
                 "#SBATCH --constraint=h100", "#SBATCH --exclude=node017", "#SBATCH --mail-type=END",
                 "#SBATCH --signal=USR2@120", "--kill-on-bad-exit=1"):
        assert line in text, (line, text)
