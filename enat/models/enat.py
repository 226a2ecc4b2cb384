"""ENAT: an encoder over visible tokens, a small decoder over [MASK] tokens, and computation
reuse across sampling steps (Ni et al., NeurIPS 2024).

Full mode (no previous state): the encoder runs self-attention over the visible tokens only; the
decoder runs over the [MASK] tokens only, with the final encoder output as SC-attention context
in every decoder block.

Reuse mode (previous step's output given): tokens that were already visible in the previous call
are not encoded again. Their previous features go through the reuse projection f and serve as
the context of every encoder block, which now runs over the newly revealed tokens only. The
decoder sees the merged visible set. The returned features hold f(z_prev) at the old positions,
so f compounds over steps, as in the released code.

Text conditioning (model.condition=text): the caption's L context tokens are prepended as
positions that are always visible. Full mode encodes them with the visible tokens and the decoder
attends to both; reuse mode treats them as tokens visible in the previous call: their previous
features go through f with the old visible tokens' and they are never encoded again. The pooled
caption replaces the class embedding in adaLN.

All rows of a batch must have the same number of [MASK] tokens (and, in reuse mode, of newly
revealed tokens). Tokens move between the encoder, the decoder and position order by gather and
scatter on sorted positions, never by boolean masks: with the counts given (`num_masked`), a
forward is free of host syncs and compiles to one graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from enat.config import ModelConfig
from enat.models.layers import Block, Conditioning, ReuseProjection, TokenEmbedder, TokenHead


@dataclass
class Output:
    """What a forward returns; pass it back as `prev` for the next reuse-mode call of the same
    branch (conditional and unconditional passes keep separate states)."""

    logits: torch.Tensor | None  # (B, N, V) for logits="all", (B, M, V) at [MASK] positions for "masked"
    feat: torch.Tensor  # (B, N, D) features per position, before the head's LayerNorm
    mask: torch.Tensor  # (B, N) bool, True at [MASK] inputs
    num_masked: int  # M, the [MASK] count of every row
    order: torch.Tensor  # (B, N) positions: the N - M visible ones ascending, then the M masked ones ascending
    text_feat: torch.Tensor | None = None  # (B, L, D) features of the context tokens (ENAT, condition=text)

    @property
    def masked_positions(self) -> torch.Tensor:
        """(B, M) positions of the [MASK] inputs, ascending: the rows of logits="masked"."""
        return self.order[:, self.order.shape[1] - self.num_masked:]


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) at positions index (B, K) -> (B, K, D). A gather: no host sync, unlike
    boolean-mask indexing, whose output shape depends on the mask's values."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def put_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) with rows (B, K, D) written at positions index (B, K) (out of place)."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rows)


def sort_positions(key: torch.Tensor) -> torch.Tensor:
    """(B, N) positions ordered by an integer key per position, ascending positions within equal
    keys: with key = mask it lists visible then masked positions, each in position order, the
    same rows in the same order as boolean-mask indexing."""
    return torch.sort(key.to(torch.int32), dim=1, stable=True).indices


def row_count(where: torch.Tensor, what: str) -> int:
    """The per-row count of True in where, checked equal across rows (reads the device: the
    convenience path for callers that do not pass counts)."""
    counts = where.sum(dim=1)
    n = int(counts[0])
    if not bool((counts == n).all()):
        raise ValueError(f"every row of a batch must have the same number of {what}; got {counts.tolist()}")
    return n


def run_blocks(blocks: nn.ModuleList, h: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None,
               checkpointing: bool) -> torch.Tensor:
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(block, h, c, ctx, use_reentrant=False)
        else:
            h = block(h, c, ctx)
    return h


class ENAT(Conditioning, nn.Module):
    supports_reuse = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        D = cfg.width
        self.embed = TokenEmbedder(cfg.codebook_size + 1, cfg.seq_len, D, cfg.dropout)
        self._init_condition(cfg)
        self.reuse_proj = ReuseProjection(D)
        self.encoder = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth))
        # The decoder's attention (model.decoder_attention): "self" blocks are one-way (no context
        # K/V: visible features and [MASK] tokens are one sequence); "cross" blocks have no own K/V.
        variant = cfg.decoder_attention
        self.decoder = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, two_way=variant != "self", own_kv=variant != "cross")
            for _ in range(cfg.dec_depth))
        self.head = TokenHead(D, cfg.codebook_size + 1)
        init_weights(self)

    def forward(self, ids: torch.Tensor, cond: torch.Tensor, prev: Output | None = None,
                logits: str = "all", num_masked: int | None = None) -> Output:
        """ids: (B, N) token ids with [MASK] = codebook_size; cond: (B,) classes (the null class
        for the unconditional pass) or, for condition=text, (B, L, C) caption contexts (the null
        context); prev: this branch's previous Output for reuse mode;
        logits: "all" positions (as released), "masked" positions only (all the sampler and the
        loss need), or "none" (features only);
        num_masked: the [MASK] count of every row, when the caller knows it (the trainer's step
        plan, the sampler's schedule). Given, the forward never reads the device (no host sync)
        and trusts the ids to match it; omitted, it is counted and the batch checked."""
        cfg = self.cfg
        N = ids.shape[1]
        mask = ids == cfg.mask_id
        if num_masked is None:
            num_masked = row_count(mask, "[MASK] tokens")
            if prev is not None:
                if bool((mask & ~prev.mask).any()):
                    raise ValueError("reuse mode: a position masked now was visible in the previous call")
                row_count(prev.mask & ~mask, "newly revealed tokens")
        M = num_masked
        order = sort_positions(mask)
        visible_pos, masked_pos = order[:, :N - M], order[:, N - M:]
        x = self.embed(ids)
        c, text = self.condition(cond, tokens=prev is None)
        L = cfg.context_len

        if prev is None:
            ctx, h = None, take_rows(x, visible_pos)
            if L:  # context tokens lead the encoder's sequence
                h = torch.cat([text.to(x.dtype), h], dim=1)
            if self.training:
                # Zero-weighted use of the reuse projection and the encoder's context K/V in
                # full-mode training steps: every parameter takes part in every step, so ZeRO
                # stages 0-3 all see the same (zero) gradients for them and agree exactly.
                ctx = self.reuse_proj(x[:, :0])
        else:
            # Positions by kind: visible before (0), newly revealed (1), still masked (2).
            kinds = sort_positions(prev.mask.to(torch.int32) + mask.to(torch.int32))
            n_old = N - prev.num_masked
            old_pos, new_pos = kinds[:, :n_old], kinds[:, n_old:N - M]
            old = take_rows(prev.feat.detach(), old_pos)
            if L:  # the context tokens count as visible in the previous call: reused, not encoded
                old = torch.cat([prev.text_feat.detach(), old], dim=1)
            ctx = self.reuse_proj(old.to(x.dtype))
            h = take_rows(x, new_pos)
            if text is not None:  # training: the context projection's zero-weighted use, (B, 0, D)
                h = torch.cat([text.to(x.dtype), h], dim=1)

        if h.shape[1] > 0:
            h = run_blocks(self.encoder, h, c, ctx, self.activation_checkpointing)

        if prev is None:
            text, visible = h[:, :L], h[:, L:]
        else:  # merge encoded new tokens and projected old ones back into position order
            text, ctx = ctx[:, :L], ctx[:, L:]
            merged = put_rows(put_rows(torch.empty_like(x), new_pos, h), old_pos, ctx)
            visible = take_rows(merged, visible_pos)

        m = take_rows(x, masked_pos)
        if m.shape[1] > 0:
            context = torch.cat([text, visible], dim=1) if L else visible
            if cfg.decoder_attention == "self":  # one sequence; the visible positions keep the encoder's features
                n = context.shape[1]
                m = run_blocks(self.decoder, torch.cat([context, m], dim=1), c, None,
                               self.activation_checkpointing)[:, n:]
            else:
                m = run_blocks(self.decoder, m, c, context, self.activation_checkpointing)

        feat = put_rows(put_rows(torch.empty_like(x), visible_pos, visible), masked_pos, m)
        return Output(logits=head_logits(self.head, self.embed, feat, m, logits, cfg.codebook_size),
                      feat=feat, mask=mask, num_masked=M, order=order, text_feat=text if L else None)


def head_logits(head: TokenHead, embed: TokenEmbedder, feat: torch.Tensor, masked: torch.Tensor,
                which: str, codebook_size: int) -> torch.Tensor | None:
    if which == "all":
        return head(feat, embed.tokens.weight, codebook_size)
    if which == "masked":
        return head(masked, embed.tokens.weight, codebook_size)
    if which == "none":
        return None
    raise ValueError(f"logits must be 'all', 'masked' or 'none', got {which!r}")


def init_weights(model: nn.Module) -> None:
    """The released init: Xavier-uniform linears with zero bias, N(0, 0.02) tables and positions,
    zero adaLN (every block starts as the identity), zero logit bias."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.embed.tokens.weight, std=0.02)
    nn.init.normal_(model.embed.positions, std=0.02)
    if hasattr(model, "label_embed"):
        nn.init.normal_(model.label_embed.table.weight, std=0.02)
    else:
        nn.init.normal_(model.text_embed.positions, std=0.02)
    for name, module in model.named_modules():
        if name.endswith("adaLN"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
