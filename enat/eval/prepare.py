"""What evaluation needs that this project builds itself: the demo's FID feature extractor (the
digit classifier, `eval.extractor: digits-cnn`), trained when missing. Anything else (the
Inception weights, reference statistics) is given by path. Data preparation runs it alongside the
tokenizer and the shards (`enat data prepare`, the launchers' prepare job) so the FID job finds it;
the FID job itself only checks and names the command (enat.eval.fidelity.extractor_error)."""

from __future__ import annotations

from pathlib import Path

from enat.config import Config


def extractor_missing(cfg: Config) -> bool:
    """Whether the demo's digit classifier must be trained first (`prepare_extractor` would)."""
    ev = cfg.eval
    weights = ev.extractor_weights
    return ev.extractor == "digits-cnn" and bool(weights) and not Path(weights).is_file()


def prepare_extractor(cfg: Config, log=print) -> None:
    """Train the digit classifier at eval.extractor_weights when the config uses it and it is missing."""
    if not extractor_missing(cfg):
        return
    from enat.eval.fidelity import train_digit_classifier

    log(f"no FID feature extractor at {cfg.eval.extractor_weights}: training the digit classifier")
    train_digit_classifier(cfg.eval.extractor_weights, seed=cfg.seed, log=log)
