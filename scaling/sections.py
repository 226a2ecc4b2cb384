"""The scaling report's Markdown, section by section (from results already computed: no fitting,
no plotting). report.py puts them in order; the sections of the other analyses are their
modules' own (approaches_markdown, frontier_markdown, gate_markdown, loo_markdown,
preregistration_markdown).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling.baselines import gate_markdown
from scaling.holdout import loo_markdown
from scaling.points import loss_name
from scaling.tables import MIN_CHECKPOINTS


def _f(v, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _ci(fit, name, fmt="{:.3g}") -> str:
    v = getattr(fit, name)
    if name in fit.ci:
        lo, hi = fit.ci[name]
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"
    return fmt.format(v)


def law_markdown(title, runs: int, points: int, loss: str, which: str, fit, gate_passed: bool) -> list[str]:
    """The report's title, what was fitted, and the law's parameters with their intervals."""
    lines = [f"# Scaling report: {title}", ""]
    if not gate_passed:
        lines += ["**The runs fail the regime gate (below); this law was fitted anyway (--ignore-gate) and describes "
                  "optimisation progress, not capacity.**", ""]
    lines += [f"{runs} runs, {points} points: `{loss}`, {which}; "
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
    return lines


def gated_markdown(title, runs: int, loss: str) -> list[str]:
    """The title of a report that states no law: the runs fail the regime gate."""
    return [f"# Scaling report: {title}", "", f"{runs} runs, `{loss}`. No law is stated: the "
            f"runs fail the regime gate (`--ignore-gate` fits one anyway, marked as such).", ""]


def gate_section(gate: dict) -> list[str]:
    """The regime gate: baselines.gate_markdown's table, or why the baselines could not be computed."""
    if gate.get("baselines"):
        return gate_markdown(gate)
    return ["## Regime gate", ""] + [f"- {r}" for r in gate["reasons"]]


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
             f"| run | N | steps | D images | D tokens | D masked tokens | tokens/N | C/6ND | final {loss_name(key)} "
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


def minima_markdown(levels: list[dict]) -> list[str]:
    lines = ["## The minimum at each isoFLOP level", "",
             "The size with the lowest final loss at each level (seed repeats averaged) and its neighbours': inside "
             "when a smaller and a larger size both lie above it, so the level brackets its optimum.", "",
             "| compute | sizes | best N | loss | smaller neighbour | larger neighbour | inside |",
             "|---|---|---|---|---|---|---|"]
    for lv in levels:
        def nb(v):
            return f"{v:.4f} ({(v / lv['best_loss'] - 1):+.1%})" if v is not None else "none"
        lines.append(f"| {lv['compute']:.3g} | {len(lv['sizes'])} | {lv['best_N']:.3g} | {lv['best_loss']:.4f} | "
                     f"{nb(lv['below'])} | {nb(lv['above'])} | {'yes' if lv['inside'] else 'no (edge)'} |")
    inside = sum(lv["inside"] for lv in levels)
    lines += ["", f"{inside} of {len(levels)} levels have their minimum inside their sizes."]
    return lines


def residuals_markdown(res: dict, points: int) -> list[str]:
    lines = ["## Residuals", "",
             f"log L_obs - log L_fit at the {points} fitted points: RMS {res['rms']:.4g}, largest "
             f"{res['max_abs']:.4g}, mean {res['mean']:+.3g} (residuals.png: against N and against D; a trend in "
             f"either is a part of the data the law does not describe).", "",
             "| N | points | mean residual | RMS |", "|---|---|---|---|"]
    return lines + [f"| {r['N']:.4g} | {r['points']} | {r['mean']:+.3g} | {r['rms']:.3g} |" for r in res["per_size"]]


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


def optimal_markdown(opt: dict, k: float) -> list[str]:
    """N*(C), D*(C) and L*(C) with the exponents a, b (fit.compute_optimal's result)."""
    a_ci = f" [{opt['a_ci'][0]:.3f}, {opt['a_ci'][1]:.3f}]" if opt.get("a_ci") else ""
    b_ci = f" [{opt['b_ci'][0]:.3f}, {opt['b_ci'][1]:.3f}]" if opt.get("b_ci") else ""
    lines = ["## Compute-optimal allocation", "",
             f"C = k N D with k = {k:.3g} FLOPs per non-embedding parameter and sample (median over runs, from "
             f"the exact per-sample FLOPs). N*(C) ~ C^a with a = {opt['a']:.3f}{a_ci}; D*(C) ~ C^b with "
             f"b = {opt['b']:.3f}{b_ci}.", "", "| C (FLOPs) | N* | D* (samples) | L* |", "|---|---|---|---|"]
    for c, n, d, lv in zip(opt["C"], opt["N"], opt["D"], opt["L"]):
        lines.append(f"| {c:.3g} | {n:.3g} | {d:.3g} | {lv:.4f} |")
    return lines


def leave_one_out_markdown(loo: dict, ho: dict, hold: str | None) -> list[str]:
    """The leave-one-out table (holdout.loo_markdown) and the line of the run fit.json names
    "holdout" (tables.holdout_row)."""
    lines = loo_markdown(loo) if loo["rows"] else ["## Leave-one-out", "", f"Not possible: {loo['error']}"]
    if "error" in ho:
        return lines + ["", f"Hold-out of the largest run not possible: {ho['error']}"]
    return lines + ["", f"{'Run' if hold else 'The largest run,'} `{ho['run']}` (N={ho['N']:.3g}, "
                        f"D={ho['D']:.3g}), fitted without: predicted {ho['predicted']:.4f}, observed "
                        f"{ho['observed']:.4f}, relative error {ho['rel_error']:+.2%} (at most a step beyond the other "
                        f"runs; not pre-registered)."]


def fid_markdown(fits: list[dict], proto: dict) -> list[str]:
    """The FID laws per size (tables.fid_fits), then the FID protocol."""
    lines = ["## FID", ""]
    if not fits:
        lines.append("No evaluations in these runs (launch/eval.py writes them to each run's eval.jsonl).")
    for f in fits:
        if f["fitted"]:
            lines.append(f"- N={f['N']:.3g}: FID = {f['F_inf']:.3g} + {f['K']:.3g} (C/{f['C0']:.3g})^-{f['gamma']:.3g} "
                         f"(gamma 95 % CI [{f['ci']['gamma'][0]:.3g}, {f['ci']['gamma'][1]:.3g}])")
        else:
            lines.append(f"- N={f['N']:.3g}: reported as points only: {f['reason']}")
    return lines + [""] + fid_protocol_markdown(proto)


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


def excluded_markdown(excluded: list[dict]) -> list[str]:
    return ["## Excluded runs", ""] + [f"- `{e['run']}`: {e['reason']}" for e in excluded]


def plots_markdown(plots: list[Path]) -> list[str]:
    return ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
