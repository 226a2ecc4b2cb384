"""The ENAT training objective, with every random decision derived from counters.

Per step (`plan_step`):
  - the mask ratio r ~ Beta(12, 3); [MASK] count M = round(N r) clamped to [1, N-1];
  - whether the step runs in reuse mode (probability 0.5, ENAT only);
  - the re-mask fraction u ~ U(0, 1) of a reuse-mode step.
The reuse coin is drawn once per global step, so every rank runs the same modules (ZeRO-3 gathers
each module's parameters collectively: a module used on one rank only would deadlock). Mask ratio
and re-mask fraction are drawn once per global step (`train.plan_draws=global`) or once per rank
(`per_rank`, as the released code), which only changes tensor sizes, never the modules that run.
Per sample (`mask_order`, from the sample's key, so the same whatever rank or batch reads it): a
random key per position; the M lowest keys are masked. A reuse-mode step masks the next
q = max(1, round(u (N-M))) positions too, runs the EMA model on that "previous" input without
gradient to get z_prev, and trains the online model in reuse mode on the current input. Loss:
cross-entropy with label smoothing on the masked positions.

The order is computed on the host with the batch (the loader's workers) and reaches the device as
an index tensor; `compute_loss` then needs no value from the device: no host sync, one graph.
"""

from __future__ import annotations

import contextlib
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


def plan_step(step: int, seed: int, model_cfg: ModelConfig, train_cfg: TrainConfig, rank: int = 0) -> StepPlan:
    rng = np.random.default_rng(derive_seed(seed, "step", step))
    a, b = train_cfg.mask_beta
    ratio = float(rng.beta(a, b))
    reuse = model_cfg.arch == "enat" and bool(rng.random() < train_cfg.reuse_prob)
    u = float(rng.random())
    if train_cfg.plan_draws == "per_rank":
        own = np.random.default_rng(derive_seed(seed, "step", step, "rank", rank))
        ratio, u = float(own.beta(a, b)), float(own.random())
    N = model_cfg.seq_len
    M = masked_count(N, ratio)
    q = max(1, round(u * (N - M))) if reuse else 0
    if reuse and train_cfg.plan_draws == "per_rank":
        # Counts differ by rank, so keep every part of every pass non-empty: the previous input
        # keeps a visible token and the current one a new token. Else one rank would skip the EMA
        # encoder (no token to encode) while others run it, and ZeRO-3's collective gathers of the
        # sharded weights would pair up wrongly across ranks.
        M = min(M, N - 2)
        q = min(q, N - M - 1)
    return StepPlan(step, ratio, M, reuse, q)


def mask_order(uid: np.ndarray, step: int, seed: int, seq_len: int) -> np.ndarray:
    """(B, N) int64 positions of each sample sorted by a per-(seed, step, sample, position) key:
    the first M are masked at mask count M."""
    keys = hash_uniform(seed, 0x3A5C, step, np.asarray(uid)[:, None], np.arange(seq_len))
    return np.argsort(keys, axis=1, kind="stable")


class MaskOrder:
    """The loader's per-batch transform: adds `order` (mask_order at the batch's step). Batch j of
    a rank belongs to step j // grad_accum. Picklable, so DataLoader workers run it."""

    def __init__(self, seed: int, seq_len: int, grad_accum: int):
        self.seed, self.seq_len, self.grad_accum = seed, seq_len, grad_accum

    def __call__(self, batch: dict, micro_batch_index: int) -> dict:
        step = micro_batch_index // self.grad_accum
        batch["order"] = torch.from_numpy(mask_order(batch["uid"].numpy(), step, self.seed, self.seq_len))
        return batch


def mask_at(tokens: torch.Tensor, positions: torch.Tensor, mask_id: int) -> torch.Tensor:
    return tokens.scatter(1, positions, mask_id)


def compute_loss(model, ema_model, tokens: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                 remasked: torch.Tensor | None, mask_id: int, label_smoothing: float,
                 prev_autocast: torch.dtype | None = None) -> torch.Tensor:
    """One micro-batch's loss. masked: (B, M) positions to mask (a prefix of the mask order);
    remasked: (B, q) the next q positions, masked too in the previous input of a reuse step
    (None: a full-mode step). `model` may be a DeepSpeed engine (called like the module);
    `prev_autocast` runs the no-grad z_prev pass of an fp32 EMA in the training precision.
    Counts come from the index shapes: nothing here reads the device."""
    ids = mask_at(tokens, masked, mask_id)
    M = masked.shape[1]
    prev = None
    if remasked is not None:
        prev_ids = mask_at(ids, remasked, mask_id)
        amp = (torch.autocast(tokens.device.type, dtype=prev_autocast) if prev_autocast is not None
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            prev = ema_model(prev_ids, labels, logits="none", num_masked=M + remasked.shape[1])
    out = model(ids, labels, prev=prev, logits="masked", num_masked=M)
    targets = tokens.gather(1, out.masked_positions)  # ascending positions, the rows of the logits
    return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), label_smoothing=label_smoothing)


def validation_order(uid: torch.Tensor, seed: int, seq_len: int) -> torch.Tensor:
    """Fixed mask order of held-out sequences: the same positions at every evaluation."""
    return torch.from_numpy(mask_order(uid.cpu().numpy(), 0, derive_seed(seed, "validation") % (1 << 62), seq_len))
