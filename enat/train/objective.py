"""The ENAT training objective, with every random decision derived from counters.

Per step (identical on every rank, so every rank runs the same graph under ZeRO):
  - the mask ratio r ~ Beta(12, 3); [MASK] count M = round(N r) clamped to [1, N-1];
  - whether the step runs in reuse mode (probability 0.5, ENAT only);
  - the re-mask fraction u ~ U(0, 1) of a reuse-mode step.
Per sample (from the sample's key, so the same whatever rank or batch reads it): a random key per
position; the M lowest keys are masked. A reuse-mode step masks the next q = max(1, round(u (N-M)))
positions too, runs the EMA model on that "previous" input without gradient to get z_prev, and
trains the online model in reuse mode on the current input. Loss: cross-entropy with label
smoothing on the masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from enat.config import ModelConfig, TrainConfig
from enat.flops import masked_count
from enat.rng import derive_seed, hash_uniform


@dataclass
class StepPlan:
    step: int
    mask_ratio: float
    masked: int  # M
    reuse: bool
    remasked: int  # q, re-masked for the previous input of a reuse step (0 otherwise)


def plan_step(step: int, seed: int, model_cfg: ModelConfig, train_cfg: TrainConfig) -> StepPlan:
    rng = np.random.default_rng(derive_seed(seed, "step", step))
    a, b = train_cfg.mask_beta
    ratio = float(rng.beta(a, b))
    reuse = model_cfg.arch == "enat" and bool(rng.random() < train_cfg.reuse_prob)
    u = float(rng.random())
    N = model_cfg.seq_len
    M = masked_count(N, ratio)
    q = max(1, round(u * (N - M))) if reuse else 0
    return StepPlan(step, ratio, M, reuse, q)


def position_order(uid: torch.Tensor, step: int, seed: int, seq_len: int) -> torch.Tensor:
    """(B, N) positions of each sample sorted by a per-(seed, step, sample, position) key."""
    keys = hash_uniform(seed, 0x3A5C, step, uid.cpu().numpy()[:, None], np.arange(seq_len))
    return torch.from_numpy(np.argsort(keys, axis=1, kind="stable")).to(uid.device)


def mask_by_order(tokens: torch.Tensor, order: torch.Tensor, count: int, mask_id: int) -> torch.Tensor:
    return tokens.scatter(1, order[:, :count], mask_id)


def compute_loss(model, ema_model, tokens: torch.Tensor, labels: torch.Tensor, uid: torch.Tensor,
                 plan: StepPlan, seed: int, model_cfg: ModelConfig, label_smoothing: float) -> torch.Tensor:
    """One micro-batch's loss. `model` may be a DeepSpeed engine (called like the module)."""
    order = position_order(uid, plan.step, seed, model_cfg.seq_len)
    ids = mask_by_order(tokens, order, plan.masked, model_cfg.mask_id)
    prev = None
    if plan.reuse:
        prev_ids = mask_by_order(tokens, order, plan.masked + plan.remasked, model_cfg.mask_id)
        with torch.no_grad():
            prev = ema_model(prev_ids, labels, logits="none")
    out = model(ids, labels, prev=prev, logits="masked")
    targets = tokens[ids == model_cfg.mask_id].view(tokens.shape[0], -1)
    return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), label_smoothing=label_smoothing)


def validation_ids(tokens: torch.Tensor, uid: torch.Tensor, ratio: float, seed: int, mask_id: int) -> torch.Tensor:
    """Fixed masking of held-out sequences at a given ratio: the same positions at every evaluation."""
    order = position_order(uid, 0, derive_seed(seed, "validation") % (1 << 62), tokens.shape[1])
    return mask_by_order(tokens, order, masked_count(tokens.shape[1], ratio), mask_id)
