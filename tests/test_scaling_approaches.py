"""scaling/approaches.py: Chinchilla's three estimates of N*(C) ~ C^a on synthetic sweeps from a
known law (C = k N D, so a_true = beta / (alpha + beta)), the cross-check, the Markdown section,
and clear reasons for sweeps that cannot give an estimate."""

import numpy as np
import pytest

from scaling.approaches import (approaches_markdown, cross_check, envelope_exponent, huber_exponent, isoflop_exponent,
                                isoflop_levels)

TRUE = dict(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.28)
K = 6.0  # FLOPs per parameter and sample
A_TRUE = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # 0.4516
KEY = "val_loss_r0.7"


def law(N, D, t=TRUE):
    return t["E"] + t["A"] / np.asarray(N, float) ** t["alpha"] + t["B"] / np.asarray(D, float) ** t["beta"]


def n_star(C, t=TRUE):
    """The analytic compute-optimal size under C = K N D."""
    G = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    return G * (np.asarray(C, float) / K) ** (t["beta"] / (t["alpha"] + t["beta"]))


def row(run, N, D, loss, final=True):
    return {"run": run, "n_params_nonembed": float(N), "samples": float(D), "compute": K * N * D,
            "flops_per_sample": K * N, KEY: float(loss), "final": final}


def isoflop_sweep(levels, per=7, span=4.0, noise=0.005, seed=0):
    """`per` sizes from N*/span to N*·span (log-spaced, centred on the true N*) at each budget."""
    rng = np.random.default_rng(seed)
    pts = []
    for j, C in enumerate(levels):
        for i, N in enumerate(n_star(C) * np.geomspace(1 / span, span, per)):
            D = C / (K * N)
            pts.append(row(f"c{j}-n{i}", N, D, law(N, D) * np.exp(rng.normal(0, noise))))
    return pts


def curve_sweep(sizes, samples, noise=0.005, seed=0, t=TRUE, tag="n"):
    """One run per size, a validation point at every D in `samples` (a constant-LR training curve)."""
    rng = np.random.default_rng(seed)
    return [row(f"{tag}{i}", N, D, law(N, D, t) * np.exp(rng.normal(0, noise)), final=D == samples[-1])
            for i, N in enumerate(sizes) for D in samples]


ISO_LEVELS = 1e16 * 3.0 ** np.arange(5)  # 5 levels, 3x apart
CURVE_SIZES, CURVE_D = np.geomspace(1e5, 1e7, 8), np.geomspace(1e6, 1e10, 30)
FIT_SIZES, FIT_D = np.geomspace(1e5, 1e7, 12), np.geomspace(1e5, 1e8, 8)  # 12 runs, 96 points


@pytest.fixture(scope="module")
def iso():
    return isoflop_exponent(isoflop_sweep(ISO_LEVELS), KEY, bootstrap=200)


@pytest.fixture(scope="module")
def envelope():
    return envelope_exponent(curve_sweep(CURVE_SIZES, CURVE_D), KEY, bootstrap=200)


@pytest.fixture(scope="module")
def huber():
    return huber_exponent(curve_sweep(FIT_SIZES, FIT_D), KEY, bootstrap=200)


# --- approach 2: isoFLOP parabolas -------------------------------------------------------------


def test_isoflop_recovers_the_exponent(iso):
    assert iso["method"] == "isoFLOP parabolas" and iso["approach"] == 2
    assert iso["a"] == pytest.approx(A_TRUE, rel=0.05)  # 0.4526 here
    lo, hi = iso["ci"]
    assert lo <= A_TRUE <= hi and lo < iso["a"] < hi
    assert hi - lo < 0.2  # an interval that says something
    assert iso["n_resamples"] > 150  # few resamples lose a level's minimum with 7 sizes per level
    assert len(iso["levels"]) == 5
    for level, C in zip(iso["levels"], ISO_LEVELS):
        assert level["C"] == pytest.approx(C, rel=1e-9) and level["sizes"] == 7
        assert level["inside"] and level["curvature"] > 0
        assert level["N_star"] == pytest.approx(n_star(C), rel=0.1)  # each vertex within 10 % (noise 0.5 %)


def test_isoflop_groups_levels_within_the_relative_tolerance():
    pts = [{"compute": c} for c in (1.0e15, 1.1e15, 1.2e15, 1.3e15, 3.0e15, 3.3e15, 9e15)]
    # Greedy from the smallest: 1.3e15 is more than 1.25x the level's first run, so it starts a level.
    assert [len(lv) for lv in isoflop_levels(pts, rel_tol=0.25)] == [3, 1, 2, 1]
    assert [len(lv) for lv in isoflop_levels(pts, rel_tol=0.05)] == [1, 1, 1, 1, 1, 1, 1]


def test_isoflop_flags_an_extrapolated_minimum():
    pts = isoflop_sweep(ISO_LEVELS[:4], per=6, noise=0.003)
    C = ISO_LEVELS[4]
    for i, N in enumerate(n_star(C) * np.geomspace(2.5, 12, 5)):  # every size above the optimum
        pts.append(row(f"high{i}", N, C / (K * N), law(N, C / (K * N))))
    res = isoflop_exponent(pts, KEY, bootstrap=50)
    last = res["levels"][-1]
    assert last["C"] == pytest.approx(C) and last["sizes"] == 5
    assert last["N_star"] is not None and not last["inside"] and last["N_star"] < 2.5 * n_star(C)
    assert all(lv["inside"] for lv in res["levels"][:-1])
    row_md = next(line for line in approaches_markdown(cross_check([res])) if line.startswith("| 2."))
    assert f"extrapolated beyond the sizes at C = {C:.3g}" in row_md


def test_isoflop_reasons_for_degenerate_sweeps():
    one = isoflop_exponent(isoflop_sweep(ISO_LEVELS[:1]), KEY, bootstrap=10)
    assert one["a"] is None and "1 isoFLOP level(s) with a minimum" in one["reason"] and "needs >= 2" in one["reason"]
    two_sizes = isoflop_exponent(isoflop_sweep(ISO_LEVELS, per=2), KEY, bootstrap=10)
    assert two_sizes["a"] is None and "0 isoFLOP level(s)" in two_sizes["reason"]
    assert [lv["note"] for lv in two_sizes["levels"]] == ["fewer than 3 sizes"] * 5


# --- approach 1: the minimum-loss envelope -----------------------------------------------------


def test_envelope_recovers_the_exponent(envelope):
    """N_opt(C) can only be one of the sweep's 8 sizes (1.9x apart), so the envelope is a staircase
    and its slope is coarse: over seeds it lands within ~5 % of a_true (0.431-0.475); 10 % is what
    the design justifies. Its bootstrap is wide (dropping a run drops a size), so it covers."""
    assert envelope["method"] == "min-loss envelope" and envelope["approach"] == 1
    assert envelope["a"] == pytest.approx(A_TRUE, rel=0.10)  # 0.4314 here
    lo, hi = envelope["ci"]
    assert lo <= A_TRUE <= hi and envelope["n_resamples"] > 150
    cs, ns = np.array(envelope["points"]).T
    assert len(cs) >= 20 and set(ns) <= set(CURVE_SIZES)
    assert ns[np.argmax(cs)] > ns[np.argmin(cs)] * 10  # the optimum grows over the range
    # Every envelope size is within one size step (1.93x) of the analytic N*(C).
    assert np.all(np.abs(np.log(ns / n_star(cs))) < np.log(1.93) * 1.01)
    assert envelope["censored"] > 0  # edge-of-range minima are left out, not fitted


def test_envelope_takes_each_sizes_best_run():
    """A size with several runs (different budgets): the lowest loss among them at each C. Extra,
    worse, shorter runs of every size must not change the envelope."""
    good = curve_sweep(CURVE_SIZES, CURVE_D)
    worse = [{**p, "run": "short-" + p["run"], KEY: p[KEY] * 1.02} for p in good if p["samples"] <= 1e8]
    base = envelope_exponent(good, KEY, bootstrap=0)
    both = envelope_exponent(good + worse, KEY, bootstrap=0)
    assert both["a"] == base["a"] and both["points"] == base["points"]
    # And a better duplicate of one size does move it: that size wins where it covers.
    better = [{**p, "run": "tuned", KEY: p[KEY] * 0.9} for p in good if p["run"] == "n3"]
    moved = envelope_exponent(good + better, KEY, bootstrap=0)
    assert moved["points"] != base["points"]
    assert sum(n == CURVE_SIZES[3] for _, n in moved["points"]) > sum(n == CURVE_SIZES[3] for _, n in base["points"])


def test_envelope_reasons_for_degenerate_sweeps():
    one = envelope_exponent(curve_sweep([1e6], CURVE_D), KEY, bootstrap=10)
    assert one["a"] is None and "1 model size(s)" in one["reason"]
    # Three sizes whose compute ranges never overlap: no C where the best size lies between two others.
    apart = curve_sweep([1e5, 1e7, 1e9], np.geomspace(1e6, 1e7, 10))
    res = envelope_exponent(apart, KEY, bootstrap=10)
    assert res["a"] is None and "no slope to fit" in res["reason"] and "overlapping compute ranges" in res["reason"]


# --- approach 3: the parametric law, to convergence --------------------------------------------


def test_huber_recovers_the_law(huber):
    law_ = huber["law"]
    assert law_["alpha"] == pytest.approx(TRUE["alpha"], rel=0.03)  # 0.3426
    assert law_["beta"] == pytest.approx(TRUE["beta"], rel=0.03)  # 0.2829
    assert huber["a"] == pytest.approx(A_TRUE, rel=0.02)  # 0.4523
    lo, hi = huber["ci"]
    assert lo <= A_TRUE <= hi and hi - lo < 0.1
    # alpha's interval covers; beta's (0.2807-0.2851, from 12 runs) just misses 0.28 on this seed, as a
    # 95 % percentile interval over 12 runs may: its estimate is 1 % off.
    assert huber["law_ci"]["alpha"][0] <= TRUE["alpha"] <= huber["law_ci"]["alpha"][1]
    assert huber["law_ci"]["beta"][1] - huber["law_ci"]["beta"][0] < 0.02
    assert huber["n_resamples"] == 200 and huber["starts"] >= 128 and huber["at_bounds"] == []
    # The resamples' search (profile scan + L-BFGS-B) reaches the optimum of the full 128-start grid.
    assert abs(huber["scan_gap"]) < 1e-9 * huber["objective"]
    assert 1e-4 < huber["objective"] < 0.1  # mean |log residual|-sized: the scaled objective, ~noise


def test_huber_reaches_a_large_E_and_gives_honest_intervals():
    """E = 100: the reducible terms are 8-36 % of the loss (median 18 %), so the objective is flat
    in alpha and A. fit.py's fit_law used to start each bootstrap resample at the full fit with
    default tolerances and stop close to it: its interval for a, [0.4540, 0.4571], was 18x narrower
    than this one, [0.4386, 0.4947], and missed a_true = 0.4516 (over 6 noise seeds with 100
    resamples: fit_law covered 0/6, this 6/6). It now runs this search on every resample (the same
    resamples, from the same seed), so it gives this interval."""
    from scaling.fit import compute_optimal, fit_law

    t = dict(TRUE, E=100.0)
    pts = curve_sweep(FIT_SIZES, FIT_D, noise=0.001, t=t)
    res = huber_exponent(pts, KEY, bootstrap=200)
    a_true = t["beta"] / (t["alpha"] + t["beta"])
    assert res["law"]["E"] == pytest.approx(100.0, rel=0.01)
    assert res["law"]["alpha"] == pytest.approx(t["alpha"], rel=0.03)  # 0.3369
    assert res["law"]["beta"] == pytest.approx(t["beta"], rel=0.03)  # 0.2820
    assert res["a"] == pytest.approx(a_true, rel=0.03)  # 0.4557
    lo, hi = res["ci"]
    assert lo <= a_true <= hi
    assert abs(res["scan_gap"]) < 1e-9 * res["objective"]

    old = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p[KEY] for p in pts],
                  [p["run"] for p in pts], bootstrap=200)
    old_lo, old_hi = compute_optimal(old, K, [1e18])["a_ci"]
    old_a = old.beta / (old.alpha + old.beta)
    assert old_a == pytest.approx(res["a"], abs=1e-3)  # same point estimate ...
    assert (old_lo, old_hi) == pytest.approx((lo, hi), rel=1e-6)  # ... and the same interval: the same search
    # This fit is at least as good as fit_law's end point on the objective both minimise.
    from scaling.search import _scaled_objective

    logs = [np.log([p[k] for p in pts]) for k in ("n_params_nonembed", "samples", KEY)]
    x_old = np.array([np.log(old.A), np.log(old.B), np.log(old.E), old.alpha, old.beta])
    assert res["objective"] <= _scaled_objective(x_old, *logs, 1e-3)[0] * (1 + 1e-9)


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_huber_default_1000_resamples_on_a_small_sweep():
    pts = curve_sweep(np.geomspace(1e5, 1e7, 6), np.geomspace(1e5, 1e8, 6))  # 6 runs, 36 points
    res = huber_exponent(pts, KEY)
    assert res["n_resamples"] == 1000
    lo, hi = res["ci"]
    assert lo <= A_TRUE <= hi and res["a"] == pytest.approx(A_TRUE, rel=0.03)
    assert set(res["law_ci"]) == {"E", "A", "B", "alpha", "beta"}


def test_huber_reasons_for_degenerate_sweeps():
    one = huber_exponent(curve_sweep([1e6], FIT_D), KEY, bootstrap=10)
    assert one["a"] is None and "only one model size" in one["reason"]
    flat = [p for p in curve_sweep(FIT_SIZES, FIT_D) if p["samples"] == FIT_D[0]]
    res = huber_exponent(flat, KEY, bootstrap=10)
    assert res["a"] is None and "same number of samples" in res["reason"]


# --- side by side ------------------------------------------------------------------------------


def test_cross_check_agrees_on_one_law(envelope, iso, huber):
    cross = cross_check([envelope, iso, huber])
    assert cross["agree"] is True and cross["disagreement"] is None and cross["skipped"] == []
    a = [envelope["a"], iso["a"], huber["a"]]
    assert cross["spread"] == pytest.approx(max(a) - min(a))
    assert [r["approach"] for r in cross["approaches"]] == [1, 2, 3]
    md = approaches_markdown(cross)
    assert md[0] == "## Three approaches to N*(C)"
    table = [line for line in md if line.startswith(("| 1.", "| 2.", "| 3."))]
    assert len(table) == 3
    assert f"{iso['a']:.3f} [{iso['ci'][0]:.3f}, {iso['ci'][1]:.3f}]" in table[1] and "| 200 |" in table[2]
    assert "5 of 5 levels with a minimum" in table[1] and "alpha = 0.343" in table[2]
    assert md[-1].startswith("The 3 approaches agree")


def test_cross_check_names_the_approaches_that_disagree():
    results = [{"approach": 1, "method": "min-loss envelope", "a": 0.50, "ci": (0.40, 0.60), "n_resamples": 100,
                "points": [(1e15, 1e6)] * 5, "censored": 2},
               {"approach": 2, "method": "isoFLOP parabolas", "a": 0.45, "ci": (0.43, 0.47), "n_resamples": 100,
                "levels": []},
               {"approach": 3, "method": "Huber fit (approach 3)", "a": 0.55, "ci": (0.52, 0.58), "n_resamples": 100,
                "law": {"alpha": 0.3, "beta": 0.37, "E": 1.0}, "starts": 129}]
    cross = cross_check(results)
    assert cross["agree"] is False and cross["spread"] == pytest.approx(0.10)
    msg = cross["disagreement"]
    assert "approach 2 (isoFLOP parabolas)" in msg and "[0.430, 0.470]" in msg
    assert "approach 3 (Huber fit (approach 3))" in msg and "[0.520, 0.580]" in msg
    assert "approach 1" not in msg  # its interval overlaps both
    assert "disagree" in approaches_markdown(cross)[-1]
    flipped = cross_check(results[::-1])  # the higher interval first: still no overlap
    assert flipped["agree"] is False and "[0.430, 0.470]" in flipped["disagreement"]


def test_cross_check_skips_approaches_without_an_exponent(iso):
    none = envelope_exponent(curve_sweep([1e6], CURVE_D), KEY, bootstrap=0)
    cross = cross_check([none, iso])
    assert cross["agree"] is None and cross["spread"] == 0.0
    assert cross["skipped"][0]["approach"] == 1 and "model size" in cross["skipped"][0]["reason"]
    assert "nothing to cross-check" in cross["line"] and "Approach 1 (min-loss envelope) skipped" in cross["line"]
    md = approaches_markdown(cross)
    assert any(line.startswith("| 1. min-loss envelope | n/a |") for line in md)
