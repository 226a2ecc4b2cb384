"""The trainer: composes the model, EMA, loader, DeepSpeed engine, checkpointer and metrics.

One optimizer step = `grad_accum` micro-batches per rank. Every random decision comes from
counters: the step's mask ratio / reuse coin / re-mask fraction from (seed, step), mask positions
from (seed, step, sample key), dropout from (seed, step, micro-batch, rank). With the loader's
one-counter state and the EMA in the checkpoint, a resumed run continues bit for bit.

The step is shaped for a GPU: the host never waits for the device inside forward, loss and
backward (mask positions arrive as index tensors, counts come from the step plan). The loss sum,
a non-finite flag, the local gradient norm and the stop flag travel in one packed all-reduce,
read once per optimizer step; that read decides whether the update is applied or skipped.
DeepSpeed's own per-step syncs (throughput timer, bf16 overflow check, a second gradient norm)
are switched off because that flag covers them.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from enat.config import Config, dump_config, to_dict
from enat.data.identity import describe, resume_data_state
from enat.data.loader import ShardSet, TokenLoader
from enat.data.prepare import check_data
from enat.data.shards import ShardError
from enat.dist import (all_reduce, barrier, broadcast_object, device_for, import_deepspeed, init_deepspeed_comm,
                       setup_env)
from enat.flops import expected_train_flops, masked_count, train_step_flops
from enat.images import save_captioned_grid, save_grid
from enat.models import build_model, count_parameters
from enat.models.zoo import parameter_counts
from enat.rng import derive_seed
from enat.sampling import generate
from enat.text import encoder_dir, encoder_for, null_gap
from enat.tokenizer import load_tokenizer
from enat.train.checkpoint import (Checkpointer, CheckpointError, SaveError, checkpoint_dir, find_resume_tag,
                                   read_meta, to_universal)
from enat.train.ema import EMA
from enat.train.lease import Lease, LeaseError, LeaseLost
from enat.train.metrics import MetricsWriter, peak_memory_gb, peak_tflops, run_id
from enat.train.objective import MaskOrder, compute_loss, plan_step, validation_order

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
        if t.schedule == "wsd":
            start = t.steps * (1 - t.cooldown_fraction)
            progress = min(1.0, max(0.0, step - start) / max(1e-9, t.steps - start))
            return warm * (1 - (1 - t.min_lr_ratio) * progress)
        return warm

    return f


def param_groups(model, cfg) -> list[dict]:
    """AdamW groups: weight matrices decay, biases/norms/tables do not ("matrices"), or every
    parameter decays ("all", the released code)."""
    t = cfg.train
    if t.weight_decay_scope == "all":
        return [{"params": list(model.parameters()), "weight_decay": t.weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if any(k in name for k in t.no_decay) or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW, fused: one kernel for all parameters, and its step counts stay on the device (the
    default implementation reads each group's step count on the host every step)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=True)


def ds_config(cfg, world: int, load_universal: bool) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        # The trainer takes the gradient norm and the non-finite check itself (one packed
        # all-reduce); DeepSpeed's own norm is needed only to clip.
        "zero_optimization": {"stage": t.zero_stage, "compute_grad_norm": t.clip > 0 or t.zero_stage not in (1, 2)},
        "gradient_clipping": t.clip,
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 60,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},  # it synchronizes every step
        "checkpoint": {"load_universal": load_universal},
    }


def compiled_loss():
    """compute_loss through torch.compile. One graph per mode, plus one for each count that pins
    a size to 0 or 1 (one re-masked token, one or no old visible token, ...): a handful, over
    dynamo's default limit of 8 in the worst case, past which it would silently run eager."""
    return torch._dynamo.config.patch(recompile_limit=32)(torch.compile(compute_loss))


def local_grad_norm_sq(engine, zero_stage: int) -> torch.Tensor | None:
    """Squared L2 norm of the gradients this rank holds after the last backward of a step (the
    full gradients at ZeRO-0, the rank's partition at ZeRO-1/2), on the device: no host read.
    Summed over ranks it gives the global norm (ZeRO-1/2) or world x the norm (ZeRO-0).
    None under ZeRO-3, whose optimizer checks and measures its gradients itself."""
    if zero_stage == 3:
        return None
    if zero_stage == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    else:
        grads = [g for group in engine.optimizer.averaged_gradients.values() for g in (group or []) if g is not None]
    if not grads:
        return torch.zeros((), device=engine.device)
    return torch.stack(torch._foreach_norm(grads, dtype=torch.float32)).square().sum()


def skip_update(engine, zero_stage: int) -> None:
    """End an optimizer step without applying it (non-finite loss or gradient): gradients
    cleared, the skip counted, the LR schedule left where it is. ZeRO-1/2/3 take DeepSpeed's own
    overflow path (which clears its partitioned gradient buffers too); ZeRO-0 has none."""
    opt = engine.optimizer
    if zero_stage == 0:
        opt.zero_grad(set_to_none=True)
        engine.micro_steps += 1
        engine.global_steps += 1
        engine.skipped_steps += 1
        return
    if zero_stage == 3:
        def overflowed(update_scale=True, _opt=opt):
            _opt.overflow = True
            return _opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

        opt._overflow_check_and_loss_scale_update = overflowed
        undo = lambda: delattr(opt, "_overflow_check_and_loss_scale_update")  # noqa: E731
    else:
        checked = opt.check_grad_overflow
        opt.check_grad_overflow = True
        opt.has_overflow = lambda partition_gradients=True: True

        def undo():
            opt.check_grad_overflow = checked
            del opt.has_overflow
    try:
        engine.step()
    finally:
        undo()


class Trainer:
    """`takeover`: take the run directory's writer lease even from a live holder (which stops at
    its next heartbeat); without it a second writer stops here with an error naming the holder."""

    def __init__(self, cfg: Config, log=print, takeover: bool = False):
        self.cfg = cfg
        t = cfg.train
        self.rank, self.world, local = setup_env()
        self.device = device_for(local)
        init_deepspeed_comm()
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.run_dir = Path(t.run_dir)
        check_data(cfg)  # preparation is a job of its own (`enat data prepare`, launch/tokenize.py)
        # One writer per run directory: rank 0 takes the lease before anything is written.
        self.lease = Lease(self.run_dir, t.lease_timeout_s, t.lease_heartbeat_s, log=self.log) if self.rank == 0 \
            else None
        refused = None
        if self.lease is not None:
            try:
                self.lease.acquire(takeover=takeover)
            except LeaseError as e:
                refused = str(e)
            except OSError as e:  # (said on every rank: the others wait in the broadcast below)
                refused = f"cannot take the lease of {self.run_dir}: {e}"
        refused = broadcast_object(refused)
        if refused:
            raise LeaseError(refused if self.rank == 0 else f"rank 0 could not take the lease of {self.run_dir}")
        try:
            self._build(cfg)
        except BaseException:
            self._release()
            raise

    def _build(self, cfg: Config) -> None:
        deepspeed = import_deepspeed()  # not at the top: slow, and the launchers import this module

        t = cfg.train
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        model.activation_checkpointing = t.activation_checkpointing
        self.n_params = count_parameters(model)
        self.loader = TokenLoader(cfg.data.shards, t.micro_batch, self.rank, self.world, t.grad_accum, cfg.seed,
                                  cfg.data.cfg_drop, cfg.model.null_class, cfg.data.shuffle, cfg.data.num_workers,
                                  cfg.data.strict, cfg.data.resampled, model_cfg=cfg.model,
                                  transform=MaskOrder(cfg.seed, cfg.model.seq_len, t.grad_accum), log=self.log)
        self._text_encoder = None
        if cfg.model.condition == "text":
            # The shards' null context (the encoding of '') lives in the model from here on, so
            # every checkpoint and export samples with CFG on its own.
            model.set_null_context(torch.from_numpy(self.loader.data.null_context()).float())
        self.ema = EMA(model, t.ema_decay)

        # Where to resume from, decided before the engine exists (universal loading is a config
        # flag): the checkpoint `latest` names if it verifies, else the newest earlier one that does.
        ckpt_dir = checkpoint_dir(self.run_dir)
        # Why this process may no longer write the run directory (a re-read of lease.json, rank 0):
        # asked before every save and every metrics line.
        fence = self.lease.check if self.lease is not None else None
        self.checkpointer = Checkpointer(self.run_dir, self.rank, t.keep_last, t.keep_every, fence=fence, log=self.log,
                                         pin_timeout_s=t.lease_timeout_s)
        tag, passed = find_resume_tag(ckpt_dir, self.rank, self.world, log=self.log)
        failed = None
        try:
            self.checkpointer.tidy(tag, passed)  # rank 0: damaged tags aside, partial saves removed
        except OSError as e:
            failed = f"tidying {ckpt_dir} failed: {e}"
        failed = broadcast_object(failed)
        if failed:
            raise CheckpointError(failed)
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
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, self.world, universal))
        if self.world == 1 and t.zero_stage == 0:
            self.engine.enable_backward_allreduce = False  # nothing to reduce; saves a flatten+copy per step
        self.ema.attach(self.engine, t.zero_stage)
        # The z_prev pass of a reuse step runs in the training precision; the EMA itself stays fp32.
        self.prev_autocast = torch.bfloat16 if t.precision == "bf16" and not self.ema.sharded else None
        self.loss_fn = compute_loss
        if t.compile:
            # The compiled step calls the bare module. DeepSpeed's forward hooks on it (timers and
            # the flops profiler at ZeRO <= 2) read the engine's micro-step counter, which would
            # make dynamo recompile on every micro-batch.
            self.engine.module_forward_pre_hook.remove()
            self.engine.module_forward_post_hook.remove()
            self.loss_fn = compiled_loss()

        self.step = 0
        self.samples_seen = 0
        self.flops_seen = 0  # exact: every step's plan on every rank (int, so sums are exact)
        self.masked_tokens_seen = 0
        self.skipped = 0
        self.consecutive_skips = 0
        self.failed_saves = 0
        rid = None
        if tag is not None:
            state = self.checkpointer.load(self.engine, tag)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            if "flops_seen" in state:
                self.flops_seen, self.masked_tokens_seen = state["flops_seen"], state["masked_tokens_seen"]
            else:  # a checkpoint from before the exact count: recount the plans of the steps so far, as run
                self.flops_seen, self.masked_tokens_seen = self.plans_so_far(state.get("world_size", self.world),
                                                                             state["config"]["train"])
            self.skipped, self.consecutive_skips = state["skipped"], state["consecutive_skips"]
            # the same shards as the checkpoint's, or data.allow_changed_shards=true (enat/data/identity.py)
            self.loader.load_state_dict(resume_data_state(state["data"], self.loader, cfg.data.allow_changed_shards,
                                                          self.log))
            self.ema.load_state_dict(state["ema"])
            rid = state["wandb_run_id"]
            self.log(f"resumed from {ckpt_dir / tag} at step {self.step}")
        self.log(describe(self.loader.data.identity))
        if self.rank == 0:
            if rid is not None:
                (self.run_dir / "wandb_run_id").write_text(rid)
            rid = run_id(self.run_dir)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.run_id = broadcast_object(rid)
        self.flops_per_sample = expected_train_flops(cfg.model, tuple(t.mask_beta), t.reuse_prob)
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, t.wandb, self.run_id, self.wandb_config(),
                                     fence=fence)
        # wandb plots the losses against compute by default (the x-axis a scaling study needs)
        self.metrics.define_axis("flops_seen", ["loss", "loss_r*", "val/*", "val_ema/*"],
                                 also=["samples_seen", "tokens_seen", "masked_tokens_seen"])
        dropped = self.metrics.truncate_after(self.step)
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} lines logged after the checkpoint of step {self.step}")
        self.val_metrics = MetricsWriter(self.run_dir, self.rank == 0, None, name="val.jsonl", fence=fence)
        self.val_metrics.truncate_after(self.step)
        self.peak = peak_tflops(t.peak_tflops)
        self._val_data = None
        self._grid_data = None
        self._held = None
        if cfg.model.condition == "text" and cfg.data.val_shards:
            self.held_out(cfg.data.val_shards)  # on every rank, now: a mismatch stops the run before step 0
        self._tokenizer = None
        self._grad_norm = float("nan")
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------

    @property
    def module(self):
        return self.engine.module

    def wandb_config(self) -> dict:
        """The run's wandb config: the whole config tree plus what a scaling dashboard groups by."""
        cfg = self.cfg
        total, nonembed = parameter_counts(cfg.model)
        w = cfg.train.wandb
        return {**to_dict(cfg), "params": self.n_params, "n_params": total, "n_params_nonembed": nonembed,
                "data_identity": {k: v for k, v in self.loader.data.identity.items() if k != "shards"},
                "model_size": cfg.model.size, "train_flops_per_sample": self.flops_per_sample,
                "world_size": self.world, "global_batch": self.global_batch,
                "sweep": {"name": w.group, "point": w.sweep_point} if w.sweep_point else None}

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * self.world

    def step_counts(self, step: int, world: int | None = None, per_rank: int | None = None,
                    plan_draws: str | None = None, plan=None) -> tuple[int, int]:
        """(training FLOPs, [MASK] tokens) of one step over all ranks, from every rank's plan
        (with train.plan_draws=per_rank the ranks' mask ratios differ): known on every rank
        without communication. world, per_rank (samples per rank) and plan_draws default to this run's;
        `plan`, this step's plan when all ranks share it, saves drawing it again."""
        cfg, t = self.cfg, self.cfg.train
        world = world or self.world
        per_rank = per_rank or t.micro_batch * t.grad_accum
        if (plan_draws or t.plan_draws) != "per_rank":  # one plan for every rank
            plan = plan or plan_step(step, cfg.seed, cfg.model, t)
            n = world * per_rank
            return n * train_step_flops(cfg.model, plan.masked, plan.reuse, plan.remasked), n * plan.masked
        flops = masked = 0
        for r in range(world):
            plan = plan_step(step, cfg.seed, cfg.model, dataclasses.replace(t, plan_draws="per_rank"), r)
            flops += per_rank * train_step_flops(cfg.model, plan.masked, plan.reuse, plan.remasked)
            masked += per_rank * plan.masked
        return flops, masked

    def plans_so_far(self, world: int, train: dict) -> tuple[int, int]:
        """The counts of the steps before a checkpoint that predates them, with its world size and
        batch (the same global batch: resuming refuses another)."""
        per_rank = train["micro_batch"] * train["grad_accum"]
        counts = [self.step_counts(s, world, per_rank, train.get("plan_draws", "global")) for s in range(self.step)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def compute_seen(self) -> dict:
        """What a scaling study plots against: exact cumulative FLOPs, samples, tokens, [MASK] tokens."""
        return {"samples_seen": self.samples_seen, "flops_seen": self.flops_seen,
                "tokens_seen": self.samples_seen * self.cfg.model.seq_len, "masked_tokens_seen": self.masked_tokens_seen}

    def client_state(self) -> dict:
        states = [None] * self.world
        mine = self.loader.state_dict()
        if dist.is_initialized():
            dist.all_gather_object(states, mine)
            if any(s != mine for s in states):
                raise RuntimeError(f"data loader states differ across ranks: {states}")
        return {"step": self.step, "samples_seen": self.samples_seen, "flops_seen": self.flops_seen,
                "masked_tokens_seen": self.masked_tokens_seen, "data": mine, "ema": self.ema.state_dict(),
                "wandb_run_id": self.run_id, "config": to_dict(self.cfg), "git_commit": git_commit(),
                "skipped": self.skipped, "consecutive_skips": self.consecutive_skips, "world_size": self.world}

    def save(self, retry: bool = False) -> str | None:
        """Checkpoint this step. A failed save (SaveError: nothing committed, its files removed)
        stops the run, unless train.on_save_error=retry and `retry` (a save on schedule, not the
        run's last or a preemption's): then it is logged and training goes on (None)."""
        try:
            tag = self.checkpointer.save(self.engine, self.step, self.client_state(),
                                         {"world_size": self.world, "zero_stage": self.cfg.train.zero_stage})
        except SaveError as e:
            self.failed_saves += 1
            self.metrics.log({"kind": "save_error", "step": self.step, "error": str(e), "failed_saves": self.failed_saves})
            if not (retry and self.cfg.train.on_save_error == "retry"):
                raise
            self.log(f"warning: {e}\ntraining on (train.on_save_error=retry): the next save is at step "
                     f"{(self.step // self.cfg.train.ckpt_every + 1) * self.cfg.train.ckpt_every}")
            return None
        self.log(f"saved checkpoint {tag}")
        return tag

    def condition(self, batch: dict) -> torch.Tensor:
        """The batch's condition on the device: labels, or caption contexts (read from the shards,
        or encoded here from their ids with the frozen text encoder)."""
        if self.cfg.model.condition == "class":
            return batch["labels"].to(self.device, non_blocking=True)
        if "context" in batch:
            return batch["context"].to(self.device, non_blocking=True)
        return self.text_encoder().encode_ids(batch["caption_ids"].to(self.device, non_blocking=True)).half()

    def text_encoder(self):
        """The frozen encoder of ids-only caption shards (text.encoder, else the path the training
        shards' manifest records), checked against the manifest's weights checksum and null
        context; its outputs are rounded to fp16, as stored contexts are."""
        if self._text_encoder is None:
            text = self.loader.manifest.text
            self._text_encoder = encoder_for(encoder_dir(self.cfg.text) or text["encoder"]["path"], self.device,
                                             sha256=text["encoder"].get("sha256"), what=self.cfg.data.shards,
                                             null_context=torch.from_numpy(self.loader.data.null_context()))
        return self._text_encoder

    def train_step(self, it, stop: bool = False) -> dict:
        """One optimizer step over grad_accum micro-batches. `stop`: this rank wants to stop after
        this step (OR-ed over ranks into `self.stop_requested`). Returns step statistics.

        The host reads the device once: the packed all-reduce of [loss sum, non-finite flag,
        gradient norm^2, stop, lease lost] before the update, which it applies or skips on what it
        reads. A lost lease (another writer took the run directory over) ends the run on every
        rank before the update."""
        cfg, t = self.cfg, self.cfg.train
        plan = plan_step(self.step, cfg.seed, cfg.model, t, self.rank)
        model = self.module if t.compile else self.engine  # compiled: the bare module, no engine hooks to trace
        loss_sum = torch.zeros((), device=self.device)
        data_wait = 0.0
        self.module.train()
        for a in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = next(it)
            data_wait += time.perf_counter() - t0
            tokens, order = (batch[k].to(self.device, non_blocking=True) for k in ("tokens", "order"))
            cond = self.condition(batch)
            masked = order[:, :plan.masked]
            remasked = order[:, plan.masked:plan.masked + plan.remasked] if plan.reuse else None
            if t.compile:  # one graph for every mask count, not one per count ("maybe": the rare
                # edge cases a count pins, such as no old visible token left, compile their own)
                torch._dynamo.maybe_mark_dynamic(masked, 1)
                if remasked is not None:
                    torch._dynamo.maybe_mark_dynamic(remasked, 1)
            torch.manual_seed(derive_seed(cfg.seed, "dropout", self.step, a, self.rank))
            loss = self.loss_fn(model, self.ema, tokens, cond, masked, remasked, cfg.model.mask_id,
                                t.label_smoothing, self.prev_autocast)
            if self.step in t.inject_nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if a < t.grad_accum - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        grad_sq = local_grad_norm_sq(self.engine, t.zero_stage)
        lost = self.lease.lost if self.lease is not None else None  # set by the lease's heartbeat thread
        packed = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(),
                              grad_sq if grad_sq is not None else torch.zeros_like(loss_sum),
                              torch.full_like(loss_sum, float(stop)), torch.full_like(loss_sum, float(bool(lost)))])
        loss_total, nonfinite, grad_sq_total, stops, lost_any = all_reduce(packed).tolist()  # the step's one host read
        if lost_any:
            raise LeaseLost(f"stopping at step {self.step} without writing: {lost}" if lost else
                            f"stopping at step {self.step}: rank 0 lost the lease of {self.run_dir}")
        self.stop_requested = stops > 0
        bad = nonfinite > 0 or not math.isfinite(grad_sq_total)
        if grad_sq is not None:
            self._grad_norm = math.sqrt(grad_sq_total / (self.world if t.zero_stage == 0 else 1))
            if t.precision == "fp16":  # the gradients still carry the loss scale
                self._grad_norm /= float(getattr(self.engine.optimizer, "loss_scale", 1.0))
        if bad:
            skip_update(self.engine, t.zero_stage)
        else:
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            bad = self.engine.skipped_steps > skipped_before  # ZeRO-3 found a non-finite gradient itself
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
            self.ema.update()
        flops, masked = self.step_counts(self.step, plan=plan)
        self.samples_seen += self.global_batch
        self.flops_seen += flops
        self.masked_tokens_seen += masked
        self.step += 1
        return {"loss": loss_total / (t.grad_accum * self.world) if not bad else float("nan"), "plan": plan,
                "data_wait": data_wait, "skipped": bad, "flops": flops}

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        """Held-out loss at fixed mask ratios (full mode, no label smoothing), online and EMA
        weights; each rank takes a disjoint part of the fixed set."""
        cfg, t = self.cfg, self.cfg.train
        if cfg.data.val_shards is None:
            return {}
        if self._val_data is None:
            data = self.held_out(cfg.data.val_shards)
            # The same number of rows on every rank: under ZeRO-3 each forward is a collective.
            n = min(t.val_samples, len(data)) // self.world * self.world
            rows = torch.arange(n)[self.rank::self.world].numpy()
            tokens, uid = torch.from_numpy(data.tokens(rows)), torch.from_numpy(data.uid[rows])
            self._val_data = (tokens, self.fixed_condition(data, rows),
                              validation_order(uid, cfg.seed, cfg.model.seq_len))
        tokens, conds, order = (x.to(self.device) for x in self._val_data)
        N = cfg.model.seq_len
        self.module.eval()
        out = {}
        with self.ema.full_model() as ema_model:
            for name, model in (("val", self.engine), ("val_ema", ema_model)):
                for ratio in t.val_mask_ratios:
                    M = masked_count(N, ratio)
                    total = torch.zeros(2, device=self.device, dtype=torch.float64)
                    for s in range(0, len(tokens), t.micro_batch):
                        tok, lab = tokens[s:s + t.micro_batch], conds[s:s + t.micro_batch]
                        ids = tok.scatter(1, order[s:s + t.micro_batch, :M], cfg.model.mask_id)
                        res = model(ids, lab, logits="masked", num_masked=M)
                        target = tok.gather(1, res.masked_positions)
                        total[0] += F.cross_entropy(res.logits.float().flatten(0, 1), target.flatten(),
                                                    reduction="sum").double()
                        total[1] += target.numel()
                    all_reduce(total)
                    out[f"{name}/loss_r{ratio:g}"] = float(total[0] / total[1])
        self.module.train()
        return out

    def held_out(self, shard_dir):
        """A held-out shard set, checked to fit the model (caption shards: encoded by the same
        encoder, whose encoding of '' is the model's null context)."""
        if self._held is not None and self._held[0] == shard_dir:
            return self._held[1]
        data = ShardSet(shard_dir, log=self.log)
        data.manifest.check_model(self.cfg.model, str(shard_dir))
        if self.cfg.model.condition == "text":
            ok, gap = null_gap(torch.from_numpy(data.null_context()), self.module.text_embed.null_context)
            if not ok:
                raise ShardError(f"{shard_dir} was encoded with another text encoder than {self.cfg.data.shards} "
                                 f"(their encodings of '' differ by up to {gap:.3g}): re-tokenize it with "
                                 f"{self.loader.manifest.text['encoder']['path']}")
        self._held = (shard_dir, data)
        return data

    def fixed_condition(self, data, rows, k=0) -> torch.Tensor:
        """The condition of given held-out rows, the same at every evaluation: the label, or the
        context of caption k (an int, or one per row)."""
        if self.cfg.model.condition == "class":
            return torch.from_numpy(data.label[rows])
        if data.manifest.text["storage"] == "ids":
            ids = torch.from_numpy(data.caption_ids(rows, k)).to(self.device)
            return torch.cat([self.text_encoder().encode_ids(ids[i:i + 256]).half().cpu()
                              for i in range(0, len(ids), 256)])
        return torch.from_numpy(data.contexts(rows, k))

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """EMA samples for fixed labels and seeds, decoded, as a PNG in the run directory (rank 0)."""
        cfg = self.cfg
        tok_path = cfg.tokenizer.checkpoint
        if not tok_path or not Path(tok_path).is_file():
            return None
        if self.ema.sharded:  # every rank takes part in gathering the EMA; rank 0 samples
            with self.ema.full_model() as model:
                return self._sample_grid(model) if self.rank == 0 else None
        return self._sample_grid(self.ema.model) if self.rank == 0 else None

    def _sample_grid(self, model) -> Path:
        cfg = self.cfg
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(cfg.tokenizer).to(self.device)
        sc = dataclasses.replace(cfg.sample, seed=cfg.seed)
        path = self.run_dir / "samples" / f"step{self.step:08d}.png"
        if cfg.model.condition == "class":
            labels = torch.tensor([c % cfg.model.num_classes for c in cfg.train.sample_labels])
            return save_grid(self._tokenizer.decode(generate(model, labels, sc)), path)
        # Text: the last caption (the demo's most detailed) of the first held-out images (training
        # images without a held-out set).
        if self._grid_data is None:
            data = self.held_out(cfg.data.val_shards) if cfg.data.val_shards else self.loader.data
            rows = np.arange(min(len(cfg.train.sample_labels), len(data)))
            ks = data.num_captions[rows] - 1
            self._grid_data = (self.fixed_condition(data, rows, ks), [data.captions(r)[k] for r, k in zip(rows, ks)])
        cond, captions = self._grid_data
        return save_captioned_grid(self._tokenizer.decode(generate(model, cond, sc)), captions, path)

    # ------------------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None, should_stop=None) -> dict:
        """Train until train.steps (or stop_at); checkpoint, log, validate and sample on schedule.
        Returns the last logged record, with "interrupted": True when `should_stop` ended it.

        `should_stop()` (a preemption or time-limit signal seen by this process) is polled after
        every step and OR-ed over ranks, so all ranks stop after the same step and checkpoint it
        together, whichever rank saw the signal."""
        t = self.cfg.train
        end = min(t.steps, stop_at) if stop_at is not None else t.steps
        it = iter(self.loader)
        window = self._new_window()
        last: dict = {}
        self.interrupted = False
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step",
                   disable=not (self.rank == 0 and sys.stderr.isatty()))
        while self.step < end:
            stats = self.train_step(it, stop=should_stop is not None and bool(should_stop()))
            if t.inject_step_delay_s:
                time.sleep(t.inject_step_delay_s)
            self.metrics.start()  # wandb, off the first step's path (MetricsWriter)
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
                    self.val_metrics.log({"step": self.step, **self.compute_seen(), **val})
                    self.metrics.log({"kind": "val", "step": self.step, **self.compute_seen(), **val})
            if t.sample_every and (self.step % t.sample_every == 0 or self.step == end):
                grid = self.sample_grid()
                if grid is not None:
                    self.metrics.log({"kind": "samples", "step": self.step, "samples": str(grid)},
                                     images={"samples": grid})
            saved = (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == end
            if saved:  # on schedule, and always where this run ends (done or --stop-at)
                saved = self.save(retry=self.step < end and not self.stop_requested)
            if self.stop_requested and self.step < end:
                if not saved:
                    self.save()
                self.log(f"stop requested: checkpointed step {self.step} of {end}")
                self.interrupted = True
                break
        bar.close()
        return {**last, "step": self.step, "interrupted": self.interrupted}

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
        rec = {"kind": "train", "step": self.step, **self.compute_seen(),
               "loss": sum(w["loss"]) / len(w["loss"]) if w["loss"] else float("nan"),
               "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": float(self._grad_norm if self.cfg.train.zero_stage != 3
                                  else (self.engine.get_global_grad_norm() or float("nan"))),
               "skipped_steps": self.skipped, "skipped_in_window": w["skipped"],
               "images_per_s": n / elapsed, "images_per_s_per_rank": n / elapsed / self.world,
               "tokens_per_s": tokens / elapsed, "tokens_per_s_per_rank": tokens / elapsed / self.world,
               "tflops_per_s": w["flops"] / elapsed / 1e12,
               "tflops_per_s_per_rank": w["flops"] / elapsed / 1e12 / self.world,
               "data_wait_fraction": w["data_wait"] / elapsed, "peak_memory_gb": peak_memory_gb(),
               "window_s": elapsed}
        if self.peak:
            rec["mfu"] = rec["tflops_per_s_per_rank"] / self.peak
        for b, values in sorted(w["buckets"].items()):
            rec[f"loss_r{RATIO_BUCKETS[b]:.1f}-{min(RATIO_BUCKETS[b + 1], 1.0):.1f}"] = sum(values) / len(values)
        self.metrics.log(rec)
        if self.rank == 0 and not sys.stderr.isatty():
            self.log(f"step {self.step}: loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                     f"{rec['images_per_s']:.1f} img/s data-wait {rec['data_wait_fraction']:.0%}")
        return rec

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        try:
            self.metrics.finish()
        finally:
            self._release()


def train(cfg: Config, stop_at: int | None = None, log=print, should_stop=None, takeover: bool = False) -> dict:
    trainer = Trainer(cfg, log=log, takeover=takeover)
    try:
        return trainer.fit(stop_at, should_stop)
    finally:
        trainer.close()
