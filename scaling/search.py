"""The robust search for the loss law's optimum, the one home of what scaling/fit.py's law and
scaling/approaches.py's Huber approach both fit with.

The law L(N, D) = E + A / N^alpha + B / D^beta is fitted as Hoffmann et al. (2022) do: the Huber
loss (delta 1e-3) of log L_hat - log L, with L_hat = exp(LSE(a - alpha log N, b - beta log D, e)),
in the optimiser's coordinates (log A, log B, log E, alpha, beta). Besiroglu et al. (2024,
"Chinchilla scaling: a replication attempt") found the original fit had stopped early: a sum of
Huber losses (tiny, so L-BFGS's tolerances are met at once), loose tolerances, bootstrap fits
started near the full fit, so intervals far too narrow. Here the objective is a mean scaled to
O(1), L-BFGS-B runs with tight tolerances, and the starts are init_grid's 128 plus the best local
minima of a profile scan over (alpha, beta) (scan_starts: (A, B, E) exact at each cell).

    search()          the global search on one set of points -> scipy's result
    resample_fits()   the bootstrap over runs, a global search of its own per resample
    check_sweep()     whether the points can identify the law at all
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager

import numpy as np
# At import, not inside the fit: a BLAS library first loaded within threadpool_limits(1) escapes the
# limit, and its threads spinning on these tiny problems made the fit ~10x slower on 2 busy cores.
from scipy.ndimage import minimum_filter
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from scaling.collect import ScalingError

PARAMS = ("E", "A", "B", "alpha", "beta")
# In the optimiser's coordinates (log A, log B, log E, alpha, beta).
BOUNDS = [(-10.0, 60.0), (-10.0, 60.0), (-10.0, 10.0), (0.0, 3.0), (0.0, 3.0)]
LBFGS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}
SCAN = np.geomspace(0.01, 3.0, 48)  # the alpha and beta values the profile scan visits (BOUNDS' range)
_FACES = [[0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]  # of the orthant A, B, E >= 0
_LO_HI = np.array(BOUNDS).T


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def objective(theta, logN, logD, logL, delta):
    """Huber loss of the log-residuals and its gradient (analytic: L-BFGS needs ~5x fewer evaluations)."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    m = u.max(axis=0)
    w = np.exp(u - m)
    total = w.sum(axis=0)
    r = m + np.log(total) - logL
    w /= total  # softmax: d pred / d u
    g = np.clip(r, -delta, delta)  # Huber'
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * logN).sum(), -(g * w[1] * logD).sum()])
    return _huber(r, delta).sum(), grad


@contextmanager
def quiet():
    """One BLAS thread (5-parameter problems: threads spinning for them made the fit 5-10x slower
    on a busy 2-core machine) and no optimiser warnings."""
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        yield


def init_grid(logL: np.ndarray) -> list[tuple]:
    """The grid's 128 starts in the optimiser's coordinates (log A, log B, log E, alpha, beta)."""
    e0 = [np.log(max(np.exp(logL.min()) * f, 1e-6)) for f in (0.5, 0.9)]
    return list(itertools.product([0.0, 5.0, 10.0, 20.0], [0.0, 5.0, 10.0, 20.0], e0, [0.2, 0.6], [0.2, 0.6]))


def check_sweep(N: np.ndarray, D: np.ndarray, runs: np.ndarray) -> None:
    """A ScalingError saying what is missing when the points cannot identify the law."""
    sizes, budgets = np.unique(N), np.unique(D)
    if len(sizes) < 2:
        raise ScalingError(f"only one model size in the sweep (N={sizes[0]:.4g}): A and alpha cannot be told "
                           f"apart from E. Add at least two more sizes (three or more for a meaningful alpha).")
    if len(budgets) < 2:
        raise ScalingError("every point has the same number of samples D: beta cannot be fitted. Log validation "
                           "loss during training (train.val_every) or add training budgets.")
    if len(N) < len(PARAMS) + 1:
        raise ScalingError(f"{len(N)} points for a {len(PARAMS)}-parameter law: log validation loss more often "
                           f"(train.val_every) or add runs")


def _scaled_objective(theta, logN, logD, logL, delta):
    """objective() as a mean over points divided by delta: for residuals beyond delta this is
    about the mean absolute log-error, O(0.1-10) at the grid's starts and O(noise) at the optimum,
    with O(1) gradients, so L-BFGS-B's tolerances mean what they say. (The raw sum is ~1e-4 near
    the optimum with gradients ~1e-3: scipy's default tolerances are met early.)"""
    f, g = objective(theta, logN, logD, logL, delta)
    s = 1.0 / (len(logN) * delta)
    return f * s, g * s


def _polish(x0, logN, logD, logL, delta):
    return minimize(_scaled_objective, np.clip(np.asarray(x0, float), *_LO_HI), args=(logN, logD, logL, delta),
                    method="L-BFGS-B", jac=True, bounds=BOUNDS, options=LBFGS)


def best_of(starts, logN, logD, logL, delta):
    """L-BFGS-B from every start, the lowest end point."""
    best = None
    for x0 in starts:
        res = _polish(x0, logN, logD, logL, delta)
        if best is None or res.fun < best.fun:
            best = res
    return best


def _profile(N, D, L):
    """For every (alpha, beta) on SCAN x SCAN: min over A, B, E >= 0 of sum((A N^-alpha + B D^-beta
    + E) / L - 1)^2 (relative residuals ~ log-residuals), solved exactly: the minimum of a convex
    quadratic on the non-negative orthant is the unconstrained minimum on one of its 7 faces, so
    solve all 7 (batched 1-3 variable systems, columns scaled to unit diagonal) and keep the best
    feasible one. -> (residual sum [G, G], (A, B, E) [G, G, 3])."""
    q = 1.0 / L ** 2
    V, U = N[None, :] ** -SCAN[:, None], D[None, :] ** -SCAN[:, None]
    g = len(SCAN)
    G, h = np.empty((g, g, 3, 3)), np.empty((g, g, 3))
    G[..., 0, 0], G[..., 1, 1], G[..., 2, 2] = ((V * V) @ q)[:, None], ((U * U) @ q)[None, :], q.sum()
    G[..., 0, 1] = G[..., 1, 0] = (V * q) @ U.T
    G[..., 0, 2] = G[..., 2, 0] = (V @ q)[:, None]
    G[..., 1, 2] = G[..., 2, 1] = (U @ q)[None, :]
    h[..., 0], h[..., 1], h[..., 2] = (V @ (q * L))[:, None], (U @ (q * L))[None, :], (q * L).sum()
    d = np.sqrt(np.einsum("...ii->...i", G))
    G, h = G / d[..., :, None] / d[..., None, :], h / d
    best, coef = np.full((g, g), float(len(L))), np.zeros((g, g, 3))  # all zero: sum(1^2)
    for face in _FACES:
        c = np.linalg.solve(G[..., face, :][..., face] + 1e-12 * np.eye(len(face)), h[..., face, None])[..., 0]
        val = len(L) - (c * h[..., face]).sum(-1)
        ok = (c >= 0).all(-1) & (val < best)
        best = np.where(ok, val, best)
        full = np.zeros_like(coef)
        full[..., face] = c / d[..., face]
        coef = np.where(ok[..., None], full, coef)
    return best, coef


def scan_starts(N, D, L, most=3) -> list[np.ndarray]:
    """The `most` lowest local minima of the profile over (alpha, beta), as optimiser coordinates:
    one start per basin of the grid, rather than many starts that mostly fall into the same one."""
    prof, coef = _profile(N, D, L)
    cells = np.flatnonzero(prof == minimum_filter(prof, size=3, mode="nearest"))
    cells = cells[np.argsort(prof.ravel()[cells], kind="stable")][:most]
    starts = []
    for cell in cells:
        i, j = divmod(cell, len(SCAN))
        A, B, E = np.log(np.maximum(coef[i, j], 1e-30))  # a zero term starts at its lower bound
        starts.append(np.array([A, B, E, SCAN[i], SCAN[j]]))
    return starts


def law_of(x) -> dict:
    """Optimiser coordinates -> the law's parameters."""
    a, b, e, alpha, beta = x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta)}


def search(N, D, L, delta: float = 1e-3, grid: bool = True, extra=()):
    """The global search for the law's optimum: L-BFGS-B on the scaled Huber objective with tight
    tolerances, from the best local minima of the profile scan over (alpha, beta), from
    init_grid's 128 starts too with grid=True (1-2 s more), and from `extra` (points in the
    optimiser's coordinates); the lowest end point wins. Points must be valid
    (finite, positive). -> scipy's result; x = (log A, log B, log E, alpha, beta)."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    with quiet():
        starts = scan_starts(N, D, L) + [np.asarray(x, float) for x in extra]
        if grid:
            starts = init_grid(logL) + starts
        return best_of(starts, logN, logD, logL, delta)


def resample_fits(N, D, L, runs, bootstrap: int, seed: int = 0, delta: float = 1e-3) -> np.ndarray:
    """The bootstrap over runs: `bootstrap` resamples (runs drawn with replacement, a run's points
    together), each with a global search of its own (the profile scan + L-BFGS-B from its best
    local minima). Resamples with < 2 sizes or < 2 sample counts are skipped: their rows are NaN.
    -> [bootstrap, 5] rows of (E, A, B, alpha, beta), one per resample in the order drawn, so the
    first n rows are the bootstrap of n resamples with this seed (fitted(rows[:n]) its usable
    ones): one run of resamples serves every interval that takes n <= bootstrap of them."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    runs = np.asarray(runs)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    ids = np.unique(runs)
    members = [np.flatnonzero(runs == r) for r in ids]
    rng = np.random.default_rng(seed)
    draws = []
    with quiet():
        for _ in range(bootstrap):
            idx = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
            if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
                draws.append([np.nan] * len(PARAMS))
                continue
            x = best_of(scan_starts(N[idx], D[idx], L[idx]), logN[idx], logD[idx], logL[idx], delta).x
            draws.append([np.exp(x[2]), np.exp(x[0]), np.exp(x[1]), x[3], x[4]])
    return np.asarray(draws, float).reshape(-1, len(PARAMS))


def fitted(rows: np.ndarray) -> np.ndarray:
    """resample_fits' rows without the skipped resamples."""
    return rows[~np.isnan(rows).any(axis=1)]
