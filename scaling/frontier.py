"""Compute-optimal frontiers from a fitted law L(N, D) = E + A/N^alpha + B/D^beta, with each
size's own costs instead of C = k N D with one k.

  - training: at a budget C, minimise L(N, C / f(N)) over N, f(N) = training FLOPs per sample of
    a model of N non-embedding parameters (ENAT's is not proportional to N: the decoder, the
    reuse-mode extra forward and the head weigh differently at each width);
  - inference-aware (Sardana & Frankle 2023): to reach a loss l and then generate M images, minimise
    f(N) D(N, l) + M s(N) over N, s(N) = sampling FLOPs per image (steps, CFG, with or without
    reuse). D(N, l) is the data that makes L(N, D) = l. The larger M, the smaller the model that
    is worth training longer: N*_inference / N*_train < 1, and reuse (a cheaper s) moves it less.

f and s are known at the sweep's sizes; between and beyond them they are interpolated linearly in
log-log (a power law through the end sizes outside).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from scaling.collect import ScalingError


def loglog_curve(ns, values):
    """N -> value through the points (ns, values), linear in log-log, extended by the end slopes."""
    order = np.argsort(ns)
    x, y = np.log(np.asarray(ns, float)[order]), np.log(np.asarray(values, float)[order])
    x, idx = np.unique(x, return_index=True)
    y = y[idx]
    if len(x) == 1:
        return lambda n: np.full_like(np.asarray(n, float), np.exp(y[0])) * np.asarray(n, float) / np.exp(x[0])

    lo, hi = (y[1] - y[0]) / (x[1] - x[0]), (y[-1] - y[-2]) / (x[-1] - x[-2])

    def curve(n):
        t = np.log(np.asarray(n, float))
        out = np.interp(t, x, y)
        out = np.where(t < x[0], y[0] + lo * (t - x[0]), out)
        return np.exp(np.where(t > x[-1], y[-1] + hi * (t - x[-1]), out))
    return curve


def _argmin_log(fn, lo: float, hi: float) -> float:
    """The N in [lo, hi] minimising fn(N): a dense log grid, then Brent around the best cell."""
    grid = np.geomspace(lo, hi, 400)
    vals = fn(grid)
    i = int(np.nanargmin(vals))
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    if a == b:
        return float(grid[i])
    res = minimize_scalar(lambda t: float(fn(np.exp(t))), bounds=(a, b), method="bounded",
                          options={"xatol": 1e-10})
    return float(np.exp(res.x))


def train_frontier(law, train_flops, C, n_range) -> dict:
    """N*, D*, L* at each training budget C (FLOPs), D = C / f(N)."""
    out = {"C": [], "N": [], "D": [], "L": []}
    for c in np.atleast_1d(np.asarray(C, float)):
        n = _argmin_log(lambda N: law.predict(N, c / train_flops(N)), *n_range)
        d = c / float(train_flops(n))
        out["C"].append(float(c))
        out["N"].append(n)
        out["D"].append(d)
        out["L"].append(float(law.predict(n, d)))
    return out


def data_for_loss(law, N, loss):
    """D with L(N, D) = loss; inf where even infinite data cannot reach it at this N."""
    gap = loss - law.E - law.A / np.asarray(N, float) ** law.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (law.B / gap) ** (1 / law.beta), np.inf)


def inference_frontier(law, train_flops, sample_flops, loss: float, images, n_range) -> list[dict]:
    """For each number of generated images M: the N minimising training + inference FLOPs to reach
    `loss`, its data, both costs, and N* relative to M = 0."""
    rows = []
    for m in images:
        def total(N, m=m):
            return train_flops(N) * data_for_loss(law, N, loss) + m * sample_flops(N)
        n = _argmin_log(total, *n_range)
        d = float(data_for_loss(law, n, loss))
        if not np.isfinite(d):
            raise ScalingError(f"loss {loss:.4g} is not reachable by the fitted law in N {n_range}")
        rows.append({"images": float(m), "N": n, "D": d, "train_flops": float(train_flops(n)) * d,
                     "inference_flops": float(m * sample_flops(n)), "total_flops": float(total(n))})
    base = rows[0]["N"] if rows and rows[0]["images"] == 0 else None
    for r in rows:
        r["N_over_train_optimal"] = r["N"] / base if base else None
    return rows


def inference_condition(law, train_flops, sample_flops, N, loss, images, h: float = 1e-6) -> float:
    """d/dN [f(N) D(N, l) + M s(N)] relative to f D / N: zero at the inference-aware optimum (the
    first-order condition the tests check the numeric optimum against)."""
    def total(n):
        return train_flops(n) * data_for_loss(law, n, loss) + images * sample_flops(n)
    up, down = total(N * (1 + h)), total(N * (1 - h))
    return float((up - down) / (2 * h) / (train_flops(N) * data_for_loss(law, N, loss)))


IMAGES = (0, 1e4, 1e6, 1e8)


def sweep_frontiers(law, runs: list[dict], c_max: float, images=IMAGES) -> dict:
    """Both frontiers for a sweep's runs (scaling.collect summaries: N, training FLOPs per sample,
    sampling FLOPs per image with and without reuse): the training frontier at c_max, 10x and 100x,
    with D as images, tokens and [MASK] tokens; the inference-aware N* for each M at the loss the
    compute-optimal model reaches with c_max, with and without reuse."""
    by_n = {}
    for r in runs:
        by_n.setdefault(r["n_params_nonembed"], r)
    ns = sorted(by_n)
    n_range = (ns[0] / 1e3, ns[-1] * 1e3)
    f = loglog_curve(ns, [by_n[n]["flops_per_sample"] for n in ns])
    ref = by_n[ns[-1]]
    seq_len, mask_fraction = ref["seq_len"], ref["mask_fraction"]
    tf = train_frontier(law, f, [c_max, 10 * c_max, 100 * c_max], n_range)
    rows = []
    for c, n, d, loss in zip(tf["C"], tf["N"], tf["D"], tf["L"]):
        tokens = d * seq_len
        rows.append({"C": c, "N": n, "images": d, "tokens": tokens, "masked_tokens": tokens * mask_fraction,
                     "tokens_per_param": tokens / n, "C_over_6NT": c / (6 * n * tokens), "L": loss,
                     "at_range_edge": not (n_range[0] * 1.01 < n < n_range[1] / 1.01)})
    target = tf["L"][0]
    inference = {"loss": target, "images": list(images), "variants": {}}
    for name, key in (("reuse", "sample_flops_reuse"), ("no reuse", "sample_flops_plain")):
        if any(by_n[n].get(key) is None for n in ns):
            continue
        s = loglog_curve(ns, [by_n[n][key] for n in ns])
        inference["variants"][name] = {
            "rows": inference_frontier(law, f, s, target, images, n_range),
            "image_cost_in_samples": float(s(ns[-1]) / f(ns[-1]))}  # at the largest size
    return {"train": rows, "inference": inference, "n_range": n_range,
            "cost_model": "each size's own training FLOPs per sample and sampling FLOPs per image "
                          "(enat.flops), log-log interpolated between the sweep's sizes"}


def frontier_markdown(fr: dict, sample_steps: int | None = None) -> list[str]:
    lines = ["## Exact-compute frontier", "",
             "N* at a budget C minimises L(N, C / f(N)) with f(N) each size's own training FLOPs per sample "
             "(not C = k N D). D as images, tokens and [MASK] tokens (the positions the loss is on); "
             "C / (6 N T) compares with the 6 N FLOPs per token of a dense transformer.", "",
             "| C (FLOPs) | N* | D* (images) | tokens | [MASK] tokens | tokens / N* | C / (6 N* T) | L* |",
             "|---|---|---|---|---|---|---|---|"]
    for r in fr["train"]:
        edge = " (range edge)" if r["at_range_edge"] else ""
        lines.append(f"| {r['C']:.3g} | {r['N']:.3g}{edge} | {r['images']:.3g} | {r['tokens']:.3g} | "
                     f"{r['masked_tokens']:.3g} | {r['tokens_per_param']:.3g} | {r['C_over_6NT']:.3g} | {r['L']:.4f} |")
    inf = fr["inference"]
    lines += ["", "## Inference-aware frontier", "",
              f"The model that reaches L = {inf['loss']:.4f} (the compute-optimal loss at the sweep's largest budget) "
              f"at the least training + M x sampling FLOPs (Sardana & Frankle 2023)"
              + (f", sampling {sample_steps} steps with the runs' CFG" if sample_steps else "") + ".", ""]
    for name, v in inf["variants"].items():
        lines.append(f"- {name}: one generated image costs {v['image_cost_in_samples']:.2f} training samples "
                     f"at the largest size.")
    lines += ["", "| images M | sampling | N* | N* / N*(M=0) | D* (images) | training FLOPs | sampling FLOPs | total |",
              "|---|---|---|---|---|---|---|---|"]
    for name, v in inf["variants"].items():
        for r in v["rows"]:
            lines.append(f"| {r['images']:.0e} | {name} | {r['N']:.3g} | {r['N_over_train_optimal']:.3f} | "
                         f"{r['D']:.3g} | {r['train_flops']:.3g} | {r['inference_flops']:.3g} | {r['total_flops']:.3g} |")
    return lines
