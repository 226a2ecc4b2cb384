"""The trainer with real DeepSpeed on CPU (gloo): ZeRO stages agree, ZeRO-3 partitions, EMA under
ZeRO-3, exact resume (ZeRO-2 and ZeRO-3, 2 ranks, reuse-mode steps included), resume on another
world size, the NaN guard, wandb run-id continuity, and loss going down. Each launch runs several
jobs (tests/dist_harness.py) because a launch costs ~10 s."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, demo_shards, train_losses as losses
from enat.config import load_config
from enat.dist import free_port
from enat.train.objective import plan_step

pytestmark = pytest.mark.slow
CONFIG = str(ROOT / "configs/experiments/demo.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("data"))


def base(data, run_dir, **kw):
    over = dict({"train.precision": "fp32", "train.log_every": 1, "train.val_every": 0, "train.sample_every": 0,
                 "train.ckpt_every": 0, "train.wandb.mode": "disabled", "train.micro_batch": 16,
                 "train.steps": 8, "train.warmup_steps": 2, "train.ema_decay": 0.9, "data.num_workers": 0,
                 "train.run_dir": str(run_dir), "train.val_samples": 64})
    over.update({k: v for k, v in kw.items()})
    return data + [f"{k}={v}" for k, v in over.items()]


def launch(tmp_path, jobs, nproc=2, name="out"):
    jobs_path, out = tmp_path / f"{name}_jobs.json", tmp_path / f"{name}.json"
    jobs_path.write_text(json.dumps([{"config": CONFIG, **j} for j in jobs]))
    # This checkout first: the venv's editable install may point at another one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests/dist_harness.py"), str(jobs_path), str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and out.is_file(), res.stderr[-5000:]
    results = json.loads(out.read_text())
    for job in jobs:
        r = results[job["name"]]
        if not job.get("expect_error"):
            assert "error" not in r, r.get("traceback")
    return results


def grad_norms(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in recs if r.get("kind") == "train"}


def check_compute_axis(run_dir, cfg):
    """metrics.jsonl counts exact cumulative FLOPs, tokens and [MASK] tokens (every step's plan,
    recomputed here; 2 ranks then 1 across the resume), and wandb holds the same values with
    flops_seen declared as the losses' x-axis and N in the run's config."""
    from conftest import wandb_history, wandb_records
    from enat.flops import train_step_flops
    from enat.models.zoo import parameter_counts

    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    flops = masked = 0
    for r in train:
        plan = plan_step(r["step"] - 1, cfg.seed, cfg.model, cfg.train)
        flops += 32 * train_step_flops(cfg.model, plan.masked, plan.reuse, plan.remasked)
        masked += 32 * plan.masked
        assert (r["flops_seen"], r["masked_tokens_seen"]) == (flops, masked)
        assert r["tokens_seen"] == r["samples_seen"] * cfg.model.seq_len == r["step"] * 32 * 64

    records = wandb_records(run_dir)
    axes = {(m.metric.name or m.metric.glob_name): m.metric.step_metric for m in records
            if m.WhichOneof("record_type") == "metric"}
    assert axes["loss"] == axes["val/*"] == axes["val_ema/*"] == axes["loss_r*"] == "flops_seen"
    assert {"flops_seen", "samples_seen", "tokens_seen", "masked_tokens_seen"} <= set(axes)
    logged = [h for h in wandb_history(records) if "loss" in h]
    assert [h["flops_seen"] for h in logged] == [r["flops_seen"] for r in train]
    config = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        config.update({(list(i.nested_key) or [i.key])[0]: json.loads(i.value_json) for i in items})
    total, nonembed = parameter_counts(cfg.model)
    assert (config["n_params"], config["n_params_nonembed"], config["model_size"]) == (total, nonembed, "tiny")


def test_step_counts_sum_every_ranks_plan():
    """With per-rank plan draws the ranks mask different counts: the step's FLOPs sum them."""
    from types import SimpleNamespace

    from enat.flops import train_step_flops
    from enat.train.trainer import Trainer

    cfg = load_config(CONFIG, ["train.plan_draws=per_rank", "train.micro_batch=8", "train.grad_accum=2"])
    fake = SimpleNamespace(cfg=cfg, world=3)
    differ = 0
    for step in range(6):
        plans = [plan_step(step, cfg.seed, cfg.model, cfg.train, r) for r in range(3)]
        differ += len({p.masked for p in plans}) > 1
        expected = sum(16 * train_step_flops(cfg.model, p.masked, p.reuse, p.remasked) for p in plans)
        assert Trainer.step_counts(fake, step) == (expected, sum(16 * p.masked for p in plans))
    assert differ >= 3  # the case is not trivial: the ranks' counts do differ


def test_plans_cover_both_modes():
    cfg = load_config(CONFIG)
    modes = {plan_step(s, cfg.seed, cfg.model, cfg.train).reuse for s in range(6)}
    assert modes == {True, False}


def test_lr_schedules():
    """wsd: warm-up, flat, then a linear cool-down over the last cooldown_fraction to the floor;
    cosine reaches the same floor; a bad fraction is refused."""
    from enat.config import ConfigError
    from enat.train.trainer import lr_lambda

    over = ["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]
    wsd = lr_lambda(load_config(CONFIG, over + ["train.schedule=wsd", "train.cooldown_fraction=0.2"]))
    assert [wsd(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [wsd(s) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert [wsd(s) for s in (90, 100)] == pytest.approx([0.55, 0.1])
    cosine = lr_lambda(load_config(CONFIG, over + ["train.schedule=cosine"]))
    assert cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="cooldown_fraction"):
        load_config(CONFIG, over + ["train.cooldown_fraction=0"])


def test_zero_stages_agree_zero3_partitions_and_ema(tmp_path, data):
    jobs = [{"name": f"z{s}", "overrides": base(data, tmp_path / f"z{s}", **{"train.zero_stage": s, "train.steps": 6})}
            for s in (0, 1, 2, 3)]
    jobs += [
        {"name": "z3_ckpt", "overrides": base(data, tmp_path / "z3_ckpt", **{
            "train.zero_stage": 3, "train.steps": 6, "train.activation_checkpointing": "true"})},
        {"name": "nat", "overrides": base(data, tmp_path / "nat", **{
            "model.arch": "nat", "sample.reuse": "false", "train.steps": 3})},
        {"name": "bf16", "overrides": base(data, tmp_path / "bf16", **{
            "train.precision": "bf16", "train.zero_stage": 2, "train.steps": 3})},
        # Per-rank mask ratios under ZeRO-3: different shapes on the two ranks, the same modules.
        {"name": "z3_per_rank", "overrides": base(data, tmp_path / "z3_per_rank", **{
            "train.zero_stage": 3, "train.steps": 6, "train.plan_draws": "per_rank"})},
    ]
    r = launch(tmp_path, jobs)
    for name in ("nat", "bf16", "z3_per_rank"):
        assert all(math.isfinite(v) and 3 < v < 6 for v in losses(tmp_path / name).values()), name
    assert losses(tmp_path / "z3_per_rank") != losses(tmp_path / "z3")
    ref = losses(tmp_path / "z0")
    assert len(ref) == 6
    for s in (1, 2, 3, "3_ckpt"):
        got = losses(tmp_path / f"z{s}")
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (s, step)
        # The trainer's own gradient norm (ZeRO-0/1/2: from the packed all-reduce) agrees with DeepSpeed's (ZeRO-3).
        norms, ref_norms = grad_norms(tmp_path / f"z{s}"), grad_norms(tmp_path / "z0")
        for step in ref:
            assert 0 < norms[step] == pytest.approx(ref_norms[step], rel=1e-5), (s, step)
    assert r["z3"]["local_param_fraction"] == pytest.approx(0.5, abs=0.01)
    assert r["z2"]["local_param_fraction"] == 1.0
    for k, v in r["z0"]["ema"].items():  # EMA kept under ZeRO-3 equals the EMA of the full weights
        assert r["z3"]["ema"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert r["z3"]["ema_first"] == pytest.approx(r["z0"]["ema_first"], abs=1e-6)


def test_exact_resume_world_size_change_nan_guard_and_run_id(tmp_path, data):
    # Dropout masks derive from (seed, step, micro-batch, rank), so they change with the rank layout:
    # the ZeRO-2 pair, which also feeds the world-size change, runs without dropout; ZeRO-3 with it.
    kw = {2: {"model.dropout": 0.0}, 3: {}}
    first = []
    for s in (2, 3):
        first.append({"name": f"straight{s}", "overrides": base(data, tmp_path / f"straight{s}", **{
            "train.zero_stage": s, "train.ckpt_every": 4, **kw[s]})})
        first.append({"name": f"cut{s}", "stop_at": 4, "overrides": base(data, tmp_path / f"cut{s}", **{
            "train.zero_stage": s, "train.ckpt_every": 4, **kw[s]})})
    first.append({"name": "wandb", "stop_at": 2, "overrides": base(data, tmp_path / "wandb", **{
        "train.wandb.mode": "offline", "train.ckpt_every": 2, "train.steps": 4})})
    r1 = launch(tmp_path, first, name="first")
    shutil.copytree(tmp_path / "cut2", tmp_path / "cut2_one_rank")

    # Export: consolidated fp32 weights of a sharded (ZeRO-3) run, loadable with weights_only.
    from enat.cli import main
    from enat.models.weights import load_weights

    assert main(["export", str(tmp_path / "straight3"), str(tmp_path / "w.pt")]) == 0
    cfg, ema, meta = load_weights(tmp_path / "w.pt", "ema")
    assert meta["step"] == 8 and cfg.grid_size == 8
    for k, v in r1["straight3"]["ema"].items():
        assert ema[k].double().sum().item() == pytest.approx(v, rel=1e-6, abs=1e-6), k
    _, online, _ = load_weights(tmp_path / "w.pt", "online")
    assert set(online) == set(ema) and all(online[k].dtype == ema[k].dtype for k in ema)
    assert any(not torch.equal(online[k], ema[k]) for k in ema)

    # A new launch (new processes) resumes from the `latest` pointers.
    second = [{"name": f"cut{s}", "overrides": base(data, tmp_path / f"cut{s}", **{
        "train.zero_stage": s, "train.ckpt_every": 4, **kw[s]})} for s in (2, 3)]
    r2 = launch(tmp_path, second, name="second")
    for s in (2, 3):
        assert r2[f"cut{s}"]["start_step"] == 4
        straight, resumed = losses(tmp_path / f"straight{s}"), losses(tmp_path / f"cut{s}")
        assert sorted(resumed) == list(range(1, 9))
        assert resumed == straight, s  # bit for bit, reuse-mode steps and data position included

    # One rank continues the 2-rank ZeRO-2 run (same global batch) via the universal checkpoint.
    third = [
        {"name": "one_rank", "overrides": base(data, tmp_path / "cut2_one_rank", **{
            "train.zero_stage": 2, "train.micro_batch": 32, "train.ckpt_every": 4, "model.dropout": 0.0})},
        {"name": "wandb", "overrides": base(data, tmp_path / "wandb", **{
            "train.wandb.mode": "offline", "train.ckpt_every": 2, "train.steps": 4, "train.micro_batch": 32})},
        {"name": "nan_once", "overrides": base(data, tmp_path / "nan1", **{
            "train.inject_nan_steps": "[2]", "train.steps": 5})},
        # The skip takes each stage's own path (ZeRO-0: the trainer's; ZeRO-3: DeepSpeed's overflow path).
        {"name": "nan_z0", "overrides": base(data, tmp_path / "nan_z0", **{
            "train.inject_nan_steps": "[2]", "train.steps": 5, "train.zero_stage": 0})},
        {"name": "nan_z3", "overrides": base(data, tmp_path / "nan_z3", **{
            "train.inject_nan_steps": "[2]", "train.steps": 5, "train.zero_stage": 3})},
        {"name": "nan_stop", "expect_error": True, "overrides": base(data, tmp_path / "nan2", **{
            "train.inject_nan_steps": "[2,3]", "train.max_consecutive_skips": 2, "train.steps": 6})},
        {"name": "learn", "overrides": base(data, tmp_path / "learn", **{
            "train.steps": 40, "train.lr": 3e-3, "train.zero_stage": 1})},
    ]
    r3 = launch(tmp_path, third, nproc=1, name="third")
    assert r3["one_rank"]["start_step"] == 4
    assert (tmp_path / "cut2_one_rank/checkpoints/step00000004_universal").is_dir()
    straight, one = losses(tmp_path / "straight2"), losses(tmp_path / "cut2_one_rank")
    for step in range(5, 9):
        assert one[step] == pytest.approx(straight[step], rel=1e-5), step

    assert r3["wandb"]["run_id"] and r3["wandb"]["start_step"] == 2
    assert (tmp_path / "wandb/wandb_run_id").read_text() == r3["wandb"]["run_id"]
    runs = list((tmp_path / "wandb/wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(r3["wandb"]["run_id"]) for p in runs)
    check_compute_axis(tmp_path / "wandb", load_config(CONFIG, base(data, tmp_path / "wandb", **{"train.steps": 4})))

    for name, run in (("nan_once", "nan1"), ("nan_z0", "nan_z0"), ("nan_z3", "nan_z3")):
        assert r3[name]["skipped"] == 1 and r3[name]["step"] == 5, name
        nan_losses = losses(tmp_path / run)
        assert all(math.isfinite(v) for k, v in nan_losses.items() if k != 3), name  # finite except the skipped step
        recs = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        counts = [(r["skipped_steps"], r["skipped_in_window"]) for r in recs if r["kind"] == "train"]
        assert counts == [(0, 0), (0, 0), (1, 1), (1, 0), (1, 0)], (name, counts)
    # A skipped step leaves weights and optimizer alone: the stages still agree after it.
    z0, z3 = losses(tmp_path / "nan_z0"), losses(tmp_path / "nan_z3")
    for step in (4, 5):
        assert z3[step] == pytest.approx(z0[step], rel=1e-6, abs=1e-6), step
    assert "NonFiniteError" in r3["nan_stop"]["error"] and "step 3" in r3["nan_stop"]["error"]

    learned = losses(tmp_path / "learn")
    early = sum(learned[s] for s in range(1, 6)) / 5
    late = sum(learned[s] for s in range(36, 41)) / 5
    assert late < early - 0.05, (early, late)
