"""What runs on the compute nodes: small callables that submitit pickles, each calling one of
enat's public functions. They take the resolved config as a plain dict (so a job never reads a
YAML file that may have changed since submission).

TrainJob is a submitit Checkpointable. On SIGUSR2 (`scancel --signal=USR2`, or SLURM's warning
before the time limit) every rank only sets a flag; the trainer ORs the flag over ranks after each
step, so all ranks finish the same step and write that checkpoint together. Then rank 0 hands over
to submitit's own handler, which requeues the job; the requeued job resumes from the run's
`latest` pointer and appends to the same metrics.jsonl and wandb run.

SIGTERM on SLURM is treated the same way: many clusters preempt, and every cluster ends a job at
its time limit, with SIGTERM and a SIGKILL `KillWait` seconds later, without the USR2 warning.
The checkpoint is taken if the grace period allows, then the job is requeued, unless SLURM says
the job is being cancelled (`scancel JOBID`: the user's decision, which a requeue would undo; its
checkpoint is kept all the same). With `launch.max_requeues` used up (0: requeueing off) the job
ends cleanly after its checkpoint.

As local processes (launch/local.py) the same holds, with the job id the controller's pid:
`kill -USR2 JOBID` checkpoints and requeues as above; `kill -TERM JOBID` checkpoints the same step
on every rank and ends the job (submit again to continue); the tasks end when the controller dies.

The errors the `enat` command names (a held lease, a bad config, missing shards, ...) end a job as
they end the command: one `error: ...` line in the job's log, no traceback, exit 2.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit
import torch

from enat.config import Config, from_dict, resolve
from enat.data.prepare import merge_split, prepare_tokenizer, tokenize_split
from enat.dist import broadcast_object, close, free_port
from enat.eval.job import evaluate
from enat.eval.prepare import prepare_extractor
from enat.train.checkpoint import write_atomic
from enat.train.trainer import train
from launch.local import RESTART_ENV

log = functools.partial(print, flush=True)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _local() -> bool:
    """A local process of submitit's local executor (no SLURM)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "local"


def _restarts() -> int:
    """How many times this job was requeued before this start (SLURM's count, or the local controller's)."""
    if "SLURM_RESTART_COUNT" in os.environ:  # SLURM sets it from the first requeue on
        return int(os.environ["SLURM_RESTART_COUNT"])
    return int(os.environ.get(RESTART_ENV, 0)) if _local() else 0


def _end_with_controller() -> None:
    """A local task gets SIGTERM when its controller dies (on SLURM the node's daemon ends a job's
    tasks; here nothing else would, and a killed controller left its tasks running for good).
    SIGTERM takes its default action, ending the process, except where a job handles it
    (TrainJob: a checkpoint first); submitit's own handler only logs it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(os.environ.get("SUBMITIT_LOCAL_JOB_ID", os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)  # the controller died before the prctl


def _named_errors_exit(fn):
    """Run a job so that an error the `enat` command names (enat.cli.named_errors) ends it as it
    ends the command: `error: ...` on stderr (the job's log), exit 2. submitit would print the
    traceback. Its result file holds the same line, which the launcher's wait() reports. A plain
    call (not under submitit) raises as usual."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            from enat.cli import named_errors  # the CLI's list (its modules are loaded by now)

            if "SUBMITIT_FOLDER" not in os.environ or not isinstance(e, named_errors() + (NotRequeued,)):
                raise
            message = f"error: {e}"
            print(message, file=sys.stderr, flush=True)
            from submitit.core.utils import cloudpickle_dump, temporary_save_path

            with temporary_save_path(submitit.JobEnvironment().paths.result_pickle) as tmp:
                cloudpickle_dump(("error", message), tmp)
            sys.stdout.flush()
            os._exit(2)  # no interpreter teardown under a live process group (gloo threads can abort it)

    return run


def _config(config: dict):
    """Every job starts here: the config, and an environment of its own."""
    # sbatch exports the submitting process's environment; a WANDB_SERVICE there (any process that
    # used wandb) would make concurrent jobs share that process's wandb service and collide on a
    # run id. Each job starts its own.
    os.environ.pop("WANDB_SERVICE", None)
    if _local():
        _end_with_controller()
    return resolve(from_dict(Config, config))


def _distributed_env(cfg: Config) -> submitit.JobEnvironment:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the job (SLURM or local tasks), and CPU defaults.
    The job's values win over any inherited from the submitting shell (sbatch exports its
    environment, which may hold another process group's MASTER_ADDR or RANK)."""
    env = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_PORT"] = str(_master_port(env, int(os.environ["MASTER_PORT"])))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # The CPUs the task was given (SLURM's, else launch.cpus_per_task, else a share of the
        # node): oversubscribed ranks run several times slower (OpenMP threads spin for cores that
        # other processes hold; two local array tasks of 2 threads each on 2 cores ran 4-6x slower).
        per_node = max(1, env.num_tasks // max(1, env.num_nodes))
        given = os.environ.get("SLURM_CPUS_PER_TASK") or cfg.launch.cpus_per_task
        torch.set_num_threads(int(given or max(1, (os.cpu_count() or 1) // per_node)))
    return env


def _port_is_free(port: int) -> bool:
    """Bindable as the process group's store binds it (SO_REUSEADDR: a closed port still in
    TIME_WAIT counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _master_port(env: submitit.JobEnvironment, wanted: int, wait_s: float = 300.0) -> int:
    """The process group's port. submitit derives it from the job id, so any process on the master
    node that happens to hold that port (an ephemeral client port, another job's store) makes every
    rank fail with EADDRINUSE. Rank 0 checks the port on its own node, takes a free one instead when
    it is held, and publishes its choice in the job's folder (shared by every node, as submitit
    needs it to be); the other ranks read it there. One file per restart: a requeued job (same id)
    chooses again."""
    note = _port_note(env)
    if env.global_rank == 0:
        port = wanted if _port_is_free(wanted) else free_port(host="")
        if port != wanted:
            log(f"the job's default MASTER_PORT {wanted} is in use on {socket.gethostname()}: using {port}")
        if env.num_tasks > 1:
            write_atomic(note, str(port))
        return port
    deadline = time.time() + wait_s
    while not note.is_file():
        if time.time() > deadline:
            raise RuntimeError(f"rank 0 of job {env.job_id} did not publish its MASTER_PORT in {note} within "
                               f"{wait_s:.0f} s: did rank 0 start? (its log: {env.paths.stdout})")
        time.sleep(0.2)
    return int(note.read_text())


def _port_note(env: submitit.JobEnvironment) -> Path:
    return Path(env.paths.folder) / f"{env.job_id}_master_port.{_restarts()}"


def _forget_master_port(env: submitit.JobEnvironment) -> None:
    """Rank 0, once every rank has joined: a restart under the same job id and restart count
    (submitit's local executor requeues so, without SLURM_RESTART_COUNT) must not read this
    start's port."""
    if env.global_rank == 0:
        _port_note(env).unlink(missing_ok=True)


class TrainJob(submitit.helpers.Checkpointable):
    """`takeover` applies to the first start only: a requeue retakes its own lease anyway, and a
    requeued job must never seize a run directory someone else has started writing since."""

    @_named_errors_exit
    def __call__(self, config: dict, stop_at: int | None = None, takeover: bool = False) -> dict:
        cfg = _config(config)
        env = _distributed_env(cfg)
        stop, terminate = threading.Event(), threading.Event()
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue + exit
        signal.signal(signal.SIGUSR2, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: (terminate.set(), stop.set()))
        restarts = _restarts()
        log(f"rank {env.global_rank}/{env.num_tasks} of job {env.job_id} (restart {restarts}): "
            f"run {cfg.train.run_dir}")
        result = train(cfg, stop_at=stop_at, should_stop=stop.is_set, log=log, takeover=takeover and restarts == 0)
        _forget_master_port(env)  # every rank joined the process group long ago
        if not result.get("interrupted"):
            close()
            return result
        log(f"rank {env.global_rank}: stopped at step {result['step']} "
            f"({'SIGTERM' if terminate.is_set() else 'SIGUSR2'})")
        # Rank 0 decides (one answer from SLURM for all ranks) while the process group still stands.
        why_not = _why_not_requeue(cfg, env, terminate.is_set(), restarts) if env.global_rank == 0 else None
        why_not = broadcast_object(why_not)
        if why_not:
            message = (f"checkpointed step {result['step']}; not requeuing: {why_not}. Submit launch/train.py again "
                       f"to continue the run")
            log(message)
            close()
            if why_not.startswith("SLURM is cancelling") or _local():
                return result  # what was asked for (a cancel, the local job stopped): the job ends as it is
            # Requeues used up: the job fails (exit 2, no traceback), so `afterok` jobs (the FID job
            # of launch/pipeline.py and launch/sweep.py --eval) do not start on an unfinished run.
            raise NotRequeued(message)
        if env.global_rank != 0:
            time.sleep(300)  # rank 0 requeues the job, which ends this task (SLURM, launch/local.py)
            raise RuntimeError("rank 0 did not requeue the job within 300 s of the checkpoint")
        log(f"checkpointed step {result['step']}: requeuing job {env.job_id}")
        if callable(requeue):
            try:
                requeue(signal.SIGUSR2, None)  # exits this process
            except subprocess.CalledProcessError as e:  # (SLURM may be requeueing a preempted job itself)
                # exit 2 (named): srun ends the other ranks, which wait for the requeue
                raise NotRequeued(f"`scontrol requeue {env.job_id}` failed ({e}); the run is checkpointed at step "
                                  f"{result['step']}: submit launch/train.py again if SLURM does not requeue it")
        return result  # no submitit handler (a plain call): the run stays resumable


class NotRequeued(RuntimeError):
    """A train job that checkpointed on a signal and ends unfinished: exit 2, named."""


def _why_not_requeue(cfg: Config, env: submitit.JobEnvironment, terminated: bool, restarts: int) -> str | None:
    """Why a job that checkpointed on a signal ends instead of requeuing (None: requeue it)."""
    if restarts >= cfg.launch.max_requeues:
        return (f"preempted or timed out {restarts + 1} times (launch.max_requeues={cfg.launch.max_requeues})"
                if cfg.launch.max_requeues else "launch.max_requeues=0 (requeueing off)")
    if not terminated:
        return None
    if _local():
        return "SIGTERM ends a local job (its controller is being stopped)"
    return _cancelled(env.job_id)


def _cancelled(job_id: str) -> str | None:
    """Whether SLURM is cancelling the job (`scancel JOBID`), which sends the same SIGTERM as a
    time limit or a preemption. Accounting knows at once (CANCELLED, against TIMEOUT, PREEMPTED,
    RUNNING for a bare `scancel --signal=TERM`); without it, squeue's reason tells them apart
    while the job completes (TimeLimit, Preemption...; none for a cancel). No verdict: requeue,
    as submitit would."""
    state = (_ask(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]) or "?").split()[0]
    if state.startswith("CANCELLED"):
        return f"SLURM is cancelling job {job_id} (sacct: {state})"
    if state in ("TIMEOUT", "PREEMPTED", "DEADLINE", "NODE_FAIL"):
        return None
    # RUNNING (a bare signal, or accounting not caught up yet), or no accounting: ask slurmctld
    out = _ask(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if not out:
        return None
    state, _, reason = out.partition("|")
    if state in ("CANCELLED", "COMPLETING") and not any(k in reason for k in ("TimeLimit", "Preempt", "Deadline")):
        return f"SLURM is cancelling job {job_id} ({state}, reason {reason or 'none'})"
    return None


def _ask(cmd: list[str]) -> str:
    """The first line a SLURM command prints, '' when it fails or is missing."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = res.stdout.strip().splitlines() if res.returncode == 0 else []
    return lines[0].strip() if lines else ""


class EvalJob:
    """FID evaluation of one checkpoint of a run (a step, a tag or "latest")."""

    @_named_errors_exit
    def __call__(self, config: dict, run_dir: str, checkpoint: str, num_samples: int | None = None) -> dict:
        cfg = _config(config)
        _distributed_env(cfg)
        record = evaluate(cfg, run_dir, checkpoint, num_samples=num_samples, log=log)
        close()
        return {"step": record["step"], "metrics": record["metrics"], "result": record.get("path")}


def _single_task_threads(cfg: Config) -> None:
    """A one-task job (prepare, tokenize, merge) takes the CPUs it was given, as train and eval
    tasks do: SLURM's count, else launch.cpus_per_task (torch's default, every core of the node,
    oversubscribes when array tasks share it)."""
    given = os.environ.get("SLURM_CPUS_PER_TASK") or cfg.launch.cpus_per_task
    if given:
        torch.set_num_threads(int(given))


@_named_errors_exit
def prepare_job(config: dict, extractor: bool = True) -> None:
    """The project's own models before the data is tokenized (digits, Fashion-MNIST): the
    tokenizer (data) and, when FID jobs follow, the FID classifier, each built when missing."""
    cfg = _config(config)
    _single_task_threads(cfg)
    prepare_tokenizer(cfg, log=log)
    if extractor:
        prepare_extractor(cfg, log=log)


@_named_errors_exit
def tokenize_job(config: dict, split: str, part: int, num_parts: int) -> None:
    cfg = _config(config)
    _single_task_threads(cfg)
    tokenize_split(cfg, split, part=part, num_parts=num_parts, merge=False, progress=False, log=log)


@_named_errors_exit
def merge_job(config: dict, split: str) -> str:
    cfg = _config(config)
    _single_task_threads(cfg)
    manifest = merge_split(cfg, split, log=log)
    return f"{manifest.num_samples} samples in {len(manifest.shards)} shards"
