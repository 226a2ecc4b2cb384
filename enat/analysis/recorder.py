"""Which attention goes where: the attention modules of either family, with each query's and
key's token kind ([MASK], visible, caption), and a recorder of their attention mass."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


KINDS = ("mask", "visible", "text")  # token kinds, as query and as key


MASK, VISIBLE, TEXT = range(3)


LABEL = {"mask": "[MASK]", "visible": "visible", "text": "caption"}


def attention_layout(model: nn.Module, mask: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """[(layer, attention module, query kinds (B, n), key kinds (B, K))] of one full-mode forward
    on ids whose [MASK] positions are `mask` (B, N), in the order the network lays tokens out:
    the NAT's sequence is [caption ; every position]; ENAT's encoder runs over [caption ;
    visible], its decoder's queries are the [MASK] tokens (sc, cross) or [caption ; visible ;
    [MASK]] (self), its keys the context [caption ; visible] then its own tokens (none for cross)."""
    B, N = mask.shape
    cfg = model.cfg
    L = cfg.context_len
    M = int(mask[0].sum())

    def seq(*parts):
        return torch.cat([torch.full((B, n), k, dtype=torch.long) for k, n in parts], dim=1)

    if cfg.arch == "nat":
        own = torch.cat([seq((TEXT, L)), torch.where(mask.cpu(), MASK, VISIBLE)], dim=1)
        return [(f"block.{i}", b.attn, own, own) for i, b in enumerate(model.blocks)]
    context = seq((TEXT, L), (VISIBLE, N - M))
    layers = [(f"encoder.{i}", b.attn, context, context) for i, b in enumerate(model.encoder)]
    masked = seq((MASK, M))
    if cfg.decoder_attention == "self":
        q = k = torch.cat([context, masked], dim=1)
    elif cfg.decoder_attention == "cross":
        q, k = masked, context
    else:
        q, k = masked, torch.cat([context, masked], dim=1)
    return layers + [(f"decoder.{i}", b.attn, q, k) for i, b in enumerate(model.decoder)]


class AttentionRecorder:
    """Forward hooks on the attention modules that add up, per layer, the attention mass each
    query kind puts on each key kind (mean over heads), and what uniform attention would put."""

    def __init__(self):
        self.mass: dict[str, torch.Tensor] = {}  # layer -> (3 query kinds, 3 key kinds) summed shares
        self.uniform: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}  # layer -> (3,) queries of each kind

    @torch.no_grad()
    def record(self, model: nn.Module, ids: torch.Tensor, cond: torch.Tensor, M: int) -> None:
        mask = ids == model.cfg.mask_id
        handles = [attn.register_forward_hook(self._hook(name, q, k))
                   for name, attn, q, k in attention_layout(model, mask)]
        try:
            model(ids, cond, logits="none", num_masked=M)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, query_kinds: torch.Tensor, key_kinds: torch.Tensor):
        def hook(module, args, output):
            x, ctx = args[0], (args[1] if len(args) > 1 else None)
            if module.kv is None and ctx.shape[1] == 0:
                return  # cross-attention with nothing to attend to: no attention
            q, k, _ = module.qkv(x, ctx)
            if k.shape[2] != key_kinds.shape[1] or q.shape[2] != query_kinds.shape[1]:
                raise RuntimeError(f"{name}: {q.shape[2]} queries / {k.shape[2]} keys, layout says "
                                   f"{query_kinds.shape[1]} / {key_kinds.shape[1]}")
            scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # SDPA's scale
            probs = scores.softmax(dim=-1).mean(dim=1).double()  # (B, n, K), mean over heads
            keys = F.one_hot(key_kinds, 3).double().to(probs.device)  # (B, K, 3)
            queries = F.one_hot(query_kinds, 3).double().to(probs.device)  # (B, n, 3)
            share = probs @ keys  # (B, n, 3): each query's mass on each key kind
            uniform = keys.mean(dim=1, keepdim=True).expand_as(share)
            self.mass[name] = self.mass.get(name, 0) + torch.einsum("bnq,bnk->qk", queries, share).cpu()
            self.uniform[name] = self.uniform.get(name, 0) + torch.einsum("bnq,bnk->qk", queries, uniform).cpu()
            self.count[name] = self.count.get(name, 0) + queries.sum(dim=(0, 1)).cpu()
        return hook

    def shares(self) -> dict:
        """{layer: {"attention": {query kind: {key kind: share}}, "uniform": {...}, "queries": {kind: n}}}."""
        out = {}
        for name in self.mass:
            n = self.count[name]
            out[name] = {"attention": {}, "uniform": {}, "queries": {KINDS[i]: int(n[i]) for i in range(3) if n[i]}}
            for i in range(3):
                if n[i] == 0:
                    continue
                for what, table in (("attention", self.mass), ("uniform", self.uniform)):
                    out[name][what][KINDS[i]] = {KINDS[j]: float(table[name][i, j] / n[i]) for j in range(3)}
        return out
