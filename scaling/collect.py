"""Runs -> one table. Reads each run's files (config.yaml, metrics.jsonl, eval.jsonl), never the
trainer, and writes one row per (run, logged validation step):

    run, size, width, n_params, n_params_nonembed, flops_per_sample, step, samples (D),
    compute (C: the exact FLOPs the trainer logs as flops_seen; flops_per_sample * D for runs from
    before that count), val_loss_r<ratio> (online and EMA), fid / is at
    that step when evaluated, wall_s (training time so far)

    python -m scaling.collect --sweep runs/sweeps/mini [--out DIR]     (or --runs RUN [RUN ...])

Runs that failed or did not finish are listed with the reason and left out of the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

class ScalingError(ValueError):
    pass


@dataclass
class Collection:
    rows: list[dict] = field(default_factory=list)  # one per (run, validation step)
    runs: list[dict] = field(default_factory=list)  # one per included run
    excluded: list[dict] = field(default_factory=list)  # {"run", "reason"}
    name: str = ""


def _jsonl(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ScalingError(f"{path}:{i + 1}: not JSON ({e})") from e
    return out


def _compute(record: dict, per_sample: float) -> float:
    """The training FLOPs behind a record: exact (the trainer sums every step's plan) when the
    record carries them, else samples x the mean FLOPs per sample (runs from before the count)."""
    exact = record.get("flops_seen")
    return float(exact) if exact is not None else per_sample * record["samples_seen"]


def read_run(run_dir: Path, name: str | None = None) -> tuple[dict | None, list[dict], str | None]:
    """(run summary, rows, None) or (None, [], reason to exclude it)."""
    from enat.config import ConfigError, load_config
    from enat.flops import expected_train_flops
    from enat.models.zoo import parameter_counts

    name = name or run_dir.name
    if not (run_dir / "config.yaml").is_file():
        return None, [], "no config.yaml (never started)"
    if not (run_dir / "metrics.jsonl").is_file():
        return None, [], "no metrics.jsonl (failed before the first log)"
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        return None, [], f"config.yaml does not load: {e}"
    records = _jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    last = max((r["step"] for r in train), default=0)
    if last < cfg.train.steps:
        return None, [], f"incomplete: logged up to step {last} of {cfg.train.steps}"
    if any(r.get("loss") != r.get("loss") for r in train[-3:]):  # NaN at the end
        return None, [], "diverged: NaN training loss at the end"
    if not val:
        return None, [], "no validation records (train.val_every=0): nothing to fit"
    n_total, n_nonembed = parameter_counts(cfg.model)
    per_sample = expected_train_flops(cfg.model, tuple(cfg.train.mask_beta), cfg.train.reuse_prob)
    evals = {}
    if (run_dir / "eval.jsonl").is_file():
        for r in _jsonl(run_dir / "eval.jsonl"):
            evals[r["step"]] = r  # the newest evaluation of a step wins
    wall, wall_at = 0.0, {}
    for r in train:
        wall += r.get("window_s", 0.0)
        wall_at[r["step"]] = wall
    from enat.flops import sampling_flops

    guided = cfg.sample.cfg_scale != 0
    sampling = {"sample_flops_plain": sampling_flops(cfg.model, cfg.sample.steps, reuse=False, guided=guided).total,
                "sample_flops_reuse": (sampling_flops(cfg.model, cfg.sample.steps, reuse=True, guided=guided).total
                                       if cfg.model.arch == "enat" else None),
                "sample_steps": cfg.sample.steps, "seq_len": cfg.model.seq_len,
                "mask_fraction": cfg.train.mask_beta[0] / sum(cfg.train.mask_beta)}  # mean of Beta(a, b)
    summary = {"run": name, "run_dir": str(run_dir), "size": cfg.model.size, "width": cfg.model.width,
               "depth": cfg.model.enc_depth + cfg.model.dec_depth, "n_params": n_total,
               "n_params_nonembed": n_nonembed, "flops_per_sample": per_sample, "steps": cfg.train.steps,
               "samples": val[-1]["samples_seen"], "compute": _compute(val[-1], per_sample),
               "wall_s": wall, "seed": cfg.seed, "schedule": cfg.train.schedule, **sampling}
    rows = []
    for r in val:
        row = {k: summary[k] for k in ("run", "size", "width", "n_params", "n_params_nonembed", "flops_per_sample",
                                       "seed")}
        row.update(step=r["step"], samples=r["samples_seen"], compute=_compute(r, per_sample),
                   wall_s=wall_at.get(r["step"], float("nan")), final=r is val[-1], schedule=cfg.train.schedule)
        row.update({k.replace("/", "_"): v for k, v in r.items() if k.startswith(("val/", "val_ema/"))})
        ev = evals.get(r["step"], {})
        row.update({k.replace("/", "_"): v for k, v in ev.items() if k.startswith("eval/")})
        rows.append(row)
    per_step = val[-1]["samples_seen"] / val[-1]["step"]
    summary["evals"] = [{"step": s, "compute": e.get("flops_seen") or per_sample * s * per_step,
                         **{k: v for k, v in e.items() if k.startswith("eval/")}} for s, e in sorted(evals.items())]
    return summary, rows, None


def collect(sweep: str | Path | None = None, runs: list[str | Path] | None = None) -> Collection:
    """From a sweep manifest (or its folder) or a list of run directories."""
    col = Collection()
    entries: list[tuple[str, Path]] = []
    if sweep is not None:
        path = Path(sweep)
        path = path / "sweep.json" if path.is_dir() else path
        if not path.is_file():
            raise ScalingError(f"no sweep manifest at {path}: give the sweep's out_dir (launch/sweep.py writes "
                               f"sweep.json there) or --runs")
        manifest = json.loads(path.read_text())
        col.name = manifest.get("name", path.parent.name)
        for r in manifest["runs"]:
            run_dir = Path(r["run_dir"])
            if not run_dir.is_absolute() and not run_dir.exists():
                run_dir = path.parent / run_dir.name  # the manifest's paths are relative to the launch folder
            entries.append((r["name"], run_dir))
    for r in runs or []:
        entries.append((Path(r).name, Path(r)))
    if not entries:
        raise ScalingError("no runs given")
    for name, run_dir in entries:
        summary, rows, reason = read_run(run_dir, name)
        if reason:
            col.excluded.append({"run": name, "run_dir": str(run_dir), "reason": reason})
            continue
        col.runs.append(summary)
        col.rows.extend(rows)
    return col


def write(col: Collection, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in col.rows:
        keys += [k for k in row if k not in keys]
    csv_path = out / "points.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(col.rows)
    json_path = out / "collection.json"
    json_path.write_text(json.dumps({"name": col.name, "runs": col.runs, "excluded": col.excluded,
                                     "points": col.rows}, indent=1))
    return csv_path, json_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", help="sweep folder or its sweep.json")
    p.add_argument("--runs", nargs="*", default=[], help="run directories")
    p.add_argument("--out", default=None, help="where points.csv and collection.json go (default: the sweep folder)")
    args = p.parse_args(argv)
    try:
        col = collect(args.sweep, args.runs)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (Path(args.sweep) if args.sweep and Path(args.sweep).is_dir() else Path("."))
    csv_path, json_path = write(col, out)
    for e in col.excluded:
        print(f"excluded {e['run']}: {e['reason']}")
    print(f"{len(col.runs)} runs, {len(col.rows)} points -> {csv_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
