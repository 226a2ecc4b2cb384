"""Plan the next sweep: an isoFLOP grid (model size x training steps at the experiment's batch)
within a total compute budget, centred on the current fit's optimum, as a sweep YAML that
launch/sweep.py runs.

    python -m scaling.plan --config configs/experiments/demo.yaml --budget 2e14 --runs 12 \
        --size-key model.width --sizes 32 48 64 96 128 [--fit runs/sweeps/mini/report/fit.json] \
        --name iso1 --out configs/sweeps/iso1.yaml

Levels: the isoFLOP levels are spaced 3x apart; with s sizes per level and m = runs/s levels, the
top level is budget / (s (1 + 1/3 + ... )). Sizes per level: the s sizes nearest (in log N) to
N*(C) of the fit; without a fit, a prior N* ~ C^0.5 placed so that the middle level's optimum is
the middle size. Each run's steps = level / (FLOPs per sample x global batch), rounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from scaling.collect import ScalingError
from scaling.fit import compute_optimal, LawFit


def size_table(config: str | Path, key: str, sizes: list) -> list[dict]:
    from enat.config import load_config
    from enat.flops import expected_train_flops
    from enat.models.zoo import parameter_counts
    from enat.sweeps import global_batch

    out = []
    for v in sizes:
        cfg = load_config(config, [f"{key}={json.dumps(v)}"])
        _, n = parameter_counts(cfg.model)
        out.append({"value": v, "N": n, "flops_per_sample": expected_train_flops(cfg.model, tuple(cfg.train.mask_beta),
                                                                                 cfg.train.reuse_prob),
                    "batch": global_batch(cfg)})
    return sorted(out, key=lambda r: r["N"])


def plan(config: str | Path, budget: float, runs: int, key: str, sizes: list, fit_path: str | Path | None = None,
         per_level: int | None = None, ratio: float = 3.0) -> tuple[list[dict], dict]:
    """-> (runs [{key: size, "train.steps": n}], info)."""
    table = size_table(config, key, sizes)
    if len(table) < 2:
        raise ScalingError("give at least two sizes")
    s = min(per_level or min(len(table), 4), len(table))
    m = max(1, runs // s)
    top = budget / (s * sum(ratio ** -i for i in range(m)))
    levels = [top / ratio ** i for i in reversed(range(m))]
    logn = np.log([r["N"] for r in table])
    if fit_path is not None:
        info = json.loads(Path(fit_path).read_text())
        law = LawFit(**{k: info["law"][k] for k in ("E", "A", "B", "alpha", "beta")})
        k = info["k_flops_per_param_sample"]
        centres = [float(compute_optimal(law, k, c)["N"]) for c in levels]
        source = f"the fit in {fit_path}"
    else:
        mid = levels[len(levels) // 2]
        centres = [float(np.exp(logn.mean())) * (c / mid) ** 0.5 for c in levels]
        source = "a prior N* ~ C^0.5 centred on the sizes"
    out = []
    for c, centre in zip(levels, centres):
        order = np.argsort(np.abs(logn - np.log(centre)), kind="stable")[:s]
        for i in sorted(order):
            r = table[i]
            steps = max(1, round(c / (r["flops_per_sample"] * r["batch"])))
            out.append({key: r["value"], "train.steps": int(steps),
                        "_compute": steps * r["flops_per_sample"] * r["batch"], "_level": c})
    return out, {"levels": levels, "centres": centres, "source": source, "per_level": s, "sizes": table}


def write_sweep(path: str | Path, name: str, config: str | Path, out_dir: str, runs: list[dict],
                overrides: dict | None = None, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(config).resolve(), path.parent.resolve())
    spec = {"name": name, "config": rel, "out_dir": out_dir, "overrides": overrides or {},
            "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    head = ""
    if info:
        head = (f"# isoFLOP plan from {info['source']}: levels "
                + ", ".join(f"{c:.3g}" for c in info["levels"]) + " FLOPs per run, "
                + f"{info['per_level']} sizes per level; total {sum(r['_compute'] for r in runs):.3g} FLOPs.\n")
    path.write_text(head + yaml.safe_dump(spec, sort_keys=False))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment every run starts from")
    p.add_argument("--budget", type=float, required=True, help="total training FLOPs for the sweep")
    p.add_argument("--runs", type=int, required=True, help="target number of runs")
    p.add_argument("--size-key", default="model.size", help="the config key that sets the size")
    p.add_argument("--sizes", nargs="+", required=True, help="values of --size-key (zoo names or widths)")
    p.add_argument("--per-level", type=int, help="sizes per isoFLOP level (default: min(4, sizes))")
    p.add_argument("--fit", help="fit.json of a previous report (default: a prior)")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, help="the sweep YAML to write")
    p.add_argument("--out-dir", help="where the runs go (default runs/sweeps/NAME)")
    args = p.parse_args(argv)
    sizes = [int(s) if s.isdigit() else s for s in args.sizes]
    try:
        runs, info = plan(args.config, args.budget, args.runs, args.size_key, sizes, args.fit, args.per_level)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_sweep(args.out, args.name, args.config, args.out_dir or f"runs/sweeps/{args.name}", runs, info=info)
    for r in runs:
        print(f"level {r['_level']:.3g}: {args.size_key}={r[args.size_key]} steps {r['train.steps']} "
              f"({r['_compute']:.3g} FLOPs)")
    print(f"wrote {path}: {len(runs)} runs, {sum(r['_compute'] for r in runs):.3g} of {args.budget:.3g} FLOPs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
