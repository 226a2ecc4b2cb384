"""The training step's GPU shape, proved with what a CPU can count: host syncs in real trainer
steps (ZeRO-2 bf16 and ZeRO-0 fp32, full and reuse mode), one compiled graph per mode, the
same masks as before, per-rank plan draws, the weight-decay scopes, and a resampled stream that
trains. The 2-rank ZeRO-3 EMA is tested in test_ema.py; stages agreeing and resume in test_train.py."""

import math

import numpy as np
import pytest
import torch

from enat.config import TrainConfig, load_config
from enat.models import build_model, model_config
from enat.profiling import SyncCounter, count_graphs
from enat.train.ema import EMA
from enat.train.objective import compute_loss, mask_order, plan_step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from enat.bench.data import write_synthetic

    d = tmp_path_factory.mktemp("shards")
    write_synthetic(d, 600, 64, shard_size=200)
    return d


def trainer_config(shards, run_dir, **over):
    base = {"model.size": "tiny", "model.grid_size": 8, "model.codebook_size": 1024, "model.num_classes": 1000,
            "tokenizer.resolution": 128, "tokenizer.checkpoint": "null", "data.dataset": "imagefolder",
            "data.shards": shards, "data.val_shards": "null", "data.num_workers": 0, "train.run_dir": run_dir,
            "train.micro_batch": 8, "train.grad_accum": 2, "train.log_every": 1000, "train.val_every": 0,
            "train.sample_every": 0, "train.ckpt_every": 0, "train.wandb.mode": "disabled", "train.warmup_steps": 1}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("zero_stage,precision", [(2, "bf16"), (0, "fp32")])
def test_no_host_sync_in_forward_loss_backward_and_one_per_step(shards, tmp_path, zero_stage, precision):
    from enat.train.trainer import Trainer

    cfg = trainer_config(shards, tmp_path / "run", **{"train.zero_stage": zero_stage, "train.precision": precision})
    trainer = Trainer(cfg, log=lambda *_: None)
    inner = []  # syncs inside each forward + loss and each backward

    def counted(fn):
        def wrapper(*a, **k):
            with SyncCounter() as c:
                out = fn(*a, **k)
            inner.append((fn.__name__, c.total, c.where[:3]))
            return out
        return wrapper

    trainer.loss_fn = counted(trainer.loss_fn)
    trainer.engine.backward = counted(trainer.engine.backward)
    it = iter(trainer.loader)
    trainer.train_step(it)  # the first step starts the loader (its worker seed is a host read)
    per_step = []
    for _ in range(6):
        reuse = plan_step(trainer.step, cfg.seed, cfg.model, cfg.train).reuse
        with SyncCounter() as step_syncs:
            stats = trainer.train_step(it)
        per_step.append((reuse, step_syncs.total, step_syncs.where))
        assert math.isfinite(stats["loss"]) and not stats["skipped"]
    trainer.close()
    assert {reuse for reuse, _, _ in per_step} == {True, False}  # both full and reuse steps were counted
    assert all(n == 0 for _, n, _ in inner), [x for x in inner if x[1]]
    assert len(inner) == 2 * 2 * 7  # loss + backward, 2 micro-batches, 7 steps
    # Exactly one per optimizer step, in either mode: the trainer's read of the packed all-reduce,
    # which decides apply or skip. None would be a step that never looks at the non-finite flag.
    assert all(n == 1 and "trainer.py" in where[0] for _, n, where in per_step), per_step


def _trained_like(cfg):
    """A model whose blocks are not the identity (adaLN is zero at init), so reuse mode differs."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(std=0.05)
    model.embed.dropout.p = 0.0
    return model.train()


def _loss_inputs(cfg, M, q, B=4):
    N = cfg.seq_len
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.codebook_size, (B, N), generator=g)
    labels = torch.randint(0, cfg.num_classes, (B,), generator=g)
    order = torch.from_numpy(mask_order(np.arange(B), 3, 0, N))
    masked, rem = order[:, :M], (order[:, M:M + q] if q else None)
    torch._dynamo.maybe_mark_dynamic(masked, 1)
    if rem is not None:
        torch._dynamo.maybe_mark_dynamic(rem, 1)
    return tokens, labels, masked, rem


def test_forward_and_loss_are_one_graph_per_mode():
    cfg = model_config("tiny", grid_size=8, codebook_size=64, num_classes=10)
    model = _trained_like(cfg)
    ema = EMA(model, 0.9)
    for q in (0, 10):
        tokens, labels, masked, rem = _loss_inputs(cfg, 20, q)
        graphs, breaks, reasons = count_graphs(compute_loss, model, ema, tokens, labels, masked, rem, 64, 0.1)
        assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_compiled_loss_matches_eager_with_one_graph_for_all_mask_counts():
    """Through AOTAutograd (the graphs inductor would compile; inductor itself takes minutes on 2
    cores): forward and gradients match eager, and new mask counts reuse the graph of their mode."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = model_config("tiny", grid_size=8, codebook_size=64, num_classes=10)
    model = _trained_like(cfg)
    ema = EMA(model, 0.9)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(compute_loss, backend=counter)
    # The last two pin a count (no visible token left in the previous input; a single [MASK]):
    # they compile graphs of their own instead of failing.
    for M, q in ((20, 0), (33, 0), (20, 10), (41, 7), (63, 1), (1, 0)):
        tokens, labels, masked, rem = _loss_inputs(cfg, M, q)
        results = []
        for fn in (compute_loss, compiled):
            torch.manual_seed(0)
            model.zero_grad(set_to_none=True)
            loss = fn(model, ema, tokens, labels, masked, rem, 64, 0.1)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (eager, eager_grads), (comp, comp_grads) = results
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
        for a, b in zip(comp_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if (M, q) == (41, 7):
            assert counter.frame_count == 2  # one graph for full mode, one for reuse mode


def test_mask_order_is_the_one_recorded_before_the_move_to_the_host():
    """The masks of a (seed, step, sample) are what the project drew before (recorded from the
    previous on-device implementation): resumed and old runs see the same masks."""
    order = mask_order(np.array([5, 123456789012345]), 7, 3, 16)
    assert order.tolist() == [[4, 11, 7, 10, 1, 6, 8, 3, 2, 9, 12, 14, 13, 15, 5, 0],
                              [3, 5, 12, 8, 11, 0, 15, 2, 7, 10, 1, 4, 6, 13, 9, 14]]
    plan = plan_step(5, 0, model_config("tiny"), TrainConfig())
    assert (plan.masked, plan.reuse, plan.remasked) == (228, True, 15)
    assert plan.mask_ratio == pytest.approx(0.891429644264762, abs=1e-15)


def test_per_rank_plan_draws_vary_ratio_and_remask_but_share_the_reuse_coin():
    mcfg = model_config("tiny", grid_size=16)
    tcfg = TrainConfig(plan_draws="per_rank")
    for step in range(12):
        plans = [plan_step(step, 0, mcfg, tcfg, rank) for rank in range(4)]
        assert len({p.reuse for p in plans}) == 1
        assert plans[0].reuse == plan_step(step, 0, mcfg, TrainConfig()).reuse
        assert len({p.mask_ratio for p in plans}) == 4
    # Every pass keeps a token in each part on every rank (see plan_step): no rank skips a module.
    N = mcfg.seq_len
    for step in range(3000):
        p = plan_step(step, 0, mcfg, tcfg, step % 8)
        assert 1 <= p.masked <= N - 1
        if p.reuse:
            assert p.remasked >= 1 and N - p.masked - p.remasked >= 1, p
    shared = [plan_step(3, 0, mcfg, TrainConfig(), rank) for rank in range(4)]
    assert len({p.masked for p in shared}) == 1  # global draws ignore the rank


def test_weight_decay_scopes():
    from enat.train.trainer import param_groups

    cfg = load_config(None, ["model.size=tiny"])
    model = build_model(cfg.model)
    n = len(list(model.parameters()))
    groups = param_groups(model, cfg)
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    assert sum(len(g["params"]) for g in groups) == n
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and len(groups[1]["params"]) > 0
    cfg.train.weight_decay_scope = "all"
    (group,) = param_groups(model, cfg)
    assert group["weight_decay"] == 0.03 and len(group["params"]) == n


def test_resampled_stream_trains(shards, tmp_path):
    """Resampled batches carry sample ids and the mask order like the exact loader's."""
    from enat.train.trainer import Trainer

    cfg = trainer_config(shards, tmp_path / "run", **{"data.resampled": "true", "train.zero_stage": 0,
                                                       "train.precision": "fp32", "train.steps": 3})
    trainer = Trainer(cfg, log=lambda *_: None)
    batch = next(iter(trainer.loader))
    assert batch["uid"].shape == (8,) and batch["order"].shape == (8, 64)
    assert torch.equal(batch["order"], torch.from_numpy(mask_order(batch["uid"].numpy(), 0, cfg.seed, 64)))
    last = trainer.fit()
    trainer.close()
    assert last["step"] == 3 and np.isfinite(last["loss"])


def adamw_state(trainer) -> dict:
    """Copies of what the optimizer step would change: the AdamW moments and step counts, and the
    parameters it updates (ZeRO-1/2: DeepSpeed's wrapper holds the torch AdamW over the fp32
    partitions, `single_partition_of_fp32_groups`; ZeRO-0 fp32: the engine's optimizer is the AdamW)."""
    opt = trainer.engine.optimizer
    adamw = getattr(opt, "optimizer", opt)
    assert isinstance(adamw, torch.optim.AdamW), type(adamw)
    out = {}
    for g, group in enumerate(adamw.param_groups):
        for i, p in enumerate(group["params"]):
            out[g, i, "param"] = p.detach().clone()
            for k in ("exp_avg", "exp_avg_sq", "step"):
                out[g, i, k] = adamw.state[p][k].detach().clone()
    if hasattr(opt, "single_partition_of_fp32_groups"):
        assert all(any(q is p for p in adamw.param_groups[g]["params"])
                   for g, q in enumerate(opt.single_partition_of_fp32_groups))
    return out


def changed(before: dict, after: dict) -> list:
    """The keys whose tensors are not bitwise equal (a NaN that appeared counts as changed)."""
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("zero_stage,precision", [(2, "bf16"), (0, "fp32")])
def test_non_finite_step_is_skipped_without_touching_weights_optimizer_or_schedule(shards, tmp_path, zero_stage,
                                                                                   precision):
    """The skip decided from the packed read: a NaN loss (step 1), and under a finite loss a NaN
    gradient (step 2) and an inf gradient (step 3), each on one element of one parameter. Each is
    skipped and counted; weights, AdamW moments and step counts (bitwise) and the LR schedule stay
    where they were (DeepSpeed's bf16 overflow check is off, so only the trainer's flag can catch
    it); the one host read per step holds on the skip path too. Step 4 applies again."""
    from enat.train.trainer import Trainer

    cfg = trainer_config(shards, tmp_path / "run", **{"train.zero_stage": zero_stage, "train.precision": precision,
                                                       "train.inject_nan_steps": "[1]"})
    trainer = Trainer(cfg, log=lambda *_: None)
    poison = {"value": None}

    def poisoned(grad):  # one element of this parameter's gradient, before it is accumulated
        if poison["value"] is None:
            return grad
        grad = grad.clone()
        grad.view(-1)[7] = poison["value"]
        return grad

    handle = dict(trainer.module.named_parameters())["encoder.0.mlp.fc1.weight"].register_hook(poisoned)
    losses, loss_fn = [], trainer.loss_fn

    def recorded(*a, **k):
        losses.append(loss_fn(*a, **k))
        return losses[-1]

    trainer.loss_fn = recorded
    it = iter(trainer.loader)
    trainer.train_step(it)
    module_before = [p.detach().clone() for p in trainer.module.parameters()]
    opt_before = adamw_state(trainer)
    assert hasattr(trainer.engine.optimizer, "single_partition_of_fp32_groups") == (zero_stage == 2)
    lr_steps = trainer.scheduler.last_epoch
    for step, value in ((1, None), (2, float("nan")), (3, float("inf"))):
        poison["value"], losses[:] = value, []
        with SyncCounter() as syncs:
            stats = trainer.train_step(it)
        assert syncs.total == 1, syncs.where
        assert stats["skipped"] and trainer.skipped == step and trainer.consecutive_skips == step, (step, stats)
        assert trainer.step == step + 1 and trainer.scheduler.last_epoch == lr_steps
        if value is not None:  # the loss was finite: the gradient alone made the step bad
            assert len(losses) == 2 and all(math.isfinite(float(x.detach())) for x in losses), losses
        assert not changed(opt_before, adamw_state(trainer)), (step, changed(opt_before, adamw_state(trainer)))
        assert all(torch.equal(a, b) for a, b in zip(module_before, trainer.module.parameters())), step
    poison["value"] = None
    handle.remove()
    stats = trainer.train_step(it)
    assert not stats["skipped"] and math.isfinite(stats["loss"]) and trainer.consecutive_skips == 0
    assert trainer.skipped == 3
    assert not all(torch.equal(a, b) for a, b in zip(module_before, trainer.module.parameters()))
    # An applied step changes every kind of entry the skipped steps left alone.
    assert {k[2] for k in changed(opt_before, adamw_state(trainer))} == {"param", "exp_avg", "exp_avg_sq", "step"}
    assert all(torch.isfinite(v).all() for v in adamw_state(trainer).values())
    assert trainer.scheduler.last_epoch == lr_steps + 1
    trainer.close()


@pytest.mark.slow  # 30 s of dynamo + AOTAutograd on 2 cores
def test_compiled_trainer_step_compiles_once_per_mode(shards, tmp_path):
    """train.compile: DeepSpeed's forward hooks are off the module, so micro-steps do not
    recompile (through AOTAutograd here: inductor takes minutes on 2 cores)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from enat.train.trainer import Trainer

    cfg = trainer_config(shards, tmp_path / "run", **{"train.zero_stage": 2, "train.precision": "bf16",
                                                       "train.compile": "true"})
    trainer = Trainer(cfg, log=lambda *_: None)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    trainer.loss_fn = torch.compile(compute_loss, backend=counter)
    it = iter(trainer.loader)
    modes, frames = set(), []
    for _ in range(12):
        modes.add(plan_step(trainer.step, cfg.seed, cfg.model, cfg.train).reuse)
        assert np.isfinite(trainer.train_step(it)["loss"])
        frames.append(counter.frame_count)
    trainer.close()
    # Full mode, reuse mode, and the reuse counts that pin a size (a single re-masked token, none
    # or one old visible token left): 5 graphs over these 24 micro-batches, none in the last 4
    # steps. With DeepSpeed's hooks on the module it recompiled on every micro-batch.
    assert modes == {True, False} and frames[-1] <= 6 and frames[-4:] == [frames[-1]] * 4, frames
