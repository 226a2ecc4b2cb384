"""Two model families under one study design, compared as laws (the paper's efficiency claim,
ENAT against the NAT, stated with intervals):

  - the laws side by side: L(N, D) = E + A/N^alpha + B/D^beta per family, with the exponent of
    N*(C) ~ C^a;
  - the compute-optimal loss at equal training FLOPs, L*(C) = min_N L(N, C / f(N)) with each
    family's own training FLOPs per sample f, over the range both families studied and at the
    training budgets of ENAT-B and ENAT-L (an extrapolation by orders of magnitude: stated for the
    width of its interval, not as a prediction for ImageNet);
  - the inference-aware frontier per family (scaling/frontier.py): the least training + M x
    sampling FLOPs that reach a target loss, with each family's sampling FLOPs per image (ENAT
    with reuse), and the crossover M: the number of generated images from which ENAT is the
    cheaper way to that loss (0 when it is cheaper already for training).

Intervals: each family's law is bootstrapped over its runs (scaling/fit.py); draw i of one family is
paired with draw i of the other (independent resamples), and every derived number is computed per
pair, so its 2.5-97.5 percentiles are its 95 % interval.

    python -m scaling.compare --family enat=runs/studies/fashion/enat/fit \\
        --family nat=runs/studies/fashion/nat/fit --out runs/studies/fashion/comparison [--wandb]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from enat.config import load_config
from enat.flops import expected_train_flops
from enat.sweeps import global_batch
from scaling.collect import ScalingError
from scaling.fit import LawFit, fit_law
from scaling.frontier import _argmin_log, data_for_loss, loglog_curve
from scaling.points import fitting_points, loss_column

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
PAPER_BUDGETS = {"ENAT-B": CONFIGS / "imagenet256_B.yaml", "ENAT-L": CONFIGS / "imagenet256_L.yaml"}
IMAGES = (0.0, 1e2, 1e4, 1e6, 1e8, 1e10)
M_RANGE = (1e-2, 1e16)  # where a crossover is looked for (generated images)


def paper_budgets() -> dict:
    """Training FLOPs of the paper's ImageNet-256 recipes: steps x global batch x FLOPs per sample."""
    out = {}
    for name, path in PAPER_BUDGETS.items():
        cfg = load_config(path)
        out[name] = float(cfg.train.steps * global_batch(cfg)
                          * expected_train_flops(cfg.model, tuple(cfg.train.mask_beta), cfg.train.reuse_prob))
    return out


def _law(row) -> LawFit:
    E, A, B, alpha, beta = row
    return LawFit(E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta))


def family_costs(runs: list[dict]) -> dict:
    """A family's cost curves from its runs: training FLOPs per sample f(N) and sampling FLOPs per
    image s(N) (with reuse where the family has it), log-log through its sizes."""
    by_n = {}
    for r in runs:
        by_n.setdefault(r["n_params_nonembed"], r)
    ns = sorted(by_n)
    reuse = all(by_n[n].get("sample_flops_reuse") is not None for n in ns)
    key = "sample_flops_reuse" if reuse else "sample_flops_plain"
    return {"f": loglog_curve(ns, [by_n[n]["flops_per_sample"] for n in ns]),
            "s": loglog_curve(ns, [by_n[n][key] for n in ns]), "sampling": "reuse" if reuse else "no reuse",
            "n_range": (ns[0] / 1e3, ns[-1] * 1e3), "sizes": ns,
            "compute": (min(r["compute"] for r in runs), max(r["compute"] for r in runs)),
            "sample_steps": by_n[ns[-1]].get("sample_steps")}


def optimal_loss(law: LawFit, f, C: float, n_range) -> tuple[float, float]:
    """(L*, N*) at training budget C: min over N of L(N, C / f(N))."""
    n = _argmin_log(lambda N: law.predict(N, C / f(N)), *n_range)
    return float(law.predict(n, C / f(n))), n


def cost_to_loss(law: LawFit, costs: dict, loss: float, images: float) -> tuple[float, float]:
    """(least training + images x sampling FLOPs that reach `loss`, the N that does it); inf when
    the law cannot reach the loss at any N."""
    f, s = costs["f"], costs["s"]

    def total(N):
        return f(N) * data_for_loss(law, N, loss) + images * s(N)
    if not np.isfinite(data_for_loss(law, costs["n_range"][1], loss)):
        return float("inf"), float("nan")
    n = _argmin_log(total, *costs["n_range"])
    return float(total(n)), n


def crossover(law_a: LawFit, costs_a: dict, law_b: LawFit, costs_b: dict, loss: float) -> float:
    """The smallest M from which family a reaches `loss` at no more training + M x sampling FLOPs
    than family b: 0 when a is cheaper already at M = 0, inf when it is not within M_RANGE (or
    never: b's sampling is not dearer), NaN when either cannot reach the loss."""
    def gap(m):
        return cost_to_loss(law_a, costs_a, loss, m)[0] - cost_to_loss(law_b, costs_b, loss, m)[0]
    g0 = gap(0.0)
    if not np.isfinite(g0):
        return float("nan")
    if g0 <= 0:
        return 0.0
    lo, hi = np.log(M_RANGE[0]), np.log(M_RANGE[1])
    if gap(np.exp(hi)) > 0:
        return float("inf")
    if gap(np.exp(lo)) <= 0:
        return float(np.exp(lo))
    for _ in range(36):  # bisection in log M (to 1e-9 of its 41 nats): the gap is monotone (a's sampling is the cheaper)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(np.exp(mid)) > 0 else (lo, mid)
    return float(np.exp(hi))


def _pct(values) -> list[float] | None:
    v = np.asarray([x for x in values if not np.isnan(x)], float)
    if not len(v):
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def compare(families: dict, budgets: dict | None = None, images=IMAGES, order: tuple[str, str] | None = None) -> dict:
    """families: name -> {"fit": LawFit with _draws, "runs": collect's run summaries}; the first
    family (or order[0]) is the one whose sampling is the cheaper (ENAT), the second the
    baseline. budgets: name -> training FLOPs to extrapolate to (default the paper's)."""
    if len(families) != 2:
        raise ScalingError(f"a comparison takes two families, got {len(families)}: {', '.join(families)}")
    a, b = order or tuple(families)
    costs = {n: family_costs(v["runs"]) for n, v in families.items()}
    laws = {n: v["fit"] for n, v in families.items()}
    draws = {n: getattr(v["fit"], "_draws", np.empty((0, 5))) for n, v in families.items()}
    pairs = min(len(draws[a]), len(draws[b]))
    n_range = (min(costs[a]["n_range"][0], costs[b]["n_range"][0]), max(costs[a]["n_range"][1], costs[b]["n_range"][1]))

    # Equal training compute: the range both families studied, then the paper's budgets.
    lo, hi = max(costs[a]["compute"][0], costs[b]["compute"][0]), min(costs[a]["compute"][1], costs[b]["compute"][1])
    if lo >= hi:
        lo, hi = min(costs[a]["compute"][1], costs[b]["compute"][1]), max(costs[a]["compute"][0], costs[b]["compute"][0])
    grid = [(f"{c:.3g}", float(c), True) for c in np.geomspace(lo, hi, 4)]
    grid += [(name, c, False) for name, c in (budgets if budgets is not None else paper_budgets()).items()]
    equal = []
    for label, c, studied in grid:
        row = {"label": label, "C": c, "studied_range": studied}
        for n in (a, b):
            row[n], row[f"N_{n}"] = optimal_loss(laws[n], costs[n]["f"], c, n_range)
            row[f"{n}_ci"] = _pct([optimal_loss(_law(d), costs[n]["f"], c, n_range)[0] for d in draws[n]])
        row["difference"] = row[a] - row[b]
        row["difference_ci"] = _pct([optimal_loss(_law(da), costs[a]["f"], c, n_range)[0]
                                     - optimal_loss(_law(db), costs[b]["f"], c, n_range)[0]
                                     for da, db in zip(draws[a][:pairs], draws[b][:pairs])])
        row["lower"] = a if row["difference"] < 0 else b
        equal.append(row)

    # Inference-aware: the loss both reach at the top of the common range, then M images.
    target = max(optimal_loss(laws[n], costs[n]["f"], hi, n_range)[0] for n in (a, b))
    frontier = {"loss": target, "images": list(images), "families": {}}
    for n in (a, b):
        rows = []
        for m in images:
            total, nn = cost_to_loss(laws[n], costs[n], target, m)
            rows.append({"images": float(m), "total_flops": total, "N": nn})
        frontier["families"][n] = {"sampling": costs[n]["sampling"], "sample_steps": costs[n]["sample_steps"],
                                   "rows": rows}
    m_star = crossover(laws[a], costs[a], laws[b], costs[b], target)
    per_draw = [crossover(_law(da), costs[a], _law(db), costs[b], target)
                for da, db in zip(draws[a][:pairs], draws[b][:pairs])]
    finite = [m for m in per_draw if not np.isnan(m)]
    cross = {"family": a, "baseline": b, "loss": target, "M": m_star,
             "ci": [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite else None,
             "draws": len(per_draw), "unreachable_draws": len(per_draw) - len(finite),
             "cheaper_for_training_draws": sum(m == 0 for m in finite),
             "never_within_range_draws": sum(np.isinf(m) for m in finite), "M_range": list(M_RANGE)}
    laws_out = {}
    for n in (a, b):
        f = laws[n]
        d = draws[n]
        expo = d[:, 4] / (d[:, 3] + d[:, 4]) if len(d) else np.empty(0)
        laws_out[n] = {**{k: getattr(f, k) for k in ("E", "A", "B", "alpha", "beta")}, "ci": f.ci,
                       "a": f.beta / (f.alpha + f.beta), "a_ci": _pct(expo), "runs": f.n_runs, "points": f.n_points,
                       "sizes": f.n_sizes, "bootstrap": len(d), "sampling": costs[n]["sampling"],
                       "compute_range": list(costs[n]["compute"])}
    return {"families": [a, b], "laws": laws_out, "equal_compute": equal, "frontier": frontier, "crossover": cross,
            "pairs": pairs}


# ---------------------------------------------------------------------------------------------
# Identification: how well each family's runs pin its law down, and what would pin it down
# ---------------------------------------------------------------------------------------------

WIDTH_GOAL = 0.3  # 95 % interval of each exponent no wider than this
SPREAD_GOAL = 0.15  # the three approaches' N* exponents within this of each other


def _width(ci) -> float | None:
    return float(ci[1] - ci[0]) if ci else None


def runs_for_width(n_now: int, width_now: float, n_before: int | None = None, width_before: float | None = None,
                   goal: float = WIDTH_GOAL) -> dict:
    """The runs an interval `goal` wide would take, extrapolating the width as n^-p: p from two
    measured (runs, width) pairs when the width shrank between them, else the 1/sqrt(n) of a
    bootstrap over independent runs (p = 0.5, said so)."""
    p, source = 0.5, "assumed: width ~ runs^-0.5"
    if n_before and width_before and n_before < n_now and width_before > width_now > 0:
        p_meas = float(np.log(width_before / width_now) / np.log(n_now / n_before))
        if p_meas >= 0.1:
            p, source = p_meas, f"measured between {n_before} and {n_now} runs: width ~ runs^-{p_meas:.2f}"
    need = n_now if width_now <= goal else int(np.ceil(n_now * (width_now / goal) ** (1 / p)))
    return {"runs": need, "exponent": p, "source": source}


def identification(report: dict, round1: dict | None = None) -> dict:
    """From a family's report (fit.json) and, when there, its first round's: the exponents'
    interval widths, the three approaches' spread, E with and without the smallest size, and the
    runs that the goals (WIDTH_GOAL, SPREAD_GOAL) would take."""
    law = report["law"]
    runs = law.get("n_runs") or report.get("runs")
    r1 = (round1 or {}).get("law") or {}
    out = {"runs": runs, "round1_runs": r1.get("n_runs"), "widths": {}, "needed": {}}
    for k in ("alpha", "beta"):
        w = _width(law.get("ci", {}).get(k))
        w1 = _width(r1.get("ci", {}).get(k)) if r1 else None
        out["widths"][k] = {"now": w, "round1": w1}
        if w is not None:
            out["needed"][k] = runs_for_width(runs, w, r1.get("n_runs"), w1)
    appr = report.get("approaches") or {}
    out["approaches"] = [{"method": a["method"], "a": a["a"], "ci": a.get("ci")} for a in appr.get("approaches", [])]
    out["spread"] = appr.get("spread")
    dropped = next((r for r in report.get("sensitivity", []) if r.get("changed") == "sizes"), None)
    out["E"] = {"all": law["E"], "ci": law.get("ci", {}).get("E"),
                "without_smallest": dropped.get("E") if dropped else None,
                "a_without_smallest": dropped.get("a") if dropped else None}
    met = all(v["now"] is not None and v["now"] <= WIDTH_GOAL for v in out["widths"].values())
    out["goals_met"] = {"widths": met, "spread": out["spread"] is not None and out["spread"] <= SPREAD_GOAL}
    return out


def identification_markdown(ident: dict) -> list[str]:
    lines = ["## Identification", "",
             f"Goals: each exponent's 95 % interval no wider than {WIDTH_GOAL}, the three approaches' N* exponents "
             f"within {SPREAD_GOAL} of each other. Runs needed: the width extrapolated as runs^-p.", "",
             "| family | runs (round 1) | alpha width (round 1) | beta width (round 1) | runs for width "
             f"{WIDTH_GOAL} | approaches' a | spread | E | E without the smallest size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam, v in ident.items():
        def w(k):
            x = v["widths"][k]
            return (f"{x['now']:.3f}" if x["now"] is not None else "-") + (
                f" ({x['round1']:.3f})" if x["round1"] is not None else "")
        need = max((n["runs"] for n in v["needed"].values()), default=None)
        src = "; ".join(f"{k}: {n['source']}" for k, n in v["needed"].items())
        appr = ", ".join(f"{a['method'].split(' ')[0]} {a['a']:.2f}" for a in v["approaches"]) or "-"
        spread = f"{v['spread']:.3f}" if v["spread"] is not None else "-"
        e = v["E"]
        e_drop = f"{e['without_smallest']:.3g}" if e["without_smallest"] is not None else "-"
        lines.append(f"| {fam} | {v['runs']} ({v['round1_runs'] or '-'}) | {w('alpha')} | {w('beta')} | "
                     f"{need if need is not None else '-'} ({src}) | {appr} | {spread} | {e['all']:.3g} "
                     f"{_iv(e['ci'])} | {e_drop} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Report: markdown, plots, wandb
# ---------------------------------------------------------------------------------------------


def _iv(v, fmt="{:.3g}") -> str:
    return f"[{fmt.format(v[0])}, {fmt.format(v[1])}]" if v else "[-]"


def _m(m: float) -> str:
    if np.isnan(m):
        return "unreachable"
    if np.isinf(m):
        return f"> {M_RANGE[1]:.0e}"
    return "0" if m == 0 else f"{m:.3g}"


def markdown(res: dict, title: str) -> list[str]:
    a, b = res["families"]
    laws = res["laws"]
    lines = [f"# {title}: {a} against {b}", "",
             "## The laws", "", "L(N, D) = E + A / N^alpha + B / D^beta per family (95 % bootstrap intervals over runs); "
             "a is the exponent of N*(C) ~ C^a.", "",
             "| family | runs | sizes | E | alpha | beta | a | sampling |", "|---|---|---|---|---|---|---|---|"]
    for n in (a, b):
        w = laws[n]
        ci = w["ci"] or {}
        lines.append(f"| {n} | {w['runs']} | {w['sizes']} | {w['E']:.3g} {_iv(ci.get('E'))} | "
                     f"{w['alpha']:.3g} {_iv(ci.get('alpha'))} | {w['beta']:.3g} {_iv(ci.get('beta'))} | "
                     f"{w['a']:.3g} {_iv(w['a_ci'])} | {w['sampling']} |")
    lines += ["", "## Equal training compute", "",
              f"The compute-optimal loss L*(C) of each family at the same training FLOPs. Rows marked * lie beyond "
              f"the studied range: the training budgets of the paper's ImageNet-256 recipes, an extrapolation by "
              f"orders of magnitude from 8x8-token models (read the interval, not the point).", "",
              f"| C (FLOPs) | L* {a} | L* {b} | {a} - {b} | lower |", "|---|---|---|---|---|"]
    for r in res["equal_compute"]:
        star = "" if r["studied_range"] else "*"
        lines.append(f"| {r['label']}{star} ({r['C']:.3g}) | {r[a]:.4f} {_iv(r[f'{a}_ci'], '{:.4f}')} | "
                     f"{r[b]:.4f} {_iv(r[f'{b}_ci'], '{:.4f}')} | {r['difference']:+.4f} "
                     f"{_iv(r['difference_ci'], '{:+.4f}')} | {r['lower']} |")
    fr, cr = res["frontier"], res["crossover"]
    lines += ["", "## Inference-aware frontier", "",
              f"The least training + M x sampling FLOPs that reach L = {fr['loss']:.4f} (the higher of the two "
              f"families' compute-optimal losses at the top of the common range), per family with its own sampling "
              f"FLOPs per image.", "",
              "| images M | " + " | ".join(f"{n} ({fr['families'][n]['sampling']}): FLOPs, N*" for n in (a, b)) + " |",
              "|---|---|---|"]
    for ra, rb in zip(fr["families"][a]["rows"], fr["families"][b]["rows"]):
        lines.append(f"| {ra['images']:.0e} | {ra['total_flops']:.3g}, {ra['N']:.3g} | {rb['total_flops']:.3g}, "
                     f"{rb['N']:.3g} |")
    lines += ["", f"**Crossover:** {a} is the cheaper way to L = {cr['loss']:.4f} from M = {_m(cr['M'])} generated images "
              f"(95 % interval {_iv(cr['ci']) if cr['ci'] else 'none'}; over {cr['draws']} paired resamples: "
              f"{cr['cheaper_for_training_draws']} have {a} cheaper already for training (M = 0), "
              f"{cr['never_within_range_draws']} no crossover below M = {M_RANGE[1]:.0e}, "
              f"{cr['unreachable_draws']} cannot reach the loss)."]
    return lines


def plot(res: dict, out: Path) -> list[Path]:
    a, b = res["families"]
    paths = []
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    studied = [r for r in res["equal_compute"] if r["studied_range"]]
    for n, colour in ((a, "C0"), (b, "C3")):
        cs = [r["C"] for r in studied]
        ax.plot(cs, [r[n] for r in studied], "o-", color=colour, label=n)
        if all(r[f"{n}_ci"] for r in studied):
            ax.fill_between(cs, [r[f"{n}_ci"][0] for r in studied], [r[f"{n}_ci"][1] for r in studied],
                            color=colour, alpha=0.2)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="compute-optimal loss L*(C)",
           title="Equal training compute")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "compare_loss.png")
    fig.savefig(paths[-1], dpi=120)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    fr = res["frontier"]
    for n, colour in ((a, "C0"), (b, "C3")):
        rows = [r for r in fr["families"][n]["rows"] if r["images"] > 0 and np.isfinite(r["total_flops"])]
        ax.plot([r["images"] for r in rows], [r["total_flops"] for r in rows], "o-", color=colour,
                label=f"{n} ({fr['families'][n]['sampling']})")
    m = res["crossover"]["M"]
    if np.isfinite(m) and m > 0:
        ax.axvline(m, color="grey", ls="--", lw=1, label=f"crossover M = {m:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="generated images M", ylabel="training + sampling FLOPs",
           title=f"Inference-aware frontier, L = {fr['loss']:.3f}")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "compare_frontier.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def publish(res: dict, fams: dict, plots: list[Path], out: Path, name: str, mode: str) -> str:
    """The comparison as one wandb run (job type scaling-comparison) carrying both families: their
    laws, points, the comparison's tables and plots."""
    import wandb  # here, not at the top: seconds of start-up, only for a comparison published with --wandb

    first = fams[res["families"][0]]["runs"][0]
    w = load_config(Path(first["run_dir"]) / "config.yaml").train.wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    rid = f"scaling-comparison-{name}"
    run = wandb.init(project=w.project, entity=w.entity, group=name, job_type="scaling-comparison", id=rid,
                     resume="allow", name=f"{name}: {' vs '.join(res['families'])}", dir=str(out), mode=mode,
                     tags=["scaling-comparison"] + [f"family:{f}" for f in res["families"]],
                     config={"families": res["families"]})
    try:
        columns = ["family", "run", "n_params_nonembed", "samples", "compute", "loss"]
        rows = [[f, p["run"], p["n_params_nonembed"], p["samples"], p["compute"], p["_loss"]]
                for f, v in fams.items() for p in v["points"]]
        run.log({"points": wandb.Table(columns=columns, data=rows),
                 **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        run.summary.update(json.loads(json.dumps(res, default=float)))
    finally:
        run.finish()
    return rid


def compare_families(sweeps: dict, out: str | Path, loss: str = "val/loss_r0.7", bootstrap: int = 200,
                     wandb_mode: str | None = None, name: str = "comparison") -> Path:
    """sweeps: family -> its fit sweep folder, or (folder, its report's folder): the report's law
    and bootstrap resamples are then taken as they are (the same intervals); otherwise the law is
    fitted here with `bootstrap` resamples. Compares, writes comparison.{json,md} and the plots
    -> the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = loss_column(loss)
    fams = {}
    for fam, where in sweeps.items():
        sweep, rep = (where[0], Path(where[1])) if isinstance(where, (tuple, list)) else (where, None)
        col, pts, _ = fitting_points(sweep, loss)
        for p in pts:
            p["_loss"] = p[key]
        fit, done = None, {}
        if rep is not None and (rep / "fit.json").is_file():  # the family's report: its law and resamples
            done = json.loads((rep / "fit.json").read_text())
            if done.get("loss") == loss and done.get("law") and done.get("law_draws", {}).get("rows"):
                fit = LawFit(**{k: v for k, v in done["law"].items() if k in LawFit.__dataclass_fields__})
                fit._draws = np.asarray(done["law_draws"]["rows"], float)
        if fit is None:
            fit = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p[key] for p in pts],
                          [p["run"] for p in pts], bootstrap=bootstrap)
        fams[fam] = {"fit": fit, "runs": col.runs, "points": pts,
                     "gate_passed": (done.get("gate") or {}).get("passed")}
    res = compare(fams)
    res["loss"] = loss
    res["gate_passed"] = {fam: v["gate_passed"] for fam, v in fams.items()}
    ident = {}
    for fam, where in sweeps.items():
        if isinstance(where, (tuple, list)) and (Path(where[1]) / "fit.json").is_file():
            done = json.loads((Path(where[1]) / "fit.json").read_text())
            if not done.get("law"):  # a report that the regime gate stopped: nothing to identify
                continue
            r1 = Path(where[2]) / "fit.json" if len(where) > 2 else None
            ident[fam] = identification(done, json.loads(r1.read_text()) if r1 is not None and r1.is_file() else None)
    res["identification"] = ident
    plots = plot(res, out)
    lines = markdown(res, name)
    failed = [fam for fam, ok in res["gate_passed"].items() if ok is False]
    if failed:  # the reports state no law for these: say what the comparison's laws then are
        lines[1:1] = ["", f"**Regime gate failed for {', '.join(failed)}** (see their reports): their runs do not "
                          f"beat the frequency-table baselines clearly, so the laws below describe optimisation "
                          f"progress, not capacity. Read no efficiency claim from them."]
    if ident:
        lines += [""] + identification_markdown(ident)
    if wandb_mode:
        rid = publish(res, fams, plots, out, name, wandb_mode)
        lines += ["", f"Published to wandb as run `{rid}` (job type scaling-comparison, both families)."]
    lines += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots)]
    (out / "comparison.json").write_text(json.dumps(res, indent=1, default=float))
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", required=True, metavar="NAME=FIT_SWEEP",
                   help="twice: the family with the cheaper sampling first (ENAT), then the baseline")
    p.add_argument("--out", required=True)
    p.add_argument("--loss", default="val/loss_r0.7")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--wandb", nargs="?", const="offline", choices=["offline", "online"])
    args = p.parse_args(argv)
    try:
        sweeps = dict(f.split("=", 1) for f in args.family)
        path = compare_families(sweeps, args.out, args.loss, args.bootstrap, args.wandb,
                                name=Path(args.out).resolve().parent.name)
    except (ScalingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
