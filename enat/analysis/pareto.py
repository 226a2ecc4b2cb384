"""`enat analyze pareto`: FID against analytic sampling TFLOPs per image and measured img/s over
steps x CFG scales, with and without reuse (the paper's efficiency figure), and the merge of
one sweep split over jobs."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
import numpy as np
import torch
from tqdm import tqdm

from enat.analysis.output import write_analysis
from enat.analysis.scorer import Scorer, sample_conditions
from enat.analysis.subjects import Subject, show_progress
from enat.config import Config
from enat.eval.fidelity import EvalError
from enat.eval.job import generate_images
from enat.flops import sampling_flops
from enat.sampling import generate
from enat.tokenizer import load_tokenizer


# What pareto records merged from several jobs must share: points measured otherwise do not compare.
# img/s compares only on one kind of machine: "device" too.
PARETO_PROTOCOL = ("num_samples", "grid", "reference", "extractor", "extractor_weights", "weights", "device")


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both TFLOPs and FID (lower is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i]["tflops"], points[i]["fid"]))
    front, best = [], math.inf
    for i in order:
        if points[i]["fid"] < best:
            front.append(i)
            best = points[i]["fid"]
    return sorted(front)


def analyze_pareto(cfg: Config, subjects: list[Subject], steps_list: list[int],
                   scales: list[float] | dict[str, list[float]], num_samples: int | None, device, log=print) -> dict:
    if isinstance(scales, dict):  # a scale per model
        unknown = sorted(set(scales) - {s.name for s in subjects})
        missing = [s.name for s in subjects if s.name not in scales]
        if unknown or missing:
            raise EvalError(f"--cfg-scales names {unknown or 'no unknown model'} and lacks {missing or 'none'}: "
                            f"the models here are {[s.name for s in subjects]}")
    tokenizer = load_tokenizer(cfg.tokenizer).to(device)
    scorer = Scorer(cfg, tokenizer, device, log=log)
    n = num_samples or cfg.eval.num_samples
    indices = np.arange(n)
    plan = [(s, reuse, T, w) for s in subjects for reuse in ((True, False) if s.model.supports_reuse else (False,))
            for T in steps_list for w in (scales[s.name] if isinstance(scales, dict) else scales)]
    points = []
    warm = set()
    for subject, reuse, T, w in tqdm(plan, desc="pareto", unit="point", disable=not show_progress()):
        model = subject.model
        pcfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=T, cfg_scale=w, reuse=reuse))
        cond, labels, conditions = sample_conditions(cfg, model, indices[: cfg.eval.batch_size], log=log)
        if subject.name not in warm:  # first call of a model: allocations, lazy inits; not timed
            generate(model, cond, pcfg.sample)
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm.add(subject.name)
        timings: dict = {}
        images, labels = generate_images(model, tokenizer, pcfg, indices, timings=timings, conditions=conditions)
        values = scorer(images, labels)
        flops = sampling_flops(model.cfg, T, reuse=reuse, guided=w != 0)
        points.append({"model": subject.name, "reuse": reuse, "steps": T, "cfg_scale": w,
                       "tflops": flops.total / 1e12, "img_per_s": n / timings["sampling"],
                       "fid": values["fid"], "metrics": values})
    for i in pareto_front(points):
        points[i]["pareto"] = True
    return {"analysis": "pareto", "num_samples": n, "grid": cfg.model.grid_size, "device": str(device),
            "threads": torch.get_num_threads(), **scorer.protocol,
            "models": [s.record for s in subjects], "points": points,
            "definition": "FID of n class-balanced (or held-out caption) samples per point, the FID job's "
                          "protocol; TFLOPs: analytic sampling FLOPs per image (enat.flops, both CFG branches "
                          "when guided); img/s: sampling alone (decoding and features excluded) on this "
                          "machine, batch eval.batch_size, after one untimed warm-up batch per model"}


def pareto_table(result: dict) -> tuple[list[str], list[list]]:
    header = ["model", "reuse", "steps", "CFG", "TFLOPs/img", "img/s", "FID", "Pareto"]
    rows = [[p["model"], "yes" if p["reuse"] else "no", p["steps"], f"{p['cfg_scale']:g}",
             f"{p['tflops']:.4g}", f"{p['img_per_s']:.1f}",
             f"{p['fid']:.3f}", "*" if p.get("pareto") else ""] for p in result["points"]]
    return header, rows


def pareto_figure(result: dict, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    points = result["points"]
    series = sorted({(p["model"], p["reuse"]) for p in points}, key=lambda s: (s[0], not s[1]))
    markers = ["o", "s", "^", "D", "v", "P"]
    scales = sorted({p["cfg_scale"] for p in points})
    for k, (model, reuse) in enumerate(series):
        color = matplotlib.colormaps["tab10"](k)
        largest = max(p["cfg_scale"] for p in points if (p["model"], p["reuse"]) == (model, reuse))
        for j, w in enumerate(scales):
            pts = sorted((p for p in points if p["model"] == model and p["reuse"] == reuse and p["cfg_scale"] == w),
                         key=lambda p: p["tflops"])
            if not pts:
                continue
            label = f"{model}{' + reuse' if reuse else (' no reuse' if model.startswith('ENAT') else '')}, CFG {w:g}"
            ax.plot([p["tflops"] for p in pts], [p["fid"] for p in pts], marker=markers[j % len(markers)],
                    color=color, ls="-" if w == largest else ":", label=label)
            for p in pts:
                ax.annotate(str(p["steps"]), (p["tflops"], p["fid"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["tflops"])
    ax.step([p["tflops"] for p in front], [p["fid"] for p in front], where="post", color="black", lw=0.8,
            alpha=0.6, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("sampling TFLOPs per image (analytic)")
    ax.set_ylabel(f"FID ({result['extractor']}, {result['num_samples']} samples)")
    ax.set_title("quality against inference cost (labels: sampling steps)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def merge_pareto(paths: list[str | Path], out: str | Path, log=print) -> dict:
    """`enat analyze pareto --merge A.json B.json --out DIR`: one Pareto sweep split over jobs (by
    model or steps, to use more machines) -> one record, the front taken over all the points."""
    records = []
    for path in map(Path, paths):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"--merge: cannot read {path}: {e}") from None
        if not isinstance(record, dict) or record.get("analysis") != "pareto":
            what = record.get("analysis") if isinstance(record, dict) else type(record).__name__
            raise EvalError(f"--merge: {path} is not a pareto record (analysis: {what!r})")
        points, models = record.get("points"), record.get("models")
        if not (isinstance(points, list) and isinstance(models, list)
                and all(isinstance(p, dict) and {"model", "reuse", "steps", "cfg_scale", "tflops", "fid"} <= set(p)
                        for p in points)
                and all(isinstance(m, dict) and "name" in m for m in models)):
            raise EvalError(f"--merge: {path} is a damaged pareto record (its points or models lack fields)")
        records.append((path, record))
    if len(records) < 2:
        raise EvalError("--merge needs two or more pareto.json files")
    first_path, first = records[0]
    for path, record in records[1:]:
        for key in PARETO_PROTOCOL:
            if record.get(key) != first.get(key):
                raise EvalError(f"--merge: {path} and {first_path} differ in {key} ({record.get(key)!r} against "
                                f"{first.get(key)!r}): their FIDs do not compare")
    points, seen, models = [], {}, {}
    for path, record in records:
        for p in record["points"]:
            key = (p["model"], p["reuse"], p["steps"], p["cfg_scale"])
            if key in seen:
                raise EvalError(f"--merge: the point {key} is in both {seen[key]} and {path}")
            seen[key] = path
            points.append({k: v for k, v in p.items() if k != "pareto"})
        for m in record["models"]:
            if models.setdefault(m["name"], m) != m:
                raise EvalError(f"--merge: {path} has another {m['name']} ({m}) than {models[m['name']]}")
    for i in pareto_front(points):
        points[i]["pareto"] = True
    result = {**{k: v for k, v in first.items() if k not in ("files", "created", "wall_time_s", "device", "threads")},
              "models": list(models.values()), "points": points,
              "merged_from": [{"path": str(path), "device": r.get("device"), "threads": r.get("threads"),
                               "created": r.get("created"), "wall_time_s": r.get("wall_time_s")} for path, r in records],
              "wall_time_s": sum(r.get("wall_time_s", 0.0) for _, r in records),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_analysis("pareto", result, Path(out), pareto_table, pareto_figure, log=log)
    return result
