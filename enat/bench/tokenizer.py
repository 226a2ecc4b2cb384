"""Tokenizer speed: images/s of the VQGAN's encode (images -> token ids, what `enat tokenize`
does to a dataset) and decode (ids -> images, what every sample grid and FID job does), at the
config's resolution, with random weights (speed does not depend on them). --json puts the result
alone on stdout as one JSON object (the table to stderr).

    python -m enat.bench tokenizer [--config configs/experiments/imagenet256_B.yaml] [--batch 64]
"""

from __future__ import annotations


import torch

from enat.bench import median_seconds
from enat.config import load_config
from enat.tokenizer import build_tokenizer


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/tokenizer/vq_f16.yaml",
                   help="a config with a tokenizer section (default: the released f16 VQGAN at 256 px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed batches per direction (median reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: under bf16 autocast (the tokenize job runs float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="the result as one JSON object alone on stdout "
                   "(the table to stderr)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. tokenizer.resolution=512")


def run(args) -> dict:
    cfg = load_config(args.config, args.overrides).tokenizer
    device = torch.device(args.device)
    torch.manual_seed(0)
    vq = build_tokenizer(cfg).to(device).eval()
    images = torch.rand(args.batch, 3, cfg.resolution, cfg.resolution, device=device)
    ids = torch.randint(0, cfg.codebook_size, (args.batch, cfg.grid_size, cfg.grid_size), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def encode():
        with autocast:
            return vq.encode(images)

    def decode():
        with torch.no_grad(), autocast:
            return vq.decode(ids)

    seconds = {"encode": median_seconds(encode, device, args.repeats), "decode": median_seconds(decode, device, args.repeats)}
    result = {"resolution": cfg.resolution, "grid_size": cfg.grid_size, "downsample": cfg.downsample,
              "codebook_size": cfg.codebook_size, "params": sum(p.numel() for p in vq.parameters()),
              "batch": args.batch, "dtype": args.dtype, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(),
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
              "seconds_per_batch": seconds, "images_per_s": {k: args.batch / v for k, v in seconds.items()}}
    print(f"tokenizer benchmark: VQGAN f{cfg.downsample} ({result['params'] / 1e6:.1f}M), {cfg.resolution} px -> "
          f"{cfg.grid_size}x{cfg.grid_size}, batch {args.batch}, {args.dtype}, {result['device_name']}")
    print(f"{'':<8}{'images/s':>10}{'s/batch':>10}")
    for k, v in seconds.items():
        print(f"{k:<8}{args.batch / v:>10.1f}{v:>10.3f}")
    return result
