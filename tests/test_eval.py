"""FID evaluation: metric sanity, the float64 path against torch-fidelity, the job's results,
idempotency, errors, and 1-vs-2-rank identity of the samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from enat.config import dump_config, load_config
from enat.data.digits import load_digits
from enat.dist import free_port
from enat.eval.fidelity import (EvalError, build_extractor, class_fid, extract, frechet_distance,
                                import_torch_fidelity, metrics, statistics, train_digit_classifier)
from enat.files import file_sha256
from enat.images import to_uint8

CONFIG = ROOT / "configs/experiments/demo.yaml"


def u8(x):
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def extractor_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx") / "digits.pt"
    acc = train_digit_classifier(path, steps=300, log=lambda *_: None)
    assert acc > 0.6
    return path


@pytest.fixture(scope="module")
def ref(extractor_path):
    ex = build_extractor("digits-cnn", str(extractor_path))
    x, y, _ = load_digits("val")
    feats = extract(ex, u8(x))
    mu, sigma = statistics(feats["pool"])
    return ex, x, y, {"mu": mu, "sigma": sigma, "pool": feats["pool"], "labels": y.numpy()}


def fid_of(ex, images, ref):
    g = extract(ex, u8(images))
    return frechet_distance(*statistics(g["pool"]), ref["mu"], ref["sigma"])


def test_torch_fidelity_imports_on_cpu_only_torch():
    tf = import_torch_fidelity()
    assert tf.__version__ and "digits-cnn" in __import__("torch_fidelity.registry").registry.FEATURE_EXTRACTORS_REGISTRY


def test_identical_sets_give_zero(ref):
    ex, x, y, r = ref
    assert abs(fid_of(ex, x, r)) < 1e-6


def test_fid_grows_with_noise_and_blur(ref):
    ex, x, y, r = ref
    g = torch.Generator().manual_seed(0)
    noise = [fid_of(ex, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), r) for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(noise, noise[1:])), noise
    blur = [fid_of(ex, F.avg_pool2d(x, k, stride=1, padding=k // 2), r) for k in (1, 3, 5, 7)]
    assert all(a < b for a, b in zip(blur, blur[1:])), blur


def test_class_fid_grows_with_shuffled_labels(ref):
    ex, x, y, r = ref
    feats = extract(ex, u8(x))["pool"]
    rng = np.random.default_rng(0)
    values = []
    for frac in (0.0, 0.3, 0.6, 1.0):
        labels = y.numpy().copy()
        k = int(frac * len(labels))
        pick = rng.permutation(len(labels))[:k]
        labels[pick] = rng.permutation(labels[pick])
        values.append(class_fid(feats, labels, r["pool"], r["labels"]))
    assert values[0] < 1e-6 and all(a < b for a, b in zip(values, values[1:])), values


def test_float64_npz_path_matches_torch_fidelity(ref, tmp_path):
    tf = import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    ex, x, y, r = ref
    xt, _, _ = load_digits("train")
    mu, sigma = statistics(extract(ex, u8(xt))["pool"])
    np.savez(tmp_path / "ref.npz", mu=r["mu"], sigma=r["sigma"])
    z = np.load(tmp_path / "ref.npz")
    ours = frechet_distance(mu, sigma, z["mu"], z["sigma"])
    theirs = fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": z["mu"], "sigma": z["sigma"]},
                                      verbose=False)[tf.KEY_METRIC_FID]
    assert ours == pytest.approx(theirs, rel=1e-6)
    full = metrics({"pool": extract(ex, u8(xt))["pool"], "logits": extract(ex, u8(xt))["logits"]}, r)
    assert full["fid"] == pytest.approx(ours, rel=1e-9)
    assert {"isc_mean", "kid_mean", "precision", "recall"} <= set(full)


def test_precision_recall_use_as_many_reference_features_as_samples():
    """A reference larger than the samples is subsampled for precision/recall (equal-size sets):
    all 60,000 Fashion-MNIST training features took 22 GB and were killed. The subsample is the
    seeded one; a reference no larger than the samples is used whole."""
    tf = import_torch_fidelity()
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(0)
    gen = torch.randn(200, 16, generator=g, dtype=torch.float64)
    ref = torch.cat([torch.randn(200, 16, generator=g, dtype=torch.float64) + 0.5,
                     torch.randn(800, 16, generator=g, dtype=torch.float64) * 3])
    logits = torch.randn(200, 10, generator=g, dtype=torch.float64).numpy()
    mu, sigma = statistics(ref.numpy())

    def prc(a, b):
        pr = prc_features_to_metric(a, b, prc_neighborhood=3, prc_batch_size=10000, verbose=False)
        return pr[tf.KEY_METRIC_PRECISION], pr[tf.KEY_METRIC_RECALL]

    out = metrics({"pool": gen.numpy(), "logits": logits}, {"mu": mu, "sigma": sigma, "pool": ref.numpy()}, seed=3)
    sub = ref[torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:200]]
    assert (out["precision"], out["recall"]) == pytest.approx(prc(gen, sub), rel=1e-12)
    assert (out["precision"], out["recall"]) != pytest.approx(prc(gen, ref), rel=1e-3)
    small = metrics({"pool": gen.numpy(), "logits": logits}, {"mu": mu, "sigma": sigma, "pool": ref[:150].numpy()})
    assert (small["precision"], small["recall"]) == pytest.approx(prc(gen, ref[:150]), rel=1e-12)


# --- the job --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, extractor_path):
    """A demo config with a random tokenizer, the test extractor, and a random-init ENAT weights file."""
    from enat.models import build_model
    from enat.models.weights import save_weights
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    d = tmp_path_factory.mktemp("eval")
    over = [f"tokenizer.checkpoint={d / 'tok.pt'}", f"eval.extractor_weights={extractor_path}",
            f"eval.cache_dir={d / 'cache'}", "eval.batch_size=8", "sample.steps=4", "train.wandb.mode=offline"]
    cfg = load_config(CONFIG, over)
    torch.manual_seed(0)
    save_tokenizer(d / "tok.pt", VQGAN(cfg.tokenizer), {})
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(d / "w.pt", cfg.model, {"ema": model.state_dict()}, meta={"step": 7, "flops_seen": 123456789})
    dump_config(cfg, d / "config.yaml")
    return d, cfg


def test_job_writes_result_is_idempotent_and_logs(setup, tmp_path):
    from enat.eval.job import evaluate

    d, cfg = setup
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb_run_id").write_text("abc123def456")
    r1 = evaluate(cfg, run, str(d / "w.pt"), num_samples=20, log=lambda *_: None)
    assert not r1["cached"] and r1["step"] == 7 and r1["num_samples"] == 20
    results = list((run / "eval/00000007").glob("*.json"))
    assert len(results) == 1
    stored = json.loads(results[0].read_text())
    assert stored["metrics"]["fid"] == r1["metrics"]["fid"] > 0
    assert stored["settings"]["sample"]["steps"] == 4 and stored["reference"]["kind"] == "digits-val"
    assert stored["checkpoint"]["sha256"] and np.load(stored["files"]["npz"])["arr_0"].shape == (20, 32, 32, 3)
    lines = (run / "eval.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 7 and "eval/fid" in json.loads(lines[0])
    assert json.loads(lines[0])["flops_seen"] == 123456789
    assert list((run / "wandb").glob("offline-run-*abc123def456"))
    # into the training run's wandb run, against the training FLOPs that made the checkpoint
    from conftest import wandb_history, wandb_records

    records = wandb_records(run)
    axes = {(m.metric.name or m.metric.glob_name): m.metric.step_metric for m in records
            if m.WhichOneof("record_type") == "metric"}
    assert axes["eval/*"] == "eval/flops_seen"
    logged = [h for h in wandb_history(records) if "eval/fid" in h]
    assert logged == [{**logged[0], "eval/flops_seen": 123456789, "eval/step": 7}]
    assert logged[0]["eval/fid"] == r1["metrics"]["fid"]

    mtime = results[0].stat().st_mtime_ns
    r2 = evaluate(cfg, run, str(d / "w.pt"), num_samples=20, log=lambda *_: None)
    assert r2["cached"] and r2["metrics"] == r1["metrics"] and results[0].stat().st_mtime_ns == mtime
    assert len((run / "eval.jsonl").read_text().splitlines()) == 1

    # A half-written result is not taken as done.
    results[0].rename(results[0].with_suffix(".json.tmp"))
    r3 = evaluate(cfg, run, str(d / "w.pt"), num_samples=20, log=lambda *_: None)
    assert not r3["cached"] and r3["metrics"]["fid"] == pytest.approx(r1["metrics"]["fid"], rel=1e-9)

    # Other sampler settings: another result file.
    from dataclasses import replace

    cfg2 = replace(cfg, sample=replace(cfg.sample, cfg_scale=0.0))
    evaluate(cfg2, run, str(d / "w.pt"), num_samples=20, log=lambda *_: None)
    assert len(list((run / "eval/00000007").glob("*.json"))) == 2


def test_stored_results_are_keyed_by_the_weights_content(setup, tmp_path, monkeypatch):
    """A stored result is found by the settings and the weights' content, not the step alone
    (issue 30: an exported file of step 950 evaluated inside --run got the result stored for the
    run's checkpoint of step 950). Two weights files of one step get two results; the same file
    again reuses its own; a run checkpoint is identified from its manifest (its model-states file
    is not hashed), and its result is where the eval launcher looks for it."""
    import enat.eval.load as load
    from conftest import write_checkpoint
    from enat.eval.job import evaluate, result_path
    from enat.models import build_model
    from enat.models.weights import load_weights, save_weights

    d, cfg = setup
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    other = tmp_path / "other.pt"  # other weights, the same step 7
    save_weights(other, cfg.model, {"ema": build_model(cfg.model).state_dict()}, meta={"step": 7})
    hashed = []
    monkeypatch.setattr(load, "file_sha256", lambda p: hashed.append(Path(p).name) or file_sha256(p))
    quiet = dict(num_samples=20, log=lambda *_: None)
    first = evaluate(cfg, run, str(d / "w.pt"), **quiet)
    second = evaluate(cfg, run, str(other), **quiet)
    assert not first["cached"] and not second["cached"]
    assert second["metrics"]["fid"] != first["metrics"]["fid"]
    assert len(list((run / "eval/00000007").glob("*.json"))) == 2
    again = evaluate(cfg, run, str(other), **quiet)
    assert again["cached"] and again["path"] == second["path"] and again["metrics"] == second["metrics"]
    assert hashed == ["w.pt", "other.pt", "other.pt"]  # once per evaluation of a file, never twice

    # The run's own checkpoint of step 7 (ZeRO-0 layout, the weights of w.pt as its EMA): a third result.
    write_checkpoint(run, cfg, load_weights(d / "w.pt", "ema")[1], 7)
    hashed.clear()
    ckpt = evaluate(cfg, run, "7", **quiet)
    assert not ckpt["cached"] and hashed == []
    assert ckpt["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"], rel=1e-9)  # the same weights
    assert ckpt["path"] not in (first["path"], second["path"])
    assert ckpt["path"] == str(result_path(cfg, run, 7, num_samples=20))
    assert evaluate(cfg, run, "7", **quiet)["cached"]


def test_eval_jobs_filling_the_reference_cache_at_once_all_succeed(setup, tmp_path, monkeypatch):
    """The eval jobs of a sweep start together and each computes the missing reference statistics.
    Here a second job finishes while the first is still writing: both must succeed with the same
    numbers, and no temp file is left (a shared temp name once let one job rename away the other's)."""
    import enat.eval.reference as reference

    d, _ = setup
    cfg = load_config(d / "config.yaml", [f"eval.cache_dir={tmp_path}"])
    ex = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights)
    spec = reference.reference_spec(cfg)
    real_savez, other = np.savez, {}

    def savez_while_another_job_finishes(file, **arrays):
        real_savez(file, **arrays)
        if not other:
            other["started"] = True
            other["stats"] = reference.reference_stats(cfg, spec, ex, None, log=lambda *_: None)

    monkeypatch.setattr(np, "savez", savez_while_another_job_finishes)
    first = reference.reference_stats(cfg, spec, ex, None, log=lambda *_: None)
    assert "stats" in other
    np.testing.assert_array_equal(first["mu"], other["stats"]["mu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{spec['id']}.json", f"{spec['id']}.npz"]
    cached = reference.reference_stats(cfg, spec, ex, None, log=lambda *_: None)  # read back from the cache
    np.testing.assert_array_equal(cached["sigma"], first["sigma"])


def test_job_errors_name_both_sides(setup, tmp_path):
    from dataclasses import replace

    from enat.eval.job import evaluate

    d, cfg = setup
    with pytest.raises(EvalError, match="not found"):
        evaluate(cfg, tmp_path, str(tmp_path / "missing.pt"), num_samples=10)
    other = replace(cfg, model=replace(cfg.model, width=128, num_heads=4))
    with pytest.raises(EvalError, match=r"width: checkpoint 64 vs config 128"):
        evaluate(other, tmp_path, str(d / "w.pt"), num_samples=10)
    np.savez(tmp_path / "ref64.npz", mu=np.zeros(128), sigma=np.eye(128), resolution=64)
    bad_ref = replace(cfg, eval=replace(cfg.eval, reference_npz=str(tmp_path / "ref64.npz")))
    with pytest.raises(EvalError, match=r"64 px images but the samples are 32 px"):
        evaluate(bad_ref, tmp_path, str(d / "w.pt"), num_samples=10)
    with pytest.raises(EvalError, match="multiple of the 10 classes"):
        evaluate(cfg, tmp_path, str(d / "w.pt"), num_samples=15)


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_samples(setup, tmp_path):
    from enat.eval.job import evaluate

    d, cfg = setup
    one = evaluate(cfg, tmp_path / "one", str(d / "w.pt"), num_samples=20, log=lambda *_: None)
    (tmp_path / "two").mkdir()
    # Two ranks started the way srun starts them: one process each, rank and world in the environment.
    port = str(free_port())
    cmd = [sys.executable, "-m", "enat.cli", "eval", "--run", str(tmp_path / "two"), "--config",
           str(d / "config.yaml"), "--checkpoint", str(d / "w.pt"), "--num-samples", "20"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    two = json.loads(next((tmp_path / "two/eval/00000007").glob("*.json")).read_text())
    assert two["world_size"] == 2
    a, b = np.load(one["files"]["npz"]), np.load(two["files"]["npz"])
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-9)


def test_missing_extractor_names_the_command_and_prepare_builds_it(tmp_path, monkeypatch):
    """The FID job does not build the demo extractor: a missing one is an error naming the command;
    data preparation's prepare_extractor trains it (here a stand-in) only when the config uses it."""
    import enat.eval.prepare as extractor_prep
    from enat.eval.prepare import extractor_missing, prepare_extractor

    with pytest.raises(EvalError, match=r"not found: .*fx\.pt\. Train it with `enat extractor train --config CONFIG"):
        build_extractor("digits-cnn", str(tmp_path / "fx.pt"))
    with pytest.raises(EvalError, match="Inception weights not found"):
        build_extractor("inception-v3-compat", str(tmp_path / "inception.pth"))

    trained = []
    monkeypatch.setattr(extractor_prep, "train_digit_classifier",
                        lambda out, seed=0, log=print: trained.append(out) or open(out, "wb").close())
    cfg = load_config(CONFIG, [f"eval.extractor_weights={tmp_path / 'fx.pt'}"])
    assert extractor_missing(cfg)
    prepare_extractor(cfg, log=lambda *_: None)
    prepare_extractor(cfg, log=lambda *_: None)  # there now: not trained again
    assert trained == [str(tmp_path / "fx.pt")] and not extractor_missing(cfg)
    inception = load_config(CONFIG, ["eval.extractor=inception-v3-compat",
                                     f"eval.extractor_weights={tmp_path / 'i.pth'}"])
    assert not extractor_missing(inception)
    prepare_extractor(inception, log=lambda *_: None)  # given by path, never built here
    assert trained == [str(tmp_path / "fx.pt")]
