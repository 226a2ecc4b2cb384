"""The scaling report's figures (matplotlib, written as PNG files; no fitting, no Markdown):
loss_vs_compute.png, isoflop.png, optimal_n.png, fid_vs_compute.png, loss_by_mask_ratio.png and
residuals.png. Every plot labels both axes (_save refuses one that does not).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter

from scaling.collect import ScalingError
from scaling.fit import compute_optimal
from scaling.points import loss_name


def _figure():
    matplotlib.use("Agg")  # files only, no display
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


def _by_size(points: list[dict]) -> dict:
    sizes: dict = {}
    for p in points:
        sizes.setdefault(p["n_params_nonembed"], []).append(p)
    return dict(sorted(sizes.items()))


def plot_loss_vs_compute(points, fit, k, key, out: Path) -> Path:
    fig, ax = _figure()
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
           ylabel=f"validation loss {loss_name(key)} (nats per masked token)", title="validation loss vs compute")
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


def plot_fid(per_size: dict, fits: list[dict], out: Path) -> Path:
    """FID vs compute per size (per_size: tables.fid_points'), and the saturating law of each size
    where tables.fid_fits fitted one."""
    fig, ax = _figure()
    for i, ((n, pts), res) in enumerate(zip(sorted(per_size.items()), fits)):
        c, f = np.array(pts).T
        ax.scatter(c, f, s=12, color=f"C{i}", label=f"N={n / 1e3:.0f}k")
        if res["fitted"]:
            g = np.geomspace(c.min(), c.max() * 2, 100)
            ax.plot(g, res["F_inf"] + res["K"] * (g / res["C0"]) ** -res["gamma"], color=f"C{i}", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="FID", title="FID vs compute")
    return _save(fig, ax, out / "fid_vs_compute.png")


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


def plot_residuals(res: dict, key: str, out: Path) -> Path:
    matplotlib.use("Agg")
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
        a.set(xscale="log", xlabel=xlabel, ylabel=f"log L_obs - log L_fit ({loss_name(key)})")
    axes[0].set_title(f"residuals against N (RMS {res['rms']:.3g})")
    axes[1].set_title("residuals against D")
    return _save(fig, axes, out / "residuals.png")
