"""FID arithmetic, verified (issue 29, item 6): the FID job, run as `enat eval` in its own process
with torch-fidelity's TF-FID InceptionV3 at random weights (loaded by path, as the offline weights
are), reports the Frechet distance that an independent float64 computation gives (pool3 features
taken by a hook -> numpy mean / covariance -> scipy sqrtm, the formula of ADM's evaluator) against a
reference in the layout of ADM's reference batches; a reference of another layout is a named
error before any sampling."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import ROOT
from enat.config import dump_config, load_config
from enat.eval.fidelity import EvalError, import_torch_fidelity

CONFIG = ROOT / "configs/experiments/demo.yaml"
NUM_SAMPLES = 40  # 4 per class; Inception costs ~0.1 s per image on CPU (every image is resized to 299)


def inception_class():
    import_torch_fidelity()  # torchvision's guard first (enat/torchvision_guard.py)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def random_inception_weights(path, seed: int = 0):
    """torch-fidelity's InceptionV3 ("inception-v3-compat") at seeded random weights, its state dict
    saved to `path` as the converted TF weights are (a plain state dict: what torch-fidelity's
    feature_extractor_weights_path reads). He-normal convolutions keep the activations O(1)
    through the 90-odd layers, so the 2048-d pool3 features are not all zero."""
    cls = inception_class()
    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    # Its constructor loads weights (a file or a download): build the bare network without them.
    load = cls.load_state_dict
    cls.load_state_dict = lambda self, *a, **k: None
    try:
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        cls.load_state_dict = load
    empty.unlink()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    torch.save(net.state_dict(), path)
    return path


def pool3_features(weights, images_nhwc: np.ndarray) -> np.ndarray:
    """The 2048-d pool3 activations (the output of the final average pool, before the logits) of
    uint8 images (N, H, W, 3), taken by a forward hook on torch-fidelity's network loaded from
    `weights` -> float64 (N, 2048)."""
    net = inception_class()("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=str(weights))
    seen = []
    net.AvgPool.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        net(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
    (pool,) = seen
    assert pool.shape == (len(images_nhwc), 2048, 1, 1)
    return pool.flatten(1).numpy().astype(np.float64)


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """The Frechet distance as ADM's evaluator (guided-diffusion, evaluations/evaluator.py) computes
    it. Its sqrtm(..., disp=False) only adds an error estimate (`disp` leaves SciPy in 1.18)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # 40 samples: a singular product
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():  # offset the diagonals, as ADM does
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3), np.abs(covmean.imag).max()
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    """A demo config (32 px digits, the smallest the pipeline has) with a random tokenizer, a
    random-init ENAT weights file and random Inception weights as eval.extractor_weights."""
    from enat.models import build_model
    from enat.models.weights import save_weights
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    d = tmp_path_factory.mktemp("fid")
    inception = random_inception_weights(d / "inception_random.pth")
    cfg = load_config(CONFIG, [f"tokenizer.checkpoint={d / 'tok.pt'}", "eval.extractor=inception-v3-compat",
                               f"eval.extractor_weights={inception}", f"eval.cache_dir={d / 'cache'}",
                               "eval.batch_size=20", "sample.steps=4"])
    torch.manual_seed(0)
    save_tokenizer(d / "tok.pt", VQGAN(cfg.tokenizer), {})
    model = build_model(cfg.model)
    with torch.no_grad():  # not the init: samples that differ from each other
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(d / "w.pt", cfg.model, {"ema": model.state_dict()}, meta={"step": 3})
    dump_config(cfg, d / "config.yaml")
    return d, cfg


def adm_reference(path, images, mu, sigma, **extra):
    """An npz in the layout of ADM's reference batches (VIRTUAL_imagenet256_labeled.npz): arr_0
    (the images, N x H x W x 3 uint8), mu / sigma (float64 pool3 statistics), mu_s / sigma_s (its
    spatial statistics: 2023-d there, stand-ins here; never FID's)."""
    spatial = np.random.default_rng(0).standard_normal((len(images), 2023))
    arrays = dict(arr_0=images, mu=mu, sigma=sigma, mu_s=spatial.mean(axis=0), sigma_s=np.cov(spatial, rowvar=False))
    np.savez(path, **{**arrays, **extra})
    return path


@pytest.fixture(scope="module")
def reference(job_files):
    """60 real validation digits and their pool3 statistics (the independent path), ADM's layout."""
    from enat.data.digits import load_digits
    from enat.images import to_uint8

    d, cfg = job_files
    images, _, _ = load_digits("val")
    real = to_uint8(images[:60])
    feats = pool3_features(cfg.eval.extractor_weights, real)
    return adm_reference(d / "VIRTUAL_digits32_labeled.npz", real, feats.mean(axis=0), np.cov(feats, rowvar=False))


def enat_eval(d, run, *overrides):
    cmd = [sys.executable, "-m", "enat.cli", "eval", "--run", str(run), "--config", str(d / "config.yaml"),
           "--checkpoint", str(d / "w.pt"), "--num-samples", str(NUM_SAMPLES), *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_fid_job_equals_independent_float64_frechet_distance(job_files, reference, tmp_path):
    """The job's FID (its own process, Inception weights by path, the ADM-layout reference) is the
    Frechet distance of pool3 features of the job's own samples, recomputed here in float64 numpy
    with ADM's formula, to 1e-6 relative. Wrong layer (logits, Mixed_6e's 768), float32 statistics,
    ddof=0 covariances, another resize, mu_s instead of mu: each moves it by far more."""
    d, cfg = job_files
    proc = enat_eval(d, tmp_path, f"eval.reference_npz={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "eval/00000003").glob("*.json")
    record = json.loads(result.read_text())
    assert record["extractor"] == {"name": "inception-v3-compat", "weights": cfg.eval.extractor_weights}
    assert record["reference"]["kind"] == "npz" and record["num_samples"] == NUM_SAMPLES
    fid = record["metrics"]["fid"]

    # The job's own samples (saved in ADM's sample layout, arr_0), through the independent path.
    samples = np.load(record["files"]["npz"])["arr_0"]
    assert samples.shape == (NUM_SAMPLES, 32, 32, 3) and samples.dtype == np.uint8
    assert len(np.unique(samples.reshape(NUM_SAMPLES, -1), axis=0)) == NUM_SAMPLES  # distinct samples
    feats = pool3_features(cfg.eval.extractor_weights, samples)
    with np.load(reference) as z:
        mu_ref, sigma_ref = z["mu"], z["sigma"]
    mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)  # ddof=1, as ADM's evaluator
    expected = adm_frechet_distance(mu, sigma, mu_ref, sigma_ref)
    print(f"FID: job {fid!r}, independent {expected!r}, relative error {abs(fid - expected) / expected:.3g}")
    assert fid == pytest.approx(expected, rel=1e-6)
    assert expected > 1  # the samples are not the reference images: a distance well away from 0


# --- the reference's layout -----------------------------------------------------------------


def test_adm_reference_batch_is_read_for_mu_and_sigma_only(job_files, tmp_path, monkeypatch):
    """An ADM reference batch (arr_0, mu, sigma, mu_s, sigma_s) gives FID its mu and sigma in
    float64, exactly; its resolution is read from arr_0's header, and the images themselves (2 GB
    in ADM's ImageNet 256 batch) are never loaded."""
    from enat.eval.reference import reference_spec, reference_stats

    d, cfg = job_files
    rng = np.random.default_rng(1)
    f = rng.standard_normal((50, 2048))
    path = adm_reference(tmp_path / "VIRTUAL_ref.npz", np.zeros((8, 32, 32, 3), np.uint8), f.mean(axis=0),
                         np.cov(f, rowvar=False).astype(np.float32))  # a float32 sigma: read as float64
    read = []
    load = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda z, k: read.append(k) or load(z, k))
    by_path = load_config(d / "config.yaml", [f"eval.reference_npz={path}"])
    spec = reference_spec(by_path)
    stats = reference_stats(by_path, spec, None, None)
    assert spec["kind"] == "npz" and set(read) == {"mu", "sigma"}
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    np.testing.assert_array_equal(stats["mu"], f.mean(axis=0))
    np.testing.assert_array_equal(stats["sigma"], np.cov(f, rowvar=False).astype(np.float32))
    ref64 = adm_reference(tmp_path / "ref64.npz", np.zeros((8, 64, 64, 3), np.uint8), f.mean(axis=0),
                          np.cov(f, rowvar=False))
    with pytest.raises(EvalError, match=r"is for 64 px images but the samples are 32 px"):
        reference_spec(load_config(d / "config.yaml", [f"eval.reference_npz={ref64}"]))


def _layouts(d):
    """Files of other layouts -> what the error must say about them."""
    rng = np.random.default_rng(2)
    f = rng.standard_normal((30, 2048))
    mu, sigma = f.mean(axis=0), np.cov(f, rowvar=False)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    cases = {
        "no_sigma": (dict(arr_0=images, mu=mu), r"no sigma \(found arr_0 \(4, 32, 32, 3\) uint8, mu \(2048,\)"),
        "sample_batch": (dict(arr_0=images), r"images \(arr_0\) without statistics: a sample batch"),
        "sigma_not_square": (dict(mu=mu, sigma=sigma[:, :2047]), r"sigma a square matrix \(D, D\).*\(2048, 2047\)"),
        "mu_2d": (dict(mu=mu[None], sigma=sigma), r"mu must be a vector \(D,\)"),
        "sigma_not_symmetric": (dict(mu=mu, sigma=np.triu(sigma)), r"sigma is not a covariance matrix"),
        "features_128d": (dict(mu=mu[:128], sigma=sigma[:128, :128]),
                          r"statistics of 128-d features, but eval.extractor=inception-v3-compat gives 2048-d"),
        "spatial_as_pool": (dict(mu=rng.standard_normal(2023), sigma=np.eye(2023)), r"2023-d features.*mu_s"),
        "not_finite": (dict(mu=np.full(2048, np.nan), sigma=sigma), r"NaN or infinite"),
        "integers": (dict(mu=mu.astype(np.int64), sigma=sigma.astype(np.int64)), r"floating point"),
    }
    for name, (arrays, _) in cases.items():
        np.savez(d / f"{name}.npz", **arrays)
    (d / "not_an_npz.npz").write_text("mu,sigma\n")
    cases["not_an_npz"] = (None, r"not readable as an npz")
    return {name: (d / f"{name}.npz", want) for name, (_, want) in cases.items()}


def test_wrong_reference_layouts_are_named_errors(job_files, tmp_path):
    """Each names the file, what it holds and the layout it needs, from reference_spec: the first
    thing the FID job does (no checkpoint read, no sampling)."""
    from enat.eval.reference import reference_spec

    d, _ = job_files
    for name, (path, want) in _layouts(tmp_path).items():
        with pytest.raises(EvalError, match=want) as e:
            reference_spec(load_config(d / "config.yaml", [f"eval.reference_npz={path}"]))
        assert str(path) in str(e.value) and "it needs ADM's layout: mu (D,) and sigma (D, D)" in str(e.value), name


def test_wrong_reference_layout_stops_the_job_before_its_checkpoint_and_samples(job_files, tmp_path, monkeypatch):
    """In the job: the named error comes before the checkpoint is read or a sample drawn."""
    import enat.eval.job as job

    d, cfg = job_files
    path = _layouts(tmp_path)["features_128d"][0]
    monkeypatch.setattr(job, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    monkeypatch.setattr(job, "generate_images", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(EvalError, match="128-d features"):
        job.evaluate(load_config(d / "config.yaml", [f"eval.reference_npz={path}"]), tmp_path / "run", str(d / "w.pt"),
                     num_samples=NUM_SAMPLES, log=lambda *_: None)


def test_cli_names_a_128d_reference_for_the_2048d_inception(job_files, tmp_path):
    """`enat eval` (its own process) with a 128-d reference (the digit classifier's size) for the
    2048-d Inception: exit 2, one `error:` line naming the file, what it holds and the fix, no
    traceback, no result."""
    d, _ = job_files
    path = _layouts(tmp_path)["features_128d"][0]
    proc = enat_eval(d, tmp_path / "run", f"eval.reference_npz={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: reference {path} (eval.reference_npz): statistics of 128-d features, "
                                  f"but eval.extractor=inception-v3-compat gives 2048-d features"), proc.stderr
    assert "mu (128,) float64, sigma (128, 128) float64" in proc.stderr and "enat eval reference" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "eval").exists()


def test_frechet_distance_refuses_a_failed_square_root():
    """A large imaginary part of sqrtm(sigma1 sigma2) (here the root of -I: a 'covariance' that is
    none) is a failure, not a distance: an error, as in ADM's evaluator; rounding's tiny ones are
    dropped."""
    from enat.eval.fidelity import frechet_distance

    mu = np.zeros(3)
    with pytest.raises(EvalError, match=r"imaginary diagonal of 1 \(ADM's evaluator stops above 1e-3\)"):
        frechet_distance(mu, np.eye(3), mu, -np.eye(3))
    assert frechet_distance(mu, np.eye(3), mu + 1, 4 * np.eye(3)) == pytest.approx(3 + 3 + 12 - 2 * 6)
