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

The decoding loop never reads the device: the [MASK] count of every step is known from the
schedule and handed to the network (`num_masked`), masked positions come back from the network's
output as index tensors, and ranking and revealing are sorts, gathers and scatters. The noise is
drawn on the host once, before the loop, and copied to the device in one transfer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

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


def _noise(indices: torch.Tensor, seed: int, steps: int, seq_len: int, pin: bool = False) -> torch.Tensor:
    """Per-sample noise, (B, 2, steps, N) float64: [:, 0] the uniforms of the token draws, [:, 1]
    the standard Gumbel noise of the confidences, -log(-log(u)).

    Each sample's block is drawn by its own generator and transformed on its own (the same
    elementwise kernel over the same (steps, N) layout), so a sample's noise is bit-identical
    whatever the batch it is drawn in and whatever device the sampler runs on. `pin` allocates the
    buffer in page-locked memory, for one asynchronous copy to a GPU."""
    out = torch.empty((indices.shape[0], 2, steps, seq_len), dtype=torch.float64, pin_memory=pin)
    for row, i in zip(out, indices.numpy().tolist()):  # host data: reading it waits for no device
        torch.rand(row.shape, generator=generator(seed, "sample", i), dtype=torch.float64, out=row)
        gumbel = row[1]
        gumbel.clamp_(1e-300, 1 - 1e-16).log_().neg_().log_().neg_()
    return out


def _draw(logprobs: torch.Tensor, temp: float, u: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Categorical draw by inverse CDF with one given uniform per position: (..., V) -> (...)."""
    if greedy:
        return logprobs.argmax(dim=-1)
    cdf = torch.softmax(logprobs.double().div_(temp), dim=-1).cumsum_(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze_(-1)).squeeze_(-1)
    return idx.clamp_(max=logprobs.shape[-1] - 1)


def _forward(model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, prev, num_masked: int):
    """One network call of the sampler (the function compile=True compiles)."""
    return model(ids, cond, prev=prev, logits="masked", num_masked=num_masked)


# Compiled _forward per backend. The model is an argument, not a closure: its parameters are
# graph inputs, so one compiled graph serves every model of the same shapes (the EMA and the online
# model of a run), and the cache keeps no model alive.
_COMPILED: dict = {}


def compiled_forward(backend: str | Callable = "inductor") -> Callable:
    """The sampler's network call compiled with `backend`, built once per backend. Shapes are
    dynamic from the first call, so the [MASK] count changing every step does not recompile.
    Dynamo still specializes sizes 0 and 1, which gives 3 graphs for a reuse-mode run (step 0, no
    visible token; step 1, no previously visible token; the rest) and 2 without reuse (step 0; the
    rest), whatever the number of steps, the batch size (> 1) or the model's weights; a step that
    reveals exactly one token adds one (64 tokens in 12 steps, say; not 256 in 8)."""
    fn = _COMPILED.get(backend)
    if fn is None:
        fn = _COMPILED[backend] = torch.compile(_forward, backend=backend, dynamic=True)
    return fn


@torch.no_grad()
def generate(model: nn.Module, cond: torch.Tensor, cfg: SampleConfig, indices: torch.Tensor | None = None,
             trace: list[StepTrace] | None = None, autocast_dtype: torch.dtype | None = None,
             compile: bool | str | Callable = False) -> torch.Tensor:
    """Sample token ids (B, N) for the condition `cond`: class labels (B,), or caption contexts
    (B, L, C) for a text-conditioned model (CFG's unconditional branch then runs on the model's
    null context, the encoding of ''). `indices` are the samples' global indices
    (default 0..B-1): they, with cfg.seed, fix each sample's noise.

    autocast_dtype: run the network under torch.autocast with this dtype (bfloat16: the matmuls
    in bf16); logits are upcast to float32 before guidance, log-softmax and the draw, as without.
    Default: cfg.dtype (float32: no autocast).
    compile: run the network through torch.compile (True: inductor; a string or callable names
    the backend), compiled once per backend and reused across calls (see compiled_forward).
    Default: cfg.compile.
    trace: collect a StepTrace per step (copies to the host: syncs, for tests only)."""
    mcfg = model.cfg
    if autocast_dtype is None and cfg.dtype != "float32":
        autocast_dtype = getattr(torch, cfg.dtype)
    compile = compile or cfg.compile
    if cfg.reuse and not model.supports_reuse:
        raise ValueError(f"{type(model).__name__} has no reuse mode; sample with reuse=False")
    device = next(model.parameters()).device
    B, N, T = cond.shape[0], mcfg.seq_len, cfg.steps
    indices = torch.arange(B) if indices is None else indices.cpu()
    if indices.shape != (B,):
        raise ValueError(f"indices must have shape ({B},), got {tuple(indices.shape)}")
    cuda = device.type == "cuda"
    noise = _noise(indices, cfg.seed, T, N, pin=cuda).to(device, non_blocking=cuda)
    cond = cond.to(device, non_blocking=cuda)
    guided = cfg.cfg_scale != 0
    branch_cond = torch.cat([cond, model.null_condition(cond)]) if guided else cond
    forward = _forward if not compile else compiled_forward("inductor" if compile is True else compile)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    # Everything a step needs to know in advance is a Python number: no step reads the device.
    num_masked = mask_schedule(N, T)
    ids = torch.full((B, N), mcfg.mask_id, dtype=torch.long, device=device)
    state = None
    for s in range(T):
        r = (s + 1) / T
        w = cfg.cfg_scale * s / T
        M, keep = num_masked[s], masked_after_step(N, T, s)

        with autocast:
            out = forward(model, torch.cat([ids, ids]) if guided else ids, branch_cond,
                          state if cfg.reuse else None, M)
        state = out
        pos = out.masked_positions[:B]  # (B, M) ascending; both branches hold the same ids
        logits = out.logits.float()
        if guided:
            cond, uncond = logits.chunk(2)
            # cond + w (cond - uncond), in place (bit-identical); at w = 0 it is cond itself
            logits = torch.sub(cond, uncond).mul_(w).add_(cond) if w != 0 else cond
        logprobs = torch.log_softmax(logits, dim=-1)  # (B, M, V)

        u = noise[:, :, s].gather(2, pos.unsqueeze(1).expand(B, 2, M))  # (B, 2, M) at masked positions
        temp = max(cfg.samp_temp * (1 - r), 1e-3)
        tokens = _draw(logprobs, temp, u[:, 0], cfg.greedy)
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze_(-1).double()
        conf_masked = u[:, 1].mul_(cfg.mask_temp * (1 - r)).add_(chosen)  # chosen + scale * gumbel

        # Re-mask the `keep` least confident masked positions (visible ones rank +inf: never);
        # a stable sort breaks ties by position.
        if keep > 0:
            lowest = conf_masked.argsort(dim=-1, stable=True)[:, :keep]
            tokens = tokens.scatter(1, lowest, mcfg.mask_id)
        new_ids = ids.scatter(1, pos, tokens)
        if trace is not None:
            confidence = torch.full((B, N), math.inf, dtype=torch.float64, device=device).scatter_(1, pos, conf_masked)
            trace.append(StepTrace(ids.cpu(), new_ids.cpu(), confidence.float().cpu(), w))
        ids = new_ids
    return ids


def generate_all(model: nn.Module, cond: torch.Tensor, cfg: SampleConfig, first_index: int = 0,
                 progress: bool = False, **kwargs) -> torch.Tensor:
    """generate() over any number of conditions (labels or contexts) in batches of
    cfg.batch_size; sample k gets global index first_index + k. kwargs go to generate
    (autocast_dtype, compile)."""
    out = []
    starts = range(0, cond.shape[0], cfg.batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        chunk = cond[start:start + cfg.batch_size]
        idx = torch.arange(first_index + start, first_index + start + chunk.shape[0])
        out.append(generate(model, chunk, cfg, indices=idx, **kwargs).cpu())
    return torch.cat(out) if out else torch.empty(0, model.cfg.seq_len, dtype=torch.long)
