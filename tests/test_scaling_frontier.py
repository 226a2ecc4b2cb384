"""Frontiers with each size's own costs: the training frontier against the closed form where
C = k N D holds, and the inference-aware frontier against its first-order condition."""

import numpy as np
import pytest

from scaling.fit import LawFit, _optimal
from scaling.frontier import (data_for_loss, inference_condition, inference_frontier, loglog_curve,
                              train_frontier)

LAW = LawFit(E=1.7, A=400.0, B=4000.0, alpha=0.34, beta=0.28)
N_RANGE = (1e4, 1e12)


def test_loglog_curve_interpolates_and_extends_power_laws():
    f = loglog_curve([1e6, 1e7, 1e8], [6e6, 6e7, 1.2e9])
    assert f(1e6) == pytest.approx(6e6) and f(1e7) == pytest.approx(6e7)
    assert f(np.sqrt(1e6 * 1e7)) == pytest.approx(np.sqrt(6e6 * 6e7))  # linear in log-log
    assert f(1e5) == pytest.approx(6e5)  # the end slope (1) below the sizes
    assert f(1e9) == pytest.approx(1.2e9 * 20)  # the end slope (log 20 per decade) above them


def test_train_frontier_is_the_closed_form_when_flops_are_k_n():
    k = 6.0
    C = [1e15, 1e17, 1e19]
    out = train_frontier(LAW, lambda n: k * np.asarray(n, float), C, N_RANGE)
    n, d, loss, _, _ = _optimal(LAW.E, LAW.A, LAW.B, LAW.alpha, LAW.beta, np.array(C), k)
    assert out["N"] == pytest.approx(list(n), rel=1e-6)
    assert out["D"] == pytest.approx(list(d), rel=1e-6)
    assert out["L"] == pytest.approx(list(loss), rel=1e-9)


def test_train_frontier_follows_the_real_cost_curve():
    """With f(N) growing faster than N at large N, N* at a budget is smaller than C = k N D says."""
    f_lin = loglog_curve([1e6, 1e8], [6e6, 6e8])
    f_steep = loglog_curve([1e6, 1e8], [6e6, 6e8 * 4])
    lin, steep = (train_frontier(LAW, f, [1e19], N_RANGE)["N"][0] for f in (f_lin, f_steep))
    assert steep < lin


@pytest.mark.parametrize("kappa", [6.0, 40.0])
def test_inference_frontier_meets_its_first_order_condition(kappa):
    f = lambda n: 6.0 * np.asarray(n, float)  # noqa: E731
    s = lambda n: kappa * np.asarray(n, float)  # noqa: E731
    # the loss the compute-optimal model reaches at 1e19 FLOPs
    loss = train_frontier(LAW, f, [1e19], N_RANGE)["L"][0]
    rows = inference_frontier(LAW, f, s, loss, [0, 1e8, 1e10, 1e12], N_RANGE)
    assert rows[0]["N"] == pytest.approx(train_frontier(LAW, f, [1e19], N_RANGE)["N"][0], rel=1e-4)
    for r in rows:
        assert abs(inference_condition(LAW, f, s, r["N"], loss, r["images"])) < 1e-4
        assert LAW.predict(r["N"], r["D"]) == pytest.approx(loss, rel=1e-9)
    ratios = [r["N_over_train_optimal"] for r in rows]
    assert ratios[0] == 1 and all(a > b for a, b in zip(ratios, ratios[1:]))  # more images: a smaller model
    # M = 0: alpha A N^-alpha = beta (l - E - A N^-alpha), the Chinchilla optimum at that loss
    n0 = rows[0]["N"]
    gap = loss - LAW.E - LAW.A * n0 ** -LAW.alpha
    assert LAW.alpha * LAW.A * n0 ** -LAW.alpha == pytest.approx(LAW.beta * gap, rel=1e-4)


def test_cheaper_sampling_moves_n_star_less():
    f = lambda n: 6.0 * np.asarray(n, float)  # noqa: E731
    loss = train_frontier(LAW, f, [1e19], N_RANGE)["L"][0]
    reuse, plain = (inference_frontier(LAW, f, lambda n, c=c: c * np.asarray(n, float), loss, [0, 1e10], N_RANGE)
                    for c in (25.0, 44.0))  # ENAT-L: 4.2 vs 7.4 training samples per image
    assert 1 > reuse[1]["N_over_train_optimal"] > plain[1]["N_over_train_optimal"]


def test_unreachable_loss_is_infinite_data():
    assert np.isinf(data_for_loss(LAW, 1e6, LAW.E))
