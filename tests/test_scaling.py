"""scaling/: the law fit recovers known exponents, the hold-out check, clear errors for degenerate
sweeps, collect's table and exclusions, the report, the FID law, and the isoFLOP planner."""

import json

import numpy as np
import pytest

from conftest import ROOT
from enat.config import dump_config, load_config
from enat.models.zoo import parameter_counts
from scaling.collect import ScalingError, collect
from scaling.fit import compute_optimal, fit_fid, fit_law, holdout

CONFIG = ROOT / "configs/experiments/demo.yaml"
TRUE = dict(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.28)


def law(N, D):
    return TRUE["E"] + TRUE["A"] / np.asarray(N, float) ** TRUE["alpha"] + TRUE["B"] / np.asarray(D, float) ** TRUE["beta"]


def synthetic(noise=0.005, sizes=(1e5, 3e5, 1e6, 3e6, 1e7), seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    for i, n in enumerate(sizes):
        for d in np.geomspace(1e5, 1e8, 12):
            pts.append({"run": f"r{i}", "n_params_nonembed": n, "samples": d,
                        "val_loss_r0.7": float(law(n, d) * np.exp(rng.normal(0, noise)))})
    return pts


def test_fit_recovers_known_exponents_within_5_percent():
    pts = synthetic()
    fit = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts],
                  [p["val_loss_r0.7"] for p in pts], [p["run"] for p in pts], bootstrap=60)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.05)
    assert fit.at_bounds == []
    for name in ("alpha", "beta"):
        lo, hi = fit.ci[name]
        assert lo <= TRUE[name] <= hi, (name, fit.ci[name])
    opt = compute_optimal(fit, 100.0, [1e15, 1e16])
    true_a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert opt["a"] == pytest.approx(true_a, rel=0.05) and opt["a_ci"][0] <= true_a <= opt["a_ci"][1]
    assert opt["N"][1] / opt["N"][0] == pytest.approx(10 ** opt["a"], rel=1e-6)


def test_holdout_predicts_the_largest_run():
    ho = holdout(synthetic(), "val_loss_r0.7")
    assert ho["run"] == "r4" and ho["N"] == 1e7
    assert abs(ho["rel_error"]) < 0.02
    assert ho["observed"] == pytest.approx(law(1e7, 1e8), rel=0.02)


def test_unidentified_irreducible_loss_is_flagged():
    pts = synthetic(noise=0.0)
    L = [p["val_loss_r0.7"] - TRUE["E"] for p in pts]  # a pure power law: E = 0
    fit = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], L, bootstrap=0)
    assert "E" in fit.at_bounds


def test_degenerate_sweeps_give_clear_errors():
    pts = [p for p in synthetic() if p["run"] == "r2"]
    with pytest.raises(ScalingError, match="only one model size"):
        fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p["val_loss_r0.7"] for p in pts])
    pts = [p for p in synthetic() if p["samples"] == 1e5]
    with pytest.raises(ScalingError, match="same number of samples"):
        fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p["val_loss_r0.7"] for p in pts])


def test_fid_law_fitted_only_when_justified():
    C = np.geomspace(1e12, 1e15, 6)
    fid = 3.0 + 40.0 * (C / 1e12) ** -0.5
    res = fit_fid(C, fid)
    assert res["fitted"] and res["gamma"] == pytest.approx(0.5, rel=0.02) and res["F_inf"] == pytest.approx(3.0, rel=0.05)
    res = fit_fid(C[:3], fid[:3])
    assert not res["fitted"] and "needs >= 4" in res["reason"]


# --- collect and report on run directories ----------------------------------------------------


def fake_run(root, name, width, steps, val_every=20, batch=64, done=True, metrics=True, data=None, context=None,
             scale=1.0):
    """A run directory as the trainer leaves it, with losses from the known law (times `scale`).
    data: overrides naming token shards (default: shards that do not exist); context: loss at mask
    0.9 / loss at 0.7."""
    run = root / name
    run.mkdir(parents=True)
    data = data or [f"data.shards={root / 'no-shards'}", f"data.val_shards={root / 'no-val-shards'}"]
    cfg = load_config(CONFIG, [f"model.width={width}", f"train.steps={steps}", f"train.run_dir={run}"] + data)
    dump_config(cfg, run / "config.yaml")
    if not metrics:
        return run, cfg
    _, n = parameter_counts(cfg.model)
    last = steps if done else steps // 2
    lines = []
    for s in range(val_every, last + 1, val_every):
        lines.append({"kind": "train", "step": s, "samples_seen": s * batch, "loss": 5.0, "window_s": 1.5})
        loss = scale * float(law(n, s * batch))
        lines.append({"kind": "val", "step": s, "samples_seen": s * batch, "val/loss_r0.7": loss,
                      "val/loss_r0.5": loss * 0.9, **({"val/loss_r0.9": loss * context} if context else {})})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "eval.jsonl").write_text(json.dumps({"step": last, "eval/fid": 10.0 + 1000 / width}) + "\n")
    return run, cfg


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    runs = []
    for w in (32, 48, 64, 96):
        for steps in (200, 400):
            name = f"width{w}-steps{steps}"
            fake_run(root, name, w, steps)
            runs.append({"name": name, "run_dir": str(root / name)})
    fake_run(root, "broken", 64, 400, done=False)
    fake_run(root, "never", 64, 400, metrics=False)
    runs += [{"name": "broken", "run_dir": str(root / "broken")}, {"name": "never", "run_dir": str(root / "never")}]
    (root / "sweep.json").write_text(json.dumps({"name": "fake", "runs": runs}))
    return root


def test_collect_builds_the_table_and_lists_excluded_runs(sweep_dir):
    col = collect(sweep_dir)
    assert len(col.runs) == 8 and len(col.rows) == 4 * (10 + 20)
    reasons = {e["run"]: e["reason"] for e in col.excluded}
    assert "incomplete: logged up to step 200 of 400" in reasons["broken"]
    assert "metrics.jsonl" in reasons["never"]
    row = next(r for r in col.rows if r["run"] == "width32-steps200" and r["step"] == 200)
    assert row["samples"] == 200 * 64 and row["compute"] == pytest.approx(row["flops_per_sample"] * 200 * 64)
    assert row["n_params_nonembed"] < row["n_params"] and row["wall_s"] == pytest.approx(1.5 * 10)
    assert row["eval_fid"] == pytest.approx(10 + 1000 / 32)


def test_report_writes_fit_plots_and_markdown(sweep_dir, tmp_path):
    from scaling.report import report

    path = report(sweep_dir, tmp_path / "out", bootstrap=30, ignore_gate=True, approach_bootstrap=50)
    text = path.read_text()
    result = json.loads((tmp_path / "out/fit.json").read_text())
    # The losses follow the law exactly (N = non-embedding parameters of each width).
    assert result["law"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)
    assert result["law"]["beta"] == pytest.approx(TRUE["beta"], rel=0.05)
    assert abs(result["holdout"]["rel_error"]) < 0.01 and result["holdout"]["run"] == "width96-steps400"
    # the three approaches: the Huber fit recovers a = beta / (alpha + beta); the others say why not
    huber = result["approaches"]["results"][2]
    assert huber["a"] == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rel=0.05)
    assert "## Three approaches to N*(C)" in text and "## Inference-aware frontier" in text
    for png in ("loss_vs_compute", "isoflop", "optimal_n", "fid_vs_compute", "loss_by_mask_ratio"):
        assert (tmp_path / "out" / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in text
    assert "broken" in text and "incomplete" in text and "reported as points only" in text
    assert (tmp_path / "out/points.csv").read_text().count("\n") == 1 + 120


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_report_publishes_to_wandb_as_one_run(sweep_dir, tmp_path):
    """--wandb: a run of its own in the sweep's group (job type scaling-report) whose summary is
    fit.json; the points as a table and the plots as images; a re-run reuses the id."""
    from conftest import wandb_records, wandb_summary
    from scaling.publish import report_run_id
    from scaling.report import report

    out = tmp_path / "out"
    report(sweep_dir, out, bootstrap=20, wandb_mode="offline", ignore_gate=True, approach_bootstrap=20)
    result = json.loads((out / "fit.json").read_text())
    records = wandb_records(out)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.run_id) == ("fake", "scaling-report", report_run_id("enat", None, "fake"))
    summary = wandb_summary(records)
    for part in ("law", "optimal", "holdout", "k_flops_per_param_sample"):
        assert summary[part] == result[part], part
    assert summary["law"]["alpha"] == result["law"]["alpha"] and summary["holdout"]["rel_error"] == result["holdout"]["rel_error"]
    media = list(out.glob("wandb/offline-run-*/files/media"))[0]
    table = json.loads(next(media.glob("table/points_*.table.json")).read_text())
    assert len(table["data"]) == result["points"] and table["columns"][-1] == "val_loss_r0.7"
    assert {p.name.split("_")[0] for p in media.glob("images/plots/*.png")} >= {"isoflop", "optimal", "loss"}
    assert "Published to wandb as run" in (out / "report.md").read_text()

    report(sweep_dir, out, bootstrap=20, wandb_mode="offline", ignore_gate=True, approach_bootstrap=20)  # the sweep grew, say: same run, updated
    dirs = list(out.glob("wandb/offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith("-" + run.run_id) for d in dirs)
    assert {r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"} == {run.run_id}


def test_report_states_no_law_for_runs_outside_the_regime(sweep_dir, tmp_path):
    """The fake sweep has no readable shards and no loss at mask 0.9: the gate fails, saying why,
    and the report states no law."""
    from scaling.report import report

    text = report(sweep_dir, tmp_path / "out").read_text()
    result = json.loads((tmp_path / "out/fit.json").read_text())
    assert result["law"] is None and not result["gate"]["passed"]
    assert "No law is stated" in text and "could not be computed" in text and "no-shards" in text
    assert not (tmp_path / "out/loss_vs_compute.png").exists()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import demo_shards

    over = demo_shards(tmp_path_factory.mktemp("shards"))
    return [o for o in over if o.startswith("data.")]


def test_gate_passes_runs_that_beat_the_tables_and_use_context(shards, tmp_path):
    """Runs below the per-position table (the law's losses / 100) whose mask-0.9 loss is 10% above: the
    law is stated, and the gate is in the report; the same runs ignoring context (0.9 = 0.5) fail."""
    from scaling.report import report

    for ctx, name in ((1.1, "uses"), (0.9, "ignores")):  # fake_run's loss at mask 0.5 is 0.9 x that at 0.7
        root = tmp_path / name
        runs = []
        for w in (32, 48, 64):
            for steps in (200, 400):
                fake_run(root, f"w{w}-s{steps}", w, steps, data=shards, context=ctx, scale=0.01)
                runs.append({"name": f"w{w}-s{steps}", "run_dir": str(root / f"w{w}-s{steps}")})
        (root / "sweep.json").write_text(json.dumps({"name": name, "runs": runs}))
        report(root, root / "out", bootstrap=10, approach_bootstrap=20)
        result = json.loads((root / "out/fit.json").read_text())
        gate = result["gate"]
        assert gate["baselines"]["per_position"] > max(r["loss"] for r in gate["per_run"])
        if ctx > 1:
            assert gate["passed"] and result["law"]["alpha"] > 0
            assert "## Regime gate" in (root / "out/report.md").read_text()
        else:
            assert not gate["passed"] and result["law"] is None
            assert "do not use context" in " ".join(gate["reasons"])


def test_report_command_errors_cleanly_on_a_missing_sweep(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "scaling.report", "--sweep", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "no sweep manifest" in res.stderr


# --- plan --------------------------------------------------------------------------------------


def test_plan_writes_an_isoflop_sweep_the_launcher_accepts(tmp_path):
    from enat.sweeps import load_sweep, run_configs, run_entry
    from scaling.plan import plan, write_sweep

    runs, info = plan(CONFIG, 2e14, 12, "model.width", [32, 48, 64, 96, 128])
    assert len(runs) == 12 and len(info["levels"]) == 3
    assert sum(r["_compute"] for r in runs) == pytest.approx(2e14, rel=0.01)
    for level in info["levels"]:
        at = [r for r in runs if r["_level"] == level]
        assert len(at) == 4 and all(r["_compute"] == pytest.approx(level, rel=0.01) for r in at)
    path = write_sweep(tmp_path / "sweeps/iso.yaml", "iso", CONFIG, "runs/sweeps/iso", runs, info=info)
    configs = run_configs(load_sweep(path))
    assert len(configs) == 12
    entry = run_entry(*configs[0])
    assert entry["compute_budget"] == pytest.approx(info["levels"][0], rel=0.01)
    # From a fit: the sizes follow its optimum.
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"law": TRUE, "k_flops_per_param_sample": 100.0}))
    runs2, info2 = plan(CONFIG, 2e14, 6, "model.width", [32, 48, 64, 96, 128], fit_path=fit, per_level=2)
    assert "fit" in info2["source"] and len(runs2) == 6


def test_decaying_schedules_fit_final_points_only(sweep_dir):
    from scaling.points import choose_points

    rows = collect(sweep_dir).rows
    assert choose_points(rows, "auto")[0] == rows  # constant LR: every logged point
    cosine = [{**r, "schedule": "cosine"} for r in rows]
    final, why = choose_points(cosine, "auto")
    assert len(final) == 8 and all(r["final"] for r in final) and "final" in why
    assert {r["step"] for r in final} == {200, 400}
