"""Sweep -> fitted laws, plots and a Markdown report.

    python -m scaling.report --sweep runs/sweeps/mini --out runs/sweeps/mini/report [--loss val/loss_r0.7] [--wandb]
        [--holdout-sweep runs/sweeps/mini_holdout] [--preregistration PATH]

Writes OUT/report.md (parameters with 95 % bootstrap intervals, the compute-optimal exponents,
the leave-one-out table, the pre-registered hold-out, excluded runs, the plots), OUT/fit.json,
OUT/points.csv and the PNGs: loss_vs_compute.png (per size, with the fitted curves and frontier),
isoflop.png, optimal_n.png, fid_vs_compute.png, loss_by_mask_ratio.png.

--holdout-sweep (its preregistration.json) or --preregistration: the section "Pre-registered
hold-out" (scaling/holdout.py): the prediction and 95 % interval registered before the hold-out
ran, and once it has, the observed loss, the error and whether it fell inside ("not yet run"
until then).

--wandb publishes the report as a wandb run of its own in the sweep's group (job type
scaling-report, project/entity/mode from the runs' configs): fit.json as the summary, the points
as a table, the plots as images. Its id is derived from the sweep, so a re-run updates that run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from scaling.collect import ScalingError, collect, write
from scaling.fit import compute_optimal, fit_fid, fit_law, flops_per_param
from scaling.approaches import approaches_markdown, cross_check, envelope_exponent, huber_exponent, isoflop_exponent
from scaling.baselines import gate_markdown, regime_gate, sweep_baselines
from scaling.frontier import frontier_markdown, sweep_frontiers
from scaling.holdout import (PREREG, evaluate_holdout, leave_one_out, loo_markdown, points_digest,
                             preregistration_markdown)


def _key(loss: str) -> str:
    return loss.replace("/", "_")


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4))


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())  # log axes: decade labels only, no overlapping minor ones
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _by_size(points: list[dict]) -> dict:
    sizes: dict = {}
    for p in points:
        sizes.setdefault(p["n_params_nonembed"], []).append(p)
    return dict(sorted(sizes.items()))


def plot_loss_vs_compute(points, fit, k, key, out: Path) -> Path:
    fig, ax = _figure()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    sizes = _by_size(points)
    cs = np.array([p["compute"] for p in points])
    grid = np.geomspace(cs.min() / 2, cs.max() * 4, 200)
    for i, (n, pts) in enumerate(sizes.items()):
        color = cmap(i / max(1, len(sizes) - 1))
        ax.scatter([p["compute"] for p in pts], [p[key] for p in pts], s=10, color=color, label=f"N={n / 1e3:.0f}k")
        ax.plot(grid, fit.predict(n, grid / (k * n)), color=color, lw=1, alpha=0.7)
    opt = compute_optimal(fit, k, grid)
    ax.plot(grid, opt["L"], "k--", lw=1.5, label="compute-optimal frontier")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=key.replace("_", "/", 1),
           title="validation loss vs compute")
    return _save(fig, ax, out / "loss_vs_compute.png")


def plot_isoflop(points, fit, k, out: Path) -> Path:
    fig, ax = _figure()
    ns = np.array(sorted({p["n_params_nonembed"] for p in points}), float)
    cs = np.array([p["compute"] for p in points])
    n_grid = np.geomspace(ns.min() / 4, ns.max() * 4, 200)
    for c in np.geomspace(np.percentile(cs, 25), cs.max(), 4):
        line, = ax.plot(n_grid, fit.predict(n_grid, c / (k * n_grid)), lw=1, label=f"C={c:.2g}")
        opt = compute_optimal(fit, k, c)
        ax.plot(opt["N"], opt["L"], "o", color=line.get_color())
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="predicted validation loss",
           title="isoFLOP slices of the fitted law (dots: N*)")
    return _save(fig, ax, out / "isoflop.png")


def plot_optimal_n(points, fit, k, out: Path) -> Path:
    fig, ax = _figure()
    cs = np.array([p["compute"] for p in points])
    grid = np.geomspace(cs.min(), cs.max() * 100, 100)
    opt = compute_optimal(fit, k, grid)
    ax.plot(grid, opt["N"], "k-", label=f"N*(C) ~ C^{opt['a']:.2f}")
    if "N_lo" in opt:
        ax.fill_between(grid, opt["N_lo"], opt["N_hi"], color="k", alpha=0.15, label="95% bootstrap")
    ns = sorted({p["n_params_nonembed"] for p in points})
    ax.scatter([cs.max()] * len(ns), ns, marker="_", s=200, color="C1", label="sizes in the sweep")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="N*", title="compute-optimal size")
    return _save(fig, ax, out / "optimal_n.png")


def plot_fid(runs, out: Path) -> tuple[Path | None, list[dict]]:
    """FID vs compute per size; a saturating law per size where it is justified."""
    per_size: dict = {}
    for r in runs:
        for e in r.get("evals", []):
            if "eval/fid" in e:
                per_size.setdefault(r["n_params_nonembed"], []).append((e["compute"], e["eval/fid"]))
    if not per_size:
        return None, []
    fig, ax = _figure()
    fits = []
    for i, (n, pts) in enumerate(sorted(per_size.items())):
        pts.sort()
        c, f = np.array(pts).T
        ax.scatter(c, f, s=12, color=f"C{i}", label=f"N={n / 1e3:.0f}k")
        res = fit_fid(c, f)
        fits.append({"N": n, "points": len(c), **{k: v for k, v in res.items()}})
        if res["fitted"]:
            g = np.geomspace(c.min(), c.max() * 2, 100)
            ax.plot(g, res["F_inf"] + res["K"] * (g / res["C0"]) ** -res["gamma"], color=f"C{i}", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="FID", title="FID vs compute")
    return _save(fig, ax, out / "fid_vs_compute.png"), fits


def plot_mask_ratios(points, out: Path) -> Path | None:
    keys = sorted(k for k in points[0] if k.startswith("val_loss_r"))
    if not keys:
        return None
    fig, ax = _figure()
    final = {}
    for p in points:
        if p["run"] not in final or p["samples"] > final[p["run"]]["samples"]:
            final[p["run"]] = p
    for i, key in enumerate(keys):
        pts = sorted(final.values(), key=lambda p: p["compute"])
        ax.scatter([p["compute"] for p in pts], [p[key] for p in pts], s=12, color=f"C{i}",
                   label=f"mask ratio {key.removeprefix('val_loss_r')}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="validation loss (final, per run)",
           title="validation loss by mask ratio")
    return _save(fig, ax, out / "loss_by_mask_ratio.png")


def _ci(fit, name, fmt="{:.3g}") -> str:
    v = getattr(fit, name)
    if name in fit.ci:
        lo, hi = fit.ci[name]
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"
    return fmt.format(v)


def choose_points(rows: list[dict], which: str) -> tuple[list[dict], str]:
    """Which validation points are measurements of L(N, D). Along a constant-LR run every point is
    (the loss after D samples does not depend on the planned length); under a decaying schedule
    only a run's final point is what its budget reaches, the earlier ones are biased high."""
    if which == "auto":
        which = "final" if any(r["schedule"] != "constant" for r in rows) else "all"
    if which == "final":
        return [r for r in rows if r["final"]], "each run's final validation loss (decaying LR schedules)"
    return rows, "validation loss at every logged step (constant LR after warm-up)"


def report_run_id(project: str, entity: str | None, sweep_name: str) -> str:
    """The report's wandb run id: one per (entity, project, sweep), so re-running the report
    updates that run instead of adding another."""
    key = f"{entity or ''}/{project}/{sweep_name}"
    return "scaling-report-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def publish_wandb(result: dict, col, points: list[dict], key: str, plots: list[Path], out: Path,
                  mode: str | None = None) -> str:
    """The report as a wandb run in the sweep's group -> its id. The summary is fit.json's
    content (law with CIs, optimal allocation, hold-out, FID fits); the points go in a Table and
    the plots in images."""
    from enat.config import load_config

    if not col.runs:
        raise ScalingError("--wandb: no runs to take the wandb project from")
    w = load_config(Path(col.runs[0]["run_dir"]) / "config.yaml").train.wandb
    mode = mode or w.mode
    if mode == "disabled":
        raise ScalingError("--wandb: the sweep's runs have train.wandb.mode=disabled; give --wandb-mode offline "
                           "(or online)")
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name = col.name or Path(result["sweep"]).name
    rid = report_run_id(w.project, w.entity, name)
    run = wandb.init(project=w.project, entity=w.entity, group=w.group or name, job_type="scaling-report",
                     id=rid, resume="allow", name=f"{name}: scaling report", dir=str(out), mode=mode,
                     tags=[f"sweep:{name}", "scaling-report"],
                     config={"sweep": result["sweep"], "loss": result["loss"], "points_used": result["points_used"],
                             "runs": result["runs"], "points": result["points"]})
    try:
        columns = ["run", "n_params_nonembed", "step", "samples", "compute", key]
        table = wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])
        run.log({"points": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        parts = ("law", "optimal", "approaches", "frontier", "holdout", "leave_one_out", "preregistered", "fid",
                 "k_flops_per_param_sample", "gate")
        run.summary.update(json.loads(json.dumps({k: result[k] for k in parts if k in result}, default=float)))
    finally:
        run.finish()
    return rid


def check_regime(col, loss: str) -> dict:
    """The regime gate on the runs' final points, against the frequency tables of the sweep's own
    token shards (the first run's data.shards / data.val_shards); shards that cannot be read fail
    the gate, saying why."""
    from enat.config import load_config

    try:
        baselines = sweep_baselines(load_config(Path(col.runs[0]["run_dir"]) / "config.yaml"))
    except ScalingError as e:
        return {"passed": False, "reasons": [f"The frequency-table baselines could not be computed ({e}), so the "
                                             f"runs' regime is unknown."], "per_run": [], "baselines": None}
    return regime_gate([r for r in col.rows if r["final"]], baselines, loss)


def gated_report(out: Path, col, loss: str, gate: dict, sweep, wandb_mode=None) -> Path:
    """What the report says when the runs are not in the regime a law describes: why, and no law."""
    result = {"sweep": str(sweep), "loss": loss, "gate": gate, "law": None, "runs": len(col.runs),
              "excluded": col.excluded}
    (out / "fit.json").write_text(json.dumps(result, indent=1, default=float))
    lines = [f"# Scaling report: {col.name or sweep}", "", f"{len(col.runs)} runs, `{loss}`. No law is stated: the "
             f"runs fail the regime gate (`--ignore-gate` fits one anyway, marked as such).", ""]
    lines += gate_markdown(gate) if gate.get("baselines") else ["## Regime gate", ""] + [f"- {r}" for r in gate["reasons"]]
    if col.excluded:
        lines += ["", "## Excluded runs", ""] + [f"- `{e['run']}`: {e['reason']}" for e in col.excluded]
    if wandb_mode:  # the dashboard shows the failed gate (summary "gate", "law": null)
        rid = publish_wandb({**result, "points_used": "none", "points": 0}, col, [], _key(loss), [], out,
                            None if wandb_mode is True else wandb_mode)
        lines += ["", f"Published to wandb as run `{rid}`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def three_approaches(rows: list[dict], points: list[dict], key: str, bootstrap: int) -> dict:
    """N*(C) ~ C^a three ways (scaling/approaches.py): the envelope of every logged point, isoFLOP
    parabolas through each run's final point, the Huber fit of the points the law is fitted on."""
    curve = [r for r in rows if key in r and np.isfinite(r[key])]
    final = [r for r in curve if r["final"]]
    results = [envelope_exponent(curve, key, bootstrap), isoflop_exponent(final, key, bootstrap),
               huber_exponent(points, key, bootstrap)]
    return {**cross_check(results), "results": results}


def holdout_row(loo: dict, hold: str | None = None) -> dict:
    """fit.json's "holdout": the leave-one-out row of `hold` (default: the largest N, then the
    longest run) -> {run, N, D, predicted, observed, rel_error, fit} or {"error"}."""
    rows = loo["rows"]
    hold = hold or max(rows, key=lambda r: (r["N"], r["D"]))["run"]
    row = next((r for r in rows if r["run"] == hold), None)
    if row is None:
        return {"error": f"hold-out run {hold!r} is not among the runs: {sorted(r['run'] for r in rows)}"}
    if "rel_error" not in row:
        return {"error": row["reason"]}
    return {"run": hold, "N": row["N"], "D": row["D"], "predicted": row["predicted"], "observed": row["observed"],
            "rel_error": row["rel_error"], "fit": row["law"]}


def preregistered(prereg: Path, holdout_sweep, points: list[dict], key: str, sweep) -> tuple[dict, list[str]]:
    """The pre-registered hold-out's part of fit.json and its section of the report."""
    if not prereg.is_file():
        why = (f"no pre-registration at {prereg} (python -m scaling.holdout preregister writes it before the "
               f"hold-out runs)")
        return {"error": why}, ["## Pre-registered hold-out", "", why]
    pre = json.loads(prereg.read_text())
    try:
        evaluation, error = evaluate_holdout(prereg, holdout_sweep), None
    except ScalingError as e:
        evaluation, error = None, str(e)
    lines = preregistration_markdown(pre, evaluation, error)
    if pre["fit_points"]["sha256"] == points_digest(points, key)[0]:
        lines += ["", "The prediction was fitted to the same points as this report's law."]
    else:
        lines += ["", f"The prediction was fitted to {pre['fit_points']['count']} points of `{pre['fit_sweep']}`, not "
                      f"to this report's {len(points)} points of `{sweep}` (another sweep, loss or points choice, or "
                      f"runs added since): the law above is not the one that made it."]
    part = {"path": str(prereg), "created_at": pre["created_at"], "git": pre.get("git"), "loss": pre["loss"],
            "law": pre["law"], "seed_spread": {k: v for k, v in pre["seed_spread"].items() if k != "groups"},
            "targets": (evaluation or {}).get("targets") or pre["targets"],
            "groups": (evaluation or {}).get("groups") or pre.get("groups", []), "error": error}
    if evaluation is not None:
        part.update(evaluated=evaluation["evaluated"], inside=evaluation["inside"])
    return part, lines


def report(sweep: str | Path, out: str | Path, loss: str = "val/loss_r0.7", bootstrap: int = 200,
           hold: str | None = None, points: str = "auto", wandb_mode: str | bool | None = None,
           ignore_gate: bool = False, approach_bootstrap: int = 1000, preregistration: str | Path | None = None,
           holdout_sweep: str | Path | None = None) -> Path:
    """wandb_mode: publish to wandb (True: the runs' mode; or "offline"/"online"). ignore_gate:
    state the law even when the runs fail the regime gate (the report says so at the top).
    preregistration / holdout_sweep: the pre-registered hold-out's section (the file, default
    HOLDOUT_SWEEP/preregistration.json; the hold-out's runs, default the out_dir it names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    col = collect(sweep)
    write(col, out)
    key = _key(loss)
    if not col.runs:
        raise ScalingError("no finished runs to report on: " + "; ".join(f"{e['run']}: {e['reason']}"
                                                                        for e in col.excluded))
    gate = check_regime(col, loss)
    if not gate["passed"] and not ignore_gate:
        return gated_report(out, col, loss, gate, sweep, wandb_mode)
    rows, which = choose_points(col.rows, points)
    points = [p for p in rows if key in p and np.isfinite(p[key])]
    if not points:
        have = sorted({k for p in col.rows for k in p if k.startswith("val")})
        raise ScalingError(f"no {loss} in the runs' validation records; have {have or 'none'} "
                           f"(choose one with --loss, or set train.val_mask_ratios)")
    fit = fit_law([p["n_params_nonembed"] for p in points], [p["samples"] for p in points],
                  [p[key] for p in points], [p["run"] for p in points], bootstrap=bootstrap)
    k = flops_per_param(col.runs)
    cs = np.array([p["compute"] for p in points])
    opt = compute_optimal(fit, k, [cs.max(), cs.max() * 10, cs.max() * 100])
    frontiers = sweep_frontiers(fit, col.runs, cs.max())
    approaches = three_approaches(col.rows, points, key, approach_bootstrap)
    try:
        loo = leave_one_out(points, key)
        ho = holdout_row(loo, hold)
    except ScalingError as e:
        loo, ho = {"rows": [], "error": str(e)}, {"error": str(e)}
    pre_part = pre_lines = None
    if preregistration is not None or holdout_sweep is not None:
        prereg = Path(preregistration) if preregistration is not None else Path(holdout_sweep) / PREREG
        pre_part, pre_lines = preregistered(prereg, holdout_sweep, points, key, sweep)
    plots = [plot_loss_vs_compute(points, fit, k, key, out), plot_isoflop(points, fit, k, out),
             plot_optimal_n(points, fit, k, out)]
    fid_plot, fid_fits = plot_fid(col.runs, out)
    ratio_plot = plot_mask_ratios([p for p in col.rows if key in p], out)
    plots += [p for p in (fid_plot, ratio_plot) if p is not None]

    result = {"sweep": str(sweep), "loss": loss, "points_used": which, "law": fit.as_dict(), "k_flops_per_param_sample": k,
              "optimal": {"a": opt["a"], "b": opt["b"], "a_ci": opt.get("a_ci"), "b_ci": opt.get("b_ci"),
                          "at": [{"C": float(c), "N": float(n), "D": float(d), "L": float(lv)}
                                 for c, n, d, lv in zip(opt["C"], opt["N"], opt["D"], opt["L"])]},
              "frontier": frontiers, "approaches": approaches, "holdout": ho, "leave_one_out": loo, "fid": fid_fits,
              "gate": gate, "excluded": col.excluded, "runs": len(col.runs), "points": len(points)}
    if pre_part is not None:
        result["preregistered"] = pre_part
    (out / "fit.json").write_text(json.dumps(result, indent=1, default=float))

    lines = [f"# Scaling report: {col.name or sweep}", ""]
    if not gate["passed"]:
        lines += ["**The runs fail the regime gate (below); this law was fitted anyway (--ignore-gate) and describes "
                  "optimisation progress, not capacity.**", ""]
    lines += [f"{len(col.runs)} runs, {len(points)} points: `{loss}`, {which}; "
             f"{fit.n_sizes} model sizes. Fit: L(N, D) = E + A/N^alpha + B/D^beta, N = non-embedding "
             f"parameters, D = training samples; Huber (delta 1e-3) on log-loss, L-BFGS-B to tight tolerances from "
             f"a grid of starts and a profile scan; 95 % intervals from {fit.bootstrap} bootstrap resamples of runs, "
             f"each with a global search of its own.", "",
             "| parameter | value [95 % CI] |", "|---|---|"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {name} | {_ci(fit, name)} |")
    if fit.at_bounds:
        lines += ["", f"Not identified (at the optimiser's bounds, or E < 1 % of the lowest loss): "
                  f"{', '.join(fit.at_bounds)}. "
                  + ("E ~ 0 means these runs are far from the irreducible loss, so E is not identified and the "
                     "power-law terms absorb it; extrapolations far beyond the sweep overstate the gains."
                     if "E" in fit.at_bounds else "Those parameters are not identified by this sweep.")]
    a_ci = f" [{opt['a_ci'][0]:.3f}, {opt['a_ci'][1]:.3f}]" if opt.get("a_ci") else ""
    b_ci = f" [{opt['b_ci'][0]:.3f}, {opt['b_ci'][1]:.3f}]" if opt.get("b_ci") else ""
    lines += [""] + (gate_markdown(gate) if gate.get("baselines") else
                     ["## Regime gate", ""] + [f"- {r}" for r in gate["reasons"]])
    lines += ["", "## Compute-optimal allocation", "",
              f"C = k N D with k = {k:.3g} FLOPs per non-embedding parameter and sample (median over runs, from "
              f"the exact per-sample FLOPs). N*(C) ~ C^a with a = {opt['a']:.3f}{a_ci}; D*(C) ~ C^b with "
              f"b = {opt['b']:.3f}{b_ci}.", "", "| C (FLOPs) | N* | D* (samples) | L* |", "|---|---|---|---|"]
    for c, n, d, lv in zip(opt["C"], opt["N"], opt["D"], opt["L"]):
        lines.append(f"| {c:.3g} | {n:.3g} | {d:.3g} | {lv:.4f} |")
    lines += [""] + approaches_markdown(approaches)
    lines += [""] + frontier_markdown(frontiers, col.runs[0].get("sample_steps"))
    lines += [""] + (loo_markdown(loo) if loo["rows"] else ["## Leave-one-out", "", f"Not possible: {loo['error']}"])
    if "error" in ho:
        lines += ["", f"Hold-out of the largest run not possible: {ho['error']}"]
    else:
        lines += ["", f"{'Run' if hold else 'The largest run,'} `{ho['run']}` (N={ho['N']:.3g}, D={ho['D']:.3g}), "
                      f"fitted without: predicted {ho['predicted']:.4f}, observed {ho['observed']:.4f}, relative error "
                      f"{ho['rel_error']:+.2%} (at most a step beyond the other runs; not pre-registered)."]
    if pre_lines is not None:
        lines += [""] + pre_lines
    lines += ["", "## FID", ""]
    if not fid_fits:
        lines.append("No evaluations in these runs (launch/eval.py writes them to each run's eval.jsonl).")
    for f in fid_fits:
        if f["fitted"]:
            lines.append(f"- N={f['N']:.3g}: FID = {f['F_inf']:.3g} + {f['K']:.3g} (C/{f['C0']:.3g})^-{f['gamma']:.3g} "
                         f"(gamma 95 % CI [{f['ci']['gamma'][0]:.3g}, {f['ci']['gamma'][1]:.3g}])")
        else:
            lines.append(f"- N={f['N']:.3g}: reported as points only: {f['reason']}")
    if col.excluded:
        lines += ["", "## Excluded runs", ""] + [f"- `{e['run']}`: {e['reason']}" for e in col.excluded]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if wandb_mode:
        rid = publish_wandb(result, col, points, key, plots, out, None if wandb_mode is True else wandb_mode)
        lines += ["", f"Published to wandb as run `{rid}` (job type scaling-report, group `{col.name}`)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep folder (with sweep.json) or the manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--loss", default="val/loss_r0.7", help="which validation loss to fit (val/ or val_ema/)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the law's intervals")
    p.add_argument("--approach-bootstrap", type=int, default=1000,
                   help="resamples of each of the three approaches to N*(C)")
    p.add_argument("--hold", help="the leave-one-out row fit.json names \"holdout\" (default: the largest run)")
    p.add_argument("--holdout-sweep", help="the pre-registered hold-out sweep's folder (its preregistration.json "
                                           "and runs): the section \"Pre-registered hold-out\"")
    p.add_argument("--preregistration", help="the preregistration.json (default: HOLDOUT_SWEEP/preregistration.json)")
    p.add_argument("--points", choices=["auto", "all", "final"], default="auto",
                   help="fit every logged validation point or each run's last (auto: last under a decaying LR)")
    p.add_argument("--ignore-gate", action="store_true",
                   help="state a law even when the runs fail the regime gate (the report says so)")
    p.add_argument("--wandb", action="store_true", help="publish the report as a wandb run in the sweep's group")
    p.add_argument("--wandb-mode", choices=["offline", "online"], help="default: the runs' train.wandb.mode")
    args = p.parse_args(argv)
    try:
        path = report(args.sweep, args.out, args.loss, args.bootstrap, args.hold, args.points,
                      approach_bootstrap=args.approach_bootstrap, preregistration=args.preregistration,
                      holdout_sweep=args.holdout_sweep,
                      wandb_mode=(args.wandb_mode or True) if args.wandb else None, ignore_gate=args.ignore_gate)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    result = json.loads((Path(args.out) / "fit.json").read_text())
    if result["law"] is None:
        print("no law stated: the runs fail the regime gate\n" + "\n".join(f"- {r}" for r in result["gate"]["reasons"]))
    else:
        print(json.dumps(result["law"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
