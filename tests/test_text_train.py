"""Text-conditioned training with real processes (2 ranks, gloo): ZeRO stages agree on caption
shards (every parameter takes part in every step, the context projection included), exact
resume, contexts encoded on the fly from ids-only shards equal pre-encoded ones, the null
context lands in the checkpoint and the export samples from prompts on its own."""

import json

import pytest
import torch

from conftest import ROOT, demo_shards, train_losses
from test_train import base, launch

pytestmark = pytest.mark.slow
CONFIG = str(ROOT / "configs/experiments/demo_text.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("text"), text=True)


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("text_ids"), text=True, storage="ids")


def test_text_training_stages_agree_resume_exactly_and_ids_storage_matches(tmp_path, data, ids_data):
    jobs = [{"config": CONFIG, "name": f"z{s}", "overrides": base(data, tmp_path / f"z{s}", **{
        "train.zero_stage": s, "train.steps": 6, "model.dropout": 0.0})} for s in (0, 3)]
    jobs += [
        {"config": CONFIG, "name": "ids", "overrides": base(ids_data, tmp_path / "ids", **{
            "train.zero_stage": 0, "train.steps": 6, "model.dropout": 0.0})},
        {"config": CONFIG, "name": "straight", "overrides": base(data, tmp_path / "straight", **{
            "train.ckpt_every": 3, "train.steps": 6, "train.sample_every": 6, "train.val_every": 6})},
        {"config": CONFIG, "name": "cut", "stop_at": 3, "overrides": base(data, tmp_path / "cut", **{
            "train.ckpt_every": 3, "train.steps": 6, "train.sample_every": 6, "train.val_every": 6})},
    ]
    first = launch(tmp_path, jobs)
    resumed = launch(tmp_path, [{"config": CONFIG, "name": "cut", "overrides": base(data, tmp_path / "cut", **{
        "train.ckpt_every": 3, "train.steps": 6, "train.sample_every": 6, "train.val_every": 6})}], name="resume")
    # The second launch resumed at step 3 (a restart from step 0 would log the same losses: metrics.jsonl
    # is cut after the start step on every start).
    assert (first["cut"]["start_step"], first["cut"]["step"]) == (0, 3)
    assert (resumed["cut"]["start_step"], resumed["cut"]["step"]) == (3, 6)

    z0, z3 = train_losses(tmp_path / "z0"), train_losses(tmp_path / "z3")
    assert len(z0) == 6 and all(3 < v < 7 for v in z0.values())
    for step in z0:  # reuse-mode and full-mode steps alike
        assert z3[step] == pytest.approx(z0[step], rel=1e-6, abs=1e-6), step
    # Same captions, same random encoder: encoding ids in the trainer (rounded to fp16, as stored)
    # gives the stored contexts' losses.
    ids = train_losses(tmp_path / "ids")
    for step in z0:
        assert ids[step] == pytest.approx(z0[step], abs=1e-4), step
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")  # bit for bit

    # Validation on held-out captions and a captioned sample grid.
    val = [json.loads(x) for x in (tmp_path / "straight/val.jsonl").read_text().splitlines()]
    assert val and all(v["val/loss_r0.5"] == v["val/loss_r0.5"] for v in val)
    grid = tmp_path / "straight/samples/step00000006.png"
    assert grid.is_file() and len(grid.with_suffix(".txt").read_text().splitlines()) == 8

    # The export carries the null context and samples from prompts through the configured encoder.
    from enat.cli import main
    from enat.models.weights import load_weights

    out = tmp_path / "w.pt"
    assert main(["export", str(tmp_path / "straight"), str(out)]) == 0
    _, sd, _ = load_weights(out, "ema")
    from enat.data.shards import Manifest
    import numpy as np

    train_dir = next(o.split("=", 1)[1] for o in data if o.startswith("data.shards="))
    manifest = Manifest.load(train_dir)
    null = np.load(f"{train_dir}/{manifest.text['null_context']}")
    torch.testing.assert_close(sd["text_embed.null_context"], torch.from_numpy(null).float())
    over = [o for o in data if not o.startswith("data.")]
    assert main(["sample", "--config", CONFIG, "--checkpoint", str(out), "--prompts", "a thick handwritten seven",
                 "the digit 1", "--per-label", "2", "--out", str(tmp_path / "s"), *over]) == 0
    assert json.loads((tmp_path / "s/prompts.json").read_text()) == ["a thick handwritten seven"] * 2 + ["the digit 1"] * 2
    assert (tmp_path / "s/samples.png").is_file()
    # Prompts the encoder would silently lose, and overrides swallowed by --prompts, are refused.
    args = ["sample", "--config", CONFIG, "--checkpoint", str(out), "--out", str(tmp_path / "s3"), *over]
    assert main(args + ["--prompts", "a bold seven"]) == 2  # "bold" is not in the demo vocabulary
    assert main(args + ["--prompts", "the digit 1", "sample.cfg_scale=3"]) == 2
    assert not (tmp_path / "s3").exists()
    # Another encoder than the one it was trained with is refused (its '' is not the null context).
    other = tmp_path / "other_encoder"
    from enat.text import build_demo_text_encoder
    from enat.data.captions import DEMO_WORDS

    build_demo_text_encoder(other, list(DEMO_WORDS), 12, 32, seed=5)
    assert main(["sample", "--config", CONFIG, "--checkpoint", str(out), "--prompts", "the digit 1", "--out",
                 str(tmp_path / "s2"), *over, f"text.encoder={other}"]) == 2
