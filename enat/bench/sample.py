"""Sampling speed: ENAT with reuse, ENAT without reuse and the vanilla NAT of the same width and
depth, in one process on the same labels and seeds. Prints images/s, analytic TFLOPs per image,
the speed-ups and the host syncs per generate() (at the dispatcher, and on a GPU CUDA's own count
by call site); --json puts the result alone on stdout as one JSON object (the table to stderr).

--dtype bfloat16 runs the networks under bf16 autocast (weights stay float32, logits are upcast
before sampling); --compile runs them through torch.compile (compiled in the warm-up call)."""

from __future__ import annotations

import dataclasses

import torch

from enat.bench import median_seconds
from enat.config import SampleConfig
from enat.flops import sampling_flops
from enat.models import build_model, model_config
from enat.profiling import CudaSyncCounter, SyncCounter
from enat.sampling import generate


VARIANTS = ("ENAT", "ENAT no reuse", "NAT")


def add_arguments(p) -> None:
    p.add_argument("--model", default="S", help="zoo size")
    p.add_argument("--grid-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=2.5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: the networks under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (inductor)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="which networks (default all; the ratios need ENAT and the other)")
    p.add_argument("--json", action="store_true", help="the result as one JSON object alone on stdout "
                   "(the table to stderr)")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    cfg = model_config(args.model, grid_size=args.grid_size)
    variants = {
        "ENAT": (cfg, True),
        "ENAT no reuse": (cfg, False),
        "NAT": (dataclasses.replace(cfg, arch="nat"), False),
    }
    variants = {k: v for k, v in variants.items() if k in args.variants}
    labels = torch.arange(args.batch) % cfg.num_classes
    rows = {}
    for name, (mcfg, reuse) in variants.items():
        torch.manual_seed(0)
        model = build_model(mcfg).to(device).eval()
        sc = SampleConfig(steps=args.steps, cfg_scale=args.cfg_scale, reuse=reuse, batch_size=args.batch)

        def sample(m=model, c=sc):
            return generate(m, labels, c, autocast_dtype=autocast_dtype, compile=args.compile)

        seconds = median_seconds(sample, device, args.repeats)
        with SyncCounter() as syncs:  # after the warm-up: compilation is not counted
            sample()
        with CudaSyncCounter() as cuda_syncs:  # no dispatch mode: compiled code counted as it runs
            sample()
        flops = sampling_flops(mcfg, args.steps, reuse=reuse, guided=args.cfg_scale != 0).total
        rows[name] = dict(seconds=seconds, images_per_s=args.batch / seconds, tflops_per_image=flops / 1e12,
                          achieved_tflops=flops * args.batch / seconds / 1e12,
                          syncs_per_generate=syncs.total, syncs_per_step=syncs.total / args.steps,
                          cuda_syncs_per_generate=cuda_syncs.total if cuda_syncs.available else None,
                          cuda_sync_sites=dict(cuda_syncs.by_site.most_common()) if cuda_syncs.available else None)
        del model
    first = next(iter(rows.values()))
    result = {
        "model": args.model, "grid_size": args.grid_size, "batch": args.batch, "steps": args.steps,
        "device": str(device), "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "variants": rows, "syncs_per_step": first["syncs_per_step"], "syncs_per_generate": first["syncs_per_generate"],
        "cuda_syncs_per_generate": first["cuda_syncs_per_generate"],
    }
    ratios = {"vanilla": "NAT", "noreuse": "ENAT no reuse"}  # each against ENAT with reuse, where both ran
    for key, other in ratios.items():
        if "ENAT" in rows and other in rows:
            e, o = rows["ENAT"], rows[other]
            result[f"flops_ratio_{key}_over_enat"] = o["tflops_per_image"] / e["tflops_per_image"]
            result[f"wall_ratio_{key}_over_enat"] = o["seconds"] / e["seconds"]
            result[f"wall_over_flops_speedup_{key}"] = (result[f"wall_ratio_{key}_over_enat"]
                                                        / result[f"flops_ratio_{key}_over_enat"])
    print(f"sampling benchmark: {args.model} grid {args.grid_size}x{args.grid_size}, batch {args.batch}, "
          f"{args.steps} steps, CFG {args.cfg_scale}, {device} {args.dtype}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<15}{'images/s':>10}{'s/batch':>10}{'TFLOPs/img':>12}{'TFLOP/s':>10}{'syncs/step':>12}"
          f"{'CUDA syncs':>12}")
    for name, r in rows.items():
        cuda = r["cuda_syncs_per_generate"]
        print(f"{name:<15}{r['images_per_s']:>10.2f}{r['seconds']:>10.3f}{r['tflops_per_image']:>12.4f}"
              f"{r['achieved_tflops']:>10.3f}{r['syncs_per_step']:>12.2f}{'-' if cuda is None else cuda:>12}")
    for key, other in ratios.items():
        if f"wall_ratio_{key}_over_enat" in result:
            print(f"{other + ' / ENAT:':<22}FLOPs {result[f'flops_ratio_{key}_over_enat']:.2f}x, "
                  f"wall-clock {result[f'wall_ratio_{key}_over_enat']:.2f}x "
                  f"({100 * result[f'wall_over_flops_speedup_{key}']:.0f}% of the FLOPs speed-up)")
    return result
