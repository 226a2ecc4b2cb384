"""Submit a sweep (see enat/sweeps.py for the YAML) as one job array of training runs.

    python launch/sweep.py --sweep configs/sweeps/mini.yaml [--cluster ...] [--wait]

Each run gets its own directory OUT_DIR/<name>, the wandb group = the sweep name and tags with
its grid values; OUT_DIR/sweep.json (the manifest `scaling/` reads) lists every run with its
parameters, size, FLOPs per sample and compute budget, and the job ids. Resubmitting continues
the runs from their checkpoints and skips finished ones. launch.array_parallelism caps how many
run at once. --eval adds an FID job per run for its final checkpoint. The runs' data is prepared
first (launch/tokenize.py's jobs, once per distinct tokenizer/shards/extractor; nothing when it
exists): the trainer only checks its data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # a script: import `launch` from the checkout, not launch/tokenize.py as stdlib tokenize
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from enat.config import to_dict
from enat.sweeps import MANIFEST, load_sweep, run_configs, run_entry
from enat.train.checkpoint import latest_step
from launch.eval import submit_eval
from launch.jobs import TrainJob
from launch.submit import add_launch_args, describe, executor, launch_overrides, record, submit_array, wait
from launch.tokenize import submit_tokenize


def submit_data(cfgs, evaluate: bool = True) -> list:
    """The prepare/tokenize jobs for the data the runs need, once per distinct set of paths (two
    runs writing the same shards would collide), one set after the other (they may share a
    tokenizer); [] when everything exists. The FID classifier only when FID jobs follow."""
    deps, seen = [], set()
    for cfg in cfgs:
        key = (cfg.tokenizer.checkpoint, cfg.data.shards, cfg.data.val_shards, cfg.eval.extractor_weights)
        if key not in seen:
            seen.add(key)
            deps += submit_tokenize(cfg, ["train", "val"] if cfg.data.val_shards else ["train"], parts=1, after=deps,
                                    extractor=evaluate)
    return deps


def merged_manifest(old: dict | None, new: dict) -> dict:
    """The manifest of a sweep folder that another spec wrote runs to (a study's second round
    goes to the first round's folder, so that every reader of the sweep sees both): the other
    specs' runs are kept, this spec's renewed. One spec alone: its manifest as it is."""
    if old is None:
        return new
    specs = old.get("sweeps", [old.get("sweep")])
    if specs == [new["sweep"]]:
        return new
    mine = {e["name"] for e in new["runs"]}
    return {**new, "name": old.get("name", new["name"]), "sweeps": list(dict.fromkeys(specs + [new["sweep"]])),
            "runs": [e for e in old["runs"] if e["name"] not in mine] + new["runs"]}


def submit_sweep(sweep_path: str | Path, extra_overrides: list[str], evaluate: bool = False) -> tuple[Path, list]:
    sweep = load_sweep(sweep_path)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    runs = run_configs(sweep, extra_overrides)  # launcher flags and overrides apply to every run
    entries = [run_entry(run, cfg) for run, cfg in runs]
    todo = [i for i, (run, cfg) in enumerate(runs) if (latest_step(run.run_dir) or 0) < cfg.train.steps]
    for i, (run, _) in enumerate(runs):
        if i not in todo:
            print(f"{run.name}: finished, not resubmitted")
    jobs = []
    if todo:
        cfg0 = runs[todo[0]][1]
        ln = cfg0.launch
        ex = executor(cfg0, Path(ln.log_dir or sweep.out_dir / "slurm"), f"sweep-{sweep.name}",
                      tasks_per_node=ln.gpus_per_node, nodes=ln.nodes)
        data = submit_data([runs[i][1] for i in todo], evaluate)
        jobs = submit_array(ex, TrainJob(), [to_dict(runs[i][1]) for i in todo], [None] * len(todo), after=data)
        for i, job in zip(todo, jobs):
            entries[i]["job_id"] = job.job_id
            print(f"{runs[i][0].name}: job {job.job_id}  log {job.paths.stdout}  run {runs[i][0].run_dir}")
        record(sweep.out_dir, "sweep", cfg0, jobs, {"sweep": str(sweep_path), "runs": [runs[i][0].name for i in todo]})
        if evaluate:  # FID of each run's final checkpoint, each after its own training task
            evals = [e for i, job in zip(todo, jobs)
                     for e in submit_eval(runs[i][1], Path(runs[i][0].run_dir), ["latest"], after=[job])]
            jobs = jobs + evals
    manifest = {"name": sweep.name, "sweep": str(sweep_path), "config": str(sweep.config), "grid": sweep.grid,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": entries}
    path = sweep.out_dir / MANIFEST
    manifest = merged_manifest(json.loads(path.read_text()) if path.is_file() else None, manifest)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    print(f"sweep {sweep.name}: {len(entries)} runs, {len(todo)} submitted"
          + (f" with {len(jobs) - len(todo)} FID jobs" if evaluate else "") + f"; manifest {path}", flush=True)
    return path, jobs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep YAML (configs/sweeps/...)")
    p.add_argument("--eval", action="store_true", help="also an FID job per run, after its training (afterok)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    add_launch_args(p, config=False)
    args = p.parse_args(argv)
    _, jobs = submit_sweep(args.sweep, list(args.overrides) + launch_overrides(args), args.eval)
    if args.wait:
        wait(jobs)
        print(describe(jobs, "done"))


if __name__ == "__main__":
    from launch.submit import main_guard

    sys.exit(main_guard(main))
