"""Analytic FLOPs against torch's FlopCounterMode (attention through the MATH backend, whose
matmuls the counter sees), exactly (integer equality), on the tiny and S configs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from enat.config import SampleConfig
from enat.flops import (expected_train_flops, forward_flops, sampling_flops, train_step_flops)
from enat.models import build_model, model_config
from enat.sampling import generate
from test_models import masked_ids, perturb_

CONFIGS = {"tiny": model_config("tiny", grid_size=8, num_classes=10), "S": model_config("S", grid_size=16)}


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def exact(measured, analytic):
    """enat.flops counts what the counter counts: equal to the FLOP, no tolerance (a dropped adaLN,
    head projection or caption projection is 0.5-2.4% of a forward, under any loose tolerance)."""
    assert analytic == measured, (measured, analytic, measured - analytic)


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    torch.manual_seed(0)
    enat = perturb_(build_model(cfg), std=0.02).eval()
    nat = build_model(dataclasses.replace(cfg, arch="nat")).eval()
    return cfg, enat, nat


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("logits", ["all", "masked", "none"])
def test_forward(models, frac, logits):
    cfg, enat, nat = models
    N, B = cfg.seq_len, 2
    M = round(N * frac)
    ids, labels = masked_ids(B, N, M), torch.tensor([1, 2])
    with torch.no_grad():
        exact(counted(lambda: enat(ids, labels, logits=logits)), B * forward_flops(cfg, M, logits=logits))
        nat_cfg = nat.cfg
        exact(counted(lambda: nat(ids, labels, logits=logits)), B * forward_flops(nat_cfg, M, logits=logits))


@pytest.mark.parametrize("prev_frac,frac", [(1.0, 0.9), (0.8, 0.5), (0.5, 0.5), (0.3, 0.0)])
def test_reuse_forward(models, prev_frac, frac):
    cfg, enat, _ = models
    N = cfg.seq_len
    a = masked_ids(1, N, round(N * prev_frac))
    b = a.clone()
    masked_pos = (a[0] == 1024).nonzero()[:, 0]
    reveal = masked_pos[: len(masked_pos) - round(N * frac)]
    b[0, reveal] = 3
    with torch.no_grad():
        prev = enat(a, torch.tensor([1]))
        M = int((b == 1024).sum())
        exact(counted(lambda: enat(b, torch.tensor([1]), prev=prev, logits="masked")),
              forward_flops(cfg, M, prev_visible=int((a != 1024).sum()), logits="masked"))


@pytest.mark.parametrize("variant", ["enat", "enat-reuse", "nat"])
def test_train_step(models, variant):
    _, enat, nat = models
    model = nat if variant == "nat" else enat
    cfg, reuse = model.cfg, variant == "enat-reuse"
    N, B = cfg.seq_len, 2
    M, remasked = round(0.7 * N), round(0.15 * N)
    x0 = torch.randint(0, 1024, (B, N))
    cur = masked_ids(B, N, M)
    labels = torch.tensor([1, 2])
    model.train()
    model.embed.dropout.p = 0.0

    def step():
        prev = None
        if reuse:  # previous input: `remasked` more of the visible tokens masked
            before = cur.clone()
            for r in range(B):
                before[r, (cur[r] != 1024).nonzero()[:remasked, 0]] = 1024
            with torch.no_grad():
                prev = model(before, labels, logits="none")
        out = model(cur, labels, prev=prev, logits="masked")
        loss = F.cross_entropy(out.logits.flatten(0, 1), x0[cur == 1024])
        loss.backward()

    try:
        exact(counted(step), B * train_step_flops(cfg, M, reuse=reuse, remasked=remasked))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", ["enat", "enat-noreuse", "nat"])
@pytest.mark.parametrize("cfg_scale", [2.5, 0.0])
def test_whole_sampling_run(models, variant, cfg_scale):
    cfg, enat, nat = models
    model = nat if variant == "nat" else enat
    reuse = variant == "enat"
    B, steps = 2, 8
    sc = SampleConfig(steps=steps, cfg_scale=cfg_scale, reuse=reuse)
    measured = counted(lambda: generate(model, torch.tensor([1, 2]), sc))
    analytic = sampling_flops(model.cfg, steps, reuse=reuse, guided=cfg_scale != 0)
    exact(measured, B * analytic.total)


def test_released_L_costs_from_the_method_note():
    """ENAT-L, 256 px, 8 steps, CFG, logits over all positions as the released sampler:
    0.51 / 0.89 / 2.60 TFLOPs per image (ENAT / no reuse / vanilla NAT); 512 px 2.14 / 3.79 / 11.6."""
    for grid, expect in [(16, (0.51, 0.89, 2.60)), (32, (2.14, 3.79, 11.6))]:
        cfg = model_config("L", grid_size=grid)
        nat = dataclasses.replace(cfg, arch="nat")
        got = (sampling_flops(cfg, 8, True, True, "all").total, sampling_flops(cfg, 8, False, True, "all").total,
               sampling_flops(nat, 8, False, True, "all").total)
        for g, e in zip(got, expect):
            assert g / 1e12 == pytest.approx(e, rel=0.01)
        assert got[2] / got[0] >= 5


def test_expected_train_flops_is_a_mean_of_step_costs():
    cfg = CONFIGS["tiny"]
    lo = train_step_flops(cfg, 1)
    hi = train_step_flops(cfg, cfg.seq_len - 1)
    plain = expected_train_flops(cfg, reuse_prob=0.0)
    assert min(lo, hi) < plain < max(lo, hi)
    # A point mass at ratio 0.5 gives exactly the cost of that step.
    assert expected_train_flops(cfg, beta=(1e6, 1e6), reuse_prob=0.0) == pytest.approx(
        train_step_flops(cfg, cfg.seq_len // 2), rel=1e-6)
