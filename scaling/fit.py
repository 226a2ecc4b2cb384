"""Fits: the loss law L(N, D) = E + A / N^alpha + B / D^beta, the compute-optimal allocation it
implies, FID against compute, and a hold-out prediction check.

The law is fitted as Hoffmann et al. (2022) do: the Huber loss (delta 1e-3) of
log L_hat - log L, with L_hat = exp(LSE(a - alpha log N, b - beta log D, e)), minimised by L-BFGS
from a grid of starting points; the best end point wins. The minimiser is scaling/search.py's
(Besiroglu et al. 2024): the objective averaged and scaled to O(1), L-BFGS-B with tight
tolerances, from the grid's 128 starts plus the best local minima of a profile scan over
(alpha, beta). Uncertainty: a bootstrap over runs (all points of a run drawn together, since they
share a model), percentile intervals; every resample gets a global search of its own (the
profile scan, then L-BFGS-B from its best local minima), not starts near the full fit, which kept
every resample in the full fit's basin and made the intervals far too narrow.

Compute: each run's FLOPs per training sample are exact (enat.flops), and across sizes they are
close to proportional to N: C = k N D, with k the median ratio over the runs. With that,
N*(C) = G (C/k)^a and D*(C) = (C/k)^b / G with a = beta/(alpha+beta), b = alpha/(alpha+beta),
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import curve_fit

from scaling.collect import ScalingError
from scaling.search import BOUNDS, PARAMS, check_sweep, fitted, objective, resample_fits, search


@dataclass
class LawFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float = float("nan")  # the objective at the optimum
    n_points: int = 0
    n_runs: int = 0
    n_sizes: int = 0
    ci: dict = field(default_factory=dict)  # name -> (lo, hi), 95 % bootstrap
    bootstrap: int = 0
    at_bounds: list = field(default_factory=list)  # parameters pinned to a bound (E: or negligible)

    def predict(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def as_dict(self) -> dict:
        return asdict(self)


def fit_law(N, D, L, runs=None, delta: float = 1e-3, bootstrap: int = 200, seed: int = 0,
            resamples: int = 0) -> LawFit:
    """Fit L(N, D) to points (one per run and validation step). `runs` labels each point's run for
    the bootstrap (default: every point its own run). The optimum: search() from the grid and the
    profile scan; the 95 % intervals: the first `bootstrap` of resample_fits()' resamples, a global
    search each. resamples > bootstrap draws that many and keeps them all in fit._resamples (one
    row per resample, NaN where skipped) for other estimates to take theirs from the same ones
    (the report's Huber exponent); the intervals are those of `bootstrap` resamples all the same."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    runs = np.asarray(runs if runs is not None else np.arange(len(N)))
    ok = np.isfinite(L) & (L > 0) & (N > 0) & (D > 0)
    N, D, L, runs = N[ok], D[ok], L[ok], runs[ok]
    check_sweep(N, D, runs)
    best = search(N, D, L, delta)
    a, b, e, alpha, beta = best.x
    fit = LawFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta),
                 loss=float(objective(best.x, np.log(N), np.log(D), np.log(L), delta)[0]), n_points=len(N),
                 n_runs=len(np.unique(runs)), n_sizes=len(np.unique(N)),
                 at_bounds=[name for name, x, (lo, hi) in zip(("A", "B", "E", "alpha", "beta"), best.x, BOUNDS)
                            if min(x - lo, hi - x) < 1e-6])
    if "E" not in fit.at_bounds and fit.E < 0.01 * L.min():
        fit.at_bounds.append("E")  # its gradient vanishes as E -> 0, so L-BFGS stops short of the bound
    if max(bootstrap, resamples):
        fit._resamples = resample_fits(N, D, L, runs, max(bootstrap, resamples), seed, delta)
        fit._resampled = {"seed": seed, "delta": delta}
    if bootstrap:
        draws = fitted(fit._resamples[:bootstrap])
        if len(draws):
            fit.ci = {k: (float(np.percentile(draws[:, i], 2.5)), float(np.percentile(draws[:, i], 97.5)))
                      for i, k in enumerate(PARAMS)}
            fit.bootstrap = len(draws)
            fit._draws = draws  # for derived quantities' intervals
    return fit


# ---------------------------------------------------------------------------------------------
# Compute-optimal allocation
# ---------------------------------------------------------------------------------------------


def _optimal(E, A, B, alpha, beta, C, k):
    """N*, D*, L* at compute C (FLOPs) with C = k N D."""
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    n = G * (np.asarray(C, float) / k) ** a
    d = (np.asarray(C, float) / k) / n
    return n, d, E + A / n ** alpha + B / d ** beta, a, b


def compute_optimal(fit: LawFit, k: float, C) -> dict:
    """N*(C), D*(C), L*(C) and the exponents a, b with bootstrap intervals."""
    n, d, loss, a, b = _optimal(fit.E, fit.A, fit.B, fit.alpha, fit.beta, C, k)
    out = {"C": np.asarray(C, float), "N": n, "D": d, "L": loss, "a": a, "b": b, "k": k}
    draws = getattr(fit, "_draws", None)
    if draws is not None and len(draws):
        ab = np.array([(bt / (al + bt), al / (al + bt)) for _, _, _, al, bt in draws])
        out["a_ci"] = (float(np.percentile(ab[:, 0], 2.5)), float(np.percentile(ab[:, 0], 97.5)))
        out["b_ci"] = (float(np.percentile(ab[:, 1], 2.5)), float(np.percentile(ab[:, 1], 97.5)))
        ns = np.array([_optimal(*row, C, k)[0] for row in draws])
        out["N_lo"], out["N_hi"] = np.percentile(ns, 2.5, axis=0), np.percentile(ns, 97.5, axis=0)
    return out


def flops_per_param(runs: list[dict]) -> float:
    """k in C = k N D: the median over runs of FLOPs per sample / non-embedding parameters."""
    return float(np.median([r["flops_per_sample"] / r["n_params_nonembed"] for r in runs]))


# ---------------------------------------------------------------------------------------------
# Hold-out check and FID
# ---------------------------------------------------------------------------------------------


def holdout(points: list[dict], loss_key: str, hold: str | None = None, bootstrap: int = 0) -> dict:
    """Fit on every run but `hold` (default: the largest N, then the longest), predict its final
    validation loss: a check at most one step beyond the other runs. The report takes it from
    scaling/holdout.py's leave-one-out table; the test of extrapolation is the pre-registered
    hold-out there."""
    runs = sorted({p["run"] for p in points}, key=lambda r: max((p["n_params_nonembed"], p["samples"])
                                                                  for p in points if p["run"] == r))
    hold = hold or runs[-1]
    if hold not in runs:
        raise ScalingError(f"hold-out run {hold!r} is not among the runs: {runs}")
    train = [p for p in points if p["run"] != hold]
    test = max((p for p in points if p["run"] == hold), key=lambda p: p["samples"])
    fit = fit_law([p["n_params_nonembed"] for p in train], [p["samples"] for p in train],
                  [p[loss_key] for p in train], [p["run"] for p in train], bootstrap=bootstrap)
    pred = float(fit.predict(test["n_params_nonembed"], test["samples"]))
    obs = float(test[loss_key])
    return {"run": hold, "N": test["n_params_nonembed"], "D": test["samples"], "predicted": pred, "observed": obs,
            "rel_error": (pred - obs) / obs, "fit": fit.as_dict()}


def fit_fid(C, fid, min_points: int = 4) -> dict:
    """FID(C) = F_inf + K C^-gamma for one size, or the reason it is reported as points only."""
    C, fid = np.asarray(C, float), np.asarray(fid, float)
    ok = np.isfinite(fid)
    C, fid = C[ok], fid[ok]
    if len(C) < min_points:
        return {"fitted": False, "reason": f"{len(C)} evaluated checkpoints; a 3-parameter saturating law needs "
                                           f">= {min_points}"}
    if not np.all(np.diff(fid[np.argsort(C)]) <= 0.05 * fid.max()):
        return {"fitted": False, "reason": "FID does not decrease with compute at these points"}
    c0 = C.min()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (f_inf, K, gamma), cov = curve_fit(lambda c, f, k, g: f + k * (c / c0) ** -g, C, fid,
                                               p0=[fid.min() * 0.5, fid.max(), 0.5], bounds=([0, 0, 0], [np.inf] * 2 + [5]),
                                               maxfev=20000)
    except RuntimeError as e:
        return {"fitted": False, "reason": f"the fit did not converge ({e})"}
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) * 1.96
    return {"fitted": True, "F_inf": f_inf, "K": K, "gamma": gamma, "C0": c0,
            "ci": {"F_inf": (f_inf - err[0], f_inf + err[0]), "gamma": (gamma - err[2], gamma + err[2])}}
