"""What the scaling report computes besides the law, as rows for fit.json (no plotting, no
Markdown): the runs table, the residuals, the sensitivity of the law to the choices behind it,
the FID laws per size and the FID protocol's checks, the three approaches to N*(C), the hold-out
row and the regime gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from enat.config import load_config
from scaling.approaches import cross_check, envelope_exponent, huber_exponent, isoflop_exponent, isoflop_levels
from scaling.baselines import regime_gate, sweep_baselines
from scaling.collect import ScalingError
from scaling.fit import fit_fid
from scaling.points import loss_name, weights_of
from scaling.search import check_sweep, search

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


def level_minima(points: list[dict], key: str) -> list[dict]:
    """Per isoFLOP level (the seed repeats' mean at a size): the size with the lowest final loss,
    its neighbours' losses, and whether that minimum lies inside the level's sizes (a neighbour
    on each side) or at an edge, where the level's sizes do not bracket the optimum."""
    out = []
    for group in isoflop_levels(points):
        by_n = {}
        for p in group:
            by_n.setdefault(p["n_params_nonembed"], []).append(p[key])
        ns = sorted(by_n)
        losses = [float(np.mean(by_n[n])) for n in ns]
        i = int(np.argmin(losses))
        out.append({"compute": float(np.median([p["compute"] for p in group])), "sizes": ns, "losses": losses,
                    "best_N": ns[i], "best_loss": losses[i],
                    "below": losses[i - 1] if i > 0 else None, "above": losses[i + 1] if i + 1 < len(ns) else None,
                    "inside": 0 < i < len(ns) - 1, "runs": sorted(p["run"] for p in group)})
    return out


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


def _point_fit(points: list[dict], key: str, delta: float, start=()) -> dict:
    """The law's point estimate (no bootstrap) on these points: scaling/search.py's global search
    (the profile scan, plus `start`) under Huber delta `delta`."""
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
    ref = {"variant": "reference (the fit above)", "changed": None, "loss": loss_name(key), "weights": weights_of(key),
           "delta": REFERENCE_DELTA, "sizes": fit.n_sizes, "points": fit.n_points, "E": fit.E, "A": fit.A, "B": fit.B,
           "alpha": fit.alpha, "beta": fit.beta, "a": fit.beta / (fit.alpha + fit.beta), "reference": True}
    prefix = "val_ema_" if key.startswith("val_ema_") else "val_"
    ratio = key[len(prefix):]
    have = {k for r in rows for k in r if k.startswith(("val_loss_r", "val_ema_loss_r"))}
    variants = []  # (name, changed, key, delta, points)
    for other in sorted(k for k in have if k.startswith(prefix + "loss_r") and k != key):
        variants.append((f"loss {loss_name(other)}", "loss", other, REFERENCE_DELTA, None))
    twin = ("val_" if prefix == "val_ema_" else "val_ema_") + ratio
    if twin in have:
        variants.append((f"{weights_of(twin)} weights ({loss_name(twin)})", "weights", twin, REFERENCE_DELTA, None))
    for d in HUBER_DELTAS:
        if d != REFERENCE_DELTA:
            variants.append((f"Huber delta {d:g}", "delta", key, d, points))
    smallest = min(p["n_params_nonembed"] for p in points)
    variants.append((f"smallest size (N={smallest:.4g}) dropped", "sizes", key, REFERENCE_DELTA,
                     [p for p in points if p["n_params_nonembed"] != smallest]))
    table = [ref]
    for name, changed, k, delta, pts in variants:
        pts = pts if pts is not None else [r for r in rows if k in r and np.isfinite(r[k])]
        row = {"variant": name, "changed": changed, "loss": loss_name(k), "weights": weights_of(k), "delta": delta,
               "reference": False}
        try:
            row.update(_point_fit(pts, k, delta, [x0]))
        except ScalingError as e:
            row.update(points=len(pts), error=str(e))
        table.append(row)
    return table


def _spearman(x, y) -> dict:
    """Spearman's rank correlation with its n and two-sided p-value (None where n < 3 or a side is
    constant)."""
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
    law_weights = weights_of(key)
    evals = [(r, e) for r in runs for e in r.get("evals", []) if "eval/fid" in e]
    out = {"law_weights": law_weights, "loss": loss_name(key), "evaluated": len(evals), "warnings": []}
    if not evals:
        return out
    warn = out["warnings"]
    fid_weights = sorted({e.get("weights") or "unknown" for _, e in evals})
    out["fid_weights"] = fid_weights
    if fid_weights != [law_weights]:
        warn.append(f"FID was computed with the {' and '.join(fid_weights)} weights, the law is fitted on the "
                    f"{law_weights} weights ({loss_name(key)}): the loss and FID describe different models "
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


def fid_points(runs: list[dict]) -> dict:
    """N -> [(C, FID)] of every evaluated checkpoint, sorted by compute."""
    per_size: dict = {}
    for r in runs:
        for e in r.get("evals", []):
            if "eval/fid" in e:
                per_size.setdefault(r["n_params_nonembed"], []).append((e["compute"], e["eval/fid"]))
    for pts in per_size.values():
        pts.sort()
    return per_size


def fid_fits(per_size: dict) -> list[dict]:
    """A saturating law FID(C) per size where it is justified (fit.fit_fid), or the reason not."""
    fits = []
    for n, pts in sorted(per_size.items()):
        c, f = np.array(pts).T
        res = fit_fid(c, f)
        fits.append({"N": n, "points": len(c), **{k: v for k, v in res.items()}})
    return fits


def three_approaches(rows: list[dict], points: list[dict], key: str, bootstrap: int, law_fit=None) -> dict:
    """N*(C) ~ C^a three ways (scaling/approaches.py): the envelope of every logged point, isoFLOP
    parabolas through each run's final point, the Huber fit of the points the law is fitted on
    (its interval from law_fit's resamples when given: fit_law's of these points, with
    resamples >= bootstrap)."""
    curve = [r for r in rows if key in r and np.isfinite(r[key])]
    final = [r for r in curve if r["final"]]
    results = [envelope_exponent(curve, key, bootstrap), isoflop_exponent(final, key, bootstrap),
               huber_exponent(points, key, bootstrap, law_fit=law_fit)]
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


def check_regime(col, loss: str) -> dict:
    """The regime gate on the runs' final points, against the frequency tables of the sweep's own
    token shards (the first run's data.shards / data.val_shards); shards that cannot be read fail
    the gate, saying why."""
    try:
        baselines = sweep_baselines(load_config(Path(col.runs[0]["run_dir"]) / "config.yaml"))
    except ScalingError as e:
        return {"passed": False, "reasons": [f"The frequency-table baselines could not be computed ({e}), so the "
                                             f"runs' regime is unknown."], "per_run": [], "baselines": None}
    return regime_gate([r for r in col.rows if r["final"]], baselines, loss)
