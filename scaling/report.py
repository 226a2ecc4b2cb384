"""Sweep -> fitted laws, plots and a Markdown report.

    python -m scaling.report --sweep runs/sweeps/mini --out runs/sweeps/mini/report [--loss val/loss_r0.7] [--wandb]
        [--holdout-sweep runs/sweeps/mini_holdout] [--preregistration PATH]

Writes OUT/report.md (parameters with 95 % bootstrap intervals and unrounded, the runs table, the
residuals, the sensitivity table, the compute-optimal exponents, the leave-one-out table, the
pre-registered hold-out, FID and its protocol, excluded runs, the plots), OUT/fit.json,
OUT/points.csv, OUT/runs.csv and the PNGs: loss_vs_compute.png (per size, with the fitted curves
and frontier), isoflop.png, optimal_n.png, fid_vs_compute.png, loss_by_mask_ratio.png,
residuals.png. Every plot labels both axes (_save refuses one that does not).

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
from scaling.points import choose_points, loss_column


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4))


def _labelled_ticks(axis, lo: float, hi: float) -> list[str]:
    """The tick labels an axis shows inside its limits (after a draw)."""
    out = []
    for locs, labels in ((axis.get_majorticklocs(), axis.get_majorticklabels()),
                         (axis.get_minorticklocs(), axis.get_minorticklabels())):
        out += [t.get_text() for v, t in zip(locs, labels) if lo <= v <= hi and t.get_text()]
    return out


def _save(fig, ax, path: Path) -> Path:
    """Write the figure. Every axis must say what it shows: a ScalingError for an axis without a
    label. Log axes spanning under a decade label minor ticks too (a loss axis from 3.6 to 4.8
    showed no value at all); an axis that still shows no value gets three labelled ticks
    across its limits. ax: one axis, or several (panels; not shared, so each shows its values)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter

    axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    for a in axes:
        missing = [name for name, label in (("x", a.get_xlabel()), ("y", a.get_ylabel())) if not label.strip()]
        if missing:
            plt.close(fig)
            raise ScalingError(f"{path.name}: the {' and '.join(missing)} axis has no label")
        for axis, lim in ((a.xaxis, a.get_xlim()), (a.yaxis, a.get_ylim())):
            if axis.get_scale() == "log":  # minor labels only on an axis spanning under a decade (else they overlap)
                narrow = abs(np.log10(lim[1] / lim[0])) < 1
                axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1 if narrow else 0, 0.4)))
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    fixed = False
    for a in axes:
        for axis, (lo, hi) in ((a.xaxis, sorted(a.get_xlim())), (a.yaxis, sorted(a.get_ylim()))):
            if not _labelled_ticks(axis, lo, hi):
                ticks = np.geomspace(lo, hi, 5)[1:-1] if axis.get_scale() == "log" else np.linspace(lo, hi, 5)[1:-1]
                axis.set_major_locator(FixedLocator(ticks))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                fixed = True
    if fixed:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _loss_name(key: str) -> str:
    """points' key -> the metric's name: val_loss_r0.7 -> val/loss_r0.7, val_ema_loss_r0.7 -> val_ema/loss_r0.7."""
    return key.replace("_loss", "/loss", 1)


def _weights(key: str) -> str:
    """Which weights a validation loss is of: "ema" (val_ema/) or "online" (val/)."""
    return "ema" if key.startswith("val_ema_") else "online"


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
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)",
           ylabel=f"validation loss {_loss_name(key)} (nats per masked token)", title="validation loss vs compute")
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
    ax.set(xscale="log", xlabel="non-embedding parameters N",
           ylabel="predicted validation loss (nats per masked token)",
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
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)",
           ylabel="compute-optimal non-embedding parameters N*",
           title="compute-optimal size")
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
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)",
           ylabel="final validation loss (nats per masked token)", title="validation loss by mask ratio")
    return _save(fig, ax, out / "loss_by_mask_ratio.png")


# ---------------------------------------------------------------------------------------------
# Runs, residuals, sensitivity, FID protocol
# ---------------------------------------------------------------------------------------------

# Feature dimension of each FID extractor (enat/eval/fidelity.py): an unbiased-enough FID needs
# >= 10x as many samples (the covariance is dim x dim).
FEATURE_DIMS = {"digits-cnn": 128, "inception-v3-compat": 2048}
SAMPLES_PER_DIM = 10
MIN_CHECKPOINTS = 4  # evaluated checkpoints per size for an FID-vs-compute curve
HUBER_DELTAS = (1e-4, 1e-3, 1e-2)
REFERENCE_DELTA = 1e-3  # fit_law's default: the main fit's


def _final_rows(rows: list[dict]) -> dict:
    """run -> its final validation row."""
    final = {}
    for r in rows:
        if r["run"] not in final or r["step"] > final[r["run"]]["step"]:
            final[r["run"]] = r
    return final


def runs_table(runs: list[dict], rows: list[dict], key: str) -> list[dict]:
    """One row per run: D as images, tokens and [MASK] tokens, tokens per non-embedding parameter,
    C / (6 N D_tokens) (the exact training FLOPs against the dense-transformer rule C = 6 N D), the
    final loss, and what a law needs to transfer to another cluster: wall time, device-hours,
    tokens/s, MFU, sampling img/s with and without reuse."""
    final = _final_rows(rows)
    out = []
    for r in sorted(runs, key=lambda r: (r["n_params_nonembed"], r["samples"], r["run"])):
        n, tokens = r["n_params_nonembed"], r["tokens_seen"]
        loss = final.get(r["run"], {}).get(key)
        out.append({"run": r["run"], "N": n, "steps": r["steps"], "D_images": r["samples"], "D_tokens": tokens,
                    "D_masked_tokens": r["masked_tokens_seen"], "masked_estimated": r["masked_tokens_estimated"],
                    "tokens_per_param": tokens / n, "C": r["compute"], "C_over_6ND": r["compute"] / (6 * n * tokens),
                    "final_loss": loss, "wall_min": r["wall_s"] / 60, "world_size": r["world_size"],
                    "gpu_hours": r["gpu_hours"], "tokens_per_s": r["tokens_per_s"], "images_per_s": r["images_per_s"],
                    "mfu": r["mfu"], "sample_images_per_s_reuse": r["sample_images_per_s_reuse"],
                    "sample_images_per_s_plain": r["sample_images_per_s_plain"]})
    return out


def _f(v, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def runs_markdown(table: list[dict], key: str) -> list[str]:
    lines = ["## Runs", "",
             "D three ways: images (training samples), tokens (images x the sequence length) and [MASK] tokens "
             "(the tokens the loss is on; `~` where the run predates the trainer's count: samples x sequence "
             "length x the mean mask ratio). tokens/N: training tokens per non-embedding parameter (Chinchilla's "
             "compute-optimal language models: ~20). C/6ND: the exact training FLOPs (enat.flops, summed over "
             "every step's plan) over 6 N D_tokens, the dense-transformer rule C ~ 6 N D with D in tokens; it is "
             "how far ENAT's compute is from that rule (its encoder sees only the visible tokens, attention is "
             "counted). Throughput: mean over the logged windows weighted by their time, the first (warm-up) "
             "left out; MFU '-' where the trainer knows no peak (CPU). Device-hours (GPU-hours on GPUs): "
             "training wall time x world size. Sampling: the FID jobs' sampler img/s per device, with "
             "computation reuse and without ('-': not measured).", "",
             f"| run | N | steps | D images | D tokens | D masked tokens | tokens/N | C/6ND | final {_loss_name(key)} "
             f"| wall min | devices | device-hours | tokens/s | MFU | sample img/s reuse | sample img/s plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        masked = ("~" if t["masked_estimated"] else "") + _f(t["D_masked_tokens"])
        lines.append(f"| `{t['run']}` | {t['N']:.4g} | {t['steps']} | {t['D_images']:.4g} | {t['D_tokens']:.4g} | "
                     f"{masked} | {t['tokens_per_param']:.3g} | {t['C_over_6ND']:.3g} | {_f(t['final_loss'], '.5g')} | "
                     f"{t['wall_min']:.3g} | {t['world_size']} | {t['gpu_hours']:.3g} | {_f(t['tokens_per_s'])} | "
                     f"{_f(t['mfu'], '.2%')} | {_f(t['sample_images_per_s_reuse'])} | "
                     f"{_f(t['sample_images_per_s_plain'])} |")
    return lines


def residuals(fit, points: list[dict], key: str) -> dict:
    """log L_obs - log L_fit at every fitted point; the RMS, the largest, and the mean per size
    (a trend against N or D is a law that does not describe the runs)."""
    N = np.array([p["n_params_nonembed"] for p in points], float)
    D = np.array([p["samples"] for p in points], float)
    r = np.log([p[key] for p in points]) - np.log(fit.predict(N, D))
    per_size = [{"N": float(n), "mean": float(r[N == n].mean()), "rms": float(np.sqrt((r[N == n] ** 2).mean())),
                 "points": int((N == n).sum())} for n in np.unique(N)]
    return {"rms": float(np.sqrt((r ** 2).mean())), "max_abs": float(np.abs(r).max()), "mean": float(r.mean()),
            "per_size": per_size,
            "points": [{"run": p["run"], "step": p.get("step"), "N": float(n), "D": float(d), "residual": float(v)}
                       for p, n, d, v in zip(points, N, D, r)]}


def plot_residuals(res: dict, key: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    N = np.array([p["N"] for p in res["points"]])
    D = np.array([p["D"] for p in res["points"]])
    r = np.array([p["residual"] for p in res["points"]])
    cmap = matplotlib.colormaps["viridis"]
    sizes = np.unique(N)
    for i, n in enumerate(sizes):
        at = N == n
        color = cmap(i / max(1, len(sizes) - 1))
        axes[0].scatter(N[at], r[at], s=10, color=color)
        axes[1].scatter(D[at], r[at], s=10, color=color, label=f"N={n:.3g}")
    for a, xlabel in zip(axes, ("non-embedding parameters N", "training samples D (images)")):
        a.axhline(0, color="k", lw=1)
        a.set(xscale="log", xlabel=xlabel, ylabel=f"log L_obs - log L_fit ({_loss_name(key)})")
    axes[0].set_title(f"residuals against N (RMS {res['rms']:.3g})")
    axes[1].set_title("residuals against D")
    return _save(fig, axes, out / "residuals.png")


def _point_fit(points: list[dict], key: str, delta: float, start=()) -> dict:
    """The law's point estimate (no bootstrap) on these points: scaling/search.py's global search (the
    profile scan, plus `start`) under Huber delta `delta`."""
    from scaling.search import check_sweep, search

    N = np.array([p["n_params_nonembed"] for p in points], float)
    D = np.array([p["samples"] for p in points], float)
    L = np.array([p[key] for p in points], float)
    runs = np.array([p["run"] for p in points])
    ok = np.isfinite(L) & (L > 0) & (N > 0) & (D > 0)
    N, D, L, runs = N[ok], D[ok], L[ok], runs[ok]
    check_sweep(N, D, runs)
    a, b, e, alpha, beta = search(N, D, L, delta, grid=False, extra=list(start)).x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "a": float(beta / (alpha + beta)), "points": int(len(N)),
            "sizes": int(len(np.unique(N)))}


def sensitivity(rows: list[dict], points: list[dict], key: str, fit) -> list[dict]:
    """Point estimates of alpha, beta, E and a = beta / (alpha + beta) when one choice changes: the
    loss key (the other mask ratios validated), the weights (EMA against online at the same ratio),
    the Huber delta, and the smallest size dropped. The first row is the reference: the main fit."""
    x0 = np.log([fit.A, fit.B, max(fit.E, 1e-300)]).tolist() + [fit.alpha, fit.beta]
    ref = {"variant": "reference (the fit above)", "changed": None, "loss": _loss_name(key), "weights": _weights(key),
           "delta": REFERENCE_DELTA, "sizes": fit.n_sizes, "points": fit.n_points, "E": fit.E, "A": fit.A, "B": fit.B,
           "alpha": fit.alpha, "beta": fit.beta, "a": fit.beta / (fit.alpha + fit.beta), "reference": True}
    prefix = "val_ema_" if key.startswith("val_ema_") else "val_"
    ratio = key[len(prefix):]
    have = {k for r in rows for k in r if k.startswith(("val_loss_r", "val_ema_loss_r"))}
    variants = []  # (name, changed, key, delta, points)
    for other in sorted(k for k in have if k.startswith(prefix + "loss_r") and k != key):
        variants.append((f"loss {_loss_name(other)}", "loss", other, REFERENCE_DELTA, None))
    twin = ("val_" if prefix == "val_ema_" else "val_ema_") + ratio
    if twin in have:
        variants.append((f"{_weights(twin)} weights ({_loss_name(twin)})", "weights", twin, REFERENCE_DELTA, None))
    for d in HUBER_DELTAS:
        if d != REFERENCE_DELTA:
            variants.append((f"Huber delta {d:g}", "delta", key, d, points))
    smallest = min(p["n_params_nonembed"] for p in points)
    variants.append((f"smallest size (N={smallest:.4g}) dropped", "sizes", key, REFERENCE_DELTA,
                     [p for p in points if p["n_params_nonembed"] != smallest]))
    table = [ref]
    for name, changed, k, delta, pts in variants:
        pts = pts if pts is not None else [r for r in rows if k in r and np.isfinite(r[k])]
        row = {"variant": name, "changed": changed, "loss": _loss_name(k), "weights": _weights(k), "delta": delta,
               "reference": False}
        try:
            row.update(_point_fit(pts, k, delta, [x0]))
        except ScalingError as e:
            row.update(points=len(pts), error=str(e))
        table.append(row)
    return table


def sensitivity_markdown(table: list[dict]) -> list[str]:
    ref = table[0]
    lines = ["## Sensitivity", "",
             "The law's point estimates (no bootstrap) when one choice of the reference fit changes: the loss key "
             "(another validated mask ratio), the weights (EMA against online), the Huber delta, the smallest "
             "size dropped. a = beta / (alpha + beta) is N*(C)'s exponent; its change against the reference is in "
             "the last column.", "",
             "| variant | loss | weights | delta | sizes | points | alpha | beta | E | a | a - a_ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        name = f"**{r['variant']}**" if r["reference"] else r["variant"]
        if "error" in r:
            lines.append(f"| {name} | `{r['loss']}` | {r['weights']} | {r['delta']:g} | - | {r['points']} | "
                         f"not fitted: {r['error']} | | | | |")
            continue
        lines.append(f"| {name} | `{r['loss']}` | {r['weights']} | {r['delta']:g} | {r['sizes']} | {r['points']} | "
                     f"{r['alpha']:.4g} | {r['beta']:.4g} | {r['E']:.4g} | {r['a']:.4g} | "
                     f"{r['a'] - ref['a']:+.3g} |")
    return lines


def _spearman(x, y) -> dict:
    """Spearman's rank correlation with its n and two-sided p-value (None where n < 3 or a side is
    constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "rho": None, "p": None}
    res = spearmanr(x, y)
    return {"n": n, "rho": float(res.statistic), "p": float(res.pvalue)}


def fid_protocol(runs: list[dict], rows: list[dict], key: str) -> dict:
    """Is the FID fit for a law? Which weights it was computed with against those the law is
    fitted on, the sample count against 10x the extractor's feature dimension (KID, unbiased, shown
    where the jobs computed it), evaluated checkpoints per size, and the rank correlation of the
    validation loss with FID (and KID): over every evaluated checkpoint with a validation loss at
    its step, and over each run's last such checkpoint. Warnings say what falls short."""
    law_weights = _weights(key)
    evals = [(r, e) for r in runs for e in r.get("evals", []) if "eval/fid" in e]
    out = {"law_weights": law_weights, "loss": _loss_name(key), "evaluated": len(evals), "warnings": []}
    if not evals:
        return out
    warn = out["warnings"]
    fid_weights = sorted({e.get("weights") or "unknown" for _, e in evals})
    out["fid_weights"] = fid_weights
    if fid_weights != [law_weights]:
        warn.append(f"FID was computed with the {' and '.join(fid_weights)} weights, the law is fitted on the "
                    f"{law_weights} weights ({_loss_name(key)}): the loss and FID describe different models "
                    f"(set eval.weights={law_weights}, or fit --loss "
                    f"{'val_ema' if law_weights == 'online' else 'val'}/loss_{key.split('loss_', 1)[1]})")
    samples = []
    for ext in sorted({e.get("extractor") or "unknown" for _, e in evals}):
        at = [e for _, e in evals if (e.get("extractor") or "unknown") == ext]
        counts = [e["num_samples"] for e in at if e.get("num_samples")]
        dim = FEATURE_DIMS.get(ext)
        need = SAMPLES_PER_DIM * dim if dim else None
        kid = all("eval/kid_mean" in e for e in at)
        row = {"extractor": ext, "feature_dim": dim, "needed": need, "min_samples": min(counts) if counts else None,
               "max_samples": max(counts) if counts else None, "evaluations": len(at), "kid": kid}
        samples.append(row)
        if need is None:
            warn.append(f"extractor {ext}: feature dimension unknown, the sample count cannot be checked")
        elif not counts:
            warn.append(f"extractor {ext}: the evaluations do not record their sample count")
        elif min(counts) < need:
            warn.append(f"{min(counts)} FID samples with {ext} (feature dimension {dim}): below {need} "
                        f"({SAMPLES_PER_DIM}x the dimension), so FID is biased upward by an amount that depends on "
                        f"the sample count; "
                        + ("compare KID (unbiased), reported below, or raise eval.num_samples" if kid
                           else "raise eval.num_samples (the jobs computed no KID)"))
    out["samples"] = samples
    per_size: dict = {}
    for r, e in evals:
        per_size.setdefault(r["n_params_nonembed"], set()).add((r["run"], e["step"]))
    out["checkpoints_per_size"] = [{"N": float(n), "checkpoints": len(v)} for n, v in sorted(per_size.items())]
    few = [(n, len(v)) for n, v in sorted(per_size.items()) if len(v) < MIN_CHECKPOINTS]
    if few:
        warn.append(f"fewer than {MIN_CHECKPOINTS} evaluated checkpoints at "
                    + ", ".join(f"N={n:.4g} ({c})" for n, c in few)
                    + ": too few for FID against compute per size (save more checkpoints, train.ckpt_every, and "
                      "evaluate them all: launch/eval.py --checkpoint all)")
    pairs = sorted((r for r in rows if key in r and np.isfinite(r[key]) and np.isfinite(r.get("eval_fid", np.nan))),
                   key=lambda r: (r["run"], r["step"]))
    last = list(_final_rows(pairs).values())
    corr = {}
    for name, metric in (("fid", "eval_fid"), ("kid", "eval_kid_mean")):
        for over, pts in (("checkpoints", pairs), ("final", last if len(last) < len(pairs) else [])):
            have = [p for p in pts if np.isfinite(p.get(metric, np.nan))]
            if have:
                corr[f"{name}_{over}"] = _spearman([p[key] for p in have], [p[metric] for p in have])
    out["spearman"] = corr
    out["evaluations"] = [{"run": r["run"], "N": float(r["n_params_nonembed"]), "step": e["step"],
                           "compute": float(e["compute"]), "fid": e.get("eval/fid"), "kid": e.get("eval/kid_mean"),
                           "kid_std": e.get("eval/kid_std"), "num_samples": e.get("num_samples"),
                           "weights": e.get("weights"), "extractor": e.get("extractor"), "reuse": e.get("reuse")}
                          for r, e in evals]
    if not pairs:
        warn.append("no evaluated checkpoint has a validation loss at its step: no rank correlation")
    return out


def fid_protocol_markdown(proto: dict) -> list[str]:
    lines = ["### FID protocol", ""]
    if not proto["evaluated"]:
        return lines + ["No FID evaluations."]
    w = " and ".join(proto["fid_weights"])
    lines.append(f"- Weights: FID of the **{w}** weights; the law is fitted on the **{proto['law_weights']}** "
                 f"weights (`{proto['loss']}`: val/ = online, val_ema/ = EMA).")
    for s in proto["samples"]:
        need = f"{s['needed']} (10 x feature dimension {s['feature_dim']})" if s["needed"] else "unknown"
        got = (f"{s['min_samples']}" if s["min_samples"] == s["max_samples"]
               else f"{s['min_samples']}-{s['max_samples']}")
        lines.append(f"- Samples ({s['extractor']}): {got} per evaluation, {s['evaluations']} evaluations; needed for "
                     f"an FID of small bias: {need}. KID (unbiased): {'computed' if s['kid'] else 'not computed'}.")
    per_size = ", ".join(f"N={c['N']:.4g}: {c['checkpoints']}" for c in proto["checkpoints_per_size"])
    lines.append(f"- Evaluated checkpoints per size: {per_size} (>= {MIN_CHECKPOINTS} wanted).")
    for k, c in proto["spearman"].items():
        metric, over = k.split("_")
        where = "every evaluated checkpoint" if over == "checkpoints" else "each run's last evaluated checkpoint"
        value = (f"rho = {c['rho']:.3f} (n = {c['n']}, p = {c['p']:.3g})" if c["rho"] is not None
                 else f"not computable (n = {c['n']}, or a constant side)")
        lines.append(f"- Spearman rank correlation of `{proto['loss']}` and {metric.upper()} over {where}: {value}.")
    lines += [""] + ([f"- **Warning:** {w}" for w in proto["warnings"]] or ["The protocol meets every check."])
    last: dict = {}
    for e in proto["evaluations"]:
        if e["run"] not in last or e["step"] > last[e["run"]]["step"]:
            last[e["run"]] = e
    lines += ["", "Each run's last evaluation (fit.json's fid_protocol.evaluations has them all):", "",
              "| run | N | step | samples | weights | FID | KID (mean +- std) |", "|---|---|---|---|---|---|---|"]
    for e in sorted(last.values(), key=lambda e: (e["N"], e["compute"])):
        kid = "-" if e["kid"] is None else f"{e['kid']:.4g} +- {_f(e['kid_std'], '.2g')}"
        lines.append(f"| `{e['run']}` | {e['N']:.4g} | {e['step']} | {_f(e['num_samples'], 'd')} | {e['weights']} | "
                     f"{_f(e['fid'], '.4g')} | {kid} |")
    return lines


def _ci(fit, name, fmt="{:.3g}") -> str:
    v = getattr(fit, name)
    if name in fit.ci:
        lo, hi = fit.ci[name]
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"
    return fmt.format(v)


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
                 "k_flops_per_param_sample", "gate", "runs_table", "sensitivity", "fid_protocol")
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
    table = runs_table(col.runs, col.rows, loss_column(loss))
    result = {"sweep": str(sweep), "loss": loss, "gate": gate, "law": None, "runs": len(col.runs),
              "excluded": col.excluded, "runs_table": table}
    (out / "fit.json").write_text(json.dumps(result, indent=1, default=float))
    lines = [f"# Scaling report: {col.name or sweep}", "", f"{len(col.runs)} runs, `{loss}`. No law is stated: the "
             f"runs fail the regime gate (`--ignore-gate` fits one anyway, marked as such).", ""]
    lines += gate_markdown(gate) if gate.get("baselines") else ["## Regime gate", ""] + [f"- {r}" for r in gate["reasons"]]
    lines += [""] + runs_markdown(table, loss_column(loss))
    if col.excluded:
        lines += ["", "## Excluded runs", ""] + [f"- `{e['run']}`: {e['reason']}" for e in col.excluded]
    if wandb_mode:  # the dashboard shows the failed gate (summary "gate", "law": null)
        rid = publish_wandb({**result, "points_used": "none", "points": 0}, col, [], loss_column(loss), [], out,
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
    table = runs_table(col.runs, col.rows, key)
    res = residuals(fit, points, key)
    plots.append(plot_residuals(res, key, out))
    sens = sensitivity(rows, points, key, fit)
    proto = fid_protocol(col.runs, col.rows, key)

    result = {"sweep": str(sweep), "loss": loss, "points_used": which, "law": fit.as_dict(), "k_flops_per_param_sample": k,
              "optimal": {"a": opt["a"], "b": opt["b"], "a_ci": opt.get("a_ci"), "b_ci": opt.get("b_ci"),
                          "at": [{"C": float(c), "N": float(n), "D": float(d), "L": float(lv)}
                                 for c, n, d, lv in zip(opt["C"], opt["N"], opt["D"], opt["L"])]},
              "frontier": frontiers, "approaches": approaches, "holdout": ho, "leave_one_out": loo, "fid": fid_fits,
              "gate": gate, "excluded": col.excluded, "runs": len(col.runs), "points": len(points),
              "runs_table": table, "residuals": res, "sensitivity": sens, "fid_protocol": proto}
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
             "| parameter | value [95 % CI] | unrounded |", "|---|---|---|"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {name} | {_ci(fit, name)} | {getattr(fit, name)!r} |")
    lines += ["", f"a = beta / (alpha + beta) = {fit.beta / (fit.alpha + fit.beta)!r}; objective at the optimum "
                  f"{fit.loss!r} over {fit.n_points} points. fit.json holds these values as they are."]
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
    lines += [""] + runs_markdown(table, key)
    lines += ["", "## Residuals", "",
              f"log L_obs - log L_fit at the {len(points)} fitted points: RMS {res['rms']:.4g}, largest "
              f"{res['max_abs']:.4g}, mean {res['mean']:+.3g} (residuals.png: against N and against D; a trend in "
              f"either is a part of the data the law does not describe).", "",
              "| N | points | mean residual | RMS |", "|---|---|---|---|"]
    lines += [f"| {r['N']:.4g} | {r['points']} | {r['mean']:+.3g} | {r['rms']:.3g} |" for r in res["per_size"]]
    lines += [""] + sensitivity_markdown(sens)
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
    lines += [""] + fid_protocol_markdown(proto)
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
