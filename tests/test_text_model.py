"""Text-conditioned ENAT and NAT (model.condition=text): context tokens always visible, reused (never
re-encoded) after the first sampling step, the null context as CFG's unconditional input, FLOPs
against torch's counter. Class conditioning is covered, unchanged, by test_parity.py."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from enat.config import SampleConfig
from enat.flops import forward_flops, sampling_flops, train_step_flops
from enat.models import build_model, model_config
from enat.models.weights import load_state
from enat.sampling import generate, mask_schedule
from enat.train.objective import compute_loss
from test_flops import counted, exact
from test_models import masked_ids, perturb_

L, C = 5, 12


def text_cfg(**kw):
    return model_config("tiny", grid_size=4, codebook_size=32, num_classes=10, condition="text", text_len=L,
                        text_dim=C, **kw)


def text_model(arch="enat", seed=0):
    torch.manual_seed(seed)
    model = perturb_(build_model(text_cfg(arch=arch)), std=0.05, seed=seed).eval()
    model.set_null_context(torch.randn(L, C, generator=torch.Generator().manual_seed(99)))
    return model


def contexts(B, seed=1):
    return torch.randn(B, L, C, generator=torch.Generator().manual_seed(seed)).half()  # as shards store them


def record_blocks(blocks):
    """Per call of the first block: (own tokens, context tokens)."""
    calls = []
    handle = blocks[0].register_forward_pre_hook(
        lambda mod, args: calls.append((args[0].shape[1], 0 if args[2] is None else args[2].shape[1])))
    return calls, handle


def test_class_model_has_no_text_parts_and_text_model_no_label_table():
    cls = build_model(model_config("tiny", grid_size=4, num_classes=10))
    assert not any(k.startswith("text_embed") for k in cls.state_dict())
    txt = build_model(text_cfg())
    keys = set(txt.state_dict())
    assert "text_embed.null_context" in keys and not any(k.startswith("label_embed") for k in keys)


def test_text_positions_always_visible_and_never_re_encoded_in_reuse_sampling():
    model = text_model()
    N, T = model.cfg.seq_len, 6
    enc_calls, h1 = record_blocks(model.encoder)
    dec_calls, h2 = record_blocks(model.decoder)
    try:
        generate(model, contexts(3), SampleConfig(steps=T, cfg_scale=0.0, reuse=True))
    finally:
        h1.remove(), h2.remove()
    sched = mask_schedule(N, T)
    visible = [N - m for m in sched]
    # Step 0: the encoder sees the L context tokens and no image token (all are [MASK]).
    assert enc_calls[0] == (L, 0)
    # Later steps: only newly revealed tokens are encoded; the L context tokens and the old
    # visible tokens come back through f as the encoder's context, never as its input.
    expect = [(visible[s] - visible[s - 1], L + visible[s - 1]) for s in range(1, T) if visible[s] > visible[s - 1]]
    assert enc_calls[1:] == expect
    # The decoder attends to the context tokens at every step.
    assert dec_calls == [(sched[s], L + visible[s]) for s in range(T)]


def test_reuse_carries_text_features_through_f():
    model = text_model()
    N = model.cfg.seq_len
    ctx = contexts(2)
    a = masked_ids(2, N, N - 4, vocab=32, mask_id=32)
    b = a.clone()
    b[a == 32] = torch.where(torch.arange(int((a == 32).sum())) % 3 == 0, 5, 32)[: int((a == 32).sum())]
    b[1] = a[1]
    b[1, (a[1] == 32).nonzero()[:, 0][: int((b[0] != 32).sum()) - 4]] = 5  # same newly revealed count per row
    with torch.no_grad():
        prev = model(a, ctx)
        out = model(b, ctx, prev=prev)
        assert prev.text_feat.shape == (2, L, model.cfg.width)
        torch.testing.assert_close(out.text_feat, model.reuse_proj(prev.text_feat))
        # The context tokens matter: another caption's features change the reuse-mode logits.
        other = dataclasses.replace(prev, text_feat=prev.text_feat.flip(0))
        assert not torch.allclose(model(b, ctx, prev=other).logits, out.logits)


def test_unconditional_branch_is_the_model_on_the_null_context():
    model = text_model()
    calls = []
    h = model.register_forward_pre_hook(lambda mod, args: calls.append(args[1].clone()))
    try:
        generate(model, contexts(2), SampleConfig(steps=4, cfg_scale=3.0, reuse=True))
    finally:
        h.remove()
    null = model.text_embed.null_context
    for cond in calls:
        assert cond.shape == (4, L, C)
        torch.testing.assert_close(cond[2:].float(), null.half().float().expand(2, -1, -1))
    # Guidance toward the null context itself is no guidance at all.
    nul = null.expand(3, -1, -1).clone()
    torch.testing.assert_close(generate(model, nul, SampleConfig(steps=4, cfg_scale=4.0)),
                               generate(model, nul, SampleConfig(steps=4, cfg_scale=0.0)))


@pytest.mark.parametrize("arch", ["enat", "nat"])
def test_samples_independent_of_batch_and_changed_by_the_caption(arch):
    model = text_model(arch)
    sc = SampleConfig(steps=4, cfg_scale=2.0, reuse=arch == "enat", batch_size=2)
    ctx = contexts(5)
    whole = generate(model, ctx, sc, indices=torch.arange(5))
    parts = torch.cat([generate(model, ctx[:2], sc, indices=torch.arange(2)),
                       generate(model, ctx[2:], sc, indices=torch.arange(2, 5))])
    assert torch.equal(whole, parts)
    # Same noise (same indices), other captions: other images (greedy, so the noise cannot hide it).
    sc = dataclasses.replace(sc, greedy=True)
    a, b = generate(model, ctx, sc), generate(model, contexts(5, seed=7), sc)
    assert (a != b).any(dim=1).all()


def test_bad_context_shape_or_dtype_names_the_fields():
    model = text_model()
    ids = torch.full((2, model.cfg.seq_len), 32)
    with pytest.raises(ValueError, match="model.text_len"):
        model(ids, torch.zeros(2, L + 1, C))
    with pytest.raises(ValueError, match="floating point"):
        model(ids, torch.zeros(2, L, C, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional"):
        build_model(model_config("tiny")).set_null_context(torch.zeros(L, C))


def test_a_saved_model_samples_with_its_own_null_context():
    model = text_model()
    fresh = build_model(text_cfg())
    load_state(fresh, model.state_dict(), "test")
    sc = SampleConfig(steps=4, cfg_scale=2.0)
    ctx = contexts(2)
    assert torch.equal(generate(fresh.eval(), ctx, sc), generate(model, ctx, sc))


def test_training_loss_with_contexts_in_both_modes():
    model = text_model().train()
    ema = text_model().eval()
    N = model.cfg.seq_len
    tokens = torch.randint(0, 32, (4, N))
    order = torch.argsort(torch.rand(4, N, generator=torch.Generator().manual_seed(3)), dim=1)
    for remasked in (None, order[:, 6:9]):
        loss = compute_loss(model, ema, tokens, contexts(4), order[:, :6], remasked, 32, 0.1)
        loss.backward()
        assert torch.isfinite(loss)
        # Every parameter takes part in every step (ZeRO stages agree): the context projection
        # is used in full mode and used with zero weight when a step reuses the context features.
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        assert (grads["text_embed.proj.weight"].abs().sum() > 0) == (remasked is None)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# FLOPs


@pytest.fixture(scope="module")
def flop_models():
    cfg = model_config("tiny", grid_size=8, num_classes=10, condition="text", text_len=16, text_dim=48)
    torch.manual_seed(0)
    return cfg, perturb_(build_model(cfg), std=0.02).eval(), perturb_(build_model(dataclasses.replace(cfg, arch="nat")))


@pytest.mark.parametrize("frac", [0.0, 0.4, 1.0])
def test_forward_flops_count_the_text_positions(flop_models, frac):
    cfg, enat, nat = flop_models
    N = cfg.seq_len
    M = round(N * frac)
    ids, ctx = masked_ids(2, N, M), torch.randn(2, 16, 48)
    with torch.no_grad():
        for model in (enat, nat):
            exact(counted(lambda: model(ids, ctx, logits="masked")), 2 * forward_flops(model.cfg, M, logits="masked"))


def test_reuse_and_train_flops_count_the_text_positions(flop_models):
    """Training: the caption Linears' backward is the weight gradient alone (the captions are data),
    counted once, as torch's counter sees it."""
    cfg, enat, nat = flop_models
    N = cfg.seq_len
    a = masked_ids(1, N, 50)
    b = a.clone()
    b[0, (a[0] == 1024).nonzero()[:20, 0]] = 7
    ctx = torch.randn(1, 16, 48)
    with torch.no_grad():
        prev = enat(a, ctx)
        exact(counted(lambda: enat(b, ctx, prev=prev, logits="masked")),
              forward_flops(cfg, 30, prev_visible=N - 50, logits="masked"))
    tokens = torch.randint(0, 1024, (2, N))
    order = torch.argsort(torch.rand(2, N), dim=1)
    enat.train()
    enat.embed.dropout.p = 0.0
    try:
        for remasked in (None, order[:, 40:52]):
            def step():
                compute_loss(enat, enat, tokens, torch.randn(2, 16, 48), order[:, :40], remasked, 1024, 0.0).backward()
            exact(counted(step), 2 * train_step_flops(cfg, 40, reuse=remasked is not None, remasked=12))
        nat.train()
        nat.embed.dropout.p = 0.0
        exact(counted(lambda: compute_loss(nat, nat, tokens, torch.randn(2, 16, 48), order[:, :40], None, 1024,
                                           0.0).backward()),
              2 * train_step_flops(nat.cfg, 40))
    finally:
        for model in (enat, nat):
            model.eval()
            model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("reuse", [True, False])
def test_whole_text_sampling_run_flops(flop_models, reuse):
    cfg, enat, _ = flop_models
    sc = SampleConfig(steps=8, cfg_scale=2.0, reuse=reuse)
    enat.set_null_context(torch.zeros(16, 48))
    exact(counted(lambda: generate(enat, torch.randn(2, 16, 48), sc)),
          2 * sampling_flops(cfg, 8, reuse=reuse, guided=True).total)


def test_text_adds_what_the_context_tokens_cost():
    """ENAT-B at 256 px with CLIP's 77 x 768: the context tokens are a visible share of the cost."""
    cls = model_config("B")
    txt = dataclasses.replace(cls, condition="text")
    with_text = sampling_flops(txt, 8, reuse=True, guided=True).total
    without = sampling_flops(cls, 8, reuse=True, guided=True).total
    assert 1.1 < with_text / without < 2.0
    # Reuse still pays: no reuse re-encodes the text at every step.
    assert sampling_flops(txt, 8, reuse=False, guided=True).total > 1.3 * with_text


# ------------------------------------------------------------------------------------------------
# The GPU shape with text, counted on the CPU


def test_no_host_sync_and_one_graph_per_mode_with_text():
    from enat.profiling import SyncCounter, count_graphs
    from enat.train.ema import EMA

    model = text_model().train()
    ema = EMA(model, 0.9)
    N = model.cfg.seq_len
    tokens = torch.randint(0, 32, (4, N))
    order = torch.argsort(torch.rand(4, N, generator=torch.Generator().manual_seed(3)), dim=1)
    for remasked in (None, order[:, 6:9]):
        with SyncCounter() as c:  # forward, loss and backward of a step, fp16 contexts as from shards
            compute_loss(model, ema, tokens, contexts(4), order[:, :6], remasked, 32, 0.1).backward()
        assert c.total == 0, c.where
        graphs, breaks, reasons = count_graphs(compute_loss, model, ema, tokens, contexts(4), order[:, :6], remasked,
                                               32, 0.1)
        assert (graphs, breaks) == (1, 0), reasons
    model.eval()
    for reuse in (True, False):  # the decoding loop, with CFG on the null context
        with SyncCounter() as c:
            generate(model, contexts(3), SampleConfig(steps=6, cfg_scale=2.0, reuse=reuse))
        assert c.total == 0, c.where
    with SyncCounter() as c:  # bf16 autocast, as a GPU sampler runs
        generate(model, contexts(3), SampleConfig(steps=6, cfg_scale=2.0), autocast_dtype=torch.bfloat16)
    assert c.total == 0, c.where
