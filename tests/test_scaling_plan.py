"""scaling.plan's study phases: the LR sweep's spec, the LR per size from its results, isoFLOP
levels sized to the study's minutes and centred on the prior, the data-repetition rule, seed
repeats, and a hold-out beyond the fitted range; the specs the launcher accepts."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT
from enat.config import dump_config, load_config
from enat.sweeps import load_sweep, run_configs, run_entry
from scaling.collect import ScalingError
from scaling.plan import choose_lrs, load_study, plan_lr_sweep, plan_study, study_sizes, write_study

SIZES = {f"w{w}": {"model.width": w, "model.num_heads": w // 16, "model.enc_depth": d, "model.dec_depth": 1}
         for w, d in ((16, 1), (32, 2), (48, 2), (64, 3), (80, 3), (96, 4), (128, 4), (192, 5))}


def study_file(tmp_path, **kw):
    spec = {"name": "t", "config": str(ROOT / "configs/experiments/demo.yaml"), "out_dir": str(tmp_path / "study"),
            "overrides": {"train.micro_batch": 64, "launch.gpus_per_node": 1, "train.schedule": "wsd"},
            "sizes": SIZES, "lr_sweep": {"sizes": ["w32", "w96"], "lrs": [1e-3, 2e-3, 4e-3], "steps": 50},
            "minutes": 20, "levels": 4, "level_ratio": 2, "per_level": 5, "min_steps": 100, **kw}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(spec))
    return path


def seconds(sizes):  # a machine doing 30 GFLOP/s per run
    return {n: v["flops_per_sample"] / 30e9 for n, v in sizes.items()}


def test_isoflop_levels_fit_the_minutes_and_the_holdout_lies_beyond(tmp_path):
    study = load_study(study_file(tmp_path))
    sizes = study_sizes(study)
    lrs = {n: 2e-3 for n in sizes}
    p = plan_study(study, lrs, seconds(sizes), sizes, images=10 ** 7, parallel=2)
    levels = p["levels"]
    assert len(levels) == 4 and np.allclose(np.diff(np.log(levels)), np.log(2))
    main = [r for r in p["fit"] if "seed" not in r]
    for j, level in enumerate(levels):
        at = [r for r in main if r["_level"] == j + 1]
        assert len(at) == 5 and all(r["_compute"] == pytest.approx(level, rel=0.05) for r in at)
        assert all(r["train.steps"] >= 100 for r in at)  # min_steps
        assert all(r["train.warmup_steps"] == max(10, round(0.05 * r["train.steps"])) for r in at)
    # Centred on a prior N* ~ C^0.5: the levels' sizes move up the ladder with compute.
    mean_logn = [np.mean([np.log(r["_N"]) for r in main if r["_level"] == j + 1]) for j in range(4)]
    assert mean_logn == sorted(mean_logn) and mean_logn[-1] > mean_logn[0]
    # Seed repeats: 2 extra seeds at 3 points, identical but for the seed.
    seeds = [r for r in p["fit"] if "seed" in r]
    assert len(seeds) == 6 and {r["seed"] for r in seeds} == {1, 2}
    # The hold-out: >= 2x the largest fitted N, >= 3x the top level's compute, 2 seeds.
    n_fit = max(r["_N"] for r in p["fit"])
    assert len(p["holdout"]) == 2 and all(r["_N"] >= 2 * n_fit for r in p["holdout"])
    assert all(r["_compute"] >= 2.9 * levels[-1] for r in p["holdout"])
    # The wall time the plan predicts is the study's budget.
    assert p["predicted_minutes"] == pytest.approx(20, rel=0.05)
    # Twice the machine speed: twice the compute per run.
    p2 = plan_study(study, lrs, {n: s / 2 for n, s in seconds(sizes).items()}, sizes, images=10 ** 7, parallel=2)
    assert p2["levels"][-1] > 1.6 * levels[-1]


def test_specs_are_sweeps_the_launcher_accepts(tmp_path):
    study = load_study(study_file(tmp_path))
    lr = load_sweep(plan_lr_sweep(study))
    configs = run_configs(lr)
    assert len(configs) == 6 and configs[0][0].name == "w32-lr0.001"
    assert configs[0][1].train.lr == 1e-3 and configs[0][1].model.width == 32 and configs[0][1].train.steps == 50
    sizes = study_sizes(study)
    lrs = {n: 2e-3 for n in sizes}
    p = plan_study(study, lrs, seconds(sizes), sizes, images=None, parallel=2)
    paths = write_study(study, p, sizes, lrs, {}, seconds(sizes))
    fit = run_configs(load_sweep(paths["fit"]))
    assert len(fit) == len(p["fit"])
    run, cfg = fit[0]
    assert run_entry(run, cfg)["compute_budget"] == pytest.approx(p["fit"][0]["_compute"])
    assert cfg.train.schedule == "wsd" and cfg.train.val_every == cfg.train.steps // 4
    hold = run_configs(load_sweep(paths["holdout"]))
    assert [r.name for r, _ in hold] == ["w192-holdout-seed0", "w192-holdout-seed1"]
    assert "| w192-holdout-seed0 | H |" in paths["plan"].read_text()


def test_data_repetition_is_refused(tmp_path):
    study = load_study(study_file(tmp_path))
    sizes = study_sizes(study)
    with pytest.raises(ScalingError, match="more than 4.0 times.*make more training data"):
        plan_study(study, {n: 2e-3 for n in sizes}, seconds(sizes), sizes, images=2000, parallel=2)


def test_bad_studies_are_refused(tmp_path):
    with pytest.raises(ScalingError, match="unknown study keys"):
        load_study(study_file(tmp_path, budget=3))
    with pytest.raises(ScalingError, match="lr_sweep.*unknown sizes"):
        load_study(study_file(tmp_path, lr_sweep={"sizes": ["w7"], "lrs": [1e-3], "steps": 5}))
    study = load_study(study_file(tmp_path, holdout={"size": "w48"}))
    sizes = study_sizes(study)
    with pytest.raises(ScalingError, match="half the hold-out"):
        plan_study(study, {n: 2e-3 for n in sizes}, seconds(sizes), sizes)


def fake_lr_run(root, name, overrides, loss):
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", overrides + [f"train.run_dir={run}", "train.steps=50"])
    dump_config(cfg, run / "config.yaml")
    rec = [{"kind": "train", "step": 50, "samples_seen": 3200, "loss": 4.0, "window_s": 1.0},
           {"kind": "val", "step": 50, "samples_seen": 3200, "val/loss_r0.7": loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    return {"name": name, "run_dir": str(run)}


def test_lr_per_size_from_the_lr_sweep(tmp_path):
    study = load_study(study_file(tmp_path))
    sizes = study_sizes(study)
    root = tmp_path / "lr"
    best = {"w32": 4e-3, "w96": 1e-3}  # the smaller model takes the larger LR
    runs = []
    for size in ("w32", "w96"):
        over = [f"{k}={v}" for k, v in SIZES[size].items()]
        for lr in (1e-3, 2e-3, 4e-3):
            loss = 3.0 + 0.1 * np.log(lr / best[size]) ** 2  # a parabola in log LR
            runs.append(fake_lr_run(root, f"{size}-lr{lr:g}", over, loss))
    (root / "sweep.json").write_text(json.dumps({"name": "t_lr", "runs": runs}))
    lrs, notes = choose_lrs(study, sizes, root)
    assert lrs["w32"] == pytest.approx(4e-3, rel=1e-6) and lrs["w96"] == pytest.approx(1e-3, rel=1e-6)
    assert notes["per_size"]["w32"]["at_grid_edge"] and "N^-" in notes["rule"]
    # Between the swept sizes: log-linear in log N; beyond them, clamped to the swept LRs.
    assert 1e-3 < lrs["w64"] < 4e-3 and lrs["w16"] == pytest.approx(4e-3) and lrs["w192"] == pytest.approx(1e-3)
    # An interior optimum is read off the parabola, not the grid.
    for r in runs:
        if r["name"].startswith("w96"):
            m = (tmp_path / "lr" / r["name"] / "metrics.jsonl")
            lr = float(r["name"].split("lr")[1])
            rec = [json.loads(x) for x in m.read_text().splitlines()]
            rec[1]["val/loss_r0.7"] = 3.0 + 0.1 * np.log(lr / 1.5e-3) ** 2
            m.write_text("".join(json.dumps(x) + "\n" for x in rec))
    lrs, notes = choose_lrs(study, sizes, root)
    assert lrs["w96"] == pytest.approx(1.5e-3, rel=1e-6) and not notes["per_size"]["w96"]["at_grid_edge"]
    (root / "w32-lr0.002" / "metrics.jsonl").unlink()
    with pytest.raises(ScalingError, match="no finished run of w32 at lr"):
        choose_lrs(study, sizes, root)


def test_measured_throughput_leaves_the_environment_as_it_was(tmp_path):
    from scaling.plan import measure_seconds_per_sample

    study = load_study(study_file(tmp_path))
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    sec = measure_seconds_per_sample(study, ["w16", "w32"], steps=2, warmup=1, log=lambda *_: None)
    assert set(sec) == {"w16", "w32"} and all(0 < s < 1 for s in sec.values())
    assert {k: os.environ.get(k) for k in keys} == before  # runs launched next must not inherit its port


@pytest.mark.slow
def test_a_study_runs_end_to_end(tmp_path):
    """scaling.study on a micro study of two families (ENAT and the NAT) and two rounds with local
    processes: per family the LR sweep, the plan (throughput measured), round 1, its fit, round 2
    planned from it, pre-registration, hold-out, report; then the comparison. Each prediction is on
    disk before any of its hold-out runs starts, and is then checked against their results."""
    import subprocess
    import sys

    from conftest import demo_shards
    from scaling.holdout import evaluate_holdout

    data = dict(o.split("=", 1) for o in demo_shards(tmp_path / "data"))
    spec = {"name": "e2e", "config": str(ROOT / "configs/experiments/demo.yaml"), "out_dir": str(tmp_path / "study"),
            "families": {"enat": {}, "nat": {"model.arch": "nat", "sample.reuse": False}}, "rounds": 2,
            "overrides": {**data, "launch.gpus_per_node": 1, "launch.cpus_per_task": 1, "launch.array_parallelism": 2,
                          "train.micro_batch": 16, "train.log_every": 5, "train.val_samples": 64,
                          "train.sample_every": 0, "train.ckpt_every": 0, "train.zero_stage": 0, "train.schedule": "wsd",
                          "train.wandb.mode": "disabled", "model.dropout": 0.0},
            "sizes": {"w16": SIZES["w16"], "w32": SIZES["w32"], "w48": SIZES["w48"],
                      "w96": {**SIZES["w96"], "model.enc_depth": 3}},
            "lr_sweep": {"sizes": ["w16"], "lrs": [2e-3, 4e-3], "steps": 10}, "minutes": 1.0, "levels": 2,
            "level_ratio": 2, "per_level": 3, "min_steps": 10, "val_points": 2, "max_epochs": 1000,
            "seeds": {"extra": [1], "points": 1}, "holdout": {"size": "w96", "compute_factor": 3, "seeds": [0, 1]},
            "run_overhead_s": 10}
    path = tmp_path / "e2e.yaml"
    path.write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, "-m", "scaling.study", "--study", str(path), "--cluster", "local"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "study"
    summary = json.loads((out / "study.json").read_text())
    per_family = ["lr sweep", "plan", "round 1", "round 1 fit", "plan round 2", "round 2", "pre-registration",
                  "hold-out", "report"]
    assert set(summary["phases_s"]) == {f"{f}: {p}" for f in ("enat", "nat") for p in per_family} | {
        "comparison", "total"}
    from datetime import datetime

    for fam in ("enat", "nat"):
        fam_dir = out / fam
        prereg = fam_dir / "holdout" / "preregistration.json"
        registered = json.loads(prereg.read_text())
        created = datetime.fromisoformat(registered["created_at"].replace("Z", "+00:00")).timestamp()
        for seed in (0, 1):
            assert (fam_dir / "holdout" / f"w96-holdout-seed{seed}" / "config.yaml").stat().st_mtime > created
        checked = evaluate_holdout(prereg, fam_dir / "holdout")
        assert all(np.isfinite(t["observed"]) for t in checked["targets"])
        # Both rounds in one fit sweep: round 1 (2 levels x 3 sizes + 1 seed repeat), round 2 (2 x 3).
        runs = [r["name"] for r in json.loads((fam_dir / "fit" / "sweep.json").read_text())["runs"]]
        assert len(runs) == 13 and sum("-r2c" in r for r in runs) == 6
        assert len(registered["fit_points"]["runs"]) == 13
        assert (fam_dir / "round1" / "fit.json").is_file() and (fam_dir / "plan" / "plan2.md").is_file()
        assert (fam_dir / "report" / "report.md").is_file()
        assert load_config(fam_dir / "fit" / runs[0] / "config.yaml").model.arch == fam
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    assert comparison["families"] == ["enat", "nat"] and comparison["laws"]["enat"]["sampling"] == "reuse"
    assert comparison["laws"]["nat"]["sampling"] == "no reuse"
    assert (out / "comparison" / "comparison.md").read_text().startswith("# e2e: enat against nat")
