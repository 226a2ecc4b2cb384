"""The sampler beyond the golden greedy trace: reproducibility, batch-size independence,
schedule, switches."""

import math
from pathlib import Path

import pytest
import torch

from enat.config import SampleConfig
from enat.models import build_model, model_config
from enat.sampling import generate, generate_all, mask_schedule, masked_after_step
from test_models import perturb_


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(build_model(model_config("tiny", grid_size=4, num_classes=10)), std=0.1).eval()


def test_schedule_matches_released_counts():
    assert [masked_after_step(16, 8, s) for s in range(8)] == [15, 14, 13, 11, 8, 6, 3, 0]
    assert mask_schedule(16, 8) == [16, 15, 14, 13, 11, 8, 6, 3]
    for N, T in [(256, 8), (1024, 12), (64, 1)]:
        sched = mask_schedule(N, T)
        assert sched[0] == N and all(a >= b for a, b in zip(sched, sched[1:]))
        assert masked_after_step(N, T, T - 1) == 0


def test_same_samples_whatever_the_batch_size(model):
    cfg = SampleConfig(steps=6, cfg_scale=2.0, samp_temp=3.0, mask_temp=1.5, seed=5)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    whole = generate(model, labels, cfg)
    for bs in (1, 2, 3):
        parts = generate_all(model, labels, SampleConfig(**{**cfg.__dict__, "batch_size": bs}))
        assert torch.equal(parts, whole), bs
    # A sample drawn alone with its global index equals the same sample in the batch.
    one = generate(model, labels[4:5], cfg, indices=torch.tensor([4]))
    assert torch.equal(one[0], whole[4])


def test_seed_controls_samples(model):
    labels = torch.tensor([1, 1, 1, 1])
    a = generate(model, labels, SampleConfig(steps=4, seed=1))
    b = generate(model, labels, SampleConfig(steps=4, seed=1))
    c = generate(model, labels, SampleConfig(steps=4, seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Same label, different sample indices: different samples.
    assert len({tuple(r.tolist()) for r in a}) > 1


@pytest.mark.parametrize("steps", [1, 3, 8, 20])
@pytest.mark.parametrize("reuse", [True, False])
def test_any_number_of_steps_fills_every_token(model, steps, reuse):
    trace = []
    ids = generate(model, torch.tensor([2, 7]), SampleConfig(steps=steps, reuse=reuse), trace=trace)
    assert (ids < 1024).all() and ids.shape == (2, 16)
    assert [int((t.input_ids == 1024).sum(1)[0]) for t in trace] == mask_schedule(16, steps)
    for t in trace:  # a visible token never changes and is never masked again
        vis = t.input_ids != 1024
        assert torch.equal(t.ids[vis], t.input_ids[vis])


def test_reuse_switch_changes_the_computation(model):
    labels = torch.tensor([3, 4])
    cfg = dict(steps=8, greedy=True, mask_temp=0.0)
    with_reuse, without = [], []
    generate(model, labels, SampleConfig(**cfg, reuse=True), trace=with_reuse)
    generate(model, labels, SampleConfig(**cfg, reuse=False), trace=without)
    # Step 0 is full mode either way; later steps see reused features only with reuse on.
    assert torch.equal(with_reuse[0].confidence, without[0].confidence)
    assert any(not torch.allclose(a.confidence, b.confidence) for a, b in zip(with_reuse[2:], without[2:]))


def test_cfg_ramp_and_no_cfg(model):
    trace = []
    generate(model, torch.tensor([1]), SampleConfig(steps=4, cfg_scale=2.0), trace=trace)
    assert [t.cfg_scale for t in trace] == [0.0, 0.5, 1.0, 1.5]
    ids = generate(model, torch.tensor([1]), SampleConfig(steps=4, cfg_scale=0.0))
    assert (ids < 1024).all()


def test_greedy_ignores_sampling_temperature(model):
    labels = torch.tensor([5, 6])
    a = generate(model, labels, SampleConfig(greedy=True, samp_temp=1.0, mask_temp=0.0))
    b = generate(model, labels, SampleConfig(greedy=True, samp_temp=9.0, mask_temp=0.0, seed=3))
    assert torch.equal(a, b)


def test_temperature_spreads_the_draw(model):
    labels = torch.zeros(16, dtype=torch.long)
    cold = generate(model, labels, SampleConfig(steps=1, samp_temp=1e-6, mask_temp=0.0, cfg_scale=0.0))
    hot = generate(model, labels, SampleConfig(steps=1, samp_temp=50.0, mask_temp=0.0, cfg_scale=0.0))
    # steps=1 anneals the temperature to its floor, so both are near-greedy: equal.
    assert torch.equal(cold, hot)
    hot2 = generate(model, labels, SampleConfig(steps=2, samp_temp=50.0, mask_temp=0.0, cfg_scale=0.0))
    cold2 = generate(model, labels, SampleConfig(steps=2, samp_temp=1e-6, mask_temp=0.0, cfg_scale=0.0))
    assert hot2.unique().numel() > cold2.unique().numel()


def test_nat_samples_without_reuse_and_refuses_reuse():
    nat = build_model(model_config("tiny", arch="nat", grid_size=4, num_classes=10)).eval()
    ids = generate(nat, torch.tensor([1, 2]), SampleConfig(steps=4, reuse=False))
    assert (ids < 1024).all()
    with pytest.raises(ValueError, match="no reuse mode"):
        generate(nat, torch.tensor([1]), SampleConfig(reuse=True))


def test_gumbel_noise_uses_float64_uniforms_safely(model):
    # Extreme mask temperature: confidence is dominated by noise yet stays finite.
    trace = []
    generate(model, torch.tensor([0, 1]), SampleConfig(steps=4, mask_temp=1e6), trace=trace)
    for t in trace:
        vis = t.input_ids != 1024
        assert torch.isfinite(t.confidence[~vis]).all()
        assert not math.isnan(float(t.confidence[~vis].sum()))


def test_save_steps_grid_shows_each_step_with_undecided_tokens_grey(tmp_path):
    """`enat sample --save-steps`: one row per sample, one column per step; the grey patches of
    column s are exactly the tokens still [MASK] after step s (the schedule)."""
    import numpy as np
    from PIL import Image

    from enat.cli import main
    from enat.config import load_config
    from enat.images import decode_partial
    from enat.sampling import mask_schedule
    from enat.tokenizer import VQGAN, load_tokenizer
    from enat.tokenizer.train import save_tokenizer

    config = str(Path(__file__).resolve().parents[1] / "configs/experiments/demo.yaml")
    over = [f"tokenizer.checkpoint={tmp_path / 'tok.pt'}"]
    cfg = load_config(config, over)
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})
    assert main(["sample", "--config", config, "--labels", "1,2", "--per-label", "2", "--save-steps",
                 "--out", str(tmp_path / "s"), *over]) == 0
    grid = np.asarray(Image.open(tmp_path / "s/steps.png"))
    T, px = cfg.sample.steps, 32
    assert grid.shape[:2] == (4 * (px + 2) + 2, T * (px + 2) + 2)
    # The PNG itself: in column t every sample shows exactly the [MASK] tokens the cosine schedule
    # leaves after step t, floor(N cos(pi/2 (t+1)/T)) (written out here, not taken from the sampler),
    # grey in all three channels; and a decided token never turns grey again.
    import inspect

    g, patch = 8, px // 8
    assert cfg.model.seq_len == g * g
    from enat.images import to_uint8

    grey = inspect.signature(decode_partial).parameters["grey"].default  # the drawing code's grey
    grey_u8 = int(to_uint8(torch.full((1, 3, 1, 1), grey))[0, 0, 0, 0])
    want = [math.floor(g * g * math.cos(math.pi / 2 * (t + 1) / T)) for t in range(T)]
    assert want[-1] == 0 and want[0] < g * g
    for r in range(4):
        masks = []
        for t in range(T):
            cell = grid[2 + r * (px + 2):2 + r * (px + 2) + px, 2 + t * (px + 2):2 + t * (px + 2) + px, :3]
            patches = cell.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g, g, -1)
            masks.append((patches == grey_u8).all(-1))
        assert [int(m.sum()) for m in masks] == want, (r, [int(m.sum()) for m in masks])
        assert all((b <= a).all() for a, b in zip(masks, masks[1:])), r  # grey only shrinks
    # decode_partial paints exactly the masked patches grey.
    tok = load_tokenizer(cfg.tokenizer)
    N, mask_id = cfg.model.seq_len, cfg.model.mask_id
    counts = mask_schedule(N, T)[1:] + [0]  # [MASK] tokens left after each step
    for left in counts:
        ids = torch.randint(0, mask_id, (1, N))
        ids[0, torch.randperm(N)[:left]] = mask_id
        img = decode_partial(tok, ids, mask_id)
        patches = img.unfold(2, 4, 4).unfold(3, 4, 4)  # (1, 3, 8, 8, 4, 4): 4x4 px per token
        grey = (patches == 0.5).flatten(-2).all(-1).all(1)[0]
        assert int(grey.sum()) == left and torch.equal(grey.flatten(), ids[0] == mask_id)
