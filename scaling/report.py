"""Sweep -> fitted laws, plots and a Markdown report.

    python -m scaling.report --sweep runs/sweeps/mini --out runs/sweeps/mini/report [--loss val/loss_r0.7] [--wandb]
        [--holdout-sweep runs/sweeps/mini_holdout] [--preregistration PATH]

Writes OUT/report.md (parameters with 95 % bootstrap intervals and unrounded, the runs table, the
residuals, the sensitivity table, the compute-optimal exponents, the leave-one-out table, the
pre-registered hold-out, FID and its protocol, excluded runs, the plots), OUT/fit.json,
OUT/points.csv, OUT/runs.csv and the PNGs: loss_vs_compute.png (per size, with the fitted curves
and frontier), isoflop.png, optimal_n.png, fid_vs_compute.png, loss_by_mask_ratio.png,
residuals.png. Every plot labels both axes (_save refuses one that does not).

The parts, each a module of one job: tables.py computes the rows (runs table, residuals,
sensitivity, FID laws and protocol, the three approaches, the hold-out row, the regime gate),
plots.py draws the figures, sections.py writes the Markdown sections, publish.py the wandb run;
this module puts them together and writes fit.json and report.md.

Besides the law, fit.json holds:
    runs_table    per run: D as images, tokens and [MASK] tokens, tokens per parameter, C / (6 N D_tokens),
                  final loss, wall time, device-hours, tokens/s, MFU, sampling img/s with and without reuse
    residuals     log L_obs - log L_fit per fitted point, their RMS, largest and mean per size
    sensitivity   point estimates of E, A, B, alpha, beta, a under another loss key, the other weights
                  (EMA / online), Huber delta 1e-4 / 1e-2 and the smallest size dropped; row 0 the reference
    fid_protocol  FID weights against the law's, samples against 10x the feature dimension, evaluated
                  checkpoints per size, Spearman rank correlation of loss with FID (and KID), warnings

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
import json
import sys
from pathlib import Path

import numpy as np

from scaling.approaches import approaches_markdown
from scaling.collect import ScalingError, collect, write
from scaling.fit import compute_optimal, fit_law, flops_per_param
from scaling.frontier import frontier_markdown, sweep_frontiers
from scaling.holdout import PREREG, evaluate_holdout, leave_one_out, points_digest, preregistration_markdown
from scaling.plots import plot_fid, plot_isoflop, plot_loss_vs_compute, plot_mask_ratios, plot_optimal_n, plot_residuals
from scaling.points import choose_points, loss_column
from scaling.publish import publish_wandb
from scaling.sections import (excluded_markdown, fid_markdown, gate_section, gated_markdown, law_markdown,
                              leave_one_out_markdown, minima_markdown, optimal_markdown, plots_markdown,
                              residuals_markdown, runs_markdown, sensitivity_markdown)
from scaling.tables import (check_regime, fid_fits, fid_points, fid_protocol, holdout_row, level_minima, residuals,
                            runs_table, sensitivity, three_approaches)


def gated_report(out: Path, col, loss: str, gate: dict, sweep, wandb_mode=None) -> Path:
    """What the report says when the runs are not in the regime a law describes: why, and no law."""
    table = runs_table(col.runs, col.rows, loss_column(loss))
    result = {"sweep": str(sweep), "loss": loss, "gate": gate, "law": None, "runs": len(col.runs),
              "excluded": col.excluded, "runs_table": table}
    (out / "fit.json").write_text(json.dumps(result, indent=1, default=float))
    lines = gated_markdown(col.name or sweep, len(col.runs), loss)
    lines += gate_section(gate)
    lines += [""] + runs_markdown(table, loss_column(loss))
    if col.excluded:
        lines += [""] + excluded_markdown(col.excluded)
    if wandb_mode:  # the dashboard shows the failed gate (summary "gate", "law": null)
        rid = publish_wandb({**result, "points_used": "none", "points": 0}, col, [], loss_column(loss), [], out,
                            None if wandb_mode is True else wandb_mode)
        lines += ["", f"Published to wandb as run `{rid}`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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
    key = loss_column(loss)
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
    # One bootstrap for the report: the law's intervals take the first `bootstrap` resamples, the
    # Huber exponent's (approach 3, the same law) the first `approach_bootstrap` of the same ones.
    fit = fit_law([p["n_params_nonembed"] for p in points], [p["samples"] for p in points],
                  [p[key] for p in points], [p["run"] for p in points], bootstrap=bootstrap,
                  resamples=approach_bootstrap)
    k = flops_per_param(col.runs)
    cs = np.array([p["compute"] for p in points])
    opt = compute_optimal(fit, k, [cs.max(), cs.max() * 10, cs.max() * 100])
    frontiers = sweep_frontiers(fit, col.runs, cs.max())
    approaches = three_approaches(col.rows, points, key, approach_bootstrap, law_fit=fit)
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
    fid_by_size = fid_points(col.runs)
    fid_laws = fid_fits(fid_by_size)
    fid_plot = plot_fid(fid_by_size, fid_laws, out) if fid_by_size else None
    ratio_plot = plot_mask_ratios([p for p in col.rows if key in p], out)
    plots += [p for p in (fid_plot, ratio_plot) if p is not None]
    table = runs_table(col.runs, col.rows, key)
    minima = level_minima([p for p in points if p.get("final", True)], key)
    res = residuals(fit, points, key)
    plots.append(plot_residuals(res, key, out))
    sens = sensitivity(rows, points, key, fit)
    proto = fid_protocol(col.runs, col.rows, key)

    result = {"sweep": str(sweep), "loss": loss, "points_used": which, "law": fit.as_dict(), "k_flops_per_param_sample": k,
              "optimal": {"a": opt["a"], "b": opt["b"], "a_ci": opt.get("a_ci"), "b_ci": opt.get("b_ci"),
                          "at": [{"C": float(c), "N": float(n), "D": float(d), "L": float(lv)}
                                 for c, n, d, lv in zip(opt["C"], opt["N"], opt["D"], opt["L"])]},
              "frontier": frontiers, "approaches": approaches, "holdout": ho, "leave_one_out": loo, "fid": fid_laws,
              "gate": gate, "excluded": col.excluded, "runs": len(col.runs), "points": len(points),
              "runs_table": table, "level_minima": minima, "residuals": res, "sensitivity": sens, "fid_protocol": proto}
    if pre_part is not None:
        result["preregistered"] = pre_part
    # The resamples behind the law's intervals, for what is derived from the law elsewhere (the
    # families' comparison) to have intervals from the same draws.
    result["law_draws"] = {"params": ["E", "A", "B", "alpha", "beta"],
                           "rows": np.asarray(getattr(fit, "_draws", np.empty((0, 5)))).tolist()}
    (out / "fit.json").write_text(json.dumps(result, indent=1, default=float))

    lines = law_markdown(col.name or sweep, len(col.runs), len(points), loss, which, fit, gate["passed"])
    lines += [""] + gate_section(gate)
    lines += [""] + runs_markdown(table, key)
    lines += [""] + minima_markdown(minima)
    lines += [""] + residuals_markdown(res, len(points))
    lines += [""] + sensitivity_markdown(sens)
    lines += [""] + optimal_markdown(opt, k)
    lines += [""] + approaches_markdown(approaches)
    lines += [""] + frontier_markdown(frontiers, col.runs[0].get("sample_steps"))
    lines += [""] + leave_one_out_markdown(loo, ho, hold)
    if pre_lines is not None:
        lines += [""] + pre_lines
    lines += [""] + fid_markdown(fid_laws, proto)
    if col.excluded:
        lines += [""] + excluded_markdown(col.excluded)
    lines += [""] + plots_markdown(plots)
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
