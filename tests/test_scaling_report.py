"""scaling.report's runs table (D in images / tokens / [MASK] tokens, tokens per parameter,
C / 6ND, throughput, MFU, device-hours, sampling img/s), the residuals, the sensitivity table, the
FID protocol's checks and rank correlation, and the plots' axis labels, on fake runs whose losses
follow a known law."""

import json

import numpy as np
import pytest

from enat.config import dump_config, load_config
from enat.models.zoo import parameter_counts
from scaling.collect import ScalingError, collect
from test_scaling import CONFIG, TRUE, law

BATCH = 64
C_RATIO = 1.5  # the fake runs' training FLOPs are C_RATIO x 6 N D_tokens
MASKED = 0.55  # and their [MASK] tokens this fraction of the tokens


def fake_run(root, name, width, steps, val_every=20, eval_steps=(), num_samples=2000, overrides=(), mfu=None,
             results=None):
    """A run directory as the trainer and the FID jobs leave it. Losses from the known law (val/:
    r0.7 the law, r0.5 0.9x, r0.9 1.1x; val_ema/ r0.7 1.02x); train records with throughput
    (a slow first window, then 5000 tokens/s on 2 ranks); FID / KID at eval_steps, falling with
    the loss; results: [(step, reuse, sampling seconds)] result files of the jobs."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(CONFIG, [f"model.width={width}", f"train.steps={steps}", f"train.run_dir={run}",
                               f"data.shards={root / 'no-shards'}", f"data.val_shards={root / 'no-val-shards'}",
                               "eval.extractor=digits-cnn", *overrides])
    dump_config(cfg, run / "config.yaml")
    _, n = parameter_counts(cfg.model)
    seq = cfg.model.seq_len
    lines = []
    for s in range(val_every, steps + 1, val_every):
        seen = {"samples_seen": s * BATCH, "tokens_seen": s * BATCH * seq,
                "masked_tokens_seen": s * BATCH * seq * MASKED, "flops_seen": C_RATIO * 6 * n * s * BATCH * seq}
        first = s == val_every
        tok = 1000.0 if first else 5000.0
        lines.append({"kind": "train", "step": s, **seen, "loss": 5.0, "window_s": 10.0 if first else 2.0,
                      "tokens_per_s": tok, "images_per_s": tok / seq, "images_per_s_per_rank": tok / seq / 2,
                      "tflops_per_s": 0.01, **({"mfu": mfu} if mfu is not None else {})})
        loss = float(law(n, s * BATCH))
        lines.append({"kind": "val", "step": s, **seen, "val/loss_r0.7": loss, "val/loss_r0.5": loss * 0.9,
                      "val/loss_r0.9": loss * 1.1, "val_ema/loss_r0.7": loss * 1.02})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    evals = []
    for s in eval_steps:
        loss = float(law(n, s * BATCH))
        fid = 2 * loss + 3 * np.sin(s + width)  # falls with the loss, not strictly: ranks differ a little
        evals.append({"step": s, "flops_seen": C_RATIO * 6 * n * s * BATCH * seq, "eval/fid": fid,
                      "eval/kid_mean": fid / 1000 + 0.003 * np.cos(s * width), "num_samples": num_samples,
                      "settings_hash": f"h{s}"})
    for i, (s, reuse, secs) in enumerate(results or []):
        h = f"r{i}"
        evals.append({**next(e for e in evals if e["step"] == s), "settings_hash": h})
        path = run / "eval" / f"{s:08d}" / f"{h}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": s, "settings": {"sample": {"reuse": reuse, "steps": 8},
                                                            "weights": cfg.eval.weights, "extractor": "digits-cnn"},
                                    "num_samples": num_samples, "world_size": 2,
                                    "timings_s_rank0": {"sampling": secs, "decoding": 1.0}}))
    if evals:
        (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run, cfg, n


def make_sweep(root, widths=(32, 48, 64, 96), steps=(200, 400), **kw):
    runs = []
    for w in widths:
        for st in steps:
            name = f"w{w}-s{st}"
            evals = kw.get("evals", {}).get(st, ())
            fake_run(root, name, w, st, eval_steps=evals, **{k: v for k, v in kw.items() if k != "evals"})
            runs.append({"name": name, "run_dir": str(root / name)})
    (root / "sweep.json").write_text(json.dumps({"name": root.name, "runs": runs}))
    return root


GOOD = dict(evals={200: (100, 200), 400: (100, 200, 300, 400)}, num_samples=2000,
            overrides=("eval.weights=online",))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("good"), **GOOD)


@pytest.fixture(scope="module")
def reported(good, tmp_path_factory):
    from scaling.report import report

    out = tmp_path_factory.mktemp("out")
    report(good, out, bootstrap=4, ignore_gate=True, approach_bootstrap=10)
    return out, json.loads((out / "fit.json").read_text()), (out / "report.md").read_text()


def test_collect_throughput_tokens_and_sampling(tmp_path):
    run, cfg, n = fake_run(tmp_path, "r", 48, 100, eval_steps=(100,), mfu=0.4,
                           results=[(100, True, 4.0), (100, False, 10.0)])
    summary = collect(runs=[run]).runs[0]
    seq = cfg.model.seq_len
    assert summary["tokens_seen"] == 100 * BATCH * seq and summary["masked_tokens_seen"] == 100 * BATCH * seq * MASKED
    assert not summary["masked_tokens_estimated"]
    assert summary["tokens_per_s"] == pytest.approx(5000.0)  # the warm-up window left out
    assert summary["mfu"] == pytest.approx(0.4)
    assert summary["world_size"] == 2 and summary["world_size_source"] == "metrics"
    assert summary["wall_s"] == pytest.approx(10 + 4 * 2.0)
    assert summary["gpu_hours"] == pytest.approx(18.0 * 2 / 3600)
    # 2000 samples on 2 ranks: rank 0's 1000 in 4 s with reuse, 10 s without
    assert summary["sample_images_per_s_reuse"] == pytest.approx(250.0)
    assert summary["sample_images_per_s_plain"] == pytest.approx(100.0)
    ev = summary["evals"][0]
    assert ev["weights"] == cfg.eval.weights and ev["extractor"] == "digits-cnn" and ev["num_samples"] == 2000
    # no mfu logged (CPU): None, not 0
    run2, _, _ = fake_run(tmp_path, "cpu", 48, 100)
    s2 = collect(runs=[run2]).runs[0]
    assert s2["mfu"] is None and s2["sample_images_per_s_reuse"] is None and s2["sample_images_per_s_plain"] is None


def test_runs_table_counts_tokens_and_the_6nd_ratio(reported, good):
    out, result, text = reported
    table = {t["run"]: t for t in result["runs_table"]}
    assert len(table) == 8
    col = collect(good)
    seq = load_config(good / "w64-s400" / "config.yaml").model.seq_len
    t = table["w64-s400"]
    n = next(r["n_params_nonembed"] for r in col.runs if r["run"] == "w64-s400")
    assert t["D_images"] == 400 * BATCH and t["D_tokens"] == 400 * BATCH * seq
    assert t["D_masked_tokens"] == pytest.approx(400 * BATCH * seq * MASKED)
    assert t["tokens_per_param"] == pytest.approx(400 * BATCH * seq / n)
    assert t["C_over_6ND"] == pytest.approx(C_RATIO)
    assert t["final_loss"] == pytest.approx(float(law(n, 400 * BATCH)))
    assert t["mfu"] is None and t["gpu_hours"] == pytest.approx((10 + 19 * 2.0) * 2 / 3600)
    assert "## Runs" in text and "| `w64-s400` |" in text and "C/6ND" in text and "tokens/N" in text
    assert (out / "runs.csv").read_text().count("\n") == 1 + 8


def test_residuals_vanish_on_noiseless_data(reported):
    out, result, text = reported
    res = result["residuals"]
    assert len(res["points"]) == result["points"] == 120
    assert res["rms"] < 2e-3 and res["max_abs"] < 1e-2
    assert res["rms"] == pytest.approx(np.sqrt(np.mean([p["residual"] ** 2 for p in res["points"]])))
    assert "## Residuals" in text and f"RMS {res['rms']:.4g}" in text
    assert (out / "residuals.png").stat().st_size > 1000 and "(residuals.png)" in text


def test_sensitivity_rows_and_reference(reported, good):
    from scaling.tables import _point_fit

    out, result, text = reported
    rows = result["sensitivity"]
    ref = rows[0]
    assert ref["reference"] and sum(r["reference"] for r in rows) == 1
    assert ref["alpha"] == result["law"]["alpha"] and ref["beta"] == result["law"]["beta"]
    # the variants' search (profile scan, no grid) finds the reference's optimum on the reference's points
    again = _point_fit(collect(good).rows, "val_loss_r0.7", 1e-3)
    assert again["alpha"] == pytest.approx(ref["alpha"], rel=1e-5) and again["beta"] == pytest.approx(ref["beta"], rel=1e-5)
    assert ref["a"] == pytest.approx(result["optimal"]["a"])
    names = [r["variant"] for r in rows[1:]]
    assert names == ["loss val/loss_r0.5", "loss val/loss_r0.9", "ema weights (val_ema/loss_r0.7)",
                     "Huber delta 0.0001", "Huber delta 0.01", next(n for n in names if n.startswith("smallest"))]
    smallest = [r for r in rows if r["changed"] == "sizes"][0]
    assert smallest["sizes"] == ref["sizes"] - 1 and smallest["points"] == ref["points"] - 30
    for r in rows:  # every variant's losses are the law up to a constant factor: the same exponents
        assert "error" not in r, r
        assert r["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05), r
        assert r["beta"] == pytest.approx(TRUE["beta"], rel=0.05), r
    assert "## Sensitivity" in text and "**reference (the fit above)**" in text


def test_unrounded_parameters_in_the_report(reported):
    _, result, text = reported
    for name in ("E", "A", "B", "alpha", "beta"):
        assert repr(result["law"][name]) in text


def test_good_fid_protocol_has_no_warnings_and_scipy_spearman(reported, good):
    from scipy.stats import spearmanr

    _, result, text = reported
    proto = result["fid_protocol"]
    assert proto["warnings"] == [] and "The protocol meets every check." in text
    assert proto["fid_weights"] == ["online"] and proto["law_weights"] == "online"
    assert proto["samples"][0]["needed"] == 1280 and proto["samples"][0]["kid"]
    assert [c["checkpoints"] for c in proto["checkpoints_per_size"]] == [6, 6, 6, 6]
    rows = [r for r in collect(good).rows if "eval_fid" in r]
    assert len(rows) == 24
    for metric, key in (("fid", "eval_fid"), ("kid", "eval_kid_mean")):
        ref = spearmanr([r["val_loss_r0.7"] for r in rows], [r[key] for r in rows])
        got = proto["spearman"][f"{metric}_checkpoints"]
        assert got["n"] == 24 and got["rho"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(ref.pvalue)
        assert 0.5 < got["rho"] < 1  # falls with the loss, with a few swaps
    final = [r for r in rows if r["final"]]
    ref = spearmanr([r["val_loss_r0.7"] for r in final], [r["eval_fid"] for r in final])
    assert proto["spearman"]["fid_final"]["n"] == 8
    assert proto["spearman"]["fid_final"]["rho"] == pytest.approx(ref.statistic)
    assert "### FID protocol" in text and "Spearman rank correlation" in text


def test_poor_fid_protocol_warns(tmp_path):
    """300 samples for a 128-d extractor, FID of the EMA weights against an online-loss law, two
    evaluated checkpoints per size: three warnings; the same runs fitted on the EMA loss: two."""
    from scaling.tables import fid_protocol

    root = make_sweep(tmp_path / "poor", widths=(32, 48), evals={200: (200,), 400: (400,)}, num_samples=300,
                      overrides=("eval.weights=ema",))
    col = collect(root)
    proto = fid_protocol(col.runs, col.rows, "val_loss_r0.7")
    w = " ".join(proto["warnings"])
    assert len(proto["warnings"]) == 3, proto["warnings"]
    assert "ema weights, the law is fitted on the online weights" in w and "--loss val_ema/loss_r0.7" in w
    assert "300 FID samples" in w and "below 1280" in w and "KID" in w
    assert "fewer than 4 evaluated checkpoints" in w
    ema = fid_protocol(col.runs, col.rows, "val_ema_loss_r0.7")
    assert len(ema["warnings"]) == 2 and not any("weights" in x for x in ema["warnings"])


def test_plots_refuse_unlabelled_axes_and_show_values_on_narrow_log_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaling.plots import _labelled_ticks, _save

    fig, ax = plt.subplots()
    ax.plot([1e10, 1e12], [3.6, 4.8])
    ax.set(xscale="log", yscale="log", xlabel="C")
    with pytest.raises(ScalingError, match="y axis has no label"):
        _save(fig, ax, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    fig, ax = plt.subplots()
    ax.plot([1e10, 1e12], [3.6, 4.8])
    ax.set(xscale="log", yscale="log", xlabel="C", ylabel="loss")  # no power of ten in 3.6 - 4.8
    _save(fig, ax, tmp_path / "ok.png")
    assert _labelled_ticks(ax.yaxis, *sorted(ax.get_ylim()))


def test_every_plot_of_the_report_is_labelled(reported):
    """_save refuses a plot without axis labels, so a report that was written labelled them all;
    each PNG it wrote is in the report."""
    out, _, text = reported
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert set(pngs) == {"loss_vs_compute.png", "isoflop.png", "optimal_n.png", "fid_vs_compute.png",
                         "loss_by_mask_ratio.png", "residuals.png"}
    for name in pngs:
        assert f"({name})" in text
