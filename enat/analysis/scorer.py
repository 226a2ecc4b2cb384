"""Scoring images with the FID job's machinery (extractor, reference statistics, metrics), and the
conditions of sample indices (class-balanced labels or held-out captions)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from enat.config import Config
from enat.eval.fidelity import build_extractor, extract
from enat.eval.captions import HeldOutCaptions
from enat.eval.job import score
from enat.eval.reference import reference_spec, reference_stats


class Scorer:
    """FID & co. of uint8 images against the FID job's reference (same extractor, statistics,
    metrics and protocol record)."""

    def __init__(self, cfg: Config, tokenizer, device, log=print):
        self.cfg = cfg
        self.spec = reference_spec(cfg)
        self.extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights, device)
        self.ref = reference_stats(cfg, self.spec, self.extractor, tokenizer, log=log)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
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
