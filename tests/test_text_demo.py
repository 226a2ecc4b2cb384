"""The captioned demo end to end, shortened: the demo tokenizer and digit classifier trained here
(briefly), caption shards through the demo text encoder, a text-conditioned tiny ENAT trained in one
process, then `enat eval control`: the caption must steer the samples (digit accuracy at CFG 2 well
above CFG 0, both above chance), with and without reuse."""

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_captioned_demo_shows_text_control(tmp_path):
    import os

    from enat.config import load_config
    from enat.data.prepare import prepare_data
    from enat.eval.prepare import prepare_extractor
    from enat.eval.text import evaluate_control
    from enat.train.trainer import train

    over = [f"tokenizer.checkpoint={tmp_path / 'tok.pt'}", "tokenizer.train.steps=200",
            f"eval.extractor_weights={tmp_path / 'digits.pt'}", f"eval.cache_dir={tmp_path / 'fid'}",
            f"text.encoder={tmp_path / 'text_encoder'}", f"data.shards={tmp_path / 'train'}",
            f"data.val_shards={tmp_path / 'val'}", f"train.run_dir={tmp_path / 'run'}", "train.steps=1200",
            "train.zero_stage=0", "train.precision=fp32", "train.micro_batch=64", "train.wandb.mode=disabled",
            "train.val_every=0", "train.sample_every=0", "train.ckpt_every=0", "data.num_workers=0"]
    cfg = load_config(ROOT / "configs/experiments/demo_text.yaml", over)
    quiet = lambda *_: None  # noqa: E731
    prepare_data(cfg, progress=False, log=quiet)
    prepare_extractor(cfg, log=quiet)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    train(cfg, log=quiet)
    res = evaluate_control(cfg, cfg.train.run_dir, "latest", cfg_scales=[0.0, 2.0], num_samples=300, fid=False,
                           log=quiet)
    acc = {(r["cfg_scale"], r["reuse"]): r["digit_accuracy"] for r in res["results"]}
    for reuse in (True, False):
        assert acc[(0.0, reuse)] > 0.25, acc  # chance is 0.1
        assert acc[(2.0, reuse)] > acc[(0.0, reuse)] + 0.05, acc
    assert (tmp_path / "run/eval/control/00001200/control.md").is_file()
