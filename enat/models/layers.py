"""Building blocks shared by ENAT and the vanilla NAT baseline.

Everything here follows the released ENAT code numerically (see tests/test_parity.py); names are
this project's own, `enat.models.convert` maps them to and from the official state_dict keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift/scale of a (B, L, D) sequence."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def norm(x: torch.Tensor) -> torch.Tensor:
    """The blocks' LayerNorm: no affine parameters (adaLN supplies them), eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. Blocks and the reuse projection use the tanh GELU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TokenEmbedder(nn.Module):
    """Token table (codebook + [MASK]) plus learned absolute positions, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(seq_len, width))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.tokens(ids) + self.positions))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance.

    `drop_prob` > 0 replaces labels by the null class during training. The released model did this
    on top of the data pipeline's drop (a quirk); this project drops labels in the data loader and
    keeps 0 here by default.
    """

    def __init__(self, num_classes: int, width: int, drop_prob: float = 0.0):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)
        self.num_classes = num_classes
        self.drop_prob = drop_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.drop_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.table(labels)


class TextEmbedder(nn.Module):
    """A frozen text encoder's hidden states (B, L, C) -> context tokens (B, L, D) (Linear plus
    learned positions, as U-ViT and AdaNAT prepend them) and a pooled vector (B, D) (their mean,
    through a Linear) that drives adaLN in place of the class embedding.

    `null_context` (L, C) is the encoding of the empty caption, the unconditional input of
    classifier-free guidance: a buffer, so a checkpoint samples with CFG on its own."""

    def __init__(self, text_dim: int, text_len: int, width: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, width)
        self.positions = nn.Parameter(torch.zeros(text_len, width))
        self.pool = nn.Linear(text_dim, width)
        self.register_buffer("null_context", torch.zeros(text_len, text_dim))

    def forward(self, context: torch.Tensor, tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (pooled (B, D), context tokens (B, L, D)). tokens=False (a reuse-mode call: the
        context tokens' features come from the previous call) -> no tokens; while training, an
        empty (B, 0, D) instead: the projection applied to no token, a zero-weighted use so that
        every parameter takes part in every step (ZeRO stages then agree exactly).
        One forward, so ZeRO-3 gathers this module's own parameters (the positions) around it."""
        context = context.to(self.proj.weight.dtype)
        pooled = self.pool(context.mean(dim=1))
        if tokens:
            return pooled, self.proj(context) + self.positions
        if self.training:
            return pooled, self.proj(context[:, :0]) + self.positions[:0]
        return pooled, None


class Conditioning:
    """What ENAT and the NAT baseline share about their condition (mixed into both networks).

    condition=class: `cond` is labels (B,), embedded by `label_embed` (the released model's keys).
    condition=text: `cond` is contexts (B, L, C), embedded by `text_embed` into L context tokens
    that every forward sees as always-visible positions, plus the pooled adaLN vector."""

    def _init_condition(self, cfg) -> None:
        if cfg.condition == "class":
            self.label_embed = LabelEmbedder(cfg.num_classes, cfg.width, cfg.label_drop)
        else:
            self.text_embed = TextEmbedder(cfg.text_dim, cfg.text_len, cfg.width)

    def condition(self, cond: torch.Tensor, tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (c, context tokens): c (B, D) through SiLU, every block's adaLN input; the context
        tokens (B, L, D) of a text model (see TextEmbedder.forward for tokens=False), else None."""
        if self.cfg.condition == "class":
            if cond.is_floating_point():
                raise ValueError(f"a class-conditional model takes labels (B,) int64, got {tuple(cond.shape)} "
                                 f"{cond.dtype} (caption contexts need model.condition=text)")
            return F.silu(self.label_embed(cond.reshape(-1))), None
        self.check_context(cond)
        pooled, text = self.text_embed(cond, tokens)
        return F.silu(pooled), text

    def check_context(self, cond: torch.Tensor) -> None:
        L, C = self.cfg.text_len, self.cfg.text_dim
        if cond.dim() != 3 or tuple(cond.shape[1:]) != (L, C) or not cond.is_floating_point():
            raise ValueError(f"a text-conditioned model takes contexts of shape (B, {L}, {C}) (model.text_len, "
                             f"model.text_dim), floating point; got {tuple(cond.shape)} {cond.dtype}")

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional input shaped like `cond`: the null class, or the null context."""
        if self.cfg.condition == "class":
            return torch.full_like(cond, self.cfg.null_class)
        return self.text_embed.null_context.to(cond.dtype).expand(cond.shape[0], -1, -1)

    @torch.no_grad()
    def set_null_context(self, context: torch.Tensor) -> None:
        """Install the encoding of '' (L, C) as the null context (from the shards' manifest)."""
        if self.cfg.condition != "text":
            raise ValueError("set_null_context: the model is class-conditional (model.condition=class)")
        self.check_context(context.unsqueeze(0))
        self.text_embed.null_context.copy_(context)


class SCAttention(nn.Module):
    """Attention whose queries are the block's own tokens and whose keys/values are
    [context ; own tokens]. With `two_way`, context and own tokens have separate K/V projections
    (ENAT's two-way K/V); the own-token projection is used alone when there is no context.
    Without `own_kv` the keys/values are the context's only (cross-attention: CrossMAE's decoder).
    """

    def __init__(self, width: int, num_heads: int, two_way: bool = True, own_kv: bool = True):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if not (two_way or own_kv):
            raise ValueError("attention needs keys: from the context (two_way) or from its own tokens (own_kv)")
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width) if own_kv else None  # own tokens
        self.kv_ctx = nn.Linear(width, 2 * width) if two_way else None  # context tokens
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """-> q (B, H, N, d), k and v (B, H, K, d); the K keys are [context ; own tokens], or the
        context's only without own K/V. `enat analyze attention` reads the attention through this."""
        B, N, D = x.shape
        H = self.num_heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)
        if self.kv is None:
            kv = self.kv_ctx(ctx)
        else:
            kv = self.kv(x)
            if ctx is not None:  # an empty context still runs kv_ctx: a zero-weighted use (see ENAT.forward)
                kv = torch.cat([self.kv_ctx(ctx), kv], dim=1)
        # K/V projections lay out their 2D outputs as (k|v, head, head_dim).
        k, v = kv.view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv is None and ctx.shape[1] == 0:  # nothing to attend to (no visible token yet): no message
            return self.proj(torch.zeros_like(x))
        B, N, D = x.shape
        out = F.scaled_dot_product_attention(*self.qkv(x, ctx))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """SC-attention + MLP with adaLN-Zero conditioning on the class.

    Two-way blocks take 8 modulation chunks: shift/scale for own tokens, shift/scale for context
    tokens, attention gate, MLP shift/scale/gate. One-way blocks (the NAT baseline) drop the two
    context chunks, which makes them plain DiT blocks.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, two_way: bool = True, own_kv: bool = True):
        super().__init__()
        self.two_way = two_way
        self.attn = SCAttention(width, num_heads, two_way, own_kv)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN = nn.Linear(width, (8 if two_way else 6) * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) own tokens; c: (B, D) conditioning, already through SiLU;
        ctx: (B, M, D) context tokens (M may be 0) or None."""
        if self.two_way:
            shift, scale, shift_ctx, scale_ctx, gate, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c).chunk(8, dim=1)
            if ctx is not None:
                ctx = modulate(norm(ctx), shift_ctx, scale_ctx)
        else:
            if ctx is not None:
                raise ValueError("a one-way block takes no context tokens")
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c).chunk(6, dim=1)
        x = x + gate.unsqueeze(1) * self.attn(modulate(norm(x), shift, scale), ctx)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(norm(x), shift_mlp, scale_mlp))
        return x


class ReuseProjection(nn.Module):
    """f(z) = z + MLP4x(LayerNorm(z)): maps the previous step's features of already-visible
    tokens to the context the current step's encoder attends to."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mlp(self.norm(z))


class TokenHead(nn.Module):
    """Final LayerNorm, Linear+GELU+LayerNorm, then logits against the token table (tied weights,
    gradient stopped) plus a bias. The [MASK] row never becomes a logit."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, feat: torch.Tensor, token_table: torch.Tensor, codebook_size: int) -> torch.Tensor:
        h = self.ln(F.gelu(self.fc(self.norm(feat))))
        return h @ token_table[:codebook_size].detach().t() + self.bias[:codebook_size]
