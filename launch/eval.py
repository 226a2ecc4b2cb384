"""Submit FID evaluation jobs for a run's checkpoints (a job array when there are several).

    python launch/eval.py --run runs/demo/train [--checkpoint STEP|all|latest] [--after JOBID] [--watch]
                          [--num-samples N] [eval.key=value ...]

The run's own config (RUN/config.yaml) describes the model, the sampler and the FID protocol;
overrides change the evaluation (e.g. eval.num_samples, sample.cfg_scale). Checkpoints whose result
for these settings exists are skipped. With --after, the job waits for that job (afterok) and picks
the checkpoint when it starts (so it can follow a training job that has not written it yet).
--watch keeps submitting for new checkpoints of a live run and returns when the run has written
its final checkpoint (or the --after job has ended) and every checkpoint has a job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # a script: import `launch` from the checkout, not launch/tokenize.py as stdlib tokenize
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import submitit
import yaml

from enat.config import Config, load_config, to_dict
from enat.eval.job import result_path
from enat.train.checkpoint import LATEST, checkpoint_dir, complete_tags, latest_step, step_of
from launch.jobs import EvalJob
from launch.submit import (LaunchError, add_launch_args, describe, executor, launch_overrides, record, submit,
                           submit_array, wait)


def run_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's config: RUN/config.yaml (written when training starts), else the config of its
    newest train submission (a run still waiting in the queue)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        subs = sorted((run_dir / "submissions").glob("*-train*.json"))
        if not subs:
            raise LaunchError(f"{path} not found and no train submission in {run_dir / 'submissions'}: --run must "
                              f"be a training run directory")
        path = run_dir / "submissions" / "submitted_config.yaml"
        path.write_text(yaml.safe_dump(json.loads(subs[-1].read_text())["config"], sort_keys=False))
    return load_config(path, overrides)


def complete_steps(run_dir: Path) -> list[int]:
    """Steps of the run's complete checkpoints (those with their metadata written)."""
    return [step_of(t) for t in complete_tags(checkpoint_dir(run_dir))]


def pending(cfg: Config, run_dir: Path, which: str, num_samples: int | None) -> tuple[list[int], list[int]]:
    """(steps to evaluate, steps already evaluated) for --checkpoint STEP|all|latest."""
    if which == "all":
        steps = complete_steps(run_dir)
    elif which == LATEST:
        latest = latest_step(run_dir)
        steps = [] if latest is None else [latest]
    else:
        if not which.isdigit():
            raise LaunchError(f"--checkpoint {which!r}: expected a step number, 'latest' or 'all'")
        steps = [int(which)]
        if steps[0] not in complete_steps(run_dir):
            raise LaunchError(f"no complete checkpoint of step {which} in {checkpoint_dir(run_dir)}; "
                              f"have {complete_steps(run_dir) or 'none'}")
    done = [s for s in steps if result_path(cfg, run_dir, s, num_samples=num_samples).is_file()]
    return [s for s in steps if s not in done], done


def submit_eval(cfg: Config, run_dir: Path, checkpoints: list[str], num_samples: int | None = None, after=None):
    ln = cfg.launch
    tasks = 1 if ln.cpu else ln.gpus_per_node
    ex = executor(cfg, Path(ln.log_dir or run_dir / "slurm"), f"eval-{run_dir.name}", tasks_per_node=tasks)
    n = len(checkpoints)
    if n == 1:
        jobs = [submit(ex, EvalJob(), to_dict(cfg), str(run_dir), checkpoints[0], num_samples, after=after)]
    else:
        jobs = submit_array(ex, EvalJob(), [to_dict(cfg)] * n, [str(run_dir)] * n, checkpoints,
                            [num_samples] * n, after=after)
    rec = record(run_dir, "eval", cfg, jobs, {"checkpoints": checkpoints, "num_samples": num_samples})
    print(describe(jobs, "eval") + f"\nresults under {run_dir / 'eval'}  (submission: {rec})", flush=True)
    return jobs


def job_finished(job_id: str) -> bool:
    return submitit.SlurmJob(folder=".", job_id=job_id).done(force_check=True)


def watch(cfg: Config, run_dir: Path, num_samples: int | None, after: str | None, poll_s: float,
          max_hours: float) -> list:
    """Submit evaluations of new checkpoints until the run is over."""
    submitted: set[int] = set()
    jobs = []
    deadline = time.time() + max_hours * 3600
    while True:
        latest = latest_step(run_dir)
        train_over = latest is not None and latest >= cfg.train.steps
        if after is not None and job_finished(after):
            train_over = True
        todo, done = pending(cfg, run_dir, "all", num_samples)
        new = [s for s in todo if s not in submitted]
        if new:
            print(f"new checkpoints: {new} (already evaluated: {done})", flush=True)
            jobs += submit_eval(cfg, run_dir, [str(s) for s in new], num_samples)
            submitted.update(new)
        if train_over:
            print(f"run over (latest: step {latest}); {len(submitted)} evaluation jobs submitted", flush=True)
            return jobs
        if time.time() > deadline:
            raise LaunchError(f"--watch gave up after {max_hours} h without the run ending")
        time.sleep(poll_s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="training run directory")
    p.add_argument("--checkpoint", default=LATEST, help="step number, 'latest' or 'all' (default: latest)")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--after", help="start after this job id succeeded (SLURM afterok)")
    p.add_argument("--watch", action="store_true", help="keep submitting for new checkpoints until the run ends")
    p.add_argument("--poll", type=float, default=60.0, help="--watch: seconds between looks")
    p.add_argument("--max-hours", type=float, default=24 * 7, help="--watch: give up after this long")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.num_samples=10000")
    add_launch_args(p, config=False)
    args = p.parse_args(argv)
    cfg = run_config(args.run, list(args.overrides) + launch_overrides(args))
    if args.watch:
        jobs = watch(cfg, args.run, args.num_samples, args.after, args.poll, args.max_hours)
    elif args.after:
        if args.checkpoint == "all":
            raise LaunchError("--checkpoint all --after: the checkpoints are not known yet; use --watch --after JOBID")
        # The checkpoint may not exist yet: the job resolves it when it starts.
        jobs = submit_eval(cfg, args.run, [args.checkpoint], args.num_samples, after=[args.after])
    else:
        todo, done = pending(cfg, args.run, args.checkpoint, args.num_samples)
        for s in done:
            print(f"step {s}: already evaluated: {result_path(cfg, args.run, s, num_samples=args.num_samples)}")
        if not todo and not done:
            raise LaunchError(f"no checkpoint to evaluate in {checkpoint_dir(args.run)}")
        jobs = submit_eval(cfg, args.run, [str(s) for s in todo], args.num_samples) if todo else []
    if args.wait:
        for job, res in zip(jobs, wait(jobs)):
            print(f"eval job {job.job_id}: step {res['step']}: {res['metrics']}\n  -> {res['result']}")


if __name__ == "__main__":
    from launch.submit import main_guard

    sys.exit(main_guard(main))
