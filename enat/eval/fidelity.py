"""Features and metrics through torch-fidelity.

torch-fidelity imports torchvision, whose PyPI build fails to import on a CPU-only torch;
`import_torch_fidelity` goes through `enat.torchvision_guard` and registers the project's extractors.

Extractors: torch-fidelity's Inception ("inception-v3-compat", the TF-FID network of the standard
protocol; weights by path for offline nodes) and "digits-cnn", a small classifier the project
trains on the demo training split (`enat extractor train`, or with the data: `enat data prepare`;
enat/eval/prepare.py), so the embedded default computes a real FID offline. FID is computed in
float64 from (mu, sigma).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from enat.data.digits import load_digits
from enat.data.fashion import load_fashion
from enat.models.weights import torch_load, torch_save_atomic
from enat.torchvision_guard import import_guarded

_TF = None


class EvalError(ValueError):
    """An evaluation that cannot run as configured (missing weights, checkpoint, reference)."""


def import_torch_fidelity():
    """torch-fidelity, through the ground floor's torchvision guard, with the project's
    extractors registered."""
    global _TF
    if _TF is None:
        _TF = import_guarded("torch_fidelity")
        _register(_TF)
    return _TF


# ---------------------------------------------------------------------------------------------
# The demo extractor
# ---------------------------------------------------------------------------------------------


class DigitNet(nn.Module):
    """A small CNN for 32x32 digits: 128-d penultimate features ("pool") and 10 logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.conv(x).flatten(1)
        return pool, self.fc(pool)


class FashionNet(nn.Module):
    """A small CNN for Fashion-MNIST at 32x32 (the 64 px images halved: the 28 px photograph
    padded to 32): two 3x3 convolutions per stage, 256-d penultimate features ("pool")."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.conv = nn.Sequential(*stage(3, 32), nn.MaxPool2d(2), *stage(32, 64), nn.MaxPool2d(2),
                                  *stage(64, 128), nn.MaxPool2d(2), nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.conv(x).flatten(1)
        return pool, self.fc(pool)


# The classifiers this project trains as FID feature extractors: name -> (network, weights format,
# the data it was trained on, the size it sees, the penultimate feature size).
CLASSIFIERS = {"digits-cnn": (DigitNet, "enat-digit-classifier", "digits", 32, 128),
               "fashion-cnn": (FashionNet, "enat-fashion-classifier", "fashion_mnist", 32, 256)}


def _register(tf) -> None:
    # torch-fidelity's modules only after import_torch_fidelity: on a CPU-only torch, torchvision's
    # op schemas must be defined first (enat/torchvision_guard.py)
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierCNN(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise EvalError(f"{name} needs eval.extractor_weights (train it: `enat extractor train`)")
            net_cls, fmt, dataset, self.size, _ = CLASSIFIERS[name]
            obj = torch_load(feature_extractor_weights_path, f"{name} classifier")
            if obj.get("format") != fmt:
                raise EvalError(f"{feature_extractor_weights_path} is a {obj.get('format')!r} file, not the {name} "
                                f"classifier ({fmt}, trained on {dataset}): eval.extractor and "
                                f"eval.extractor_weights disagree; set eval.extractor_weights to a new path and "
                                f"train the right one there (`{EXTRACTOR_COMMAND}`)")
            self.net = net_cls(obj["num_classes"])
            self.net.load_state_dict(obj["state_dict"])
            self.net.eval().requires_grad_(False)

        def forward(self, x):  # uint8 (N, 3, H, W), as torch-fidelity hands images over
            x = x.float() / 255.0
            if x.shape[-1] != self.size:  # 64 -> 32 bilinear at half-pixel centres: the 2x2 means
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            pool, logits = self.net(x)
            feats = {"pool": pool.double(), "logits_unbiased": logits.double()}
            return tuple(feats[f] for f in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "pool", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

    for name in CLASSIFIERS:
        tf.register_feature_extractor(name, ClassifierCNN)


def train_digit_classifier(out: str | Path, steps: int = 600, seed: int = 0, log=print) -> float:
    """Train the demo extractor on the digits training split; returns held-out accuracy."""
    torch.manual_seed(seed)
    x, y, _ = load_digits("train")
    xv, yv, _ = load_digits("val")
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # a little noise: robust features
        loss = F.cross_entropy(net(xb)[1], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (net(xv)[1].argmax(1) == yv).float().mean().item()
    torch_save_atomic({"format": "enat-digit-classifier", "num_classes": 10, "state_dict": net.state_dict(),
                       "val_accuracy": acc}, out)
    log(f"wrote {out}: digit classifier, held-out accuracy {acc:.3f}")
    return acc


def train_fashion_classifier(out: str | Path, root: str | None = None, epochs: int = 4, seed: int = 0,
                             batch_size: int = 128, lr: float = 2e-3, limit: int | None = None,
                             resolution: int = 64, log=print) -> float:
    """Train the Fashion-MNIST extractor (FashionNet) on the 60,000 training images, as the FID
    job sees them (64 px, halved to 32), with horizontal flips; AdamW, one-cycle cosine. Returns
    its accuracy on the 10,000 test images (stored in the file, with what it was trained on).
    `limit`: the first N images of each split only (smoke tests)."""
    torch.manual_seed(seed)
    t0 = time.time()
    half = lambda x: F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    train, y, _ = load_fashion("train", resolution, root, limit=limit)  # as the FID job sees them
    x = torch.cat([half(c[:, :1]) for c in train.split(4096)])
    del train
    xt, yt, _ = load_fashion("test", resolution, root, limit=limit)
    net = FashionNet()
    batch_size = min(batch_size, len(y))
    steps = epochs * (len(y) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        if step % (len(y) // batch_size) == 0:
            perm = torch.randperm(len(y), generator=g)
        idx = perm[(step % (len(y) // batch_size)) * batch_size:][:batch_size]
        xb = x[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb).expand(-1, 3, -1, -1)
        loss = F.cross_entropy(net(xb)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"fashion classifier step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    net.eval()
    with torch.no_grad():
        correct = sum((net(half(c.contiguous()))[1].argmax(1) == yc).sum().item()
                      for c, yc in zip(xt.split(1000), yt.split(1000)))
    acc = correct / len(yt)
    torch_save_atomic({"format": "enat-fashion-classifier", "num_classes": 10, "state_dict": net.state_dict(),
                       "test_accuracy": acc, "trained_on": {"dataset": "fashion_mnist", "split": "train",
                                                           "images": len(y), "resolution": resolution, "epochs": epochs,
                                                           "test_images": len(yt),
                                                           "seed": seed}}, out)
    log(f"wrote {out}: Fashion-MNIST classifier, test accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    return acc


# ---------------------------------------------------------------------------------------------
# Features and metrics
# ---------------------------------------------------------------------------------------------


EXTRACTOR_COMMAND = "enat extractor train --config CONFIG [key=value ...]"


def extractor_error(name: str, weights: str | None) -> str | None:
    """Why the extractor `name` with weights `weights` cannot be built, naming the fix; None if it can."""
    if name in CLASSIFIERS:
        if not weights:
            return (f"{name} needs eval.extractor_weights (the {CLASSIFIERS[name][2]} classifier's path); train "
                    f"it: `{EXTRACTOR_COMMAND}`")
        if not Path(weights).is_file():
            return (f"FID feature extractor ({name}, the {CLASSIFIERS[name][2]} classifier) not found: {weights}. "
                    f"Train it with "
                    f"`{EXTRACTOR_COMMAND}` (`enat data prepare` and launch/tokenize.py / launch/pipeline.py "
                    f"also build it)")
    elif name.startswith("inception"):
        if weights is None:
            return ("eval.extractor_weights is not set: give the Inception weights file "
                    "(pt_inception-2015-12-05-6726825d.pth) by path; nothing is downloaded")
        if not Path(weights).is_file():
            return (f"Inception weights not found: {weights} (eval.extractor_weights); copy "
                    f"pt_inception-2015-12-05-6726825d.pth there, nothing is downloaded")
    return None


# The Inception layer FID uses: pool3, the 2048-d output of the final average pool (the TF-FID
# protocol's "pool_3:0"), not the logits or an earlier mixed block.
INCEPTION_POOL = "2048"


def feature_size(name: str) -> int | None:
    """The size of the features FID compares for extractor `name` (None for one unknown here)."""
    if name in CLASSIFIERS:
        return CLASSIFIERS[name][4]
    return int(INCEPTION_POOL) if name.startswith("inception") else None


def build_extractor(name: str, weights: str | None, device: torch.device | str = "cpu"):
    import_torch_fidelity()  # registers digits-cnn
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # after the guard (see _register)

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(f"unknown feature extractor {name!r}")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layers = (["pool", "logits_unbiased"] if name in CLASSIFIERS else [INCEPTION_POOL, "logits_unbiased"])
    problem = extractor_error(name, weights)  # missing weights: say which file and what makes it
    if problem:
        raise EvalError(problem)
    return cls(name, layers, feature_extractor_weights_path=weights).to(device).eval()


@torch.no_grad()
def extract(extractor, images_uint8: torch.Tensor, batch_size: int = 100, progress: bool = False) -> dict:
    """(N, 3, H, W) uint8 -> {"pool": (N, D) float64, "logits": (N, C) float64}."""
    device = next(extractor.parameters()).device
    pools, logits = [], []
    for s in tqdm(range(0, len(images_uint8), batch_size), desc="features", unit="batch", disable=not progress):
        p, lg = extractor(images_uint8[s:s + batch_size].to(device))
        pools.append(p.double().cpu())
        logits.append(lg.double().cpu())
    if not pools:
        raise EvalError("no images to extract features from")
    return {"pool": torch.cat(pools).numpy(), "logits": torch.cat(logits).numpy()}


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians, in float64 (as the ADM evaluation suite does)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-singular products (ReLU features): handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the reference code does
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    if np.iscomplexobj(covmean):
        # Rounding leaves tiny imaginary parts (~1e-8 with 40 samples of 2048-d features); a large one
        # means sqrtm failed, and its real part is no distance: ADM's evaluator stops there too.
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > 1e-3:
            raise EvalError(f"FID: the square root of the covariances' product has an imaginary diagonal of "
                            f"{imag:.3g} (ADM's evaluator stops above 1e-3): the covariances are degenerate "
                            f"(non-finite or constant features?); check the samples and the extractor")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def metrics(gen: dict, ref: dict, kid_subset_size: int = 1000, prc: bool = True, seed: int = 0) -> dict:
    """FID (float64 from statistics), IS, and — when reference features exist — KID and
    precision/recall (on as many reference features as samples), through torch-fidelity's metric
    functions."""
    tf = import_torch_fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric  # after the guard (see _register)
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    mu, sigma = statistics(gen["pool"])
    out = {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    isc = isc_features_to_metric(torch.from_numpy(gen["logits"]), splits=10, shuffle=True, rng_seed=seed)
    out["isc_mean"], out["isc_std"] = float(isc[tf.KEY_METRIC_ISC_MEAN]), float(isc[tf.KEY_METRIC_ISC_STD])
    if "pool" in ref:
        a, b = torch.from_numpy(gen["pool"]), torch.from_numpy(ref["pool"])
        subset = min(kid_subset_size, len(a), len(b))
        kid = kid_features_to_metric(a, b, kid_subsets=100, kid_subset_size=subset, kid_degree=3, kid_gamma=None,
                                     kid_coef0=1, rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = float(kid[tf.KEY_METRIC_KID_MEAN]), float(kid[tf.KEY_METRIC_KID_STD])
        if prc:
            # Equal-size sets (Kynkaenniemi et al.): a larger reference is subsampled to the samples'
            # count. It also bounds memory: the k-NN radii of all 60,000 Fashion-MNIST training
            # images against each other took 22 GB.
            if len(b) > len(a):
                b = b[torch.randperm(len(b), generator=torch.Generator().manual_seed(seed))[: len(a)]]
            pr = prc_features_to_metric(a, b, prc_neighborhood=3, prc_batch_size=10000, verbose=False)
            out["precision"], out["recall"] = float(pr[tf.KEY_METRIC_PRECISION]), float(pr[tf.KEY_METRIC_RECALL])
    return out


def class_fid(gen_pool: np.ndarray, gen_labels: np.ndarray, ref_pool: np.ndarray, ref_labels: np.ndarray) -> float:
    """Mean over classes of the FID between samples and references of that class: a conditional
    metric (it grows when samples do not match their labels, which plain FID does not see)."""
    values = []
    for c in np.unique(ref_labels):
        g, r = gen_pool[gen_labels == c], ref_pool[ref_labels == c]
        if len(g) > 1 and len(r) > 1:
            values.append(frechet_distance(*statistics(g), *statistics(r)))
    return float(np.mean(values)) if values else math.nan
