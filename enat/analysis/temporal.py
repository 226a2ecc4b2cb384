"""`enat analyze temporal`: while sampling, the cosine similarity of a token's features between
consecutive steps, per layer and step, for tokens visible at both steps and tokens decoded in
between (full forwards on the sampler's trajectory: the network's true features)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from enat.analysis.scorer import sample_conditions
from enat.analysis.subjects import Subject, show_progress
from enat.config import Config
from enat.sampling import StepTrace, generate


def feature_layout(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """[(layer, block, which positions its output rows are)]: 'all' (NAT: [caption ; every
    position]), 'visible' (ENAT's encoder: [caption ; visible]), 'masked' (ENAT's sc/cross
    decoder: the [MASK] tokens), 'ordered' (the self decoder: [caption ; visible ; [MASK]])."""
    if model.cfg.arch == "nat":
        return [(f"block.{i}", b, "all") for i, b in enumerate(model.blocks)]
    dec = "ordered" if model.cfg.decoder_attention == "self" else "masked"
    return ([(f"encoder.{i}", b, "visible") for i, b in enumerate(model.encoder)]
            + [(f"decoder.{i}", b, dec) for i, b in enumerate(model.decoder)])


@torch.no_grad()
def position_features(model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, M: int) -> dict[str, torch.Tensor]:
    """Every block's output of one full-mode forward, put back in position order: {layer: (B, N, D),
    NaN where that layer does not see the position}, plus 'output' (the features the head reads)."""
    L = model.cfg.context_len
    outputs: dict[str, torch.Tensor] = {}
    layout = feature_layout(model)
    handles = [b.register_forward_hook(lambda mod, a, out, name=name: outputs.__setitem__(name, out))
               for name, b, _ in layout]
    try:
        out = model(ids, cond, logits="none", num_masked=M)
    finally:
        for h in handles:
            h.remove()
    B, N, D = out.feat.shape
    feats = {}
    for name, _, rows in layout:
        h = outputs.get(name)
        f = torch.full((B, N, D), math.nan, dtype=torch.float32, device=out.feat.device)
        if h is not None:
            h = h.float()
            if rows == "all":
                f = h[:, L:]
            elif rows == "visible":
                f = f.scatter(1, out.order[:, :N - M].unsqueeze(-1).expand(-1, -1, D), h[:, L:])
            elif rows == "masked":
                f = f.scatter(1, out.masked_positions.unsqueeze(-1).expand(-1, -1, D), h)
            else:
                f = f.scatter(1, out.order.unsqueeze(-1).expand(-1, -1, D), h[:, L:])
        feats[name] = f
    feats["output"] = out.feat.float()
    return feats


def cosine_at(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> tuple[float, int]:
    """Mean cosine similarity of a[where] and b[where] over the positions where both are defined
    -> (mean, count); (nan, 0) when there is none."""
    ok = where & ~a.isnan().any(-1) & ~b.isnan().any(-1)
    n = int(ok.sum())
    if n == 0:
        return math.nan, 0
    return float(F.cosine_similarity(a[ok].double(), b[ok].double(), dim=-1).mean()), n


def temporal_similarity(model: nn.Module, cond: torch.Tensor, sample_cfg, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Sample for `cond`, then run a full forward on every step's input and compare features step
    to step -> ({"layers", "steps": [{"step", "visible": {layer: (cos, n)}, "new": {...}}]}, the
    trajectory (T, n, N): input ids per step). One batch goes through its whole trajectory at a
    time, so only two steps' features of one batch are ever held (an L-size model at 32x32 holds
    GBs per step for a hundred samples)."""
    device = next(model.parameters()).device
    mask_id = model.cfg.mask_id
    totals: dict = {}  # (step, kind, layer) -> [sum of cosines, count]
    layers: list[str] = []
    trajectory = []
    for start in range(0, len(cond), batch_size):
        c = cond[start:start + batch_size]
        trace: list[StepTrace] = []
        generate(model, c, sample_cfg, indices=torch.arange(start, start + len(c)), trace=trace)
        traj = torch.stack([t.input_ids for t in trace])  # (T, b, N)
        trajectory.append(traj)
        prev = None
        for s, ids in enumerate(traj):
            masked = (ids == mask_id).to(device)
            feats = position_features(model, ids.to(device), c.to(device), int(masked[0].sum()))
            layers = list(feats)
            if prev is not None:
                before, was_masked = prev
                # visible at both steps (the sampler never re-masks one); decoded in between
                for kind, where in (("visible", ~was_masked), ("new", was_masked & ~masked)):
                    for layer in layers:
                        mean, n = cosine_at(before[layer], feats[layer], where)
                        total = totals.setdefault((s, kind, layer), [0.0, 0])
                        if n:
                            total[0] += mean * n
                            total[1] += n
            prev = (feats, masked)
    traj = torch.cat(trajectory, dim=1)
    steps = []
    for s in range(1, traj.shape[0]):
        step = {"step": s}
        for kind in ("visible", "new"):
            step[kind] = {}
            for layer in layers:
                total, n = totals.get((s, kind, layer), (0.0, 0))
                step[kind][layer] = (total / n if n else math.nan, n)
        steps.append(step)
    return {"layers": layers, "steps": steps}, traj


def analyze_temporal(cfg: Config, subjects: list[Subject], num_samples: int | None, log=print) -> dict:
    n = num_samples or min(cfg.eval.num_samples, 100)
    sc = dataclasses.replace(cfg.sample, seed=cfg.eval.seed)
    models = []
    for subject in tqdm(subjects, desc="temporal", unit="model", disable=not show_progress()):
        model = subject.model
        sub_sc = sc if model.supports_reuse else dataclasses.replace(sc, reuse=False)
        cond = sample_conditions(cfg, model, np.arange(n), log=log)[0]
        sims, _ = temporal_similarity(model, cond, sub_sc, cfg.eval.batch_size)
        mean = {}
        for kind in ("visible", "new"):
            mean[kind] = {}
            for layer in sims["layers"]:
                vals = [(st[kind][layer][0], st[kind][layer][1]) for st in sims["steps"] if st[kind][layer][1]]
                total = sum(c for _, c in vals)
                mean[kind][layer] = float(sum(v * c for v, c in vals) / total) if total else None
        steps = [{"step": st["step"], **{kind: {layer: (None if math.isnan(st[kind][layer][0]) else st[kind][layer][0])
                                               for layer in sims["layers"]} for kind in ("visible", "new")},
                  "count": {kind: st[kind]["output"][1] for kind in ("visible", "new")}} for st in sims["steps"]]
        models.append({**subject.record, "layers": sims["layers"], "sample": dataclasses.asdict(sub_sc),
                       "mean": mean, "steps": steps})
    return {"analysis": "temporal", "num_samples": n, "grid": cfg.model.grid_size, "models": models,
            "definition": "cosine similarity of a position's features (each block's output; 'output' = what the "
                          "head reads) between the full forwards of consecutive sampling steps; 'visible': tokens "
                          "visible at both steps; 'new': tokens decoded in between; mean over positions and "
                          "samples (the mean row weights steps by their counts); null where a layer does not "
                          "see the tokens at both steps (ENAT's encoder never sees a [MASK] token)"}


def temporal_table(result: dict) -> tuple[list[str], list[list]]:
    header = ["model", "layer", "visible tokens", "newly decoded"]
    rows = []
    for m in result["models"]:
        for layer in m["layers"]:
            v, n = m["mean"]["visible"][layer], m["mean"]["new"][layer]
            rows.append([m["name"], layer, "–" if v is None else f"{v:.4f}", "–" if n is None else f"{n:.4f}"])
    return header, rows


def temporal_figure(result: dict, path: Path) -> Path:
    models = result["models"]
    fig = Figure(figsize=(10, 3.4 * len(models)))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, m in zip(axes, models):
        cmap = matplotlib.colormaps["viridis"]
        for ax, kind, title in ((row[0], "visible", "tokens visible at both steps"),
                                (row[1], "new", "tokens decoded in between")):
            for i, layer in enumerate(m["layers"]):
                xs = [st["step"] for st in m["steps"] if st[kind][layer] is not None]
                ys = [st[kind][layer] for st in m["steps"] if st[kind][layer] is not None]
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, color="black" if layer == "output" else
                            cmap(i / max(len(m["layers"]) - 1, 1)), lw=2 if layer == "output" else 1, label=layer)
            ax.set_title(f"{m['name']}: {title}", fontsize=10)
            ax.set_xlabel("sampling step s (similarity of step s-1 and s)")
            ax.set_ylabel("cosine similarity")
            ax.set_ylim(min(0, ax.get_ylim()[0]), 1.02)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(f"feature similarity between consecutive sampling steps ({result['num_samples']} samples, "
                 f"grid {result['grid']}x{result['grid']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
