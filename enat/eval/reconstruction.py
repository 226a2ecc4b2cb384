"""`enat tokenizer eval`: the tokenizer's reconstruction FID, the floor under any generator's
FID on its tokens."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from enat.config import Config
from enat.data.prepare import tokenizer_images
from enat.eval.fidelity import EvalError, build_extractor, extract, metrics
from enat.eval.reference import extractor_mismatch, reference_spec, reference_stats
from enat.files import file_sha256, write_json
from enat.images import to_uint8
from enat.tokenizer import load_tokenizer
from enat.tokenizer.train import reconstruction_stats


def tokenizer_report(cfg: Config, checkpoint: str | None = None, out: str | Path | None = None, log=print) -> dict:
    """`enat tokenizer eval`: how well the tokenizer reconstructs the held-out images: PSNR and the
    reconstruction FID (encode -> decode every reference image, scored against the references
    with the FID job's extractor): the floor under any generator's FID on these tokens. For the
    datasets whose held-out images the project reads itself (fashion_mnist, digits)."""
    if cfg.data.dataset not in ("fashion_mnist", "digits"):
        raise EvalError(f"`enat tokenizer eval` reads the held-out images of fashion_mnist and the digits; "
                        f"data.dataset={cfg.data.dataset}")
    problem = extractor_mismatch(cfg)
    if problem:
        raise EvalError(problem)
    path = checkpoint or cfg.tokenizer.checkpoint
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer, path)
    images = tokenizer_images(cfg, "val")
    spec = reference_spec(cfg)
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights)
    ref = reference_stats(cfg, spec, extractor, tokenizer, log=log)
    rec, recon = reconstruction_stats(tokenizer, images, keep=True)
    u8 = torch.from_numpy(to_uint8(recon)).permute(0, 3, 1, 2).contiguous()
    values = metrics(extract(extractor, u8), ref, cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)
    record = {"tokenizer": str(path), "sha256": file_sha256(path), "codebook_size": cfg.tokenizer.codebook_size,
              "resolution": cfg.tokenizer.resolution, "grid": cfg.tokenizer.grid_size, **rec,
              "reconstruction": values, "reference": spec, "extractor": cfg.eval.extractor,
              "seconds": time.perf_counter() - t0}
    log(f"tokenizer {path}: held-out PSNR {rec['psnr_db']:.2f} dB over {rec['images']} images, "
        f"{rec['codes_used']}/{cfg.tokenizer.codebook_size} codes used; reconstruction FID {values['fid']:.3f} "
        f"({cfg.eval.extractor})")
    if out is not None:
        write_json(Path(out), record)
    return record
