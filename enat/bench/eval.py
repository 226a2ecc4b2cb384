"""Evaluation pipeline throughput: images/s of sampling + decoding + feature extraction, and the
fraction of time in each, for a config (default: the embedded demo) and a weights file (default:
a random-init model of the config; speed does not depend on the weights)."""

from __future__ import annotations

import time

import numpy as np
import torch

from enat.config import load_config
from enat.eval.fidelity import build_extractor, extract
from enat.eval.job import generate_images
from enat.models import build_model
from enat.models.weights import load_model
from enat.tokenizer import load_tokenizer


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/experiments/demo.yaml")
    p.add_argument("--checkpoint", help="enat-weights file (default: random init)")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--json", action="store_true", help="the result as one JSON object alone on stdout "
                   "(the table to stderr)")
    p.add_argument("overrides", nargs="*")


def run(args) -> dict:
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = (load_model(args.checkpoint) if args.checkpoint else build_model(cfg.model).eval()).to(device)
    tokenizer = load_tokenizer(cfg.tokenizer).to(device)
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights, device)
    timings: dict = {}
    generate_images(model, tokenizer, cfg, np.arange(min(cfg.eval.batch_size, args.num_samples)))  # warm-up
    images, _ = generate_images(model, tokenizer, cfg, np.arange(args.num_samples), timings=timings)
    t0 = time.perf_counter()
    extract(extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    timings["features"] = time.perf_counter() - t0
    total = sum(timings.values())
    result = {"images_per_s": args.num_samples / total, "num_samples": args.num_samples, "device": str(device),
              "seconds": timings, "fractions": {k: v / total for k, v in timings.items()},
              "model": cfg.model.size, "steps": cfg.sample.steps, "extractor": cfg.eval.extractor}
    print(f"eval pipeline: {args.num_samples} samples, ENAT-{cfg.model.size} {cfg.sample.steps} steps, "
          f"{cfg.eval.extractor}, {device}")
    print(f"{'phase':<10}{'seconds':>10}{'fraction':>10}")
    for k, v in timings.items():
        print(f"{k:<10}{v:>10.2f}{v / total:>10.1%}")
    print(f"total: {result['images_per_s']:.1f} images/s")
    return result
