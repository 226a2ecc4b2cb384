"""The iterative decoder (MaskGIT schedule, as the released ENAT code runs it).

Step s = 0..T-1 with r = (s+1)/T:
  - the network predicts every [MASK] token; with CFG the guided logits are
    cond + w_s (cond - uncond), w_s = cfg_scale * s / T (0 at the first step), then log-softmax;
  - a token is drawn at each masked position at temperature max(samp_temp (1-r), 1e-3)
    (argmax when greedy);
  - confidence = log-prob of the drawn token + mask_temp (1-r) * Gumbel noise; visible positions
    get +inf and are never re-masked;
  - the floor(N cos(pi/2 r)) lowest-confidence positions are masked again.
Step 0 runs ENAT in full mode; later steps in reuse mode, each branch (conditional,
unconditional) with its own previous output. Both branches run as one batch.

Every sample's noise comes from a generator seeded by (seed, sample index), so a sample is the
same whatever the batch it is drawn in, and however many ranks share the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from enat.config import SampleConfig
from enat.rng import generator


def masked_after_step(seq_len: int, steps: int, step: int) -> int:
    """Number of [MASK] tokens left after `step` (0-based): floor(N cos(pi/2 (s+1)/T)).
    float64 cosine, as the released code (np.cos), so the counts match it exactly."""
    return math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / steps))


def mask_schedule(seq_len: int, steps: int) -> list[int]:
    """[MASK] count at the start of each step: [N, m_0, ..., m_{T-2}]."""
    return [seq_len] + [masked_after_step(seq_len, steps, s) for s in range(steps - 1)]


@dataclass
class StepTrace:
    """What one step did, for tests and debugging."""

    input_ids: torch.Tensor  # (B, N) ids fed to the network
    ids: torch.Tensor  # (B, N) ids after the step, [MASK] where re-masked
    confidence: torch.Tensor  # (B, N) the ranked value; +inf at positions visible before the step
    cfg_scale: float


def _noise(indices: torch.Tensor, seed: int, steps: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniforms for token draws and Gumbel noise: two (B, steps, N) float64 tensors."""
    u_tok, u_gumbel = [], []
    for i in indices.tolist():
        g = generator(seed, "sample", i)
        u = torch.rand(2, steps, seq_len, generator=g, dtype=torch.float64)
        u_tok.append(u[0])
        u_gumbel.append(u[1])
    return torch.stack(u_tok), torch.stack(u_gumbel)


def _draw(logprobs: torch.Tensor, temp: float, u: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Categorical draw by inverse CDF with one given uniform per position: (..., V) -> (...)."""
    if greedy:
        return logprobs.argmax(dim=-1)
    cdf = torch.softmax(logprobs.double() / temp, dim=-1).cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=logprobs.shape[-1] - 1)


@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, cfg: SampleConfig, indices: torch.Tensor | None = None,
             trace: list[StepTrace] | None = None) -> torch.Tensor:
    """Sample token ids (B, N) for class `labels` (B,). `indices` are the samples' global indices
    (default 0..B-1): they, with cfg.seed, fix each sample's noise."""
    mcfg = model.cfg
    if cfg.reuse and not model.supports_reuse:
        raise ValueError(f"{type(model).__name__} has no reuse mode; sample with reuse=False")
    device = next(model.parameters()).device
    B, N, T = labels.shape[0], mcfg.seq_len, cfg.steps
    labels = labels.to(device)
    indices = torch.arange(B) if indices is None else indices.cpu()
    if indices.shape != (B,):
        raise ValueError(f"indices must have shape ({B},), got {tuple(indices.shape)}")
    u_tok, u_gumbel = (u.to(device) for u in _noise(indices, cfg.seed, T, N))
    guided = cfg.cfg_scale != 0
    branch_labels = torch.cat([labels, torch.full_like(labels, mcfg.null_class)]) if guided else labels

    ids = torch.full((B, N), mcfg.mask_id, dtype=torch.long, device=device)
    state = None
    for s in range(T):
        r = (s + 1) / T
        w = cfg.cfg_scale * s / T
        mask = ids == mcfg.mask_id
        M = int(mask[0].sum())
        pos = mask.nonzero()[:, 1].view(B, M)  # masked positions, ascending per row

        branch_ids = torch.cat([ids, ids]) if guided else ids
        out = model(branch_ids, branch_labels, prev=state if cfg.reuse else None, logits="masked")
        state = out
        logits = out.logits.float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = cond + w * (cond - uncond)
        logprobs = torch.log_softmax(logits, dim=-1)  # (B, M, V)

        temp = max(cfg.samp_temp * (1 - r), 1e-3)
        tokens = _draw(logprobs, temp, u_tok[:, s].gather(1, pos), cfg.greedy)
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
        gumbel = -torch.log(-torch.log(u_gumbel[:, s].gather(1, pos).clamp(1e-300, 1 - 1e-16)))
        conf_masked = chosen + cfg.mask_temp * (1 - r) * gumbel

        sampled = ids.scatter(1, pos, tokens)
        confidence = torch.full((B, N), math.inf, dtype=torch.float64, device=device).scatter(1, pos, conf_masked)
        remask = confidence.argsort(dim=-1)[:, :masked_after_step(N, T, s)]
        new_ids = sampled.scatter(1, remask, mcfg.mask_id)
        if trace is not None:
            trace.append(StepTrace(ids.cpu(), new_ids.cpu(), confidence.float().cpu(), w))
        ids = new_ids
    return ids


def generate_all(model: nn.Module, labels: torch.Tensor, cfg: SampleConfig, first_index: int = 0,
                 progress: bool = False) -> torch.Tensor:
    """generate() over any number of labels in batches of cfg.batch_size; sample k gets global
    index first_index + k."""
    from tqdm import tqdm

    out = []
    starts = range(0, labels.shape[0], cfg.batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        chunk = labels[start:start + cfg.batch_size]
        idx = torch.arange(first_index + start, first_index + start + chunk.shape[0])
        out.append(generate(model, chunk, cfg, indices=idx).cpu())
    return torch.cat(out) if out else torch.empty(0, model.cfg.seq_len, dtype=torch.long)
