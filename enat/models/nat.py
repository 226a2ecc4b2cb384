"""The vanilla NAT baseline (MaskGIT-style): every token, visible or [MASK], goes through every
block; no encoder/decoder split, no context tokens, no reuse. Same embedding, block family
(one-way K/V, 6 adaLN chunks) and head as ENAT, so ablations and benchmarks compare like with like.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from enat.config import ModelConfig
from enat.models.enat import Output, row_count, head_logits, init_weights, run_blocks, sort_positions, take_rows
from enat.models.layers import Block, Conditioning, TokenEmbedder, TokenHead


class NAT(Conditioning, nn.Module):
    supports_reuse = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        D = cfg.width
        self.embed = TokenEmbedder(cfg.codebook_size + 1, cfg.seq_len, D, cfg.dropout)
        self._init_condition(cfg)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, two_way=False) for _ in range(cfg.depth))
        self.head = TokenHead(D, cfg.codebook_size + 1)
        init_weights(self)

    def forward(self, ids: torch.Tensor, cond: torch.Tensor, prev: Output | None = None,
                logits: str = "all", num_masked: int | None = None) -> Output:
        """As ENAT.forward (num_masked: the per-row [MASK] count, given = no host sync)."""
        if prev is not None:
            raise ValueError("the NAT baseline has no reuse mode; call it without prev")
        mask = ids == self.cfg.mask_id
        M = row_count(mask, "[MASK] tokens") if num_masked is None else num_masked
        order = sort_positions(mask)
        x = self.embed(ids)
        c, text = self.condition(cond)
        L = self.cfg.context_len
        if L:
            x = torch.cat([text.to(x.dtype), x], dim=1)
        x = run_blocks(self.blocks, x, c, None, self.activation_checkpointing)[:, L:]
        masked = take_rows(x, order[:, x.shape[1] - M:]) if logits == "masked" else None
        return Output(logits=head_logits(self.head, self.embed, x, masked, logits, self.cfg.codebook_size),
                      feat=x, mask=mask, num_masked=M, order=order)
