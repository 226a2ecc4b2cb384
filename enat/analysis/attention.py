"""`enat analyze attention` (spatial): the share of attention mass [MASK] and visible queries put
on each kind of key, per layer, next to the share uniform attention would give."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from enat.analysis.recorder import KINDS, LABEL, AttentionRecorder
from enat.analysis.subjects import Subject, held_out_maps, mask_positions, masked_count, show_progress
from enat.config import Config
from enat.eval.fidelity import EvalError


def attention_shares(model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, rows: np.ndarray, ratio: float,
                     seed: int, batch_size: int) -> dict:
    """attention split per layer for the maps `ids` masked at `ratio` (see AttentionRecorder)."""
    device = next(model.parameters()).device
    N = ids.shape[1]
    M = masked_count(N, ratio)
    if M in (0, N):
        raise EvalError(f"mask ratio {ratio} leaves {'no [MASK]' if M == 0 else 'no visible'} token in a "
                        f"{N}-token map: the attention split needs both kinds (use ratios in (0, 1))")
    pos = mask_positions(rows, N, M, seed)
    masked = ids.scatter(1, pos, model.cfg.mask_id)
    rec = AttentionRecorder()
    for s in range(0, len(ids), batch_size):
        rec.record(model, masked[s:s + batch_size].to(device), cond[s:s + batch_size].to(device), M)
    return rec.shares()


def analyze_attention(cfg: Config, subjects: list[Subject], ratios: list[float], num_maps: int | None,
                      log=print) -> dict:
    ids, cond, rows = held_out_maps(cfg, num_maps, log=log)
    models = []
    for subject in subjects:
        per_ratio = {}
        for r in tqdm(ratios, desc=f"attention {subject.name}", unit="ratio", disable=not show_progress()):
            per_ratio[f"{r:g}"] = attention_shares(subject.model, ids, cond, rows, r, cfg.eval.seed,
                                                   cfg.eval.batch_size)
        layers = list(next(iter(per_ratio.values())))
        mean = {}
        for layer in layers:  # the mean over ratios
            mean[layer] = {}
            for what in ("attention", "uniform"):
                qs = per_ratio[f"{ratios[0]:g}"][layer][what]
                mean[layer][what] = {qk: {kk: float(np.mean([per_ratio[f"{r:g}"][layer][what][qk][kk]
                                                             for r in ratios])) for kk in qs[qk]} for qk in qs}
        models.append({**subject.record, "layers": layers, "mean": mean, "per_ratio": per_ratio})
    return {"analysis": "attention", "ratios": ratios, "num_maps": len(rows), "shards": str(cfg.data.val_shards),
            "mask_seed": cfg.eval.seed, "grid": cfg.model.grid_size, "condition": cfg.model.condition,
            "models": models,
            "definition": "share of a query's attention mass (softmax over its keys, mean over heads) on keys of "
                          "each kind, averaged over queries of a kind; 'uniform' is the share equal weights "
                          "would give (the kind's fraction of the keys)"}


def _pairs(text: bool) -> list[tuple[str, str]]:
    keys = KINDS if text else KINDS[:2]
    return [(q, k) for q in ("mask", "visible") for k in keys]


def attention_table(result: dict) -> tuple[list[str], list[list]]:
    pairs = _pairs(result["condition"] == "text")
    header = ["model", "layer"] + [f"{LABEL[q]}→{LABEL[k]}" for q, k in pairs]
    rows = []
    for m in result["models"]:
        for layer in m["layers"]:
            att, uni = m["mean"][layer]["attention"], m["mean"][layer]["uniform"]
            rows.append([m["name"], layer] + [f"{att[q][k]:.3f} ({uni[q][k]:.2f})" if q in att else "–"
                                              for q, k in pairs])
    return header, rows


def attention_figure(result: dict, path: Path) -> Path:
    pairs = _pairs(result["condition"] == "text")
    models = result["models"]
    fig = Figure(figsize=(1.3 * len(pairs) * len(models) + 1.5, 0.5 * max(len(m["layers"]) for m in models) + 2.2))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, m in zip(axes[0], models):
        grid = np.full((len(m["layers"]), len(pairs)), np.nan)
        for i, layer in enumerate(m["layers"]):
            att = m["mean"][layer]["attention"]
            for j, (q, k) in enumerate(pairs):
                if q in att:
                    grid[i, j] = att[q][k]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(pairs)), [f"{LABEL[q]}\n→{LABEL[k]}" for q, k in pairs], fontsize=8)
        ax.set_yticks(range(len(m["layers"])), m["layers"], fontsize=8)
        ax.set_title(f"{m['name']} (step {m['step']})", fontsize=10)
        ax.set_xlabel("query → key kind")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of attention mass")
    fig.suptitle(f"attention mass by token kind, mean over mask ratios {', '.join(f'{r:g}' for r in result['ratios'])}"
                 f" ({result['num_maps']} held-out maps; blank: no such queries)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
