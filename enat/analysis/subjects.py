"""What every analysis reads: the checkpoints it compares (`Subject`s on one interface: tokens,
classes, captions) and held-out token maps masked by counters."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from enat.config import Config, ModelConfig
from enat.data.loader import ShardSet
from enat.eval.fidelity import EvalError
from enat.eval.captions import HeldOutCaptions
from enat.eval.load import load_checkpoint
from enat.rng import generator


def show_progress() -> bool:
    return sys.stderr.isatty()


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
            HeldOutCaptions(cfg, log=log).check_model(s.model)  # captions encoded by the model's encoder
    return subjects


def held_out_maps(cfg: Config, n: int | None, log=print) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n held-out token maps (data.val_shards), chosen by a permutation seeded by eval.seed ->
    (ids (n, N) int64, conditions: labels (n,) or caption contexts (n, L, C) (each map's first
    caption), row numbers)."""
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
        cond = HeldOutCaptions(cfg, data=data, log=log).contexts(rows, np.zeros(len(rows), np.int64)).float()
    else:
        cond = torch.from_numpy(np.asarray(data.label, dtype=np.int64)[rows])
    return ids, cond, rows


def mask_positions(rows: np.ndarray, N: int, M: int, seed: int) -> torch.Tensor:
    """(n, M) positions to mask in each map: the first M of a permutation drawn from (seed, row), so
    a higher ratio masks a superset and every model and run sees the same masks."""
    if M == 0:
        return torch.zeros(len(rows), 0, dtype=torch.long)
    return torch.stack([torch.randperm(N, generator=generator(seed, "analysis-mask", int(r)))[:M] for r in rows])


def masked_count(N: int, ratio: float) -> int:
    if not 0 <= ratio <= 1:
        raise EvalError(f"mask ratios lie in [0, 1], got {ratio}")
    return round(N * ratio)
