"""The MAGE/MaskGIT VQGAN that ENAT's tokens come from (taming-transformers key layout).

Images in [0, 1] (no further normalisation) -> encoder -> nearest code (squared Euclidean,
first index on ties) -> ids, flattened row-major; ids -> codebook rows -> decoder -> images
(raw, unclamped). The released model's quirks are kept because its weights need them:
  - no attention layers are built (whatever `attn_resolutions` says);
  - downsampling is parameter-free 2x2 average pooling; upsampling is nearest x2 + 3x3 conv;
  - ResNet-block convs, the 1x1 shortcut and the encoder's first conv have no bias;
  - when a block changes the channel count, the 1x1 shortcut is applied to the block's
    residual-branch output and added to it (the block input is dropped);
  - the decoder has num_res_blocks (not num_res_blocks + 1) blocks per level;
  - GroupNorm(32 groups, eps 1e-6) + swish everywhere; no quant_conv / post_quant_conv.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from enat.config import TokenizerConfig
from enat.models.weights import WeightsError, load_state, torch_load


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return self.nin_shortcut(h) + h  # the released quirk: shortcut of the residual output
        return x + h


class Level(nn.Module):
    """One resolution: `block` ResBlocks, then (decoder only) an upsampling conv."""

    def __init__(self, blocks: list[ResBlock], upsample: bool = False, channels: int = 0):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample:
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(channels, channels, 3, padding=1)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        levels, c = [], ch
        for m in mult:
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, ch * m))
                c = ch * m
            levels.append(Level(blocks))
        self.down = nn.ModuleList(levels)
        self.mid = Mid(c)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c)
        levels: list[Level] = [None] * len(mult)  # type: ignore[list-item]
        for i in reversed(range(len(mult))):  # indexed like the encoder: up.0 is full resolution
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, ch * mult[i]))
                c = ch * mult[i]
            levels[i] = Level(blocks, upsample=i != 0, channels=c)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H, W) ids of the nearest codes."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(dim=1).view(B, H, W)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, H, W) ids -> (B, C, H, W) codebook rows."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.ch % 32 or any((cfg.ch * m) % 32 for m in cfg.ch_mult):
            raise ValueError(f"tokenizer channels must be multiples of 32 (GroupNorm(32)): ch {cfg.ch}, "
                             f"ch_mult {cfg.ch_mult}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.codebook_size, cfg.z_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, H/f, W/f) token ids."""
        return self.quantize.nearest(self.encoder(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """(B, h, w) or (B, h*w) ids -> (B, 3, H, W) images, raw (clamp to [0, 1] for display),
        on the tokenizer's device; batch_size bounds the decoder's activation memory."""
        if ids.dim() == 2:
            g = int(round(ids.shape[1] ** 0.5))
            ids = ids.view(ids.shape[0], g, g)
        ids = ids.to(self.quantize.embedding.weight.device)
        chunks = ids.split(batch_size) if batch_size else [ids]
        return torch.cat([self.decoder(self.quantize.lookup(c)) for c in chunks])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward: straight-through quantisation. Returns the reconstruction, the
        pre-quantisation latents, the quantised latents and the ids."""
        z = self.encoder(images)
        ids = self.quantize.nearest(z.detach())
        zq = self.quantize.lookup(ids)
        recon = self.decoder(z + (zq - z).detach())
        return {"recon": recon, "z": z, "zq": zq, "ids": ids}


def build_tokenizer(cfg: TokenizerConfig) -> VQGAN:
    return VQGAN(cfg)


def load_tokenizer(cfg: TokenizerConfig, path: str | Path | None = None) -> VQGAN:
    """Build from the config and load official-format weights (a state dict, possibly wrapped in
    {'state_dict': ...}; loss/discriminator keys of a training checkpoint are ignored)."""
    path = path or cfg.checkpoint
    if path is None:
        raise WeightsError("no tokenizer checkpoint: set tokenizer.checkpoint (or train the demo tokenizer "
                           "with `enat tokenizer train`)")
    obj = torch_load(path, "tokenizer checkpoint")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds no state dict")
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quantize."))}
    model = VQGAN(cfg)
    load_state(model, sd, f"tokenizer {path}")
    return model.eval()
