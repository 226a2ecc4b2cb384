"""Named model sizes and the one function that builds a network from a ModelConfig.

Only ENAT-L (22 encoder + 2 decoder blocks, width 1024, 16 heads) is published. XL follows the
paper's review thread (28 blocks, width 1280, about 1B parameters); its 26+2 split keeps L's
two-block decoder. S and B are NOT published sizes: they take DiT's widths and head counts
(S 384/6, B 768/12, 12 blocks) with the same two-block decoder. `tiny` is for tests and the
CPU demo (the shape of the golden file `enat_tiny_a.pt`).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from enat.config import ConfigError, ModelConfig

ARCH_FIELDS = ("width", "num_heads", "enc_depth", "dec_depth")


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill architecture fields left unset from the zoo entry named by `cfg.size`, then check."""
    if cfg.size is not None:
        if cfg.size not in ZOO:
            raise ConfigError(f"unknown model.size {cfg.size!r}; the zoo has {', '.join(ZOO)}")
        fill = {k: v for k, v in ZOO[cfg.size].items() if getattr(cfg, k) is None}
        cfg = dataclasses.replace(cfg, **fill)
    missing = [f"model.{k}" for k in ARCH_FIELDS if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} unset: name a zoo size (model.size=, one of "
                          f"{', '.join(ZOO)}) or set them explicitly")
    if cfg.width % cfg.num_heads:
        raise ConfigError(f"model.width {cfg.width} is not divisible by model.num_heads {cfg.num_heads}")
    if cfg.arch == "enat" and (cfg.enc_depth < 1 or cfg.dec_depth < 1):
        raise ConfigError("ENAT needs model.enc_depth >= 1 and model.dec_depth >= 1")
    if cfg.depth < 1 or cfg.grid_size < 1 or cfg.codebook_size < 2 or cfg.num_classes < 1:
        raise ConfigError(f"model config out of range: {cfg}")
    return cfg


# The fields that make two configs different networks (dropout and label drop only affect training).
NETWORK_FIELDS = ("arch", "width", "num_heads", "enc_depth", "dec_depth", "mlp_ratio", "grid_size", "codebook_size",
                  "num_classes")


def model_differences(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """['field: checkpoint X vs config Y', ...] for a checkpoint's config against the expected one."""
    return [f"{k}: checkpoint {getattr(found, k)!r} vs config {getattr(expected, k)!r}"
            for k in NETWORK_FIELDS if getattr(found, k) != getattr(expected, k)]


def model_config(size: str, **overrides) -> ModelConfig:
    """The resolved config of a zoo size, e.g. model_config('L', grid_size=32)."""
    return resolve_model_config(ModelConfig(size=size, **overrides))


def build_model(cfg: ModelConfig) -> nn.Module:
    from enat.models.enat import ENAT
    from enat.models.nat import NAT

    cfg = resolve_model_config(cfg)
    return {"enat": ENAT, "nat": NAT}[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Non-embedding parameters (the N of scaling fits) leave out the token/position/label tables and
# the vocabulary bias of the tied head: they grow with the codebook and the grid, not the network.
EMBEDDING_PREFIXES = ("embed.", "label_embed.", "head.bias")


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters, counted on the meta device (XL without allocating 4 GB)."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(EMBEDDING_PREFIXES))
    total = count_parameters(model)
    return total, total - embed


ZOO: dict[str, dict] = {
    "tiny": dict(width=64, num_heads=4, enc_depth=3, dec_depth=1),
    "S": dict(width=384, num_heads=6, enc_depth=10, dec_depth=2),  # not published (DiT-S width)
    "B": dict(width=768, num_heads=12, enc_depth=10, dec_depth=2),  # not published (DiT-B width)
    "L": dict(width=1024, num_heads=16, enc_depth=22, dec_depth=2),  # the released ENAT-L
    "XL": dict(width=1280, num_heads=20, enc_depth=26, dec_depth=2),  # 28 blocks, 1280, 20 heads
}
