"""`enat analyze WHAT`: parse the sweep, load the subjects, run one analysis, write and log it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from enat.analysis.attention import analyze_attention, attention_figure, attention_table
from enat.analysis.one_step import analyze_one_step, one_step_figure, one_step_table
from enat.analysis.output import log_to_wandb, write_analysis
from enat.analysis.pareto import analyze_pareto, pareto_figure, pareto_table
from enat.analysis.subjects import load_subjects
from enat.analysis.temporal import analyze_temporal, temporal_figure, temporal_table
from enat.config import Config
from enat.eval.fidelity import EvalError


def parse_floats(text: str | None, what: str, default: list[float]) -> list[float]:
    if not text:
        return default
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_scales(text: str | None, default: list[float]) -> list[float] | dict[str, list[float]]:
    """--cfg-scales: "0,2" for every model, or a scale per model ("ENAT=2.5,NAT=1", the names of
    the table) when each is to be compared at the scale a held-out sweep chose for it."""
    if not text or "=" not in text:
        return parse_floats(text, "--cfg-scales", default)
    out: dict[str, list[float]] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out.setdefault(name.strip(), []).append(float(value))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise EvalError(f"--cfg-scales: {item!r} is not NAME=SCALE (e.g. ENAT=2.5,NAT=1)")
    return out


ANALYSES = {
    "attention": (attention_table, attention_figure),
    "temporal": (temporal_table, temporal_figure),
    "one-step": (one_step_table, one_step_figure),
    "pareto": (pareto_table, pareto_figure),
}


def output_dir(run_dir: Path | None, checkpoint: str, out: str | None) -> Path:
    if out:
        return Path(out)
    if run_dir is not None:
        return run_dir / "analysis"
    return Path(checkpoint).resolve().parent / "analysis"


def run_analysis(what: str, cfg: Config, run_dir: str | Path | None, checkpoint: str, baseline: str | None = None,
                 weights: str | None = None, ratios: str | None = None, steps: str | None = None,
                 cfg_scales: str | None = None, num_samples: int | None = None, out: str | None = None,
                 log=print) -> dict:
    """One analysis end to end -> its record (also written to OUT/NAME.json/.md/.png)."""
    if what not in ANALYSES:
        raise EvalError(f"unknown analysis {what!r}: one of {', '.join(ANALYSES)}")
    run_dir = Path(run_dir) if run_dir is not None else None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    if what == "pareto":  # parse the sweep before loading anything
        steps_list = [int(x) for x in parse_floats(steps, "--steps", [4, 8, 12, 16])]
        scales = parse_scales(cfg_scales, sorted({0.0, cfg.sample.cfg_scale}))
    elif steps or cfg_scales:
        raise EvalError("--steps and --cfg-scales belong to `enat analyze pareto`")
    default_ratios = [0.2, 0.4, 0.6, 0.8] if what == "one-step" else [0.25, 0.5, 0.75]
    ratio_list = parse_floats(ratios, "--ratios", default_ratios)
    if ratios and what not in ("attention", "one-step"):
        raise EvalError("--ratios belongs to `enat analyze attention` and `enat analyze one-step`")
    subjects = load_subjects(cfg, run_dir, checkpoint, baseline, weights, device, log=log)
    if what == "attention":
        result = analyze_attention(cfg, subjects, ratio_list, num_samples, log=log)
    elif what == "temporal":
        result = analyze_temporal(cfg, subjects, num_samples, log=log)
    elif what == "one-step":
        result = analyze_one_step(cfg, subjects, ratio_list, num_samples, device, log=log)
    else:
        result = analyze_pareto(cfg, subjects, steps_list, scales, num_samples, device, log=log)
    result["weights"] = weights or cfg.eval.weights
    result["wall_time_s"] = time.perf_counter() - t0
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    header, rows, png = write_analysis(what, result, output_dir(run_dir, checkpoint, out), *ANALYSES[what], log=log)
    log_to_wandb(cfg, run_dir, what.replace("-", "_"), header, rows, png, subjects[0].step)
    return result
