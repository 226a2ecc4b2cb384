"""Train a small VQGAN on the embedded demo data, so the default path needs no download.

Reconstruction (L1 + L2) plus the VQ codebook and commitment losses; no perceptual or GAN terms
(they need pretrained networks). The codebook starts from encoder outputs and codes unused for
`dead_code_every` steps are re-seeded from random encoder outputs, which keeps a small codebook
in use. Deterministic for a given seed on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from enat.config import Config
from enat.models.weights import torch_save_atomic
from enat.tokenizer.vqgan import VQGAN

FORMAT = "enat-tokenizer"


def save_tokenizer(path: str | Path, model: VQGAN, meta: dict) -> None:
    """Official key layout inside {'state_dict': ...}, so load_tokenizer (and the official
    loader) read it; the config and provenance ride along."""
    cfg = dataclasses.asdict(model.cfg)
    cfg.pop("train")
    obj = {"format": FORMAT, "tokenizer_config": cfg, "meta": meta,
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    torch_save_atomic(obj, path)


def _sample_latents(z: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return flat[torch.randint(0, flat.shape[0], (n,), generator=g)]


def reconstruction_stats(model: VQGAN, images: torch.Tensor, batch_size: int = 256, keep: bool = False):
    """MSE and PSNR (dB, peak 1, of the mean MSE) of encode -> decode, and the codes used;
    with `keep`, also the reconstructions (clamped to [0, 1])."""
    model.eval()
    se, used, kept = 0.0, torch.zeros(model.cfg.codebook_size, dtype=torch.bool), []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            ids = model.encode(chunk)
            used[ids.unique()] = True
            recon = model.decode(ids).clamp(0, 1)
            se += F.mse_loss(recon, chunk, reduction="sum").item()
            if keep:
                kept.append(recon)
    mse = se / images.numel()
    stats = {"recon_mse": mse, "psnr_db": 10 * math.log10(1 / mse), "codes_used": int(used.sum()),
             "images": int(images.shape[0])}
    return (stats, torch.cat(kept)) if keep else stats


def train_tokenizer(cfg: Config, images: torch.Tensor, out: str | Path, log=print, progress: bool | None = None,
                    val_images: torch.Tensor | None = None) -> dict:
    """Train on `images` (n, 3, R, R) in [0, 1]; write the tokenizer file; return final stats:
    reconstruction on (at most 4,096 of) the training images, and on `val_images` when given."""
    tcfg = cfg.tokenizer
    t = tcfg.train
    if images.shape[-1] != tcfg.resolution:
        raise ValueError(f"images are {images.shape[-1]} px but tokenizer.resolution is {tcfg.resolution}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = VQGAN(tcfg)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, t.steps) / t.steps)))
    with torch.no_grad():  # codebook from encoder outputs instead of a near-zero uniform init
        first = images[torch.randperm(images.shape[0], generator=g)[: t.batch_size]]
        model.quantize.embedding.weight.copy_(_sample_latents(model.encoder(first), tcfg.codebook_size, g))
    usage = torch.zeros(tcfg.codebook_size)
    stats = {}
    t0 = time.time()
    bar = tqdm(total=t.steps, desc="tokenizer", unit="step", disable=not (sys.stderr.isatty() if progress is None else progress))
    for step in range(t.steps):
        batch = images[torch.randint(0, images.shape[0], (t.batch_size,), generator=g)]
        out_ = model(batch)
        rec = F.l1_loss(out_["recon"], batch) + F.mse_loss(out_["recon"], batch)
        codebook = F.mse_loss(out_["zq"], out_["z"].detach())
        commit = F.mse_loss(out_["z"], out_["zq"].detach())
        loss = rec + codebook + t.commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(out_["ids"].flatten(), minlength=tcfg.codebook_size)
        bar.update(1)
        if (step + 1) % t.dead_code_every == 0 and step + 1 < t.steps:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = _sample_latents(out_["z"], len(dead), g)
            usage.zero_()
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            stats = {"step": step + 1, "loss": loss.item(), "recon": rec.item(), "codebook": codebook.item(),
                     "commit": commit.item(), "seconds": time.time() - t0}
            log(f"tokenizer step {step + 1}/{t.steps}: loss {loss.item():.4f} recon {rec.item():.4f} "
                f"codebook {codebook.item():.4f} ({time.time() - t0:.0f}s)")
    bar.close()
    train_rec = reconstruction_stats(model, images[:4096])
    stats.update(recon_mse=train_rec["recon_mse"], codes_used=train_rec["codes_used"])
    if val_images is not None:
        stats["val"] = reconstruction_stats(model, val_images)
    save_tokenizer(out, model, {"stats": stats, "seed": cfg.seed, "num_images": int(images.shape[0])})
    held = (f"; held-out PSNR {stats['val']['psnr_db']:.2f} dB on {stats['val']['images']} images"
            if val_images is not None else "")
    log(f"wrote {out}: reconstruction MSE {stats['recon_mse']:.5f}, {stats['codes_used']}/{tcfg.codebook_size} "
        f"codes used{held}")
    return stats
