"""Networks from a ModelConfig: build one, count its parameters, compare two configs.

The named sizes themselves (ZOO: tiny, S, B, L, XL -> width, heads, encoder/decoder depth, with
what is and is not published) are plain data in enat/config.py, next to ModelConfig, where
`model.size` is resolved when a config loads; they are re-exported here for the model's users.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from enat.config import ZOO, ModelConfig, resolve_model_config
from enat.models.enat import ENAT
from enat.models.nat import NAT

__all__ = ["ZOO", "NETWORK_FIELDS", "build_model", "count_parameters", "model_config", "model_differences",
           "parameter_counts", "resolve_model_config"]


# The fields that make two configs different networks (dropout and label drop only affect training).
NETWORK_FIELDS = ("arch", "width", "num_heads", "enc_depth", "dec_depth", "mlp_ratio", "grid_size", "codebook_size",
                  "num_classes", "condition", "text_len", "text_dim", "decoder_attention")
TEXT_FIELDS = ("text_len", "text_dim")  # compared only between text-conditioned configs


def model_differences(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """['field: checkpoint X vs config Y', ...] for a checkpoint's config against the expected one."""
    fields = [k for k in NETWORK_FIELDS
              if k not in TEXT_FIELDS or expected.condition == found.condition == "text"]
    return [f"{k}: checkpoint {getattr(found, k)!r} vs config {getattr(expected, k)!r}"
            for k in fields if getattr(found, k) != getattr(expected, k)]


def model_config(size: str, **overrides) -> ModelConfig:
    """The resolved config of a zoo size, e.g. model_config('L', grid_size=32)."""
    return resolve_model_config(ModelConfig(size=size, **overrides))


def build_model(cfg: ModelConfig) -> nn.Module:
    cfg = resolve_model_config(cfg)
    return {"enat": ENAT, "nat": NAT}[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Non-embedding parameters (the N of scaling fits) leave out the token/position/label tables and
# the vocabulary bias of the tied head: they grow with the codebook and the grid, not the network.
EMBEDDING_PREFIXES = ("embed.", "label_embed.", "head.bias")


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters, counted on the meta device (XL without allocating 4 GB)."""
    with torch.device("meta"):
        model = build_model(cfg)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(EMBEDDING_PREFIXES))
    total = count_parameters(model)
    return total, total - embed

