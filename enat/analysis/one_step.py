"""`enat analyze one-step`: held-out token maps masked at each ratio, every [MASK] predicted in
one forward (argmax, conditional logits), decoded and scored like the FID job."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
import torch
import torch.nn as nn
from tqdm import tqdm

from enat.analysis.scorer import Scorer
from enat.analysis.subjects import Subject, held_out_maps, mask_positions, masked_count, show_progress
from enat.config import Config
from enat.images import to_uint8
from enat.tokenizer import load_tokenizer


@torch.no_grad()
def one_step_fill(model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """ids with the positions `pos` (n, M) masked and then predicted, all in one forward (argmax of
    the conditional logits)."""
    device = next(model.parameters()).device
    M = pos.shape[1]
    masked = ids.scatter(1, pos, model.cfg.mask_id)
    if M == 0:
        return masked
    out = []
    for s in range(0, len(ids), batch_size):
        x = masked[s:s + batch_size].to(device)
        o = model(x, cond[s:s + batch_size].to(device), logits="masked", num_masked=M)
        out.append(x.scatter(1, o.masked_positions, o.logits.float().argmax(dim=-1)).cpu())
    return torch.cat(out)


def analyze_one_step(cfg: Config, subjects: list[Subject], ratios: list[float], num_maps: int | None,
                     device, log=print) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer).to(device)
    scorer = Scorer(cfg, tokenizer, device, log=log)
    ids, cond, rows = held_out_maps(cfg, num_maps or cfg.eval.num_samples, log=log)
    labels = cond.numpy() if cond.dim() == 1 else None
    N = ids.shape[1]

    def score(tokens: torch.Tensor) -> dict:
        images = to_uint8(tokenizer.decode(tokens, batch_size=cfg.eval.batch_size))
        return scorer(images, labels)

    models = []
    for subject in subjects:
        points = []
        for r in tqdm(ratios, desc=f"one-step {subject.name}", unit="ratio", disable=not show_progress()):
            M = masked_count(N, r)
            pos = mask_positions(rows, N, M, cfg.eval.seed)
            filled = one_step_fill(subject.model, ids, cond, pos, cfg.eval.batch_size)
            acc = float((filled.gather(1, pos) == ids.gather(1, pos)).double().mean()) if M else None
            points.append({"ratio": r, "masked": M, "token_accuracy": acc, "metrics": score(filled)})
        models.append({**subject.record, "points": points})
    return {"analysis": "one-step", "ratios": ratios, "num_maps": len(rows), "shards": str(cfg.data.val_shards),
            "mask_seed": cfg.eval.seed, "grid": cfg.model.grid_size, "resolution": cfg.tokenizer.resolution,
            "reconstruction": score(ids), **scorer.protocol, "models": models,
            "definition": "held-out token maps masked at each ratio (the same positions for every model), every "
                          "[MASK] predicted in one forward (argmax of the conditional logits, no guidance), "
                          "decoded by the tokenizer and scored against the FID job's reference; "
                          "'reconstruction' scores the unmasked maps decoded (ratio 0)"}


def one_step_table(result: dict) -> tuple[list[str], list[list]]:
    header = ["model", "mask ratio", "[MASK] tokens", "token accuracy", "FID", "IS"]
    rec = result["reconstruction"]
    rows = [["tokenizer reconstruction", "0", "0", "–", f"{rec['fid']:.3f}", f"{rec['isc_mean']:.2f}"]]
    for m in result["models"]:
        for p in m["points"]:
            rows.append([m["name"], f"{p['ratio']:g}", p["masked"],
                         "–" if p["token_accuracy"] is None else f"{p['token_accuracy']:.3f}",
                         f"{p['metrics']['fid']:.3f}", f"{p['metrics']['isc_mean']:.2f}"])
    return header, rows


def one_step_figure(result: dict, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m in result["models"]:
        ax.plot([p["ratio"] for p in m["points"]], [p["metrics"]["fid"] for p in m["points"]], marker="o",
                label=m["name"])
    ax.axhline(result["reconstruction"]["fid"], color="grey", ls="--", label="tokenizer reconstruction")
    ax.set_xlabel("mask ratio (share of tokens predicted in one step)")
    ax.set_ylabel(f"FID ({result['extractor']})")
    ax.set_title(f"one-step decoding of {result['num_maps']} held-out maps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
