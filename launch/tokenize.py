"""Tokenize a config's data on the cluster: a job array over parts per split, then the merge
step (manifest) as a job that depends on the array. For the embedded demo a first job trains the
demo tokenizer and FID classifier when they are missing.

    python launch/tokenize.py --config configs/experiments/imagenet256_L.yaml --parts 64 \
        --split train --split val [--cpus-per-task 8 ...]

Splits whose manifest exists are skipped; parts whose shards exist are skipped inside the jobs,
so a failed array can simply be submitted again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script: import `launch` from the checkout, not launch/tokenize.py as stdlib tokenize
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from enat.config import Config, to_dict
from enat.data.prepare import check_text_encoder, split_dir, text_encoder_missing, tokenizer_missing
from enat.data.shards import MANIFEST
from enat.eval.prepare import extractor_missing
from launch.jobs import merge_job, prepare_job, tokenize_job
from launch.submit import add_launch_args, describe, executor, load, record, submit, submit_array, wait


def needs_models(cfg: Config, extractor: bool = True) -> bool:
    """Whether the prepare job must run first: the project's own tokenizer or (when FID jobs
    will need it) FID classifier is missing."""
    return tokenizer_missing(cfg) or (extractor and extractor_missing(cfg))


def submit_tokenize(cfg: Config, splits: list[str], parts: int, after=None, extractor: bool = True) -> list:
    """-> the merge jobs (what a training job should depend on); [] when all is there already.
    extractor=False: no FID job will follow (a sweep without --eval), so a missing FID classifier
    is not trained."""
    if not text_encoder_missing(cfg):  # the prepare job builds the demo's; any other must exist now, not after the queue
        check_text_encoder(cfg)
    cfg_dict = to_dict(cfg)
    log_dir = Path(cfg.launch.log_dir or Path(split_dir(cfg, "train")).parent / "slurm")
    ex = executor(cfg, log_dir, "tokenize", tasks_per_node=1, gpus=False)
    jobs, merges = [], []
    deps = list(after or [])
    if needs_models(cfg, extractor):
        prep = submit(ex, prepare_job, cfg_dict, extractor, after=deps)
        jobs.append(prep)
        deps = [prep]
        print(describe([prep], "prepare (tokenizer, FID classifier)"))
    for split in splits:
        out = Path(split_dir(cfg, split))
        if (out / MANIFEST).is_file():
            print(f"{split}: {out / MANIFEST} exists, skipped")
            continue
        ex.update_parameters(name=f"tokenize-{split}")
        array = submit_array(ex, tokenize_job, [cfg_dict] * parts, [split] * parts, list(range(parts)),
                             [parts] * parts, after=deps)
        ex.update_parameters(name=f"merge-{split}")
        merge = submit(ex, merge_job, cfg_dict, split, after=array)
        print(describe(array, f"tokenize {split}") + "\n" + describe([merge], f"merge {split}") + f"\n-> {out}")
        jobs += array + [merge]
        merges.append(merge)
    if jobs:
        rec = record(Path(split_dir(cfg, "train")).parent, "tokenize", cfg, jobs, {"splits": splits, "parts": parts})
        print(f"submission: {rec}", flush=True)
    return merges or [j for j in jobs[:1]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
    p.add_argument("--parts", type=int, default=1, help="array tasks per split")
    p.add_argument("--split", action="append", choices=["train", "val"],
                   help="default: train, and val when data.val_shards is set")
    args = p.parse_args(argv)
    cfg = load(args)
    splits = args.split or (["train", "val"] if cfg.data.val_shards else ["train"])
    jobs = submit_tokenize(cfg, splits, args.parts)
    if args.wait:
        print("done: " + "; ".join(str(r) for r in wait(jobs)))


if __name__ == "__main__":
    from launch.submit import main_guard

    sys.exit(main_guard(main))
