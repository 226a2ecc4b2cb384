"""The paper's analyses as commands, on any checkpoint (ENAT or the vanilla NAT baseline):

    enat analyze attention --run RUN --checkpoint W [--baseline W2] [--ratios 0.25,0.5,0.75]
    enat analyze temporal  --run RUN --checkpoint W [--baseline W2]
    enat analyze one-step  --run RUN --checkpoint W [--ratios 0.2,0.4,0.6,0.8]
    enat analyze pareto    --run RUN --checkpoint W [--baseline W2] [--steps 4,8,12,16] [--cfg-scales 0,2]

  attention  spatial: the share of attention mass [MASK] queries and visible queries put on [MASK],
             visible (and caption) keys, per layer, averaged over held-out token maps masked at
             several ratios; next to it the share uniform attention would give (the key counts).
  temporal   temporal: while sampling, the cosine similarity of a token's features between
             consecutive steps, per layer and step: for tokens visible at both steps, and for
             tokens decoded in between. Features come from full forwards on the sampler's
             trajectory (reuse only shapes the trajectory), so they are the network's true ones.
  one-step   held-out token maps masked at each ratio, every [MASK] predicted in one forward
             (argmax, conditional logits), decoded and scored by the FID job's machinery (same
             extractor, reference, metrics); ratio 0 is the tokenizer's reconstruction score.
  pareto     FID against analytic sampling TFLOPs per image and measured img/s over steps x CFG
             scales, with and without reuse (and the NAT baseline): the paper's efficiency figure.

Each writes NAME.json (numbers and protocol), NAME.md (the table) and NAME.png into RUN/analysis/
(or --out) and logs table and figure to the run's wandb run when it has one. --baseline is a
weights file or a run directory (its latest checkpoint) of a model on the same tokens and
conditions; a checkpoint that does not match the config is refused with the differing fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from enat.config import Config, ModelConfig
from enat.eval.fidelity import EvalError

KINDS = ("mask", "visible", "text")  # token kinds, as query and as key
MASK, VISIBLE, TEXT = range(3)
LABEL = {"mask": "[MASK]", "visible": "visible", "text": "caption"}


def _progress() -> bool:
    return sys.stderr.isatty()


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


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A model under analysis."""

    name: str  # ENAT, NAT, ENAT (decoder self), ...
    model: nn.Module
    checkpoint: str
    step: int

    @property
    def record(self) -> dict:
        c = self.model.cfg
        return {"name": self.name, "checkpoint": self.checkpoint, "step": self.step, "arch": c.arch,
                "decoder_attention": c.decoder_attention if c.arch == "enat" else None,
                "width": c.width, "depth": [c.enc_depth, c.dec_depth] if c.arch == "enat" else c.depth}


INTERFACE = ("grid_size", "codebook_size", "num_classes", "condition", "text_len", "text_dim")


def check_interface(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    """A baseline may be another network, but on the same tokens and conditions."""
    fields = [k for k in INTERFACE if k not in ("text_len", "text_dim") or expected.condition == "text"]
    diff = [f"{k}: baseline {getattr(found, k)!r} vs config {getattr(expected, k)!r}" for k in fields
            if getattr(found, k) != getattr(expected, k)]
    if diff:
        raise EvalError(f"baseline {source} works on other tokens or conditions than the config: " + "; ".join(diff))


def _name(cfg: ModelConfig) -> str:
    if cfg.arch == "nat":
        return "NAT"
    return "ENAT" if cfg.decoder_attention == "sc" else f"ENAT (decoder {cfg.decoder_attention})"


def load_subjects(cfg: Config, run_dir: Path | None, checkpoint: str, baseline: str | None, weights: str | None,
                  device: torch.device, log=print) -> list[Subject]:
    from enat.eval.job import load_checkpoint

    weights = weights or cfg.eval.weights
    ck = load_checkpoint(cfg, run_dir, checkpoint, weights, log=log)
    subjects = [Subject(_name(ck["model_cfg"]), ck["model"].to(device), ck["id"], ck["step"])]
    if baseline:
        path = Path(baseline)
        if path.is_dir():  # a run directory: its latest checkpoint
            b = load_checkpoint(cfg, path, "latest", weights, log=log, check=check_interface)
        else:
            b = load_checkpoint(cfg, None, str(path), weights, log=log, check=check_interface)
        name = _name(b["model_cfg"])
        subjects.append(Subject(name if name != subjects[0].name else f"{name} (baseline)", b["model"].to(device),
                                b["id"], b["step"]))
    for s in subjects:
        if s.model.cfg.condition == "text":
            from enat.eval.text import HeldOutCaptions

            HeldOutCaptions(cfg, log=log).check_model(s.model)  # captions encoded by the model's encoder
    return subjects


def held_out_maps(cfg: Config, n: int | None, log=print) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n held-out token maps (data.val_shards), chosen by a permutation seeded by eval.seed ->
    (ids (n, N) int64, conditions: labels (n,) or caption contexts (n, L, C) (each map's first
    caption), row numbers)."""
    from enat.data.loader import ShardSet

    if cfg.data.val_shards is None:
        raise EvalError("the analysis reads held-out token maps: set data.val_shards (tokenize the validation split)")
    data = ShardSet(cfg.data.val_shards, strict=cfg.data.strict, log=log)
    if len(data) == 0:
        raise EvalError(f"{cfg.data.val_shards} holds no token maps")
    rows = np.random.default_rng(cfg.eval.seed).permutation(len(data))[: n or len(data)]
    ids = torch.from_numpy(data.tokens(rows).astype(np.int64))
    if ids.shape[1] != cfg.model.seq_len:
        raise EvalError(f"{cfg.data.val_shards} holds {ids.shape[1]} tokens per image but the model's grid is "
                        f"{cfg.model.grid_size}x{cfg.model.grid_size} (model.grid_size)")
    if cfg.model.condition == "text":
        from enat.eval.text import HeldOutCaptions

        cond = HeldOutCaptions(cfg, data=data, log=log).contexts(rows, np.zeros(len(rows), np.int64)).float()
    else:
        cond = torch.from_numpy(np.asarray(data.label, dtype=np.int64)[rows])
    return ids, cond, rows


def mask_positions(rows: np.ndarray, N: int, M: int, seed: int) -> torch.Tensor:
    """(n, M) positions to mask in each map: the first M of a permutation drawn from (seed, row), so
    a higher ratio masks a superset and every model and run sees the same masks."""
    from enat.rng import generator

    if M == 0:
        return torch.zeros(len(rows), 0, dtype=torch.long)
    return torch.stack([torch.randperm(N, generator=generator(seed, "analysis-mask", int(r)))[:M] for r in rows])


def masked_count(N: int, ratio: float) -> int:
    if not 0 <= ratio <= 1:
        raise EvalError(f"mask ratios lie in [0, 1], got {ratio}")
    return round(N * ratio)


# ---------------------------------------------------------------------------------------------
# Spatial: where attention goes
# ---------------------------------------------------------------------------------------------


def attention_layout(model: nn.Module, mask: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """[(layer, attention module, query kinds (B, n), key kinds (B, K))] of one full-mode forward
    on ids whose [MASK] positions are `mask` (B, N), in the order the network lays tokens out:
    the NAT's sequence is [caption ; every position]; ENAT's encoder runs over [caption ;
    visible], its decoder's queries are the [MASK] tokens (sc, cross) or [caption ; visible ;
    [MASK]] (self), its keys the context [caption ; visible] then its own tokens (none for cross)."""
    B, N = mask.shape
    cfg = model.cfg
    L = cfg.context_len
    M = int(mask[0].sum())

    def seq(*parts):
        return torch.cat([torch.full((B, n), k, dtype=torch.long) for k, n in parts], dim=1)

    if cfg.arch == "nat":
        own = torch.cat([seq((TEXT, L)), torch.where(mask.cpu(), MASK, VISIBLE)], dim=1)
        return [(f"block.{i}", b.attn, own, own) for i, b in enumerate(model.blocks)]
    context = seq((TEXT, L), (VISIBLE, N - M))
    layers = [(f"encoder.{i}", b.attn, context, context) for i, b in enumerate(model.encoder)]
    masked = seq((MASK, M))
    if cfg.decoder_attention == "self":
        q = k = torch.cat([context, masked], dim=1)
    elif cfg.decoder_attention == "cross":
        q, k = masked, context
    else:
        q, k = masked, torch.cat([context, masked], dim=1)
    return layers + [(f"decoder.{i}", b.attn, q, k) for i, b in enumerate(model.decoder)]


class AttentionRecorder:
    """Forward hooks on the attention modules that add up, per layer, the attention mass each
    query kind puts on each key kind (mean over heads), and what uniform attention would put."""

    def __init__(self):
        self.mass: dict[str, torch.Tensor] = {}  # layer -> (3 query kinds, 3 key kinds) summed shares
        self.uniform: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}  # layer -> (3,) queries of each kind

    @torch.no_grad()
    def record(self, model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, M: int) -> None:
        mask = ids == model.cfg.mask_id
        handles = [attn.register_forward_hook(self._hook(name, q, k))
                   for name, attn, q, k in attention_layout(model, mask)]
        try:
            model(ids, cond, logits="none", num_masked=M)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, query_kinds: torch.Tensor, key_kinds: torch.Tensor):
        def hook(module, args, output):
            x, ctx = args[0], (args[1] if len(args) > 1 else None)
            if module.kv is None and ctx.shape[1] == 0:
                return  # cross-attention with nothing to attend to: no attention
            q, k, _ = module.qkv(x, ctx)
            if k.shape[2] != key_kinds.shape[1] or q.shape[2] != query_kinds.shape[1]:
                raise RuntimeError(f"{name}: {q.shape[2]} queries / {k.shape[2]} keys, layout says "
                                   f"{query_kinds.shape[1]} / {key_kinds.shape[1]}")
            scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # SDPA's scale
            probs = scores.softmax(dim=-1).mean(dim=1).double()  # (B, n, K), mean over heads
            keys = F.one_hot(key_kinds, 3).double().to(probs.device)  # (B, K, 3)
            queries = F.one_hot(query_kinds, 3).double().to(probs.device)  # (B, n, 3)
            share = probs @ keys  # (B, n, 3): each query's mass on each key kind
            uniform = keys.mean(dim=1, keepdim=True).expand_as(share)
            self.mass[name] = self.mass.get(name, 0) + torch.einsum("bnq,bnk->qk", queries, share).cpu()
            self.uniform[name] = self.uniform.get(name, 0) + torch.einsum("bnq,bnk->qk", queries, uniform).cpu()
            self.count[name] = self.count.get(name, 0) + queries.sum(dim=(0, 1)).cpu()
        return hook

    def shares(self) -> dict:
        """{layer: {"attention": {query kind: {key kind: share}}, "uniform": {...}, "queries": {kind: n}}}."""
        out = {}
        for name in self.mass:
            n = self.count[name]
            out[name] = {"attention": {}, "uniform": {}, "queries": {KINDS[i]: int(n[i]) for i in range(3) if n[i]}}
            for i in range(3):
                if n[i] == 0:
                    continue
                for what, table in (("attention", self.mass), ("uniform", self.uniform)):
                    out[name][what][KINDS[i]] = {KINDS[j]: float(table[name][i, j] / n[i]) for j in range(3)}
        return out


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
    from tqdm import tqdm

    ids, cond, rows = held_out_maps(cfg, num_maps, log=log)
    models = []
    for subject in subjects:
        per_ratio = {}
        for r in tqdm(ratios, desc=f"attention {subject.name}", unit="ratio", disable=not _progress()):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(result["condition"] == "text")
    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(1.3 * len(pairs) * len(models) + 1.5,
                                                       0.5 * max(len(m["layers"]) for m in models) + 2.2),
                             squeeze=False)
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
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Temporal: how features move between sampling steps
# ---------------------------------------------------------------------------------------------


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
    from enat.sampling import StepTrace, generate

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
    from tqdm import tqdm

    n = num_samples or min(cfg.eval.num_samples, 100)
    sc = dataclasses.replace(cfg.sample, seed=cfg.eval.seed)
    models = []
    for subject in tqdm(subjects, desc="temporal", unit="model", disable=not _progress()):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.4 * len(models)), squeeze=False)
    for row, m in zip(axes, models):
        cmap = plt.get_cmap("viridis")
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
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Scoring images (the FID job's machinery)
# ---------------------------------------------------------------------------------------------


class Scorer:
    """FID & co. of uint8 images against the FID job's reference (same extractor, statistics,
    metrics and protocol record)."""

    def __init__(self, cfg: Config, tokenizer, device, log=print):
        from enat.eval.fidelity import build_extractor
        from enat.eval.job import reference_spec, reference_stats

        self.cfg = cfg
        self.spec = reference_spec(cfg)
        self.extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights, device)
        self.ref = reference_stats(cfg, self.spec, self.extractor, tokenizer, log=log)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        from enat.eval.fidelity import extract
        from enat.eval.job import score

        feats = extract(self.extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        return score(self.cfg, {**feats, "labels": labels}, self.ref)

    @property
    def protocol(self) -> dict:
        return {"reference": self.spec["id"], "extractor": self.cfg.eval.extractor,
                "extractor_weights": self.cfg.eval.extractor_weights}


def sample_conditions(cfg: Config, model: nn.Module, indices: np.ndarray, log=print):
    """The FID job's conditions for global sample indices: labels i mod C, or held-out captions
    chosen from counters -> (conditions tensor, labels, condition function for generate_images)."""
    if cfg.model.condition == "text":
        from enat.eval.text import HeldOutCaptions

        held = HeldOutCaptions(cfg, log=log)

        def conditions(idx):
            rows, ks = held.select(idx)
            return held.contexts(rows, ks).float(), held.labels[rows]
    else:
        C = cfg.model.num_classes

        def conditions(idx):
            return torch.from_numpy(idx % C), idx % C
    cond, labels = conditions(np.asarray(indices))
    return cond, labels, conditions


# ---------------------------------------------------------------------------------------------
# One-step decoding
# ---------------------------------------------------------------------------------------------


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
    from tqdm import tqdm

    from enat.images import to_uint8
    from enat.tokenizer import load_tokenizer

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
        for r in tqdm(ratios, desc=f"one-step {subject.name}", unit="ratio", disable=not _progress()):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Quality against inference cost
# ---------------------------------------------------------------------------------------------


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
    from tqdm import tqdm

    from enat.eval.job import generate_images
    from enat.flops import sampling_flops
    from enat.sampling import generate
    from enat.tokenizer import load_tokenizer

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
    for subject, reuse, T, w in tqdm(plan, desc="pareto", unit="point", disable=not _progress()):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = result["points"]
    series = sorted({(p["model"], p["reuse"]) for p in points}, key=lambda s: (s[0], not s[1]))
    markers = ["o", "s", "^", "D", "v", "P"]
    scales = sorted({p["cfg_scale"] for p in points})
    for k, (model, reuse) in enumerate(series):
        color = plt.get_cmap("tab10")(k)
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
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


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

    header, rows, png = write_analysis(what, result, output_dir(run_dir, checkpoint, out), log=log)
    _log_wandb(cfg, run_dir, what.replace("-", "_"), header, rows, png, subjects[0].step)
    return result


def write_analysis(what: str, result: dict, folder: Path, log=print) -> tuple[list[str], list[list], Path]:
    """FOLDER/NAME.json (the record), .md (the table) and .png (the figure)."""
    table, figure = ANALYSES[what]
    name = what.replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table(result)
    md = markdown(header, rows)
    files = {"json": folder / f"{name}.json", "md": folder / f"{name}.md", "png": folder / f"{name}.png"}
    figure(result, files["png"])
    files["md"].write_text(md)
    result["files"] = {k: str(v) for k, v in files.items()}
    tmp = files["json"].with_name(files["json"].name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(files["json"])
    log(md + f"wrote {files['json']}, {files['md'].name}, {files['png'].name} "
             f"({result['wall_time_s']:.0f} s)")
    return header, rows, files["png"]


# What pareto records merged from several jobs must share: points measured otherwise do not compare.
# img/s compares only on one kind of machine: "device" too.
PARETO_PROTOCOL = ("num_samples", "grid", "reference", "extractor", "extractor_weights", "weights", "device")


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
    write_analysis("pareto", result, Path(out), log=log)
    return result


def _log_wandb(cfg: Config, run_dir: Path | None, name: str, header: list[str], rows: list[list], png: Path,
               step: int) -> None:
    """The table and the figure into the training run's wandb run, under analysis/NAME."""
    from enat.eval.job import training_wandb_run

    with training_wandb_run(cfg, run_dir) as run:
        if run is None:
            return
        import wandb

        run.log({f"analysis/{name}": wandb.Table(columns=header, data=[[str(c) for c in r] for r in rows]),
                 f"analysis/{name}_figure": wandb.Image(str(png)), "analysis/checkpoint_step": step})
