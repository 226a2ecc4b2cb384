"""Networks beyond golden parity: zoo counts, input validation, trainability of ENAT and NAT."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from enat.models import ENAT, NAT, build_model, count_parameters, model_config


def perturb_(model, std=0.05, seed=0):
    """Non-zero weights everywhere (the released init zeroes adaLN, making blocks identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(**kw):
    return model_config("tiny", grid_size=4, num_classes=10, **kw)


def masked_ids(B, N, M, vocab=1024, mask_id=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, N), generator=g)
    for b in range(B):
        ids[b, torch.randperm(N, generator=g)[:M]] = mask_id
    return ids


def test_L_parameter_count_is_the_official_count_without_unused_mlp():
    with torch.device("meta"):
        model = build_model(model_config("L"))
    assert count_parameters(model) == 565_904_385
    # Non-embedding N for scaling fits: without the token (1025), position (256), label (1001)
    # tables, the embedding norm and the head's vocabulary bias.
    from enat.models.zoo import parameter_counts

    assert parameter_counts(model_config("L")) == (565_904_385, 565_904_385 - (1025 + 256 + 2 + 1001) * 1024 - 1025)


def test_build_model_picks_architecture():
    assert isinstance(build_model(tiny()), ENAT)
    assert isinstance(build_model(tiny(arch="nat")), NAT)


def test_rows_with_different_mask_counts_are_rejected():
    model = build_model(tiny()).eval()
    ids = masked_ids(2, 16, 5)
    ids[1, (ids[1] != 1024).nonzero()[0]] = 1024
    with pytest.raises(ValueError, match=r"same number of \[MASK\] tokens"):
        model(ids, torch.tensor([1, 2]))


def test_reuse_rejects_newly_masked_positions():
    model = build_model(tiny()).eval()
    ids = masked_ids(1, 16, 8)
    prev = model(ids, torch.tensor([1]))
    later = ids.clone()
    visible = (ids != 1024).nonzero()[:, 1]
    later[0, visible[0]] = 1024
    later[0, (ids[0] == 1024).nonzero()[0, 0]] = 5
    with pytest.raises(ValueError, match="visible in the previous call"):
        model(later, torch.tensor([1]), prev=prev)


def test_reuse_mode_does_not_reencode_old_tokens():
    """In reuse mode the output at previously visible positions is f(previous features): it does
    not depend on the ids there, only on the carried features."""
    model = perturb_(build_model(tiny())).eval()
    a = masked_ids(1, 16, 10)
    prev = model(a, torch.tensor([3]))
    b = a.clone()
    b[0, (a[0] == 1024).nonzero()[:2, 0]] = 7  # reveal two tokens
    out = model(b, torch.tensor([3]), prev=prev)
    old = ~prev.mask
    torch.testing.assert_close(out.feat[old], model.reuse_proj(prev.feat)[old])


@pytest.mark.parametrize("arch", ["enat", "nat"])
def test_architecture_fits_a_batch(arch):
    """A few optimizer steps on one fixed batch drive the masked-token loss down."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(arch=arch), dropout=0.0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x0 = torch.randint(0, 1024, (8, 16))
    labels = torch.arange(8) % 10
    ids = x0.clone()
    g = torch.Generator().manual_seed(1)
    for b in range(8):
        ids[b, torch.randperm(16, generator=g)[:12]] = 1024
    target = x0[ids == 1024].view(8, -1)
    losses = []
    for _ in range(80):
        out = model(ids, labels, logits="masked")
        loss = F.cross_entropy(out.logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # The tied table is frozen in the head (gradient stopped), which bounds how peaked logits get.
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_reuse_mode_trains_the_reuse_projection_and_context_kv():
    model = perturb_(build_model(tiny())).train()
    a = masked_ids(2, 16, 10)
    prev = model(a, torch.tensor([1, 2]), logits="none")
    b = a.clone()
    for r in range(2):
        b[r, (a[r] == 1024).nonzero()[:3, 0]] = 11
    out = model(b, torch.tensor([1, 2]), prev=prev, logits="masked")
    out.logits.sum().backward()
    assert model.reuse_proj.mlp.fc1.weight.grad.abs().sum() > 0
    assert model.encoder[0].attn.kv_ctx.weight.grad.abs().sum() > 0
    assert model.embed.tokens.weight.grad is not None  # through the embedding, not the tied head
