"""Trainer overhead: the trainer's optimizer step (DeepSpeed engine, EMA, loader, metrics
bookkeeping) against a bare PyTorch loop doing the same math (same model, batches, step plans,
objective, AdamW, EMA) in one process. Prints both step times and their ratio; --json adds one
JSON line with `overhead_ratio` = trainer step time / bare step time."""

from __future__ import annotations

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
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--zero-stage", type=int, default=0, help="one process: 0, as DeepSpeed on one GPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    from enat.bench.data import write_synthetic
    from enat.config import load_config
    from enat.models import build_model
    from enat.train.ema import EMA
    from enat.train.objective import compute_loss, plan_step
    from enat.train.trainer import Trainer, lr_lambda, param_groups

    tmp = tempfile.TemporaryDirectory()
    shards = Path(tmp.name) / "shards"
    shards.mkdir()
    n = max(args.batch * (args.steps + 4), 256)
    write_synthetic(shards, n, args.grid_size ** 2, shard_size=1000)
    over = [f"model.size={args.model}", f"model.grid_size={args.grid_size}", "model.codebook_size=1024",
            "model.num_classes=1000", f"tokenizer.resolution={args.grid_size * 16}", "tokenizer.checkpoint=null",
            "data.dataset=imagefolder", f"data.shards={shards}", "data.val_shards=null", "data.num_workers=0",
            f"train.run_dir={Path(tmp.name) / 'run'}", f"train.micro_batch={args.batch}", "train.log_every=1000000",
            "train.val_every=0", "train.sample_every=0", "train.ckpt_every=0", "train.wandb.mode=disabled",
            f"train.zero_stage={args.zero_stage}", f"train.precision={args.precision}", "train.warmup_steps=1"]
    cfg = load_config(None, over)
    total = args.steps + 2

    trainer = Trainer(cfg, log=lambda *_: None)
    it = iter(trainer.loader)

    # The same math without the framework: same init, batches, plans and EMA.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model.to(dtype)
    ema = EMA(model, cfg.train.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    loader = trainer.loader.__class__(shards, args.batch, seed=cfg.seed, cfg_drop=cfg.data.cfg_drop,
                                      null_class=cfg.model.null_class, log=lambda *_: None)
    batches = [b for _, b in zip(range(total), iter(loader))]

    def bare_step(s, batch):
        plan = plan_step(s, cfg.seed, cfg.model, cfg.train)
        loss = compute_loss(model, ema.model, batch["tokens"], batch["labels"], batch["uid"], plan, cfg.seed,
                            cfg.model, cfg.train.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model, 0)

    # Interleaved, step for step on the same batches and plans, so machine drift cancels out.
    times, bare = [], []
    for s, batch in enumerate(batches):
        t0 = time.perf_counter()
        trainer.train_step(it)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_step(s, batch)
        bare.append(time.perf_counter() - t0)
    trainer_s = statistics.median(times[2:])
    bare_s = statistics.median(bare[2:])
    trainer.close()
    tmp.cleanup()

    result = {"model": args.model, "batch": args.batch, "zero_stage": args.zero_stage, "precision": args.precision,
              "threads": torch.get_num_threads(), "trainer_step_s": trainer_s, "bare_step_s": bare_s,
              "overhead_ratio": trainer_s / bare_s}
    print(f"train-step benchmark: ENAT-{args.model}, micro-batch {args.batch}, ZeRO-{args.zero_stage}, "
          f"{args.precision}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'loop':<10}{'s/step':>10}")
    print(f"{'trainer':<10}{trainer_s:>10.4f}")
    print(f"{'bare':<10}{bare_s:>10.4f}")
    print(f"overhead ratio (trainer / bare): {result['overhead_ratio']:.3f}")
    if args.json:
        print(json.dumps(result))
    return result
