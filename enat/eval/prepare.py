"""What evaluation needs that this project builds itself: the FID feature extractors of the data
it has no standard network for (`eval.extractor: digits-cnn`, the demo's digit classifier;
`fashion-cnn`, the Fashion-MNIST classifier), trained when missing. Anything else (the Inception
weights, reference statistics) is given by path. Data preparation runs it alongside the tokenizer
and the shards (`enat data prepare`, the launchers' prepare job) so the FID job finds it; the FID
job itself only checks and names the command (enat.eval.fidelity.extractor_error)."""

from __future__ import annotations

from pathlib import Path

from enat.config import Config, ConfigError
from enat.eval.fidelity import CLASSIFIERS, train_digit_classifier, train_fashion_classifier


def extractor_missing(cfg: Config) -> bool:
    """Whether the configured classifier must be trained first (`prepare_extractor` would)."""
    ev = cfg.eval
    weights = ev.extractor_weights
    return ev.extractor in CLASSIFIERS and bool(weights) and not Path(weights).is_file()


def train_extractor(cfg: Config, out: str | Path, log=print) -> float:
    """Train the classifier eval.extractor names (on the data it belongs to) into `out`; returns
    its held-out accuracy."""
    name = cfg.eval.extractor
    if name not in CLASSIFIERS:
        raise ConfigError(f"`enat extractor train` trains the project's own extractors ({', '.join(CLASSIFIERS)}); "
                          f"eval.extractor={name} is given by path (eval.extractor_weights)")
    dataset = CLASSIFIERS[name][2]
    if not cfg.data.dataset.startswith(dataset):
        raise ConfigError(f"eval.extractor={name} is the {dataset} classifier but data.dataset={cfg.data.dataset}: "
                          f"features of another dataset's classifier make a meaningless FID")
    if name == "fashion-cnn":
        return train_fashion_classifier(out, cfg.data.fashion_dir, seed=cfg.seed, limit=cfg.data.subset,
                                        resolution=cfg.tokenizer.resolution, log=log)
    return train_digit_classifier(out, seed=cfg.seed, log=log)


def prepare_extractor(cfg: Config, log=print) -> None:
    """Train the classifier at eval.extractor_weights when the config uses one and it is missing."""
    if not extractor_missing(cfg):
        return
    log(f"no FID feature extractor at {cfg.eval.extractor_weights}: training the {cfg.eval.extractor} classifier")
    train_extractor(cfg, cfg.eval.extractor_weights, log=log)
