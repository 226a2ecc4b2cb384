"""Image tensors <-> files: uint8 conversion and sample grids (PNG, lossless)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float, nominally [0, 1] -> (B, H, W, 3) uint8 (clamped, rounded)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    arr = to_uint8(images)
    B, H, W, C = arr.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def decode_partial(tokenizer, ids: torch.Tensor, mask_id: int, grey: float = 0.5) -> torch.Tensor:
    """(B, N) ids with [MASK] at undecided positions -> (B, 3, H, W) images with those positions'
    patches painted grey (the progressive-decoding figure of MaskGIT-family papers)."""
    B, N = ids.shape
    g = int(round(N ** 0.5))
    masked = ids == mask_id
    images = tokenizer.decode(ids.masked_fill(masked, 0)).clamp(0, 1).cpu()
    patch = images.shape[-1] // g
    cover = masked.view(B, 1, g, g).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return images.masked_fill(cover, grey)


def save_captioned_grid(images: torch.Tensor, captions: list[str], path: str | Path, ncol: int | None = None,
                        cell: int = 160, pad: int = 6) -> Path:
    """Images with their captions written underneath (PIL's built-in font: nothing to download);
    small images are enlarged (nearest) to the cell width. The captions also go to PATH.txt."""
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    if len(captions) != B:
        raise ValueError(f"{B} images but {len(captions)} captions")
    scale = max(1, cell // max(H, W))
    h, w = H * scale, W * scale
    font = ImageFont.load_default()
    chars = max(8, w // 6)  # the default bitmap font is ~6 px per character
    wrapped = [textwrap.wrap(c, chars)[:4] or [""] for c in captions]
    text_h = 12 * max(len(lines) for lines in wrapped) + 4
    ncol = ncol or min(B, 4)
    nrow = math.ceil(B / ncol)
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(B):
        r, c = divmod(i, ncol)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        canvas.paste(Image.fromarray(arr[i]).resize((w, h), Image.NEAREST), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + h + 2 + 12 * k), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    path.with_suffix(".txt").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(captions)))
    return path
