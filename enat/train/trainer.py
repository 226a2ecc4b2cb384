"""The trainer: composes the model, EMA, loader, DeepSpeed engine, checkpointer and metrics.

One optimizer step = `grad_accum` micro-batches per rank. Every random decision comes from
counters: the step's mask ratio / reuse coin / re-mask fraction from (seed, step), mask positions
from (seed, step, sample key), dropout from (seed, step, micro-batch, rank). With the loader's
one-counter state and the EMA in the checkpoint, a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from enat.config import Config, dump_config, to_dict
from enat.data.loader import TokenLoader
from enat.dist import all_reduce, barrier, broadcast_object, device_for, setup_env
from enat.flops import expected_train_flops, train_step_flops
from enat.models import build_model, count_parameters
from enat.rng import derive_seed
from enat.train.checkpoint import (Checkpointer, checkpoint_dir, latest_tag, read_meta, to_universal)
from enat.train.ema import EMA
from enat.train.metrics import MetricsWriter, peak_memory_gb, peak_tflops, run_id
from enat.train.objective import compute_loss, plan_step, validation_ids

RATIO_BUCKETS = [0.0, 0.6, 0.7, 0.8, 0.9, 1.01]


class NonFiniteError(RuntimeError):
    pass


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def lr_lambda(cfg):
    t = cfg.train

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        if t.schedule == "cosine":
            progress = min(1.0, step / max(1, t.steps))
            return warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return f


def param_groups(model, cfg) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if any(k in name for k in cfg.train.no_decay) or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def ds_config(cfg, world: int, load_universal: bool) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        "zero_optimization": {"stage": t.zero_stage},
        "gradient_clipping": t.clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 60,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


class Trainer:
    def __init__(self, cfg: Config, log=print):
        import deepspeed

        self.cfg = cfg
        t = cfg.train
        self.rank, self.world, local = setup_env()
        self.device = device_for(local)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.run_dir = Path(t.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.data.dataset == "digits":
                from enat.data.prepare import prepare_data

                prepare_data(cfg, log=self.log)
        barrier()

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        model.activation_checkpointing = t.activation_checkpointing
        self.n_params = count_parameters(model)
        self.ema = EMA(model, t.ema_decay)
        self.ema.model.to(self.device)
        self.loader = TokenLoader(cfg.data.shards, t.micro_batch, self.rank, self.world, t.grad_accum, cfg.seed,
                                  cfg.data.cfg_drop, cfg.model.null_class, cfg.data.shuffle, cfg.data.num_workers,
                                  cfg.data.strict, cfg.data.resampled, model_cfg=cfg.model, log=self.log)

        # Where to resume from, decided before the engine exists (universal loading is a config flag).
        ckpt_dir = checkpoint_dir(self.run_dir)
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        universal = False
        if tag is not None:
            meta = read_meta(ckpt_dir, tag)
            if meta["world_size"] != self.world:
                if self.rank == 0:
                    to_universal(ckpt_dir, tag, log=self.log)
                barrier()
                tag, universal = f"{tag}_universal", True

        if t.zero_stage == 3:
            deepspeed.zero.register_external_parameter(model.head, model.embed.tokens.weight)  # tied head
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=tuple(t.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, self.world, universal))
        if self.world == 1 and t.zero_stage == 0:
            self.engine.enable_backward_allreduce = False  # nothing to reduce; saves a flatten+copy per step
        self.checkpointer = Checkpointer(self.run_dir, self.rank, t.keep_last, t.keep_every)

        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.consecutive_skips = 0
        rid = None
        if tag is not None:
            state = self.checkpointer.load(self.engine, tag)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            self.skipped, self.consecutive_skips = state["skipped"], state["consecutive_skips"]
            self.loader.load_state_dict(state["data"])
            self.ema.load_state_dict(state["ema"])
            rid = state["wandb_run_id"]
            self.log(f"resumed from {ckpt_dir / tag} at step {self.step}")
        if self.rank == 0:
            if rid is not None:
                (self.run_dir / "wandb_run_id").write_text(rid)
            rid = run_id(self.run_dir)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.run_id = broadcast_object(rid)
        self.flops_per_sample = expected_train_flops(cfg.model, tuple(t.mask_beta), t.reuse_prob)
        wandb_config = {**to_dict(cfg), "params": self.n_params, "train_flops_per_sample": self.flops_per_sample,
                        "world_size": self.world}
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, t.wandb, self.run_id, wandb_config)
        dropped = self.metrics.truncate_after(self.step)
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} lines logged after the checkpoint of step {self.step}")
        self.val_metrics = MetricsWriter(self.run_dir, self.rank == 0, None, name="val.jsonl")
        self.val_metrics.truncate_after(self.step)
        self.peak = peak_tflops(t.peak_tflops)
        self._val_data = None
        self._tokenizer = None
        self._grad_norm = float("nan")

    # ------------------------------------------------------------------------------------------

    @property
    def module(self):
        return self.engine.module

    def client_state(self) -> dict:
        states = [None] * self.world
        mine = self.loader.state_dict()
        if dist.is_initialized():
            dist.all_gather_object(states, mine)
            if any(s != mine for s in states):
                raise RuntimeError(f"data loader states differ across ranks: {states}")
        return {"step": self.step, "samples_seen": self.samples_seen, "data": mine, "ema": self.ema.state_dict(),
                "wandb_run_id": self.run_id, "config": to_dict(self.cfg), "git_commit": git_commit(),
                "skipped": self.skipped, "consecutive_skips": self.consecutive_skips, "world_size": self.world}

    def save(self) -> str:
        tag = self.checkpointer.save(self.engine, self.step, self.client_state(),
                                     {"world_size": self.world, "zero_stage": self.cfg.train.zero_stage})
        self.log(f"saved checkpoint {tag}")
        return tag

    def train_step(self, it) -> dict:
        """One optimizer step over grad_accum micro-batches. Returns step statistics."""
        cfg, t = self.cfg, self.cfg.train
        plan = plan_step(self.step, cfg.seed, cfg.model, t)
        losses, data_wait, bad = [], 0.0, False
        self.module.train()
        for a in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = next(it)
            data_wait += time.perf_counter() - t0
            if bad:
                continue  # drain this step's micro-batches: the data position stays aligned
            tokens, labels, uid = (batch[k].to(self.device) for k in ("tokens", "labels", "uid"))
            torch.manual_seed(derive_seed(cfg.seed, "dropout", self.step, a, self.rank))
            loss = compute_loss(self.engine, self.ema.model, tokens, labels, uid, plan, cfg.seed, cfg.model,
                                t.label_smoothing)
            if self.step in t.inject_nan_steps:
                loss = loss * float("nan")
            finite = all_reduce(torch.tensor([float(torch.isfinite(loss))], device=self.device), dist.ReduceOp.MIN)
            if finite.item() < 1:
                bad = True
                if a > 0:  # discard what this step accumulated so far
                    self.engine.optimizer.zero_grad(set_to_none=True)
                    self.engine.micro_steps += t.grad_accum - a
                continue
            self.engine.backward(loss)
            skipped_before = self.engine.skipped_steps
            if t.zero_stage == 0 and a == t.grad_accum - 1 and (self.step + 1) % t.log_every == 0:
                # ZeRO-0 computes no norm unless it clips; take it ourselves on logging steps only.
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            self.engine.step()
            losses.append(loss.detach().float())
        if not bad and self.engine.skipped_steps > skipped_before:
            bad = True  # DeepSpeed found a non-finite gradient and skipped the update itself
        if bad:
            self.skipped += 1
            self.consecutive_skips += 1
            self.log(f"step {self.step}: non-finite loss or gradient, update skipped "
                     f"({self.consecutive_skips} in a row, {self.skipped} in total)")
            if self.consecutive_skips >= t.max_consecutive_skips:
                raise NonFiniteError(f"{self.consecutive_skips} consecutive non-finite steps ending at step "
                                     f"{self.step}: stopping instead of training a NaN model. Lower the LR, "
                                     f"use bf16/fp32, or resume from an earlier checkpoint.")
        else:
            self.consecutive_skips = 0
            self.ema.update(self.module, t.zero_stage)
        loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
        loss = all_reduce(loss.to(self.device).clone()) / self.world if losses else loss
        n = t.micro_batch * t.grad_accum * self.world
        self.samples_seen += n
        self.step += 1
        return {"loss": float(loss), "plan": plan, "data_wait": data_wait, "skipped": bad,
                "flops": n * train_step_flops(cfg.model, plan.masked, plan.reuse, plan.remasked)}

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        """Held-out loss at fixed mask ratios (full mode, no label smoothing), online and EMA
        weights; each rank takes a disjoint part of the fixed set."""
        cfg, t = self.cfg, self.cfg.train
        if cfg.data.val_shards is None:
            return {}
        if self._val_data is None:
            from enat.data.loader import ShardSet

            data = ShardSet(cfg.data.val_shards, log=self.log)
            # The same number of rows on every rank: under ZeRO-3 each forward is a collective.
            n = min(t.val_samples, len(data)) // self.world * self.world
            rows = torch.arange(n)[self.rank::self.world].numpy()
            tokens = data.tokens(rows)
            self._val_data = (torch.from_numpy(tokens), torch.from_numpy(data.label[rows]),
                              torch.from_numpy(data.uid[rows]))
        tokens, labels, uid = (x.to(self.device) for x in self._val_data)
        self.module.eval()
        out = {}
        for name, model in (("val", self.engine), ("val_ema", self.ema.model)):
            for ratio in t.val_mask_ratios:
                total = torch.zeros(2, device=self.device, dtype=torch.float64)
                for s in range(0, len(tokens), t.micro_batch):
                    tok, lab, u = tokens[s:s + t.micro_batch], labels[s:s + t.micro_batch], uid[s:s + t.micro_batch]
                    ids = validation_ids(tok, u, ratio, cfg.seed, cfg.model.mask_id)
                    logits = model(ids, lab, logits="masked").logits.float()
                    target = tok[ids == cfg.model.mask_id].view(tok.shape[0], -1)
                    total[0] += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").double()
                    total[1] += target.numel()
                all_reduce(total)
                out[f"{name}/loss_r{ratio:g}"] = float(total[0] / total[1])
        self.module.train()
        return out

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """EMA samples for fixed labels and seeds, decoded, as a PNG in the run directory (rank 0)."""
        cfg = self.cfg
        tok_path = cfg.tokenizer.checkpoint
        if self.rank != 0 or not tok_path or not Path(tok_path).is_file():
            return None
        from enat.images import save_grid
        from enat.sampling import generate
        from enat.tokenizer import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(cfg.tokenizer).to(self.device)
        labels = torch.tensor([c % cfg.model.num_classes for c in cfg.train.sample_labels])
        sc = dataclasses.replace(cfg.sample, seed=cfg.seed)
        ids = generate(self.ema.model, labels, sc)
        images = self._tokenizer.decode(ids)
        return save_grid(images, self.run_dir / "samples" / f"step{self.step:08d}.png")

    # ------------------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None, should_stop=None) -> dict:
        """Train until train.steps (or stop_at); checkpoint, log, validate and sample on schedule.
        Returns the last logged record, with "interrupted": True when `should_stop` ended it.

        `should_stop()` (a preemption or time-limit signal seen by this process) is polled after
        every step and OR-ed over ranks, so all ranks stop after the same step and checkpoint it
        together, whichever rank saw the signal."""
        from tqdm import tqdm

        t = self.cfg.train
        end = min(t.steps, stop_at) if stop_at is not None else t.steps
        it = iter(self.loader)
        window = self._new_window()
        last: dict = {}
        self.interrupted = False
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step",
                   disable=not (self.rank == 0 and sys.stderr.isatty()))
        while self.step < end:
            stats = self.train_step(it)
            bar.update(1)
            window["steps"] += 1
            window["flops"] += stats["flops"]
            window["data_wait"] += stats["data_wait"]
            if stats["skipped"]:
                window["skipped"] += 1
            else:
                window["loss"].append(stats["loss"])
                r = stats["plan"].mask_ratio
                b = next(i for i in range(len(RATIO_BUCKETS) - 1) if r < RATIO_BUCKETS[i + 1])
                window["buckets"].setdefault(b, []).append(stats["loss"])
            if self.step % t.log_every == 0 or self.step == end:
                last = self._log(window)
                window = self._new_window()
            if t.val_every and (self.step % t.val_every == 0 or self.step == end):
                val = self.validate()
                if val:
                    self.val_metrics.log({"step": self.step, "samples_seen": self.samples_seen, **val})
                    self.metrics.log({"kind": "val", "step": self.step, "samples_seen": self.samples_seen, **val})
            if t.sample_every and (self.step % t.sample_every == 0 or self.step == end):
                grid = self.sample_grid()
                if grid is not None:
                    self.metrics.log({"kind": "samples", "step": self.step, "samples": str(grid)},
                                     images={"samples": grid})
            saved = (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == end
            if saved:
                self.save()  # on schedule, and always where this run ends (done or --stop-at)
            if should_stop is not None and self.step < end and self._stop_requested(should_stop):
                if not saved:
                    self.save()
                self.log(f"stop requested: checkpointed step {self.step} of {end}")
                self.interrupted = True
                break
        bar.close()
        return {**last, "step": self.step, "interrupted": self.interrupted}

    def _stop_requested(self, should_stop) -> bool:
        flag = torch.tensor([float(bool(should_stop()))], device=self.device)
        return all_reduce(flag, dist.ReduceOp.MAX).item() > 0

    @staticmethod
    def _new_window() -> dict:
        """What the log interval accumulates."""
        return {"loss": [], "flops": 0.0, "data_wait": 0.0, "t0": time.perf_counter(), "skipped": 0,
                "buckets": {}, "steps": 0}

    def _log(self, w: dict) -> dict:
        t = self.cfg.train
        elapsed = time.perf_counter() - w["t0"]
        n = w["steps"] * t.micro_batch * t.grad_accum * self.world
        tokens = n * self.cfg.model.seq_len
        rec = {"kind": "train", "step": self.step, "samples_seen": self.samples_seen,
               "loss": sum(w["loss"]) / len(w["loss"]) if w["loss"] else float("nan"),
               "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": float(self._grad_norm if self.cfg.train.zero_stage == 0
                                  else (self.engine.get_global_grad_norm() or float("nan"))),
               "skipped_steps": self.skipped, "skipped_in_window": w["skipped"],
               "images_per_s": n / elapsed, "images_per_s_per_rank": n / elapsed / self.world,
               "tokens_per_s": tokens / elapsed, "tokens_per_s_per_rank": tokens / elapsed / self.world,
               "tflops_per_s": w["flops"] / elapsed / 1e12,
               "tflops_per_s_per_rank": w["flops"] / elapsed / 1e12 / self.world,
               "data_wait_fraction": w["data_wait"] / elapsed, "peak_memory_gb": peak_memory_gb(),
               "flops_seen": self.samples_seen * self.flops_per_sample, "window_s": elapsed}
        if self.peak:
            rec["mfu"] = rec["tflops_per_s_per_rank"] / self.peak
        for b, values in sorted(w["buckets"].items()):
            rec[f"loss_r{RATIO_BUCKETS[b]:.1f}-{min(RATIO_BUCKETS[b + 1], 1.0):.1f}"] = sum(values) / len(values)
        self.metrics.log(rec)
        if self.rank == 0 and not sys.stderr.isatty():
            self.log(f"step {self.step}: loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                     f"{rec['images_per_s']:.1f} img/s data-wait {rec['data_wait_fraction']:.0%}")
        return rec

    def close(self) -> None:
        self.metrics.finish()


def train(cfg: Config, stop_at: int | None = None, log=print, should_stop=None) -> dict:
    trainer = Trainer(cfg, log=log)
    try:
        return trainer.fit(stop_at, should_stop)
    finally:
        trainer.close()
