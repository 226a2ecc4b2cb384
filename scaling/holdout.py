"""A pre-registered hold-out: the law's prediction for runs beyond the fitted range, written down
before those runs exist, then checked against them; and a leave-one-out table.

    python -m scaling.holdout preregister --sweep runs/sweeps/X --holdout configs/sweeps/X_holdout.yaml \\
        [--loss val/loss_r0.7] [--bootstrap 1000] [--out PATH] [--force] [--allow-interpolation]
    python -m scaling.holdout evaluate --prereg runs/sweeps/X_holdout/preregistration.json \\
        [--sweep runs/sweeps/X_holdout] [--out evaluation.json]
    python -m scaling.holdout loo --sweep runs/sweeps/X [--loss val/loss_r0.7]

A fit always describes its own points well; whether it predicts is only shown by runs it has not
seen, chosen and predicted before they ran, so that neither the runs nor the fit can be adjusted
to the answer. The planner (scaling/plan.py) writes the fitting sweep NAME.yaml and a hold-out
sweep NAME_holdout.yaml (a normal sweep spec: a few seeds of one (size, steps) point).

preregister, before the hold-out is launched:
  - refuses if a hold-out run directory shows the run has started (config.yaml, metrics.jsonl,
    val.jsonl, eval.jsonl, lease.json, wandb_run_id or checkpoints/), or if a pre-registration is
    already there (--force replaces it, and only while no hold-out run has started);
  - refuses targets that are not >= 2x the largest fitted N and >= 3x the largest fitted compute C
    (C = FLOPs per sample x samples, as enat.sweeps.run_entry's compute_budget; 2 % slack for
    the rounding of steps), naming the numbers;
    --allow-interpolation waives this, which weakens the test to an interpolation check and is
    recorded in the file;
  - fits L(N, D) = E + A/N^alpha + B/D^beta to the fitting sweep's points (the report's choice:
    scaling.points.choose_points) with the robust search (scaling.search.search: 128 grid starts
    plus a profile scan, tight tolerances) and a bootstrap over runs in which every resample has a
    global search of its own (scaling.search.resample_fits; 1000 resamples by default);
  - writes preregistration.json (to the hold-out sweep's out_dir by default): created_at (UTC),
    the git commit, the sha256 of the fitting points (and the points), the law, and for every
    target its N, D, C, prediction and 95 % interval.

The interval. Let p be the full fit's prediction and p_b the prediction of bootstrap resample b.
In log space, the fit's half-widths are h_lo = max(0, ln p - ln q_2.5(p_b)) and
h_hi = max(0, ln q_97.5(p_b) - ln p) (the percentile interval, kept around p). A hold-out run is
one more draw of the training noise, which the bootstrap (the uncertainty of the mean law) does not
contain: when the fitting sweep repeats a configuration with other seeds (runs whose configs are
identical but for `seed`), the seed spread of a final log-loss is the pooled standard deviation
s = sqrt(sum_g sum_i (y_gi - mean_g)^2 / nu), nu = sum_g (n_g - 1), and the interval of one run is

    [p exp(-sqrt(h_lo^2 + (t s)^2)), p exp(+sqrt(h_hi^2 + (t s)^2))],   t = t_0.975(nu),

that of the geometric mean of k seeds the same with s / sqrt(k). Without seed repeats the interval
is the fit's alone (s = 0), and the file and the report say that it leaves the seed spread out.

evaluate, after the hold-out ran: each target's observed final loss (scaling.collect on the
hold-out sweep), its error (pred - obs) / obs and whether it lies inside the interval, and the same
for the seeds' geometric mean. It refuses when a run's results predate the pre-registration
(the earliest of its config.yaml and metrics.jsonl mtimes and its first metrics record's time is
before created_at), or when a run is not the pre-registered target (another N or D).

leave_one_out: for every fitting run, the law fitted to all the others (the profile-scan search of
a bootstrap resample, started also from the full fit's optimum; no bootstrap) predicts the run's
final loss. A check of the fit within and at the edge of the sweep, not a substitute for the
pre-registered test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.stats import t as student

from enat.config import ConfigError, load_config, to_dict
from enat.sweeps import global_batch, load_sweep, run_configs, run_entry
from scaling.collect import ScalingError, collect
from scaling.fit import fit_law
from scaling.points import fitting_points, loss_column
from scaling.search import check_sweep, search

PREREG = "preregistration.json"
MIN_N_RATIO, MIN_C_RATIO = 2.0, 3.0
# Steps are whole numbers, so a hold-out planned at exactly 3x the top level's compute lands a
# rounding step off it (either way): ratios within this fraction below the minimum pass.
RATIO_SLACK = 0.02
MIN_RESAMPLES = 100  # fewer: the 2.5 and 97.5 percentiles rest on a handful of resamples
# A run has started once any of these is in its directory.
STARTED = ("config.yaml", "metrics.jsonl", "val.jsonl", "eval.jsonl", "lease.json", "wandb_run_id", "checkpoints")
# Config keys that differ between seed repeats without changing the runs: the seed itself, where
# the run writes, its wandb labels, how it is launched, how it is evaluated.
NOT_THE_RUN = ("seed", "train.run_dir", "train.wandb", "launch", "eval")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _time(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def holdout_targets(spec_path: str | Path) -> list[dict]:
    """Every run of a hold-out sweep spec: name, run_dir, N (non-embedding parameters), D
    (samples = steps x global batch), C (compute budget: FLOPs per sample x D), steps, seed."""
    try:
        sweep = load_sweep(spec_path)
        configs = run_configs(sweep)
    except ConfigError as e:
        raise ScalingError(f"hold-out sweep spec: {e}") from e
    out = []
    for run, cfg in configs:
        e = run_entry(run, cfg)
        out.append({"name": run.name, "run_dir": run.run_dir, "N": float(e["n_params_nonembed"]),
                    "D": float(e["steps"] * e["global_batch"]), "C": float(e["compute_budget"]),
                    "steps": int(e["steps"]), "global_batch": int(e["global_batch"]), "seed": int(cfg.seed),
                    "params": run.params})
    return out


def started(run_dir: str | Path) -> list[str]:
    """What in a run directory shows that the run has started ([] when nothing does)."""
    d = Path(run_dir)
    return [name for name in STARTED if (d / name).exists()] if d.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Seed-to-seed spread
# ---------------------------------------------------------------------------------------------


def _identity(run_dir: str | Path, samples: float) -> str:
    """A run's config without what seed repeats may differ in, with its final D: equal for runs
    that are the same experiment with another seed."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    tree = to_dict(cfg)
    for dotted in NOT_THE_RUN:
        *parents, leaf = dotted.split(".")
        node = tree
        for k in parents:
            node = node.get(k, {})
        node.pop(leaf, None)
    tree["_batch"], tree["_samples"] = global_batch(cfg), samples
    return json.dumps(tree, sort_keys=True, default=str)


def seed_spread(finals: list[dict], key: str) -> dict:
    """The seed-to-seed standard deviation of a final log-loss, pooled over groups of runs whose
    configs are identical but for `seed` (finals: one row per run with run_dir, samples, key).
    -> {"sigma_log": s or None, "dof": nu, "groups": [[run, ...], ...], "note"}."""
    groups: dict[str, list[dict]] = {}
    for r in finals:
        groups.setdefault(_identity(r["run_dir"], r["samples"]), []).append(r)
    repeats = [g for g in groups.values() if len(g) >= 2]
    if not repeats:
        return {"sigma_log": None, "dof": 0, "groups": [],
                "note": "no seed repeats in the fitting sweep (runs identical but for `seed`): the interval is the "
                        "fit's alone and leaves out the seed-to-seed spread, so it is too narrow for a single run. "
                        "Repeat a few of the fitting runs with another seed to measure it."}
    ss = sum(float(((y - y.mean()) ** 2).sum()) for y in (np.log([r[key] for r in g]) for g in repeats))
    dof = sum(len(g) - 1 for g in repeats)
    s = float(np.sqrt(ss / dof))
    return {"sigma_log": s, "dof": dof, "groups": [sorted(r["run"] for r in g) for g in repeats],
            "note": f"seed spread from {len(repeats)} group(s) of seed repeats ({dof} degree(s) of freedom): "
                    f"sd of the final log-loss {s:.4f} ({s:.2%})"}


def interval(pred: float, fit_lo: float, fit_hi: float, sigma_log: float | None, dof: int, seeds: int = 1
             ) -> tuple[float, float]:
    """The fit's percentile interval widened by the seed spread of the mean of `seeds` runs (in log
    space, in quadrature; see the module's docstring)."""
    h_lo, h_hi = max(0.0, np.log(pred / fit_lo)), max(0.0, np.log(fit_hi / pred))
    s = 0.0 if not sigma_log else float(student.ppf(0.975, dof)) * sigma_log / np.sqrt(seeds)
    return float(pred * np.exp(-np.hypot(h_lo, s))), float(pred * np.exp(np.hypot(h_hi, s)))


# ---------------------------------------------------------------------------------------------
# Pre-registration
# ---------------------------------------------------------------------------------------------


def _git() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30)
        dirty = bool(status.stdout.strip()) if not status.returncode else None
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def points_digest(points: list[dict], key: str) -> tuple[str, list]:
    """The fitting points as sorted [run, N, D, loss] rows and their sha256 (of the rows' JSON)."""
    rows = sorted([str(p["run"]), float(p["n_params_nonembed"]), float(p["samples"]), float(p[key])] for p in points)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest(), rows


def _predict(draws: np.ndarray, N: float, D: float) -> np.ndarray:
    E, A, B, alpha, beta = draws.T
    return E + A / N ** alpha + B / D ** beta


def preregister(fit_sweep_dir: str | Path, holdout_spec: str | Path, loss_key: str = "val/loss_r0.7",
                out: str | Path | None = None, bootstrap: int = 1000, seed: int = 0, points: str = "auto",
                allow_interpolation: bool = False, force: bool = False) -> Path:
    """Predict the hold-out sweep's final losses from the fitting sweep, before the hold-out runs
    exist, and write the prediction to `out` (default: HOLDOUT_OUT_DIR/preregistration.json).
    -> the file. Refusals (ScalingError): a hold-out run has started; a pre-registration exists
    (force replaces it while no hold-out run has started); a target is not >= 2x N and >= 3x C
    beyond the fit (allow_interpolation waives it: a weaker test, recorded as such); fewer than
    100 usable bootstrap resamples."""
    targets = holdout_targets(holdout_spec)
    spec = load_sweep(holdout_spec)
    begun = {t["name"]: (t["run_dir"], started(t["run_dir"])) for t in targets}
    begun = {k: v for k, v in begun.items() if v[1]}
    if begun:
        raise ScalingError("the hold-out has already started, so a prediction written now is not pre-registered: "
                           + "; ".join(f"run {k} ({d} holds {', '.join(files)})" for k, (d, files) in begun.items())
                           + ". Pre-register before launching the hold-out sweep, or plan a new hold-out point.")
    path = Path(out) if out is not None else Path(spec.out_dir) / PREREG
    if path.exists() and not force:
        try:
            when = json.loads(path.read_text()).get("created_at", "unknown")
        except (OSError, ValueError):
            when = "unreadable"
        raise ScalingError(f"{path} already holds a pre-registration (created_at {when}); it is not rewritten. "
                           f"--force replaces it (allowed only while no hold-out run has started).")
    if bootstrap < MIN_RESAMPLES:
        raise ScalingError(f"bootstrap={bootstrap}: the 95 % interval needs >= {MIN_RESAMPLES} resamples "
                           f"(default 1000)")

    col, pts, which = fitting_points(fit_sweep_dir, loss_key, points)
    key = loss_column(loss_key)
    fit_dirs = {str(Path(r["run_dir"]).resolve()) for r in col.runs}
    clash = [t["name"] for t in targets if str(Path(t["run_dir"]).resolve()) in fit_dirs]
    if clash:
        raise ScalingError(f"hold-out run(s) {clash} are runs of the fitting sweep")
    n_max = max(p["n_params_nonembed"] for p in pts)
    c_max = max(p["flops_per_sample"] * p["samples"] for p in pts)
    d_max = max(p["samples"] for p in pts)
    short = [t for t in targets if t["N"] < (1 - RATIO_SLACK) * MIN_N_RATIO * n_max
             or t["C"] < (1 - RATIO_SLACK) * MIN_C_RATIO * c_max]
    if short and not allow_interpolation:
        raise ScalingError(
            "hold-out target(s) too close to the fitted range (need N >= "
            f"{MIN_N_RATIO:g}x and C >= {MIN_C_RATIO:g}x the fitted maxima N = {n_max:.4g}, C = {c_max:.4g}): "
            + "; ".join(f"{t['name']}: N = {t['N']:.4g} ({t['N'] / n_max:.2f}x), C = {t['C']:.4g} "
                        f"({t['C'] / c_max:.2f}x)" for t in short)
            + ". Plan a larger hold-out point, or pass --allow-interpolation (a weaker test: it checks the "
              "fit near the data, not the extrapolation the law is used for).")

    runs = [p["run"] for p in pts]
    fit = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p[key] for p in pts], runs,
                  bootstrap=bootstrap, seed=seed)
    draws = getattr(fit, "_draws", np.zeros((0, 5)))
    if len(draws) < MIN_RESAMPLES:
        raise ScalingError(f"only {len(draws)} of {bootstrap} bootstrap resamples could be fitted (a resample needs "
                           f">= 2 sizes and >= 2 sample counts): too few for a 95 % interval. Add runs.")
    finals = [r for r in col.rows if r["final"] and r.get(key) is not None and np.isfinite(r[key])
              and r["run"] in set(runs)]
    run_dirs = {r["run"]: r["run_dir"] for r in col.runs}
    spread = seed_spread([{**r, "run_dir": run_dirs[r["run"]]} for r in finals], key)
    s, dof = spread["sigma_log"], spread["dof"]

    out_targets = []
    for t in targets:
        p = float(fit.predict(t["N"], t["D"]))
        boot = _predict(draws, t["N"], t["D"])
        lo, hi = float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
        out_targets.append({**t, "N_ratio": t["N"] / n_max, "C_ratio": t["C"] / c_max, "D_ratio": t["D"] / d_max,
                            "predicted": p, "fit_interval": [lo, hi], "interval": list(interval(p, lo, hi, s, dof))})
    groups = []
    for t in out_targets:
        g = next((g for g in groups if g["N"] == t["N"] and g["D"] == t["D"]), None)
        if g is None:
            groups.append({"N": t["N"], "D": t["D"], "C": t["C"], "runs": [t["name"]], "predicted": t["predicted"],
                           "fit_interval": t["fit_interval"]})
        else:
            g["runs"].append(t["name"])
    for g in groups:
        g["seeds"] = len(g["runs"])
        g["interval"] = list(interval(g["predicted"], *g["fit_interval"], s, dof, seeds=g["seeds"]))

    digest, rows = points_digest(pts, key)
    record = {
        "created_at": _now(), "git": _git(), "loss": loss_key,
        "fit_sweep": str(fit_sweep_dir), "holdout_spec": str(holdout_spec), "holdout_out_dir": str(spec.out_dir),
        "points_used": which, "fit_points": {"count": len(pts), "runs": sorted(set(runs)), "sha256": digest,
                                             "rows": rows},
        "fitted_range": {"N_max": n_max, "C_max": c_max, "D_max": d_max},
        "allow_interpolation": bool(allow_interpolation),
        "interpolating": [t["name"] for t in short],
        "law": {k: getattr(fit, k) for k in ("E", "A", "B", "alpha", "beta")}, "law_ci": fit.ci,
        "at_bounds": fit.at_bounds,
        "seed_spread": spread,
        "method": {
            "fit": "Huber (delta 1e-3) on log-loss, L-BFGS-B (scaled objective, ftol 1e-15, gtol 1e-12) from 128 "
                   "grid starts + a 48x48 profile scan over (alpha, beta) (scaling.fit.search)",
            "bootstrap": f"{fit.bootstrap} of {bootstrap} resamples of runs (seed {seed}), each with its own global "
                         f"search (profile scan + L-BFGS-B from its best local minima)",
            "interval": "fit: 2.5/97.5 percentiles of the resamples' predictions; h_lo, h_hi = their log distances "
                        "from the prediction p (>= 0); with seed repeats, s = pooled sd of the final log-loss, "
                        "t = t_0.975(dof): [p exp(-sqrt(h_lo^2 + (t s / sqrt(k))^2)), "
                        "p exp(+sqrt(h_hi^2 + (t s / sqrt(k))^2))] for the geometric mean of k seeds (k = 1: one "
                        "run); without seed repeats s = 0",
            "n_resamples": fit.bootstrap, "seed": seed,
        },
        "targets": out_targets, "groups": groups,
    }
    if short:
        record["warning"] = ("--allow-interpolation: target(s) " + ", ".join(record["interpolating"]) + " lie within "
                             f"{MIN_N_RATIO:g}x N or {MIN_C_RATIO:g}x C of the fitted range, so this is a weaker test "
                             "(the fit near its data, not the extrapolation the law is used for)")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, default=float)
    if force:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        try:
            with open(path, "x") as f:  # not over one written since the check above
                f.write(text)
        except FileExistsError:
            raise ScalingError(f"{path} appeared while fitting: not overwritten") from None
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _first_time(metrics: Path) -> float | None:
    """The wall-clock time of a metrics.jsonl's first record (the trainer stamps every record)."""
    try:
        with open(metrics) as f:
            for line in f:
                if line.strip():
                    t = json.loads(line).get("time")
                    return float(t) if t is not None else None
    except (OSError, ValueError):
        return None
    return None


def results_since(run_dir: str | Path) -> tuple[float, str]:
    """The earliest sign of a run's results: the older of config.yaml's and metrics.jsonl's mtimes,
    or the first metrics record's time if older still -> (timestamp, which file or record)."""
    d = Path(run_dir)
    signs = [((d / f).stat().st_mtime, f"{f} modified") for f in ("config.yaml", "metrics.jsonl") if (d / f).is_file()]
    first = _first_time(d / "metrics.jsonl")
    if first is not None:
        signs.append((first, "first metrics record"))
    return min(signs) if signs else (float("inf"), "nothing")


def _resolve(run_dir: str, sweep_dir: Path | None) -> Path:
    d = Path(run_dir)
    if not d.exists() and sweep_dir is not None and (sweep_dir / d.name).exists():
        return sweep_dir / d.name  # a relative run_dir from another working directory
    return d


def evaluate_holdout(prereg_path: str | Path, holdout_sweep_dir: str | Path | None = None) -> dict:
    """The pre-registered predictions against the hold-out runs (collected from the hold-out sweep,
    default: the out_dir the pre-registration names) -> {"targets": [...], "groups": [...], ...};
    a target not finished has its status (e.g. "not yet run") and observed None. Refusals
    (ScalingError): a run's results predate the pre-registration; a run is not the target it
    names (another N or D)."""
    prereg_path = Path(prereg_path)
    if not prereg_path.is_file():
        raise ScalingError(f"no pre-registration at {prereg_path} (python -m scaling.holdout preregister writes it)")
    pre = json.loads(prereg_path.read_text())
    key = loss_column(pre["loss"])
    created = _time(pre["created_at"])
    sweep_dir = Path(holdout_sweep_dir) if holdout_sweep_dir is not None else Path(pre["holdout_out_dir"])
    if (sweep_dir / "sweep.json").is_file():
        col = collect(sweep_dir)
    else:  # not launched through launch/sweep.py (yet): the run directories the spec names
        col = collect(runs=[_resolve(t["run_dir"], sweep_dir) for t in pre["targets"]])
        for e in col.excluded:
            e["run"] = next((t["name"] for t in pre["targets"] if Path(t["run_dir"]).name == e["run"]), e["run"])
        for r in col.runs:
            r["run"] = next((t["name"] for t in pre["targets"] if Path(t["run_dir"]).name == r["run"]), r["run"])
    runs = {r["run"]: r for r in col.runs}
    excluded = {e["run"]: e["reason"] for e in col.excluded}
    finals = {r["run"]: r for r in col.rows if r["final"]}
    rows = []
    for t in pre["targets"]:
        row = {k: t[k] for k in ("name", "N", "D", "C", "seed", "predicted", "interval", "fit_interval")}
        row.update(observed=None, error=None, inside=None)
        if t["name"] not in runs:
            reason = excluded.get(t["name"], "not in the hold-out sweep")
            row["status"] = "not yet run" if reason.startswith("no config.yaml") else reason
            rows.append(row)
            continue
        run, final = runs[t["name"]], finals[t["name"]]
        since, what = results_since(run["run_dir"])
        if since < created:
            raise ScalingError(f"hold-out run {t['name']}'s results predate the pre-registration: {what} at "
                               f"{_stamp(since)}, pre-registered at {pre['created_at']}. A prediction written after "
                               f"the run started is not a pre-registered test.")
        if not np.isclose(run["n_params_nonembed"], t["N"], rtol=1e-9):
            raise ScalingError(f"hold-out run {t['name']} has N = {run['n_params_nonembed']:.6g}, not the "
                               f"pre-registered {t['N']:.6g}: it is not the run that was predicted")
        if not np.isclose(final["samples"], t["D"], rtol=1e-9):
            raise ScalingError(f"hold-out run {t['name']}'s final validation is at D = {final['samples']:.6g} "
                               f"samples, not the pre-registered {t['D']:.6g}: it is not the run that was predicted")
        obs = final.get(key)
        if obs is None or not np.isfinite(obs):
            row["status"] = f"no {pre['loss']} in its final validation record"
            rows.append(row)
            continue
        lo, hi = t["interval"]
        row.update(observed=float(obs), error=(t["predicted"] - obs) / obs, inside=bool(lo <= obs <= hi),
                   status="evaluated", results_since=_stamp(since))
        rows.append(row)
    groups = []
    for g in pre.get("groups", []):
        mine = [r for r in rows if r["name"] in g["runs"]]
        out = {k: g[k] for k in ("N", "D", "C", "runs", "seeds", "predicted", "interval")}
        done = [r["observed"] for r in mine if r["observed"] is not None]
        if len(done) == len(mine) and done:
            obs = float(np.exp(np.mean(np.log(done))))  # geometric mean: the interval is for the mean log-loss
            lo, hi = g["interval"]
            out.update(observed=obs, error=(g["predicted"] - obs) / obs, inside=bool(lo <= obs <= hi),
                       status="evaluated")
        else:
            out.update(observed=None, error=None, inside=None,
                       status=f"{len(done)} of {len(mine)} seeds evaluated" if done else "not yet run")
        groups.append(out)
    evaluated = [r for r in rows if r["status"] == "evaluated"]
    return {"preregistration": str(prereg_path), "created_at": pre["created_at"], "git": pre.get("git"),
            "evaluated_at": _now(), "loss": pre["loss"], "law": pre["law"], "seed_spread": pre.get("seed_spread"),
            "fit_points": {k: v for k, v in pre["fit_points"].items() if k != "rows"},
            "allow_interpolation": pre.get("allow_interpolation", False), "warning": pre.get("warning"),
            "targets": rows, "groups": groups, "evaluated": len(evaluated),
            "inside": sum(bool(r["inside"]) for r in evaluated)}


# ---------------------------------------------------------------------------------------------
# Leave one out
# ---------------------------------------------------------------------------------------------


def leave_one_out(points: list[dict], loss_key: str, delta: float = 1e-3) -> dict:
    """For every run: the law fitted to the other runs' points predicts this run's final point.
    points: collect's rows (run, n_params_nonembed, samples, the loss column); loss_key: the
    column ("val_loss_r0.7") or the metric ("val/loss_r0.7").
    -> {"rows": [{run, N, D, predicted, observed, rel_error, extrapolates, law} or {run, N, D,
    observed, reason}], "median_abs_error", "max_abs_error", "rms_error"}."""
    key = loss_column(loss_key)
    pts = [p for p in points if p.get(key) is not None and np.isfinite(p[key]) and p[key] > 0]
    N = np.array([p["n_params_nonembed"] for p in pts], float)
    D = np.array([p["samples"] for p in pts], float)
    L = np.array([p[key] for p in pts], float)
    runs = np.array([str(p["run"]) for p in pts])
    check_sweep(N, D, runs)
    full = search(N, D, L, delta, grid=False)
    # A run's seed twins (the same size and budget, another seed) leave with it: left in, they
    # would tell the fit the left-out run's loss to within the seed spread.
    groups = np.array([twin_group(r) for r in runs])
    fits = {}
    rows = []
    for run in sorted(set(runs), key=lambda r: (N[runs == r][0], D[runs == r].max(), r)):
        mine = runs == run
        group = twin_group(run)
        rest = groups != group
        last = np.flatnonzero(mine)[np.argmax(D[mine])]
        row = {"run": run, "N": float(N[last]), "D": float(D[last]), "observed": float(L[last]),
               "left_out": sorted(set(runs[~rest]))}
        try:
            check_sweep(N[rest], D[rest], runs[rest])
        except ScalingError as e:
            rows.append({**row, "reason": f"the other runs cannot be fitted: {e}"})
            continue
        if group not in fits:
            fits[group] = search(N[rest], D[rest], L[rest], delta, grid=False, extra=[full.x])
        res = fits[group]
        a, b, e, alpha, beta = res.x
        pred = float(np.exp(e) + np.exp(a) / N[last] ** alpha + np.exp(b) / D[last] ** beta)
        beyond = [name for name, v, others in (("N", N[last], N[rest]), ("D", D[last], D[rest])) if v > others.max()]
        rows.append({**row, "predicted": pred, "rel_error": (pred - row["observed"]) / row["observed"],
                     "extrapolates": beyond,
                     "law": {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
                             "alpha": float(alpha), "beta": float(beta)}})
    errs = np.array([abs(r["rel_error"]) for r in rows if "rel_error" in r])
    return {"rows": rows, "loss": loss_key,
            "median_abs_error": float(np.median(errs)) if len(errs) else None,
            "max_abs_error": float(errs.max()) if len(errs) else None,
            "rms_error": float(np.sqrt((errs ** 2).mean())) if len(errs) else None,
            "search": "each fit: profile scan over (alpha, beta) + L-BFGS-B from its best local minima and from the "
                      "full data's optimum; no bootstrap",
            "twins": "a run's seed twins (its name with another -seedN) are left out with it"}


def twin_group(run: str) -> str:
    """The runs that differ only in seed share a group: the name without its -seedN suffix
    (scaling.plan names seed repeats SIZE-cLEVEL-seedN beside SIZE-cLEVEL)."""
    return re.sub(r"-seed\d+$", "", str(run))


def loo_markdown(loo: dict) -> list[str]:
    """The report's leave-one-out section."""
    lines = ["## Leave-one-out", "",
             "Each run's final loss predicted by the law fitted to all the other runs, its seed twins left out with it "
             "(no bootstrap). Rows marked "
             "'beyond' lie past every other run in N or D, so their fit extrapolates; the rest interpolate. A check "
             "of the fit near its data: the pre-registered hold-out is the test of extrapolation.", "",
             "| run | N | D | predicted | observed | error | beyond |", "|---|---|---|---|---|---|---|"]
    for r in loo["rows"]:
        if "rel_error" in r:
            lines.append(f"| `{r['run']}` | {r['N']:.3g} | {r['D']:.3g} | {r['predicted']:.4f} | {r['observed']:.4f} | "
                         f"{r['rel_error']:+.2%} | {', '.join(r['extrapolates']) or ''} |")
        else:
            lines.append(f"| `{r['run']}` | {r['N']:.3g} | {r['D']:.3g} | n/a | {r['observed']:.4f} | n/a | "
                         f"{r['reason']} |")
    if loo["median_abs_error"] is not None:
        lines += ["", f"|error|: median {loo['median_abs_error']:.2%}, max {loo['max_abs_error']:.2%}, "
                      f"RMS {loo['rms_error']:.2%} over {sum('rel_error' in r for r in loo['rows'])} runs."]
    return lines


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _iv(iv) -> str:
    return f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def _outcome(r: dict, error: str | None) -> tuple[str, str, str]:
    """A table row's observed / error / inside? cells for an evaluated target or group."""
    if r.get("status") == "evaluated":
        return f"{r['observed']:.4f}", f"{r['error']:+.2%}", "yes" if r["inside"] else "**no**"
    return (r.get("status", "not yet run") if not error else "not evaluated"), "", ""


def preregistration_markdown(pre: dict, evaluation: dict | None = None, error: str | None = None) -> list[str]:
    """The report's section: the pre-registered prediction, and (once the hold-out ran) the
    observation, the error and whether it fell inside the interval. pre: preregistration.json's
    content; evaluation: evaluate_holdout's result; error: why it could not be evaluated."""
    git = pre.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    fp = pre["fit_points"]
    law = pre["law"]
    lines = ["## Pre-registered hold-out", "",
             f"Predicted at {pre['created_at']} (git {commit}), before the hold-out runs existed, from "
             f"{fp['count']} points of {len(fp['runs'])} runs of `{pre['fit_sweep']}` (sha256 {fp['sha256'][:16]}): "
             f"`{pre['loss']}` = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.4f} + "
             f"{law['B']:.4g}/D^{law['beta']:.4f}. "
             f"95 % interval: bootstrap over runs ({pre['method']['n_resamples']} resamples, a global search each) of "
             f"the prediction, " + ("widened by the seed spread. " if pre["seed_spread"]["sigma_log"] else "")
             + _sentence(pre["seed_spread"]["note"]), ""]
    if pre.get("warning"):
        lines += [f"**{pre['warning']}.**", ""]
    ev = {r["name"]: r for r in (evaluation or {}).get("targets", [])}
    lines += ["| run | N (x fit) | D | C (x fit) | predicted [95 % interval] | observed | error | inside? |",
              "|---|---|---|---|---|---|---|---|"]
    for t in pre["targets"]:
        obs, err, ins = _outcome(ev.get(t["name"], {}), error)
        lines.append(f"| `{t['name']}` | {t['N']:.3g} ({t['N_ratio']:.1f}x) | {t['D']:.3g} | {t['C']:.3g} "
                     f"({t['C_ratio']:.1f}x) | {t['predicted']:.4f} {_iv(t['interval'])} | {obs} | {err} | {ins} |")
    for g in (evaluation or {}).get("groups") or pre.get("groups", []):
        if g.get("seeds", 1) < 2:
            continue
        obs, err, ins = _outcome(g, error)
        lines.append(f"| mean of {g['seeds']} seeds (geometric) | {g['N']:.3g} | {g['D']:.3g} | {g['C']:.3g} | "
                     f"{g['predicted']:.4f} {_iv(g['interval'])} | {obs} | {err} | {ins} |")
    lines.append("")
    if error:
        lines.append(f"**Not evaluated:** {error}")
    elif evaluation is None or not evaluation["evaluated"]:
        lines.append("The hold-out has not run yet: the prediction above stands as registered.")
    else:
        lines.append(f"{evaluation['inside']} of {evaluation['evaluated']} hold-out run(s) inside their 95 % interval "
                     f"(evaluated at {evaluation['evaluated_at']}).")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preregister", help="predict the hold-out before it runs; write preregistration.json")
    pre.add_argument("--sweep", required=True, help="the fitting sweep's folder (with sweep.json)")
    pre.add_argument("--holdout", required=True, help="the hold-out sweep spec (YAML)")
    pre.add_argument("--loss", default="val/loss_r0.7")
    pre.add_argument("--out", help="default: the hold-out sweep's out_dir/preregistration.json")
    pre.add_argument("--bootstrap", type=int, default=1000, help="resamples of runs (>= 100)")
    pre.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    pre.add_argument("--points", choices=["auto", "all", "final"], default="auto")
    pre.add_argument("--allow-interpolation", action="store_true",
                     help="accept targets < 2x N or < 3x C beyond the fit (a weaker test; recorded)")
    pre.add_argument("--force", action="store_true",
                     help="replace an existing pre-registration (refused once a hold-out run has started)")
    ev = sub.add_parser("evaluate", help="the hold-out's results against the pre-registered prediction")
    ev.add_argument("--prereg", required=True, help="preregistration.json")
    ev.add_argument("--sweep", help="the hold-out sweep's folder (default: the out_dir the pre-registration names)")
    ev.add_argument("--out", help="write the evaluation as JSON here")
    loo = sub.add_parser("loo", help="the leave-one-out table of a sweep")
    loo.add_argument("--sweep", required=True)
    loo.add_argument("--loss", default="val/loss_r0.7")
    loo.add_argument("--points", choices=["auto", "all", "final"], default="auto")
    args = p.parse_args(argv)
    try:
        if args.command == "preregister":
            path = preregister(args.sweep, args.holdout, args.loss, args.out, args.bootstrap, args.seed, args.points,
                               args.allow_interpolation, args.force)
            record = json.loads(path.read_text())
            print("\n".join(preregistration_markdown(record)))
            print(f"\nwrote {path}")
        elif args.command == "evaluate":
            result = evaluate_holdout(args.prereg, args.sweep)
            print("\n".join(preregistration_markdown(json.loads(Path(args.prereg).read_text()), result)))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1, default=float))
                print(f"\nwrote {args.out}")
        else:
            _, pts, _ = fitting_points(args.sweep, args.loss, args.points)
            print("\n".join(loo_markdown(leave_one_out(pts, args.loss))))
    except (ScalingError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
