"""Training-step benchmark: the trainer's optimizer step (DeepSpeed engine, EMA, loader, metrics
bookkeeping) on synthetic token shards, one process.

Reports, per step: seconds, images/s, achieved TFLOP/s (analytic FLOPs of the steps actually run)
and MFU against the device's dense bf16 peak (`--peak-tflops`, else the table in
enat/train/metrics.py), peak memory, host syncs per optimizer step (`enat.profiling.SyncCounter`
over real steps, full and reuse mode) and the graphs dynamo makes of forward + loss in each mode.
With `--bare` (default on CPU) it also times a bare PyTorch loop doing the same math (same model,
batches, plans, objective, AdamW, EMA) interleaved step for step: `overhead_ratio` = trainer / bare.

On a GPU:  python -m enat.bench train --device cuda --model L --precision bf16 --zero-stage 2 --compile
--json adds one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def add_arguments(p) -> None:
    p.add_argument("--model", default="S")
    p.add_argument("--grid-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3; 16 with --compile: the step plans of the first "
                        "~13 steps meet every graph a run compiles, and no compilation may be timed)")
    p.add_argument("--zero-stage", type=int, default=None, help="default: 2 on cuda, 0 on cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (dense bf16 TFLOP/s per device)")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a bare loop (default: on cpu)")
    p.add_argument("--json", action="store_true")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    from enat.bench.data import write_synthetic
    from enat.config import load_config
    from enat.flops import train_step_flops
    from enat.profiling import SyncCounter, count_graphs
    from enat.train.metrics import peak_tflops
    from enat.train.objective import compute_loss, mask_order, plan_step
    from enat.train.trainer import Trainer, compiled_loss

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a machine with a GPU: hide it (CUDA_VISIBLE_DEVICES=) to time the CPU")
    device = torch.device(args.device)
    zero = args.zero_stage if args.zero_stage is not None else (2 if device.type == "cuda" else 0)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    bare = args.bare if args.bare is not None else device.type == "cpu"

    if args.warmup is None:
        args.warmup = 16 if args.compile else 3
    tmp = tempfile.TemporaryDirectory()
    shards = Path(tmp.name) / "shards"
    shards.mkdir()
    total = args.warmup + args.steps + 4  # + the steps counted for syncs
    write_synthetic(shards, max(args.batch * args.grad_accum * total, 256), args.grid_size ** 2, shard_size=10000)
    over = [f"model.size={args.model}", f"model.grid_size={args.grid_size}", "model.codebook_size=1024",
            "model.num_classes=1000", f"tokenizer.resolution={args.grid_size * 16}", "tokenizer.checkpoint=null",
            "data.dataset=imagefolder", f"data.shards={shards}", "data.val_shards=null", "data.num_workers=0",
            f"train.run_dir={Path(tmp.name) / 'run'}", f"train.micro_batch={args.batch}",
            f"train.grad_accum={args.grad_accum}", "train.log_every=1000000", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0", "train.wandb.mode=disabled", f"train.zero_stage={zero}",
            f"train.precision={precision}", "train.warmup_steps=1", f"train.compile={str(args.compile).lower()}",
            f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    cfg = load_config(None, over)
    trainer = Trainer(cfg, log=lambda *_: None)
    it = iter(trainer.loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    bare_step = _bare_loop(cfg, trainer, shards, device) if bare else None
    # Graphs dynamo makes of forward + loss, full and reuse mode (on the bare module and EMA).
    graphs = {}
    if cfg.model.arch == "enat":
        N, B = cfg.model.seq_len, args.batch
        batch = {"tokens": torch.randint(0, 1024, (B, N), device=device), "labels": torch.zeros(B, dtype=torch.long,
                                                                                                  device=device)}
        order = torch.from_numpy(mask_order(torch.arange(B).numpy(), 0, 0, N)).to(device)
        for mode, rem in (("full", None), ("reuse", order[:, N // 2:N // 2 + N // 8])):
            masked = order[:, :N // 2]
            torch._dynamo.maybe_mark_dynamic(masked, 1)
            if rem is not None:
                torch._dynamo.maybe_mark_dynamic(rem, 1)
            g, breaks, _ = count_graphs(compute_loss, trainer.module, trainer.ema, batch["tokens"], batch["labels"],
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
            flops.append(args.batch * args.grad_accum * train_step_flops(cfg.model, plan.masked, plan.reuse,
                                                                        plan.remasked))
        if bare_step is not None:
            t0 = time.perf_counter()
            bare_step(s)
            _sync(device)
            if s >= args.warmup:
                bare_times.append(time.perf_counter() - t0)
    memory_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None

    # Host syncs per optimizer step, on steps of both modes.
    syncs = {}
    for _ in range(4):
        plan = plan_step(trainer.step, cfg.seed, cfg.model, cfg.train)
        with SyncCounter() as counter:
            trainer.train_step(it)
        syncs.setdefault("reuse" if plan.reuse else "full", []).append(counter.total)
    trainer.close()
    tmp.cleanup()

    step_s = statistics.median(times)
    n_img = args.batch * args.grad_accum
    tflops = sum(flops) / sum(times) / 1e12
    peak = peak_tflops(args.peak_tflops)
    result = {"model": args.model, "grid_size": args.grid_size, "batch": args.batch, "grad_accum": args.grad_accum,
              "zero_stage": zero, "precision": precision, "compile": args.compile, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "params": trainer.n_params, "step_s": step_s,
              "images_per_s": n_img / step_s, "tflops_per_s": tflops, "peak_tflops": peak,
              "mfu": tflops / peak if peak else None, "peak_memory_gb": memory_gb,
              "syncs_per_step": max(v for counts in syncs.values() for v in counts),
              "syncs_by_mode": syncs, "graphs": graphs}
    if bare_times:
        result["bare_step_s"] = statistics.median(bare_times)
        result["overhead_ratio"] = step_s / result["bare_step_s"]

    print(f"train-step benchmark: ENAT-{args.model} ({trainer.n_params / 1e6:.1f}M), grid {args.grid_size}, "
          f"micro-batch {args.batch} x {args.grad_accum}, ZeRO-{zero}, {precision}, compile {args.compile}, "
          f"{result['device_name']}, median of {args.steps} steps")
    print(f"{'s/step':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'mem GB':>8}{'syncs':>7}")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-"
    mem = f"{memory_gb:.1f}" if memory_gb is not None else "-"
    print(f"{step_s:>10.4f}{result['images_per_s']:>10.1f}{tflops:>10.2f}{mfu:>8}{mem:>8}"
          f"{result['syncs_per_step']:>7}")
    if graphs:
        print("graphs of forward + loss: " + ", ".join(f"{m} {g['graphs']} ({g['breaks']} breaks)"
                                                       for m, g in graphs.items()))
    if bare_times:
        print(f"bare loop {result['bare_step_s']:.4f} s/step; overhead ratio (trainer / bare): "
              f"{result['overhead_ratio']:.3f}")
    if args.json:
        print(json.dumps(result))
    return result


def _bare_loop(cfg, trainer, shards, device):
    """The same math without the framework: same init, batches, plans, objective and EMA."""
    from enat.data.loader import TokenLoader
    from enat.models import build_model
    from enat.rng import derive_seed
    from enat.train.ema import EMA
    from enat.train.objective import MaskOrder, compute_loss, plan_step
    from enat.train.trainer import lr_lambda, make_optimizer

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
