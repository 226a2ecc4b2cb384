"""Chinchilla's three approaches to the compute-optimal size N*(C) ~ C^a, side by side.

Hoffmann et al. (2022) estimate a three ways, and the three need not agree; when they do not, the
disagreement says more about the sweep than any one interval does:

  1. envelope_exponent: the minimum-loss envelope of the training curves. At each compute C the
     size with the lowest loss is N_opt(C); a is the slope of log N_opt against log C.
  2. isoflop_exponent: isoFLOP profiles. Runs of (about) equal compute form a level; a parabola in
     log N through each level's final losses has its minimum at N*; a is the slope over levels.
  3. huber_exponent: the parametric law L(N, D) = E + A/N^alpha + B/D^beta (as scaling/fit.py),
     a = beta / (alpha + beta). Besiroglu et al. (2024, "Chinchilla scaling: a replication
     attempt") found the original fit had stopped early: a sum of Huber losses (tiny, so L-BFGS's
     tolerances are met at once), loose tolerances, bootstrap fits started near the full fit, so
     intervals far too narrow. Here the objective is a mean scaled to O(1), the tolerances are
     tight, and every bootstrap resample gets a global search of its own.

cross_check() puts the three side by side (do the 95 % intervals overlap?) and
approaches_markdown() writes the report's section. Every interval is a percentile bootstrap over
runs (a run's points are drawn together, since they share a model).

Inputs are collect.py's rows: "run", "n_params_nonembed" (N), "samples" (D), "compute" (C), a loss
column (loss_key, e.g. "val_loss_r0.7").
"""

from __future__ import annotations

import numpy as np

from scaling.collect import ScalingError
from scaling.search import (BOUNDS, PARAMS, SCAN, best_of, check_sweep, fitted, init_grid, law_of, quiet, resample_fits,
                            scan_starts)

ENVELOPE_GRID = 60  # compute values the envelope is read at (log-spaced over the points' range)


def _ci(draws) -> tuple[float, float]:
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _usable(points: list[dict], loss_key: str, *keys: str) -> list[dict]:
    """Rows with a finite, positive loss and positive `keys`."""
    def ok(x):
        return x is not None and np.isfinite(x) and x > 0
    return [p for p in points if ok(p.get(loss_key)) and all(ok(p.get(k)) for k in keys)]


def _none(approach: int, method: str, reason: str) -> dict:
    return {"a": None, "reason": reason, "approach": approach, "method": method}


# ---------------------------------------------------------------------------------------------
# Approach 1: the minimum-loss envelope
# ---------------------------------------------------------------------------------------------


def _run_curves(points, loss_key):
    """Each run's loss interpolated (linear in log C) on a common log-C grid; NaN outside the run's
    own range, since extrapolating a curve would invent the very losses the envelope compares.
    -> (run ids, size of each run, grid log C, losses [run, grid])."""
    runs: dict = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    runs = {r: ps for r, ps in runs.items() if len({p["compute"] for p in ps}) >= 2}  # one point spans no range
    if not runs:
        return [], np.array([]), np.array([]), np.zeros((0, 0))
    logc = np.log([p["compute"] for ps in runs.values() for p in ps])
    grid = np.linspace(logc.min(), logc.max(), ENVELOPE_GRID)
    curves = np.full((len(runs), len(grid)), np.nan)
    sizes = np.empty(len(runs))
    for i, ps in enumerate(runs.values()):
        ps = sorted(ps, key=lambda p: p["compute"])
        x, y = np.log([p["compute"] for p in ps]), np.array([p[loss_key] for p in ps], float)
        inside = (grid >= x[0]) & (grid <= x[-1])
        curves[i, inside] = np.interp(grid[inside], x, y)
        sizes[i] = ps[0]["n_params_nonembed"]
    return list(runs), sizes, grid, curves


def _envelope(sizes, grid, curves):
    """N_opt at each grid C where >= 2 sizes have reached it and the best size is not at an edge of
    the sizes present there -> (log C, N_opt, how many grid values were censored). A best size
    that is the smallest or largest present is only a bound (a size beyond it might be better, it
    just did not train to this C), so it is left out of the fit rather than flattening the slope."""
    ns = np.unique(sizes)
    # Per size: the lowest loss among its runs at each C (runs of different budgets).
    by_size = np.full((len(ns), len(grid)), np.nan)
    for j, n in enumerate(ns):
        rows = curves[sizes == n]
        have = np.isfinite(rows).any(axis=0)
        by_size[j, have] = np.nanmin(rows[:, have], axis=0)
    present = np.isfinite(by_size)
    cols = np.flatnonzero(present.sum(axis=0) >= 2)
    xs, ys, censored = [], [], 0
    for c in cols:
        idx = np.flatnonzero(present[:, c])
        best = idx[np.argmin(by_size[idx, c])]
        if best in (idx[0], idx[-1]):
            censored += 1
            continue
        xs.append(grid[c])
        ys.append(ns[best])
    return np.array(xs), np.array(ys), censored


def _envelope_slope(logc, n_opt) -> float | None:
    if len(logc) < 3 or np.ptp(n_opt) == 0:
        return None
    return float(np.polyfit(logc, np.log(n_opt), 1)[0])


def envelope_exponent(points: list[dict], loss_key: str, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Approach 1: a from the minimum-loss envelope of every logged validation point of every run.

    The envelope only takes the sizes of the sweep, so N_opt(C) is a staircase and a is as coarse as
    the size grid (a few sizes per decade: expect ~10 %, not ~1 %). Bootstrap: runs resampled with
    replacement; resamples whose envelope has < 3 usable points or is flat are skipped and counted.
    """
    method = "min-loss envelope"
    pts = _usable(points, loss_key, "n_params_nonembed", "compute")
    run_ids, sizes, grid, curves = _run_curves(pts, loss_key)
    n_sizes = len(np.unique(sizes))
    if n_sizes < 3:
        return _none(1, method, f"{n_sizes} model size(s) with a training curve (>= 2 validation points): the "
                                f"envelope needs >= 3 sizes so that the best one can lie between two others.")
    xs, ys, censored = _envelope(sizes, grid, curves)
    a = _envelope_slope(xs, ys)
    if a is None:
        why = (f"only {len(xs)} compute value(s) where the lowest-loss size lies between two other sizes that "
               f"reached that compute" if len(xs) < 3 else "the lowest-loss size is the same at every compute")
        return _none(1, method, f"{why} ({censored} more had the best size at the edge of the sizes present): "
                                f"no slope to fit. Sizes need overlapping compute ranges with the optimum "
                                f"between them.")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = np.unique(rng.integers(0, len(run_ids), len(run_ids)))  # duplicates change no minimum
        s = _envelope_slope(*_envelope(sizes[pick], grid, curves[pick])[:2])
        if s is not None:
            draws.append(s)
    return {"a": a, "ci": _ci(draws) if draws else None, "approach": 1, "method": method,
            "points": [(float(np.exp(x)), float(n)) for x, n in zip(xs, ys)],
            "n_resamples": len(draws), "censored": censored, "grid": ENVELOPE_GRID}


# ---------------------------------------------------------------------------------------------
# Approach 2: isoFLOP parabolas
# ---------------------------------------------------------------------------------------------


def isoflop_levels(final_points: list[dict], rel_tol: float = 0.25) -> list[list[dict]]:
    """Runs of (about) equal compute: sorted by C, a run joins the current level while its C is
    within a factor (1 + rel_tol) of the level's first run."""
    levels: list[list[dict]] = []
    for p in sorted(final_points, key=lambda p: p["compute"]):
        if levels and np.log(p["compute"] / levels[-1][0]["compute"]) < np.log1p(rel_tol):
            levels[-1].append(p)
        else:
            levels.append([p])
    return levels


def _parabola(logn, loss):
    """Vertex of loss = p2 x^2 + p1 x + p0, x = log N -> (log N*, p2); None without a minimum.
    x is centred first so the fit is well conditioned."""
    if len(np.unique(logn)) < 3:
        return None
    m = logn.mean()
    p2, p1, _ = np.polyfit(logn - m, loss, 2)
    if not p2 > 0:
        return None
    return m - p1 / (2 * p2), p2


def isoflop_exponent(final_points: list[dict], loss_key: str, bootstrap: int = 1000, seed: int = 0,
                     rel_tol: float = 0.25) -> dict:
    """Approach 2: a from the minima of isoFLOP profiles (one final point per run, C its total compute).

    A level needs >= 3 distinct sizes and an upward parabola; a minimum outside the level's sizes is
    an extrapolation, kept but flagged ("inside": False). Bootstrap: runs resampled within each
    level (stratified, so every level keeps its compute); a resample where a level has < 3 sizes or
    no minimum is skipped, and n_resamples counts the ones used.
    """
    method = "isoFLOP parabolas"
    pts = _usable(final_points, loss_key, "n_params_nonembed", "compute")
    levels = []
    for group in isoflop_levels(pts, rel_tol):
        logn = np.log([p["n_params_nonembed"] for p in group])
        loss = np.array([p[loss_key] for p in group], float)
        c = float(np.exp(np.mean(np.log([p["compute"] for p in group]))))
        v = _parabola(logn, loss)
        level = {"C": c, "N_star": None, "inside": False, "sizes": len(np.unique(logn)), "curvature": None,
                 "runs": len(group), "_data": (logn, loss)}
        if v is None:
            level["note"] = ("fewer than 3 sizes" if level["sizes"] < 3 else
                             "no minimum (the parabola opens downward: the sizes miss the optimum)")
        else:
            level.update(N_star=float(np.exp(v[0])), inside=bool(logn.min() <= v[0] <= logn.max()),
                         curvature=float(v[1]))
        levels.append(level)
    fitted = [lv for lv in levels if lv["N_star"] is not None]
    public = [{k: v for k, v in lv.items() if k != "_data"} for lv in levels]
    if len(fitted) < 2:
        return {**_none(2, method, f"{len(fitted)} isoFLOP level(s) with a minimum (of {len(levels)} compute "
                                   f"level(s) within a factor {1 + rel_tol:g}): a slope needs >= 2. Each level "
                                   f"needs >= 3 sizes at one compute budget bracketing the optimum."),
                "levels": public}
    logc = np.log([lv["C"] for lv in fitted])
    a = float(np.polyfit(logc, np.log([lv["N_star"] for lv in fitted]), 1)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        stars = []
        for lv in fitted:
            logn, loss = lv["_data"]
            pick = rng.integers(0, len(logn), len(logn))
            v = _parabola(logn[pick], loss[pick])
            if v is None:
                break
            stars.append(v[0])
        else:
            draws.append(np.polyfit(logc, stars, 1)[0])
    return {"a": a, "ci": _ci(draws) if draws else None, "approach": 2, "method": method, "levels": public,
            "n_resamples": len(draws), "rel_tol": rel_tol}


# ---------------------------------------------------------------------------------------------
# Approach 3: the parametric law, fitted to convergence
# ---------------------------------------------------------------------------------------------


def _shared_resamples(law_fit, points: int, runs: int, bootstrap: int, seed: int, delta: float) -> np.ndarray:
    """The first `bootstrap` of fit_law's resamples (resample_fits' rows), refused unless they are
    of these points with this seed and delta."""
    if not bootstrap:
        return np.zeros((0, len(PARAMS)))
    rows = getattr(law_fit, "_resamples", np.zeros((0, len(PARAMS))))
    drawn = getattr(law_fit, "_resampled", None)
    if (law_fit.n_points, law_fit.n_runs) != (points, runs) or drawn != {"seed": seed, "delta": delta}:
        raise ValueError(f"law_fit was fitted to {law_fit.n_points} points of {law_fit.n_runs} runs, resampled with "
                         f"{drawn}: not these {points} points of {runs} runs with seed {seed}, delta {delta}")
    if len(rows) < bootstrap:
        raise ValueError(f"law_fit holds {len(rows)} resamples, not the {bootstrap} asked for (fit_law(..., "
                         f"resamples={bootstrap}))")
    return rows[:bootstrap]


def huber_exponent(points: list[dict], loss_key: str, bootstrap: int = 1000, seed: int = 0,
                   delta: float = 1e-3, law_fit=None) -> dict:
    """Approach 3: L(N, D) = E + A/N^alpha + B/D^beta fitted to convergence, a = beta / (alpha + beta).

    scaling/search.py's robust search, as fit.py's law: Huber (delta) on log-residuals, averaged
    and scaled to O(1), finished by L-BFGS-B with ftol 1e-15, gtol 1e-12 (what Besiroglu et al.
    found the original fit lacked). The fit: every start of the grid (128) plus the profile scan's.
    Every bootstrap resample (runs drawn with replacement) gets a global search of its own, not
    starts near the full fit; L-BFGS-B from all 128 grid starts costs 1-20 s per resample (hours
    for 1000), so resamples use the profile scan over the bounds' whole (alpha, beta) range
    (48 x 48, (A, B, E) exact at each cell) and L-BFGS-B from its best local minima. "scan_gap"
    checks that search on the full data: its objective minus the 128-start one (0 when the scan
    finds the same optimum).

    law_fit: fit.fit_law's fit of these points with resamples >= bootstrap (same seed and delta):
    the interval takes the first `bootstrap` of its resamples instead of fitting them again, so
    that the law's intervals and this exponent's come from one bootstrap (the report's). The
    resamples are the same either way: resample_fits() with this seed.
    """
    method = "Huber fit (approach 3)"
    pts = _usable(points, loss_key, "n_params_nonembed", "samples")
    N = np.array([p["n_params_nonembed"] for p in pts], float)
    D = np.array([p["samples"] for p in pts], float)
    L = np.array([p[loss_key] for p in pts], float)
    runs = np.array([str(p["run"]) for p in pts])
    try:
        check_sweep(N, D, runs)
    except ScalingError as e:
        return _none(3, method, str(e))
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    with quiet():
        scan = scan_starts(N, D, L)
        grid = init_grid(logL)
        best = best_of(grid + scan, logN, logD, logL, delta)
        scan_gap = float(best_of(scan, logN, logD, logL, delta).fun - best.fun)
    if law_fit is None:
        rows = resample_fits(N, D, L, runs, bootstrap, seed, delta)
    else:
        rows = _shared_resamples(law_fit, len(N), len(np.unique(runs)), bootstrap, seed, delta)
    draws = [dict(zip(PARAMS, map(float, row))) for row in fitted(rows)]
    law = law_of(best.x)
    at_bounds = [k for k, x, (lo, hi) in zip(("A", "B", "E", "alpha", "beta"), best.x, BOUNDS)
                 if min(x - lo, hi - x) < 1e-6]
    if "E" not in at_bounds and law["E"] < 0.01 * L.min():
        at_bounds.append("E")  # as fit.py: E -> 0 has a vanishing gradient, so the fit stops short of the bound
    a_draws = [d["beta"] / (d["alpha"] + d["beta"]) for d in draws]
    return {"a": law["beta"] / (law["alpha"] + law["beta"]), "ci": _ci(a_draws) if draws else None, "law": law,
            "law_ci": {k: _ci([d[k] for d in draws]) for k in PARAMS} if draws else {},
            "n_resamples": len(draws), "starts": len(grid) + len(scan), "approach": 3, "method": method,
            "objective": float(best.fun), "scan_gap": scan_gap, "delta": delta,
            "search": f"fit: {len(grid)} grid + {len(scan)} scan starts; each resample: profile scan "
                      f"{len(SCAN)}x{len(SCAN)} over (alpha, beta) + L-BFGS-B from its best local minima",
            "at_bounds": at_bounds}


# ---------------------------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------------------------


def _name(r: dict) -> str:
    return f"approach {r.get('approach', '?')} ({r.get('method', 'unknown')})"


def _skipped(skipped: list[dict]) -> str:
    return "".join(f" Approach {s['approach']} ({s['method']}) skipped: {s['reason']}" for s in skipped)


def _interval(r: dict) -> tuple[float, float]:
    return tuple(r["ci"]) if r.get("ci") else (r["a"], r["a"])  # no bootstrap: the point itself


def cross_check(results: list[dict]) -> dict:
    """The exponents side by side. agree: every pair of 95 % intervals overlaps (None when fewer
    than two approaches gave an exponent); disagreement names the pairs that do not."""
    have = [r for r in results if r.get("a") is not None]
    skipped = [{"approach": r.get("approach"), "method": r.get("method"), "reason": r.get("reason", "no exponent")}
               for r in results if r.get("a") is None]
    rows = [{"approach": r.get("approach"), "method": r.get("method"), "a": r["a"], "ci": r.get("ci"),
             "n_resamples": r.get("n_resamples", 0), "notes": _notes(r)} for r in have]
    out = {"approaches": rows, "skipped": skipped, "agree": None, "disagreement": None,
           "spread": float(max(r["a"] for r in have) - min(r["a"] for r in have)) if have else None}
    if len(have) < 2:
        out["line"] = f"Only {len(have)} approach(es) gave an exponent: nothing to cross-check." + _skipped(skipped)
        return out
    clashes = []
    for i, r in enumerate(have):
        for s in have[i + 1:]:
            (lo1, hi1), (lo2, hi2) = _interval(r), _interval(s)
            if hi1 < lo2 or hi2 < lo1:
                clashes.append(f"{_name(r)} gives a = {r['a']:.3f} [{lo1:.3f}, {hi1:.3f}] but {_name(s)} gives "
                               f"a = {s['a']:.3f} [{lo2:.3f}, {hi2:.3f}]")
    out["agree"] = not clashes
    if clashes:
        out["disagreement"] = "; ".join(clashes) + ": the 95 % intervals do not overlap."
        out["line"] = (f"The approaches disagree (spread {out['spread']:.3f}): {out['disagreement']} Trust none of "
                       f"them alone; the sweep does not pin a down.")
    else:
        out["line"] = (f"The {len(have)} approaches agree: every pair of 95 % intervals overlaps "
                       f"(spread of the estimates {out['spread']:.3f}).")
    out["line"] += _skipped(skipped)
    return out


def _notes(r: dict) -> str:
    if r.get("approach") == 1:
        return (f"{len(r['points'])} compute values on the envelope; {r['censored']} left out (best size at the "
                f"edge of the sizes present); staircase over the sweep's sizes")
    if r.get("approach") == 2:
        used = [lv for lv in r["levels"] if lv["N_star"] is not None]
        out = f"{len(used)} of {len(r['levels'])} levels with a minimum"
        outside = [lv for lv in used if not lv["inside"]]
        if outside:
            out += "; minimum extrapolated beyond the sizes at C = " + ", ".join(f"{lv['C']:.3g}" for lv in outside)
        return out
    if r.get("approach") == 3:
        law = r["law"]
        out = (f"alpha = {law['alpha']:.3f}, beta = {law['beta']:.3f}, E = {law['E']:.3g}; {r['starts']} starts "
               f"for the fit, a profile scan per resample")
        if r.get("at_bounds"):
            out += f"; at the optimiser's bounds: {', '.join(r['at_bounds'])}"
        return out
    return ""


def approaches_markdown(cross: dict) -> list[str]:
    """The report's section: one row per approach, then the agreement line."""
    lines = ["## Three approaches to N*(C)", "",
             "N*(C) ~ C^a estimated three ways (Hoffmann et al. 2022): the minimum-loss envelope of the training "
             "curves, parabolas through isoFLOP levels, and the parametric law's beta / (alpha + beta). 95 % "
             "intervals: bootstrap over runs.", "",
             "| approach | exponent a [95 % CI] | resamples | notes |", "|---|---|---|---|"]
    for r in cross["approaches"]:
        ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r.get("ci") else " (no interval)"
        lines.append(f"| {r['approach']}. {r['method']} | {r['a']:.3f}{ci} | {r['n_resamples']} | {r['notes']} |")
    for s in cross["skipped"]:
        lines.append(f"| {s['approach']}. {s['method']} | n/a | 0 | {s['reason']} |")
    return lines + ["", cross["line"]]
