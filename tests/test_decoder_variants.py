"""ENAT's decoder-attention variants (model.decoder_attention): sc (the released SC-attention, kept
bit-identical: test_parity.py), self (an MAE-style decoder: visible features and [MASK] tokens as
one sequence) and cross (CrossMAE: [MASK] tokens attend to the visible features only). What each
attends to, FLOPs against torch's counter, every parameter in every training step, sampling with
reuse."""

import dataclasses

import pytest
import torch

from enat.config import ConfigError, SampleConfig
from enat.flops import forward_flops, sampling_flops, train_step_flops
from enat.models import build_model, model_config
from enat.models.convert import to_official
from enat.models.weights import WeightsError
from enat.sampling import generate
from enat.train.objective import compute_loss
from test_flops import counted, exact
from test_models import masked_ids, perturb_

VARIANTS = ("sc", "self", "cross")


def variant(name, **kw):
    torch.manual_seed(0)
    cfg = model_config("tiny", grid_size=8, codebook_size=64, num_classes=10, decoder_attention=name, **kw)
    return perturb_(build_model(cfg), std=0.05).eval()


def decode(model, m, context):
    """The decoder alone on [MASK] features m (B, M, D) with context (B, K, D), as ENAT.forward runs it."""
    c = torch.nn.functional.silu(model.label_embed(torch.zeros(m.shape[0], dtype=torch.long)))
    if model.cfg.decoder_attention == "self":
        h = torch.cat([context, m], dim=1)
        for block in model.decoder:
            h = block(h, c)
        return h[:, context.shape[1]:]
    for block in model.decoder:
        m = block(m, c, context)
    return m


def test_what_the_mask_tokens_attend_to():
    g = torch.Generator().manual_seed(1)
    m, context = torch.randn(2, 6, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        for name in VARIANTS:
            model = variant(name)
            full, part = decode(model, m, context), decode(model, m[:, :2], context)
            alone = torch.allclose(full[:, :2], part, atol=1e-6)
            # cross: a [MASK] token's output does not depend on the other [MASK] tokens; sc and self:
            # it does (they attend to each other).
            assert alone == (name == "cross"), name
            # Every variant reads the visible features (a shift would vanish in the LayerNorm: noise).
            assert not torch.allclose(decode(model, m, context + torch.randn(context.shape, generator=g)), full), name
    cross = variant("cross")
    assert cross.decoder[0].attn.kv is None and cross.decoder[0].attn.kv_ctx is not None
    plain = variant("self")
    assert plain.decoder[0].attn.kv_ctx is None and not plain.decoder[0].two_way
    with torch.no_grad():  # no visible token yet (sampling step 0): cross-attention adds nothing, on any backend
        out = decode(cross, m, context[:, :0])
    assert torch.isfinite(out).all()


def test_sc_keeps_the_released_layout_and_the_others_do_not_convert():
    sc, plain, cross = (variant(v) for v in VARIANTS)
    assert set(sc.state_dict()) == set(build_model(model_config("tiny", grid_size=8, codebook_size=64,
                                                                 num_classes=10)).state_dict())
    assert sum(p.numel() for p in cross.parameters()) < sum(p.numel() for p in sc.parameters())
    for model in (plain, cross):
        with pytest.raises(WeightsError, match="SC-attention only"):
            to_official(model.state_dict(), model.cfg)
    with pytest.raises(ConfigError, match="NAT baseline has none"):
        model_config("tiny", arch="nat", decoder_attention="cross")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("text", [False, True])
def test_flops_match_torchs_counter(name, text):
    kw = dict(condition="text", text_len=6, text_dim=24) if text else {}
    model = variant(name, **kw)
    cfg = model.cfg
    N = cfg.seq_len
    cond = torch.randn(2, 6, 24) if text else torch.tensor([1, 2])
    model.set_null_context(torch.randn(6, 24)) if text else None
    with torch.no_grad():
        for M in (0, 20, N):  # no [MASK] (decoder skipped), some, all (no visible token)
            ids = masked_ids(2, N, M, vocab=64, mask_id=64)
            exact(counted(lambda: model(ids, cond, logits="masked")), 2 * forward_flops(cfg, M, logits="masked"))
    for reuse in (True, False):
        sc = SampleConfig(steps=6, cfg_scale=2.0, reuse=reuse)
        exact(counted(lambda: generate(model, cond, sc)), 2 * sampling_flops(cfg, 6, reuse=reuse).total)
    model.train()
    model.embed.dropout.p = 0.0
    tokens = torch.randint(0, 64, (2, N))
    order = torch.argsort(torch.rand(2, N, generator=torch.Generator().manual_seed(3)), dim=1)
    for remasked in (None, order[:, 30:40]):
        def step():
            compute_loss(model, model, tokens, cond, order[:, :30], remasked, 64, 0.0).backward()
        exact(counted(step), 2 * train_step_flops(cfg, 30, reuse=remasked is not None, remasked=10))
        # Every parameter takes part in every step (ZeRO stages then agree), in both modes.
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["self", "cross"])
def test_variants_learn_and_sample_with_reuse(name):
    model = variant(name).train()
    model.embed.dropout.p = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (1, 64), generator=g).repeat(16, 1)  # one sequence to memorise
    labels = torch.full((16,), 3)
    losses = []
    for step in range(30):
        order = torch.argsort(torch.rand(16, 64, generator=g), dim=1)
        remasked = order[:, 40:50] if step % 2 else None
        loss = compute_loss(model, model, tokens, labels, order[:, :40], remasked, 64, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    model.eval()
    sc = SampleConfig(steps=6, cfg_scale=2.0, greedy=True)
    ids = generate(model, torch.tensor([3, 3]), sc)
    assert ids.shape == (2, 64) and (ids < 64).all()
    no_reuse = generate(model, torch.tensor([3, 3]), dataclasses.replace(sc, reuse=False))
    assert (ids == no_reuse).float().mean() > 0.3  # reuse approximates full encoding


def test_the_ablation_sweep_differs_only_in_the_decoder():
    from conftest import ROOT
    from enat.config import to_dict
    from enat.sweeps import load_sweep, run_configs, run_entry

    runs = run_configs(load_sweep(ROOT / "configs/sweeps/decoder_attention.yaml"))
    assert [cfg.model.decoder_attention for _, cfg in runs] == list(VARIANTS)
    trees = [to_dict(cfg) for _, cfg in runs]
    for tree in trees:
        tree["train"].pop("run_dir")
        tree["train"]["wandb"].pop("tags")
        assert tree["train"]["wandb"].pop("sweep_point") == {"model.decoder_attention": tree["model"].pop("decoder_attention")}
    assert trees[0] == trees[1] == trees[2]  # same steps, data, seed, recipe
    flops = {cfg.model.decoder_attention: run_entry(run, cfg)["train_flops_per_sample"] for run, cfg in runs}
    assert flops["cross"] < flops["sc"] < flops["self"]
