"""The whole chain for one experiment: tokenize -> train -> FID evaluation, each a job that starts
when the one before succeeded (SLURM afterok; in order when running locally).

    python launch/pipeline.py --config configs/experiments/demo.yaml [--cluster local|slurm] [--wait]

What exists is not redone: tokenized splits are skipped, training resumes from its checkpoint,
an evaluated checkpoint prints its stored result. With --wait it prints where the samples grid,
the metrics and the FID result are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script: import `launch` from the checkout, not launch/tokenize.py as stdlib tokenize
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from enat.train.checkpoint import LATEST
from launch.eval import submit_eval
from launch.submit import add_launch_args, load, wait
from launch.tokenize import submit_tokenize
from launch.train import submit_train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
    p.add_argument("--parts", type=int, default=1, help="tokenize array tasks per split")
    args = p.parse_args(argv)
    cfg = load(args)
    run_dir = Path(cfg.train.run_dir)
    splits = ["train", "val"] if cfg.data.val_shards else ["train"]
    tok = submit_tokenize(cfg, splits, args.parts)
    train = submit_train(cfg, after=tok)
    evals = submit_eval(cfg, run_dir, [LATEST], after=[train])
    if not args.wait:
        return
    result = wait(evals)[0]
    grids = sorted((run_dir / "samples").glob("*.png"))
    print("\n== done ==")
    print(f"metrics:        {run_dir / 'metrics.jsonl'} (validation: {run_dir / 'val.jsonl'})")
    print(f"samples grid:   {grids[-1] if grids else '(none: train.sample_every=0)'}")
    print(f"FID result:     {result['result']}")
    print(f"FID samples:    {Path(result['result']).with_suffix('.png')}")
    print(f"metrics at step {result['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))


if __name__ == "__main__":
    from launch.submit import main_guard

    sys.exit(main_guard(main))
