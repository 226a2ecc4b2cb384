"""Submitting with submitit: which cluster, executors built from the config's `launch` section,
dependencies, waiting, and the submission record each launcher writes next to its run.

The launcher flags (--nodes, --gpus-per-node, --partition, --time, ...) are shorthands for
`launch.*` config keys, so a launch is described by one config tree like everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit

from enat.config import Config, ConfigError, load_config, to_dict
from launch import local

# flag -> config key (value type from the config's validation)
FLAGS = {"cluster": "launch.cluster", "nodes": "launch.nodes", "gpus_per_node": "launch.gpus_per_node",
         "partition": "launch.partition", "time": "launch.time_min", "account": "launch.account",
         "qos": "launch.qos", "constraint": "launch.constraint", "mem": "launch.mem_gb",
         "cpus_per_task": "launch.cpus_per_task", "exclude": "launch.exclude",
         "max_requeues": "launch.max_requeues"}
SRUN_ARGS = ["--kill-on-bad-exit=1"]  # a dead rank ends the job instead of leaving the others in a collective


class LaunchError(RuntimeError):
    pass


def add_launch_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", required=True, help="experiment YAML")
        p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")
    g = p.add_argument_group("where and how to run (shorthands for launch.* config keys)")
    g.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"],
                   help="auto (default): SLURM when sinfo answers, else local processes")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="tasks per node (processes per node on a CPU cluster)")
    g.add_argument("--partition")
    g.add_argument("--time", type=int, metavar="MIN", help="time limit per job in minutes")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--mem", type=int, metavar="GB", help="memory per node")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--exclude", help="nodes to avoid")
    g.add_argument("--max-requeues", type=int)
    g.add_argument("--additional", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --additional mail-type=END (repeatable)")
    g.add_argument("--wait", action="store_true", help="wait for the jobs and report how they ended")


def launch_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    for item in getattr(args, "additional", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--additional {item!r}: expected KEY=VALUE (an sbatch option without the dashes)")
        out.append(f"launch.additional.{key}={json.dumps(value)}")  # always a string
    return out


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config, list(args.overrides) + launch_overrides(args))


def slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cluster_kind(requested: str) -> str:
    if requested == "auto":
        return "slurm" if slurm_available() else "local"
    if requested == "slurm" and not slurm_available():
        raise LaunchError("--cluster slurm, but `sinfo` does not answer: is SLURM_CONF set and slurmctld up? "
                          "(launch/local_slurm.sh start; eval \"$(launch/local_slurm.sh env)\")")
    return requested


def executor(cfg: Config, folder: str | Path, name: str, tasks_per_node: int = 1, nodes: int = 1,
             gpus: bool = True) -> submitit.AutoExecutor:
    """An executor for `cfg.launch`; logs go to `folder`/<job id>."""
    ln = cfg.launch
    kind = cluster_kind(ln.cluster)
    ex = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=kind,
                               slurm_max_num_timeout=ln.max_requeues)
    if kind == "local":  # local processes under a controller that behaves as SLURM does (launch/local.py)
        ex._executor.__class__ = local.LocalExecutor
    ex.update_parameters(name=name, nodes=nodes, tasks_per_node=tasks_per_node,
                         timeout_min=ln.time_min,
                         gpus_per_node=None if ln.cpu or not gpus else ln.gpus_per_node,
                         cpus_per_task=ln.cpus_per_task, mem_gb=ln.mem_gb)
    if kind == "slurm":
        ex.update_parameters(slurm_partition=ln.partition, slurm_account=ln.account, slurm_qos=ln.qos,
                             slurm_constraint=ln.constraint, slurm_exclude=ln.exclude,
                             slurm_additional_parameters=dict(ln.additional),
                             slurm_signal_delay_s=ln.signal_delay_s, slurm_srun_args=SRUN_ARGS,
                             slurm_array_parallelism=ln.array_parallelism)
    ex.enat_cluster = kind  # what was chosen, for the record
    ex.enat_additional = dict(ln.additional)
    ex.enat_array_parallelism = ln.array_parallelism
    return ex


def _dependency(ex, after) -> None:
    """afterok on SLURM; elsewhere (local processes) wait for the jobs, failing if one failed."""
    ids = [a if isinstance(a, str) else a.job_id for a in after or []]
    if ex.enat_cluster == "slurm":
        extra = dict(ex.enat_additional)
        if ids:
            extra["dependency"] = "afterok:" + ":".join(ids)
        ex.update_parameters(slurm_additional_parameters=extra)
        return
    for a in after or []:
        if isinstance(a, str):
            raise LaunchError(f"a dependency on job id {a} needs SLURM; this launch runs on '{ex.enat_cluster}'")
        print(f"waiting for job {a.job_id} to finish (log {a.paths.stdout})", flush=True)
        wait([a])


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _own_process_groups():
    """Jobs inherit the submitting process's environment (local processes, and sbatch's export).
    A launcher that is itself rank 0 of a process group (a planner that ran trainers) would hand
    them its MASTER_PORT, which submitit then uses as theirs: a port still held (EADDRINUSE). So
    submit without those variables, and each job picks its own."""
    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def submit(ex, fn, *args, after=None) -> submitit.Job:
    _dependency(ex, after)
    with _own_process_groups():
        return ex.submit(fn, *args)


def submit_array(ex, fn, *arg_lists, after=None, poll_s: float = 2.0) -> list[submitit.Job]:
    """One task per argument tuple, at most launch.array_parallelism running at once: SLURM holds
    the rest back itself; local processes have no scheduler, so the launcher starts the next task
    as one finishes and returns once the last ones are running."""
    _dependency(ex, after)
    limit = getattr(ex, "enat_array_parallelism", None)
    tasks = list(zip(*arg_lists))
    if ex.enat_cluster == "slurm" or not limit or len(tasks) <= limit:
        with _own_process_groups():
            return ex.map_array(fn, *arg_lists)
    print(f"{len(tasks)} tasks as local processes, {limit} at a time (launch.array_parallelism): this launcher "
          f"starts each as a slot frees", flush=True)
    jobs, running = [], []
    for args in tasks:
        while len(running) >= limit:
            running = [j for j in running if not j.done()]
            if len(running) >= limit:
                time.sleep(poll_s)
        with _own_process_groups():
            job = ex.submit(fn, *args)
        jobs.append(job)
        running.append(job)
    return jobs


def wait(jobs) -> list:
    """Results of the jobs; a failed job raises with its log's tail and where the logs are."""
    out = []
    for job in jobs:
        try:
            out.append(job.results()[0])  # rank 0's result for multi-task jobs
        except Exception as e:  # submitit raises FailedJobState / UncompletedJobError with the remote error
            tail = ""
            try:
                tail = "\n".join((job.stderr() or "").splitlines()[-25:])
            except Exception:
                pass
            raise LaunchError(f"job {job.job_id} failed: {e}\n--- last lines of {job.paths.stderr} ---\n{tail}") from e
    return out


def describe(jobs, what: str) -> str:
    lines = []
    for job in jobs:
        lines.append(f"{what}: job {job.job_id}  log {job.paths.stdout}")
    return "\n".join(lines)


def record(run_dir: str | Path, kind: str, cfg: Config, jobs, extra: dict | None = None) -> Path:
    """RUN/submissions/<time>-<kind>.json: the command, the resolved config, the job ids and logs."""
    d = Path(run_dir) / "submissions"
    d.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = d / f"{stamp}-{kind}.json"
    n = 1
    while path.exists():
        path, n = d / f"{stamp}-{kind}-{n}.json", n + 1
    body = {"kind": kind, "command": shlex.join([sys.executable] + sys.argv), "cwd": str(Path.cwd()),
            "cluster": cluster_kind(cfg.launch.cluster), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": [{"job_id": j.job_id, "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr)} for j in jobs],
            **(extra or {}), "config": to_dict(cfg)}
    path.write_text(json.dumps(body, indent=1))
    return path


def main_guard(fn, argv=None) -> int:
    """Run a launcher's main; errors print one line (no traceback) and exit 2."""
    try:
        fn(argv)
    except (LaunchError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
