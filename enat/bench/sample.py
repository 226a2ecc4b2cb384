"""Sampling speed: ENAT with reuse, ENAT without reuse and the vanilla NAT of the same width and
depth, in one process on the same labels and seeds. Prints images/s, analytic TFLOPs per image,
and the speed-ups; --json adds one JSON object as the last line."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from enat.config import SampleConfig
from enat.flops import sampling_flops
from enat.models import build_model, model_config
from enat.sampling import generate


def add_arguments(p) -> None:
    p.add_argument("--model", default="S", help="zoo size")
    p.add_argument("--grid-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=2.5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true")


def _time(fn, device, repeats) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = model_config(args.model, grid_size=args.grid_size)
    variants = {
        "ENAT": (cfg, True),
        "ENAT no reuse": (cfg, False),
        "NAT": (dataclasses.replace(cfg, arch="nat"), False),
    }
    labels = torch.arange(args.batch) % cfg.num_classes
    rows = {}
    for name, (mcfg, reuse) in variants.items():
        torch.manual_seed(0)
        model = build_model(mcfg).to(device=device, dtype=dtype).eval()
        sc = SampleConfig(steps=args.steps, cfg_scale=args.cfg_scale, reuse=reuse, batch_size=args.batch)
        seconds = _time(lambda m=model, c=sc: generate(m, labels, c), device, args.repeats)
        flops = sampling_flops(mcfg, args.steps, reuse=reuse, guided=args.cfg_scale != 0).total
        rows[name] = dict(seconds=seconds, images_per_s=args.batch / seconds, tflops_per_image=flops / 1e12,
                          achieved_tflops=flops * args.batch / seconds / 1e12)
        del model
    e, n, v = rows["ENAT"], rows["ENAT no reuse"], rows["NAT"]
    result = {
        "model": args.model, "grid_size": args.grid_size, "batch": args.batch, "steps": args.steps,
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "variants": rows,
        "flops_ratio_vanilla_over_enat": v["tflops_per_image"] / e["tflops_per_image"],
        "flops_ratio_noreuse_over_enat": n["tflops_per_image"] / e["tflops_per_image"],
        "wall_ratio_vanilla_over_enat": v["seconds"] / e["seconds"],
        "wall_ratio_noreuse_over_enat": n["seconds"] / e["seconds"],
    }
    result["wall_over_flops_speedup_vanilla"] = (result["wall_ratio_vanilla_over_enat"]
                                                 / result["flops_ratio_vanilla_over_enat"])
    print(f"sampling benchmark: {args.model} grid {args.grid_size}x{args.grid_size}, batch {args.batch}, "
          f"{args.steps} steps, CFG {args.cfg_scale}, {device} {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'variant':<15}{'images/s':>10}{'s/batch':>10}{'TFLOPs/img':>12}{'TFLOP/s':>10}")
    for name, r in rows.items():
        print(f"{name:<15}{r['images_per_s']:>10.2f}{r['seconds']:>10.3f}{r['tflops_per_image']:>12.4f}"
              f"{r['achieved_tflops']:>10.3f}")
    print(f"NAT / ENAT:           FLOPs {result['flops_ratio_vanilla_over_enat']:.2f}x, "
          f"wall-clock {result['wall_ratio_vanilla_over_enat']:.2f}x "
          f"({100 * result['wall_over_flops_speedup_vanilla']:.0f}% of the FLOPs speed-up)")
    print(f"ENAT no reuse / ENAT: FLOPs {result['flops_ratio_noreuse_over_enat']:.2f}x, "
          f"wall-clock {result['wall_ratio_noreuse_over_enat']:.2f}x")
    if args.json:
        print(json.dumps(result))
    return result

