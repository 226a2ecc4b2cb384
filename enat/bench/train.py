"""Training-step benchmark: the trainer's optimizer step (DeepSpeed engine, EMA, loader, metrics
bookkeeping) on synthetic token shards, one process.

Reports, per step: seconds, images/s, achieved TFLOP/s (analytic FLOPs of the steps actually run)
and MFU against the device's dense bf16 peak (`--peak-tflops`, else the table in
enat/train/metrics.py), peak memory, host syncs per optimizer step and inside forward + loss +
backward (`enat.profiling.SyncCounter` over real steps, full and reuse mode; on a GPU also CUDA's
own count by call site, `CudaSyncCounter`) and the graphs dynamo makes of forward + loss in each mode.
`--config` takes an experiment's recipe (model, micro-batch, accumulation, ZeRO stage, precision,
optimizer, EMA, plan draws) and replaces only its data with synthetic shards.
With `--bare` (default on CPU) it also times a bare PyTorch loop doing the same math (same model,
batches, plans, objective, AdamW, EMA) interleaved step for step: `overhead_ratio` = trainer / bare.

On a GPU:  python -m enat.bench train --config configs/experiments/imagenet256_L.yaml --compile
--json puts one JSON object with every number alone on stdout (the table to stderr).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from enat.bench.data import write_synthetic
from enat.config import load_config
from enat.data.loader import TokenLoader
from enat.dist import close
from enat.flops import train_step_flops
from enat.models import build_model
from enat.profiling import CudaSyncCounter, SyncCounter, count_graphs
from enat.rng import derive_seed
from enat.train.ema import EMA
from enat.train.metrics import peak_tflops
from enat.train.objective import MaskOrder, compute_loss, mask_order, plan_step
from enat.train.trainer import Trainer, compiled_loss, lr_lambda, make_optimizer


def add_arguments(p) -> None:
    p.add_argument("--config", help="an experiment config whose recipe is timed (its data replaced by synthetic "
                                    "shards); the options below override it")
    p.add_argument("--model", default=None, help="zoo size (default: the config's, else S)")
    p.add_argument("--grid-size", type=int, default=None, help="default: the config's, else 16")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: the config's, else 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="default: the config's, else 1")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3; 16 with --compile: the step plans of the first "
                        "~13 steps meet every graph a run compiles, and no compilation may be timed)")
    p.add_argument("--zero-stage", type=int, default=None, help="default: the config's, else 2 on cuda, 0 on cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: the config's, else bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (dense bf16 TFLOP/s per device)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="count the graphs dynamo makes of forward + loss (a traced forward of each mode)")
    p.add_argument("--sync-steps", type=int, default=4,
                   help="optimizer steps counted for host syncs per counter (0: none)")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a bare loop (default: on cpu)")
    p.add_argument("--json", action="store_true", help="the result as one JSON object alone on stdout "
                   "(the table to stderr)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a machine with a GPU: hide it (CUDA_VISIBLE_DEVICES=) to time the CPU")
    device = torch.device(args.device)
    recipe = load_config(args.config, []) if args.config else None
    model = args.model or (recipe.model.size if recipe else "S")
    grid = args.grid_size or (recipe.model.grid_size if recipe else 16)
    batch = args.batch or (recipe.train.micro_batch if recipe else 8)
    accum = args.grad_accum or (recipe.train.grad_accum if recipe else 1)
    default_zero, default_precision = (2, "bf16") if device.type == "cuda" else (0, "fp32")
    zero = args.zero_stage if args.zero_stage is not None else (recipe.train.zero_stage if recipe else default_zero)
    precision = args.precision or (recipe.train.precision if recipe else default_precision)
    bare = args.bare if args.bare is not None else device.type == "cpu"

    if args.warmup is None:
        args.warmup = 16 if args.compile else 3
    tmp = tempfile.TemporaryDirectory()
    shards = Path(tmp.name) / "shards"
    shards.mkdir()
    total = args.warmup + args.steps + 2 * args.sync_steps
    vocab = dict(codebook_size=recipe.model.codebook_size, num_classes=recipe.model.num_classes) if recipe else {}
    write_synthetic(shards, max(batch * accum * total, 256), grid ** 2, shard_size=10000, **vocab)
    downsample = recipe.tokenizer.downsample if recipe else 16
    # a recipe with its own architecture (model.size null, width/depth set) keeps it
    over = ([f"model.size={model}"] if model else []) + [f"model.grid_size={grid}", "tokenizer.checkpoint=null",
            f"tokenizer.resolution={grid * downsample}",
            "data.dataset=imagefolder", f"data.shards={shards}", "data.val_shards=null",
            f"train.run_dir={Path(tmp.name) / 'run'}", f"train.micro_batch={batch}",
            f"train.grad_accum={accum}", "train.log_every=1000000", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0", "train.wandb.mode=disabled", f"train.zero_stage={zero}",
            f"train.precision={precision}", "train.warmup_steps=1", f"train.compile={str(args.compile).lower()}",
            f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    if recipe is None:  # the ImageNet token space; loading in the main process (the recipe's workers otherwise)
        over += ["model.codebook_size=1024", "model.num_classes=1000", "data.num_workers=0"]
    cfg = load_config(args.config, over)
    trainer = Trainer(cfg, log=lambda *_: None)
    it = iter(trainer.loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    bare_step = _bare_loop(cfg, trainer, shards, device) if bare else None
    # Graphs dynamo makes of forward + loss, full and reuse mode (on the bare module and EMA).
    graphs = {}
    if args.graphs and cfg.model.arch == "enat":
        N, B = cfg.model.seq_len, batch
        tokens = torch.randint(0, cfg.model.codebook_size, (B, N), device=device)
        labels = torch.zeros(B, dtype=torch.long, device=device)
        order = torch.from_numpy(mask_order(torch.arange(B).numpy(), 0, 0, N)).to(device)
        for mode, rem in (("full", None), ("reuse", order[:, N // 2:N // 2 + N // 8])):
            masked = order[:, :N // 2]
            torch._dynamo.maybe_mark_dynamic(masked, 1)
            if rem is not None:
                torch._dynamo.maybe_mark_dynamic(rem, 1)
            g, breaks, _ = count_graphs(compute_loss, trainer.module, trainer.ema, tokens, labels,
                                        masked, rem, cfg.model.mask_id, 0.1, trainer.prev_autocast)
            graphs[mode] = {"graphs": g, "breaks": breaks}
        torch._dynamo.reset()
        if args.compile:  # explain() reset dynamo: compile again, during the warm-up
            trainer.loss_fn = compiled_loss()

    times, bare_times, flops = [], [], []
    for s in range(args.warmup + args.steps):
        plan = plan_step(trainer.step, cfg.seed, cfg.model, cfg.train)
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_step(it)
        _sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
            flops.append(batch * accum * train_step_flops(cfg.model, plan.masked, plan.reuse, plan.remasked))
        if bare_step is not None:
            t0 = time.perf_counter()
            bare_step(s)
            _sync(device)
            if s >= args.warmup:
                bare_times.append(time.perf_counter() - t0)
    memory_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    syncs = count_step_syncs(trainer, it, cfg, args.sync_steps)
    trainer.close()
    close()  # the process group too: NCCL's threads alive at exit can abort the process after its result
    tmp.cleanup()

    step_s = statistics.median(times)
    n_img = batch * accum
    tflops = sum(flops) / sum(times) / 1e12
    peak = peak_tflops(args.peak_tflops)
    result = {"model": model, "config": args.config, "grid_size": grid, "batch": batch, "grad_accum": accum,
              "zero_stage": zero, "precision": precision, "compile": args.compile, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "device_memory_gb": (torch.cuda.get_device_properties(device).total_memory / 1e9
                                   if device.type == "cuda" else None),
              "backend": _backend(), "threads": torch.get_num_threads(), "params": trainer.n_params,
              "warmup_steps": args.warmup, "timed_steps": args.steps, "step_s": step_s,
              "images_per_s": n_img / step_s, "tflops_per_s": tflops, "peak_tflops": peak,
              "mfu": tflops / peak if peak else None, "peak_memory_gb": memory_gb, **syncs, "graphs": graphs}
    if bare_times:
        result["bare_step_s"] = statistics.median(bare_times)
        result["overhead_ratio"] = step_s / result["bare_step_s"]

    print(f"train-step benchmark: {cfg.model.arch.upper()}-{model or f'w{cfg.model.width} {cfg.model.enc_depth}+{cfg.model.dec_depth}'} ({trainer.n_params / 1e6:.1f}M), grid {grid}, "
          f"micro-batch {batch} x {accum}, ZeRO-{zero}, {precision}, compile {args.compile}, "
          f"{result['device_name']}, median of {args.steps} steps")
    print(f"{'s/step':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'mem GB':>8}{'syncs':>7}{'inside':>8}")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-"
    mem = f"{memory_gb:.1f}" if memory_gb is not None else "-"
    print(f"{step_s:>10.4f}{result['images_per_s']:>10.1f}{tflops:>10.2f}{mfu:>8}{mem:>8}"
          f"{_f(result['syncs_per_step']):>7}{_f(result['syncs_inside_forward_backward']):>8}")
    if result.get("cuda_syncs_per_step") is not None:
        print(f"CUDA's own count: {result['cuda_syncs_per_step']} syncs per step, "
              f"{result['cuda_syncs_inside_forward_backward']} inside forward + loss + backward")
        for site, n in result["cuda_sync_sites"].items():
            print(f"  {n:>4} x {site}")
    if graphs:
        print("graphs of forward + loss: " + ", ".join(f"{m} {g['graphs']} ({g['breaks']} breaks)"
                                                       for m, g in graphs.items()))
    if bare_times:
        print(f"bare loop {result['bare_step_s']:.4f} s/step; overhead ratio (trainer / bare): "
              f"{result['overhead_ratio']:.3f}")
    return result


def count_step_syncs(trainer, it, cfg, steps: int) -> dict:
    """Host syncs of `steps` real optimizer steps (both modes appear among 4: the plans are seeded),
    per step and inside forward + loss + backward: at the dispatcher (`SyncCounter`, any device;
    under its dispatch mode dynamo runs compiled frames eagerly) and, on a GPU, CUDA's own count
    by call site (`CudaSyncCounter`: compiled code counted as it runs)."""
    out = {"syncs_per_step": None, "syncs_by_mode": None, "syncs_inside_forward_backward": None,
           "sync_steps_counted": steps, "cuda_syncs_per_step": None, "cuda_syncs_by_mode": None,
           "cuda_syncs_inside_forward_backward": None, "cuda_sync_sites": None}
    if steps < 1:
        return out
    loss_fn, backward = trainer.loss_fn, trainer.engine.backward

    def run(counter_cls):
        per_mode, inside, sites = {}, 0, Counter()

        def counted(fn):
            def wrapper(*a, **k):
                nonlocal inside
                with counter_cls() as c:
                    out = fn(*a, **k)
                inside += c.total
                return out
            return wrapper

        trainer.loss_fn, trainer.engine.backward = counted(loss_fn), counted(backward)
        try:
            for _ in range(steps):
                plan = plan_step(trainer.step, cfg.seed, cfg.model, cfg.train)
                with counter_cls() as c:
                    trainer.train_step(it)
                per_mode.setdefault("reuse" if plan.reuse else "full", []).append(c.total)
                sites.update(getattr(c, "by_site", {}))
        finally:
            trainer.loss_fn, trainer.engine.backward = loss_fn, backward
        return per_mode, inside, sites

    per_mode, inside, _ = run(SyncCounter)
    out.update(syncs_per_step=max(v for counts in per_mode.values() for v in counts), syncs_by_mode=per_mode,
               syncs_inside_forward_backward=inside)
    if torch.cuda.is_available():
        per_mode, inside, sites = run(CudaSyncCounter)
        out.update(cuda_syncs_per_step=max(v for counts in per_mode.values() for v in counts),
                   cuda_syncs_by_mode=per_mode, cuda_syncs_inside_forward_backward=inside,
                   cuda_sync_sites=dict(sites.most_common()))
    return out


def _f(x) -> str:
    return "-" if x is None else str(x)


def _backend() -> str | None:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _bare_loop(cfg, trainer, shards, device):
    """The same math without the framework: same init, batches, plans, objective and EMA."""
    t = cfg.train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    ema = EMA(model, t.ema_decay)
    ema.model.to(device)
    model.to(device=device, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    loader = TokenLoader(shards, t.micro_batch, seed=cfg.seed, cfg_drop=cfg.data.cfg_drop, grad_accum=t.grad_accum,
                         null_class=cfg.model.null_class, transform=MaskOrder(cfg.seed, cfg.model.seq_len, t.grad_accum),
                         log=lambda *_: None)
    it = iter(loader)
    ema_params, params = list(ema.model.parameters()), list(model.parameters())

    def step(s):
        plan = plan_step(s, cfg.seed, cfg.model, t)
        opt.zero_grad(set_to_none=True)
        for a in range(t.grad_accum):
            batch = next(it)
            tokens, labels, order = (batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "order"))
            torch.manual_seed(derive_seed(cfg.seed, "dropout", s, a, 0))
            rem = order[:, plan.masked:plan.masked + plan.remasked] if plan.reuse else None
            loss = compute_loss(model, ema.model, tokens, labels, order[:, :plan.masked], rem, cfg.model.mask_id,
                                t.label_smoothing, trainer.prev_autocast)
            (loss / t.grad_accum).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.float() for p in params], 1 - t.ema_decay)

    return step
