"""Runs -> one table. Reads each run's files (config.yaml, metrics.jsonl, eval.jsonl), never the
trainer, and writes one row per (run, logged validation step):

    run, size, width, n_params, n_params_nonembed, flops_per_sample, step, samples (D),
    compute (C: the exact FLOPs the trainer logs as flops_seen; flops_per_sample * D for runs from
    before that count), tokens_seen / masked_tokens_seen (when the records carry them),
    val_loss_r<ratio> (online and EMA), fid / is / kid at that step when evaluated, wall_s
    (training time so far)

and one summary per run (collection.json's "runs", runs.csv): besides size and budget, D as images,
tokens and [MASK] tokens, and what makes a law transfer to another cluster: mean tokens/s,
images/s, TFLOP/s and MFU (None where the trainer knows no peak, e.g. on CPU), the training wall
time and device-hours (GPU-hours on GPUs: wall time x world size), and the FID jobs' sampling
throughput with and without computation reuse (from each job's result file), with the weights,
extractor and sample count each evaluation used.

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

from enat.config import ConfigError, load_config
from enat.flops import expected_train_flops, sampling_flops
from enat.models.zoo import parameter_counts


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


def _window_mean(train: list[dict], key: str) -> float | None:
    """The mean of a per-window rate over a run: weighted by each window's time, the first window
    (compilation, warm-up) left out when there are others. None when no record carries it."""
    have = [r for r in train if r.get(key) is not None and r.get("window_s")]
    if len(have) > 1:
        have = have[1:]
    total = sum(r["window_s"] for r in have)
    return float(sum(r[key] * r["window_s"] for r in have) / total) if total > 0 else None


def _world_size(train: list[dict], cfg) -> tuple[int, str]:
    """How many devices trained the run: from the records (images/s over images/s per rank: what
    ran), else the config's launch.nodes x launch.gpus_per_node (what was asked for)."""
    for r in reversed(train):
        if r.get("images_per_s") and r.get("images_per_s_per_rank"):
            return max(1, round(r["images_per_s"] / r["images_per_s_per_rank"])), "metrics"
    return cfg.launch.nodes * cfg.launch.gpus_per_node, "config"


def _eval_result(run_dir: Path, line: dict) -> dict:
    """The result file an eval.jsonl line was written with (RUN/eval/<step>/<settings_hash>.json:
    its settings and timings), {} when it is not there."""
    h = line.get("settings_hash")
    path = run_dir / "eval" / f"{int(line['step']):08d}" / f"{h}.json"
    if not h or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _eval_entry(run_dir: Path, line: dict, cfg) -> dict:
    """What the report needs to judge an evaluation: the weights, extractor, sample count, the
    sampler's reuse flag and its throughput. From the job's result file; where that is missing,
    the run's config (which the job defaults to), marked source "config"."""
    res = _eval_result(run_dir, line)
    settings = res.get("settings") or {}
    sample = settings.get("sample") or {}
    world = res.get("world_size") or 1
    sampling_s = (res.get("timings_s_rank0") or {}).get("sampling")
    n = line.get("num_samples", res.get("num_samples"))
    return {"weights": settings.get("weights", cfg.eval.weights),
            "extractor": settings.get("extractor", cfg.eval.extractor),
            "num_samples": n, "reuse": sample.get("reuse", cfg.sample.reuse),
            "sample_steps": sample.get("steps", cfg.sample.steps),
            # images per second per device: rank 0's share of the samples over its sampler time
            # (the network's iterations only: no tokenizer decoding, no feature extraction)
            "sample_images_per_s": (n / world / sampling_s) if n and sampling_s else None,
            "settings_source": "result" if settings else "config"}


def _sampling_throughput(entries: list[dict]) -> dict:
    """Per run: mean sampler img/s per device with computation reuse and without (None when no
    evaluation measured it)."""
    out = {}
    for flag, name in ((True, "reuse"), (False, "plain")):
        v = [e["sample_images_per_s"] for e in entries if e["reuse"] is flag and e["sample_images_per_s"]]
        out[f"sample_images_per_s_{name}"] = float(sum(v) / len(v)) if v else None
    return out


def read_run(run_dir: Path, name: str | None = None) -> tuple[dict | None, list[dict], str | None]:
    """(run summary, rows, None) or (None, [], reason to exclude it)."""
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
    evals, lines = {}, []
    if (run_dir / "eval.jsonl").is_file():
        lines = _jsonl(run_dir / "eval.jsonl")
        for r in lines:
            evals[r["step"]] = r  # the newest evaluation of a step wins
    entries = {id(r): _eval_entry(run_dir, r, cfg) for r in lines}
    wall, wall_at = 0.0, {}
    for r in train:
        wall += r.get("window_s", 0.0)
        wall_at[r["step"]] = wall
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
    world, world_from = _world_size(train, cfg)
    end = val[-1]
    tokens = end.get("tokens_seen")
    masked = end.get("masked_tokens_seen")
    summary.update(
        tokens_seen=float(tokens) if tokens is not None else float(end["samples_seen"] * cfg.model.seq_len),
        # [MASK] tokens are counted by the trainer (every step's plan); runs from before the count
        # get samples x seq_len x the mean mask ratio, marked estimated
        masked_tokens_seen=(float(masked) if masked is not None
                            else float(end["samples_seen"] * cfg.model.seq_len * sampling["mask_fraction"])),
        masked_tokens_estimated=masked is None,
        tokens_per_s=_window_mean(train, "tokens_per_s"), images_per_s=_window_mean(train, "images_per_s"),
        tflops_per_s=_window_mean(train, "tflops_per_s"), mfu=_window_mean(train, "mfu"),
        peak_memory_gb=max((r["peak_memory_gb"] for r in train if r.get("peak_memory_gb") is not None),
                           default=None),
        world_size=world, world_size_source=world_from, gpu_hours=wall * world / 3600,
        **_sampling_throughput(list(entries.values())))
    rows = []
    for r in val:
        row = {k: summary[k] for k in ("run", "size", "width", "n_params", "n_params_nonembed", "flops_per_sample",
                                       "seed")}
        row.update(step=r["step"], samples=r["samples_seen"], compute=_compute(r, per_sample),
                   wall_s=wall_at.get(r["step"], float("nan")), final=r is val[-1], schedule=cfg.train.schedule)
        row.update({k: float(r[k]) for k in ("tokens_seen", "masked_tokens_seen") if r.get(k) is not None})
        row.update({k.replace("/", "_"): v for k, v in r.items() if k.startswith(("val/", "val_ema/"))})
        ev = evals.get(r["step"], {})
        row.update({k.replace("/", "_"): v for k, v in ev.items() if k.startswith("eval/")})
        rows.append(row)
    per_step = val[-1]["samples_seen"] / val[-1]["step"]
    summary["evals"] = [{"step": s, "compute": e.get("flops_seen") or per_sample * s * per_step,
                         **{k: v for k, v in e.items() if k.startswith("eval/")}, **entries[id(e)]}
                        for s, e in sorted(evals.items())]
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


RUN_COLUMNS = ("run", "size", "n_params", "n_params_nonembed", "steps", "samples", "tokens_seen",
               "masked_tokens_seen", "masked_tokens_estimated", "compute", "flops_per_sample", "wall_s",
               "world_size", "world_size_source", "gpu_hours", "tokens_per_s", "images_per_s", "tflops_per_s", "mfu",
               "peak_memory_gb", "sample_images_per_s_reuse", "sample_images_per_s_plain", "sample_steps", "seed",
               "schedule")


def write(col: Collection, out_dir: str | Path) -> tuple[Path, Path]:
    """points.csv (one row per run and validation step), runs.csv (one per run: D in images,
    tokens and [MASK] tokens, throughput, MFU, device-hours, sampling img/s) and collection.json."""
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
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(col.runs)
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
