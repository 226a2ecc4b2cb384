"""Submit a training run: one task per GPU (or per CPU process), DeepSpeed over submitit's
torch.distributed environment; preemption and timeouts checkpoint and requeue.

    python launch/train.py --config configs/experiments/imagenet256_L.yaml \
        --nodes 4 --gpus-per-node 8 --partition gpu --time 1440 [train.lr=3e-4 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script: import `launch` from the checkout, not launch/tokenize.py as stdlib tokenize
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from enat.config import Config, to_dict
from enat.data.prepare import check_data
from enat.train.lease import describe_holder, read_lease
from launch.jobs import TrainJob
from launch.submit import add_launch_args, describe, executor, load, record, submit, wait


def submit_train(cfg: Config, stop_at: int | None = None, after=None, takeover: bool = False):
    if not after:  # nothing to wait for (no tokenize job): the data must exist now, not fail after the queue
        check_data(cfg)
    run_dir = Path(cfg.train.run_dir)
    holder = read_lease(run_dir)
    if holder is not None:  # said now, not after the queue; the job itself decides when it starts
        print(f"note: {run_dir} has a writer lease: {describe_holder(holder)}. "
              + ("This job takes it over when it starts." if takeover else
                 "This job stops at start unless that writer is gone by then (or --takeover)."), flush=True)
    ln = cfg.launch
    ex = executor(cfg, Path(ln.log_dir or run_dir / "slurm"), f"train-{run_dir.name}",
                  tasks_per_node=ln.gpus_per_node, nodes=ln.nodes)
    job = submit(ex, TrainJob(), to_dict(cfg), stop_at, takeover, after=after)
    rec = record(run_dir, "train", cfg, [job], {"stop_at": stop_at, "takeover": takeover})
    print(describe([job], "train"))
    print(f"run directory: {run_dir}  (submission: {rec})", flush=True)
    return job


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
    p.add_argument("--stop-at", type=int, help="end (with a checkpoint) at this step instead of train.steps")
    p.add_argument("--after", help="start after this job id succeeded (SLURM)")
    p.add_argument("--takeover", action="store_true",
                   help="take the run directory's writer lease from a live holder when the job starts")
    args = p.parse_args(argv)
    cfg = load(args)
    job = submit_train(cfg, args.stop_at, after=[args.after] if args.after else None, takeover=args.takeover)
    if args.wait:
        result = wait([job])[0]
        print(f"train job {job.job_id} done: step {result.get('step')}, loss {result.get('loss')}")


if __name__ == "__main__":
    from launch.submit import main_guard

    sys.exit(main_guard(main))
