"""The held-out captions of a text-conditioned FID, and the CLIP score against them.

Captions of the FID job (COCO FID-30K and the captioned demo). Sample i takes a caption of one
held-out image, a row of data.val_shards (R rows, K_r captions each):

    row(i) = perm[i mod R],  perm = the rows sorted by hash_uniform(eval.seed, 0xE7C0, row)
    k(i)   = floor(hash_uniform(eval.seed, 0xE7C1, i) * K_row(i))

so N <= R samples take N distinct images (30,000 of val2014's 40,504, one caption each), N > R
cycles through the rows again (another caption draw), and the condition of sample i is a pure
function of (eval.seed, i, the shards): the same on 1 or N ranks, in any batch. The contexts
come from the shards (text.storage=embeddings) or are encoded from the stored ids with the
encoder the manifest names (text.storage=ids). The shards' null context must be the model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from enat.config import Config
from enat.data.loader import ShardSet, _Reader
from enat.eval.fidelity import EvalError
from enat.files import file_sha256
from enat.rng import hash_uniform
from enat.text import (TextEncoderError, clip_score as text_clip_score, encoder_dir, encoder_for, local_model_dir,
                       null_gap)


ORDER_TAG, CAPTION_TAG = 0xE7C0, 0xE7C1  # the FID job's own counters (the loader's are 0xCA9, 0xCF6)


SELECTION_RULE = ("sample i -> held-out row perm[i mod R] (perm: the R rows of data.val_shards sorted by "
                  "hash_uniform(eval.seed, 0xE7C0, row)), caption k = floor(hash_uniform(eval.seed, 0xE7C1, i) * K_row)")


def caption_order(seed: int, num_rows: int) -> np.ndarray:
    """The order in which samples visit the held-out rows (a permutation of range(num_rows)), from
    counters: the same with any numpy version."""
    return np.argsort(hash_uniform(seed, ORDER_TAG, np.arange(num_rows)), kind="stable")


def select_captions(seed: int, num_captions: np.ndarray, indices: np.ndarray,
                    order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, caption indices) of the global sample indices `indices` (see the module docstring);
    a pure function of (seed, index, captions per row): any split over ranks gives the same."""
    num_captions = np.asarray(num_captions, dtype=np.int64)
    if len(num_captions) == 0:
        raise EvalError("no held-out captions to condition on (data.val_shards is empty)")
    if (num_captions < 1).any():
        raise EvalError(f"{int((num_captions < 1).sum())} held-out rows have no caption")
    indices = np.asarray(indices, dtype=np.int64)
    order = caption_order(seed, len(num_captions)) if order is None else order
    rows = order[indices % len(num_captions)]
    ks = np.floor(hash_uniform(seed, CAPTION_TAG, indices) * num_captions[rows]).astype(np.int64)
    return rows, ks


def caption_spec(cfg: Config) -> dict:
    """What the captions of a text FID are, without reading the shards (it keys the result)."""
    if cfg.data.val_shards is None:
        raise EvalError("a text-conditioned FID takes its captions from held-out caption shards: set "
                        "data.val_shards (tokenize the validation split: `enat tokenize --config C --split val`)")
    manifest = Path(cfg.data.val_shards) / "manifest.json"
    if not manifest.is_file():
        raise EvalError(f"no manifest at {manifest}: tokenize the validation split first")
    digest = file_sha256(manifest)
    return {"source": "shards", "path": str(cfg.data.val_shards), "manifest_sha256": digest,
            "rule": SELECTION_RULE, "seed": cfg.eval.seed, "id": f"captions-{digest[:12]}-seed{cfg.eval.seed}-v2"}


class HeldOutCaptions:
    """The held-out caption shards as the FID job uses them: captions per row, labels (the digit
    for the demo, 0 for COCO), and the (n, L, C) contexts of chosen (row, caption) pairs."""

    def __init__(self, cfg: Config, data=None, encoder=None, device="cpu", log=print):
        if data is None:
            if cfg.data.val_shards is None:
                caption_spec(cfg)  # raises, naming the fix
            data = ShardSet(cfg.data.val_shards, strict=cfg.data.strict, log=log)
        text = data.manifest.text
        if not text:
            raise EvalError(f"{cfg.data.val_shards} holds class shards (no captions): a text-conditioned model "
                            f"needs caption shards (tokenize the validation split with model.condition=text)")
        self.cfg, self.data, self.text, self.device = cfg, data, text, device
        self.num_captions = np.asarray(data.num_captions, dtype=np.int64)
        self.labels = np.asarray(data.label, dtype=np.int64)
        self.order = caption_order(cfg.eval.seed, len(self.num_captions)) if len(self.num_captions) else None
        self._encoder = encoder

    def __len__(self) -> int:
        return len(self.num_captions)

    def select(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return select_captions(self.cfg.eval.seed, self.num_captions, indices, self.order)

    def captions(self, rows: np.ndarray, ks: np.ndarray) -> list[str]:
        reader = _Reader(self.data.paths)  # one set of open files for all rows, not one per sample
        return [self.data.captions(int(r), reader)[int(k)] for r, k in zip(rows, ks)]

    @property
    def storage(self) -> str:
        return self.text.get("storage", "embeddings")

    def encoder(self):
        """The encoder of ids-only shards: text.encoder if set, else the manifest's path; its
        weights must be the ones the shards were made with."""
        if self._encoder is None:
            try:
                path = encoder_dir(self.cfg.text) or self.text["encoder"]["path"]
                self._encoder = encoder_for(path, self.device, sha256=self.text["encoder"].get("sha256"),
                                            what=str(self.cfg.data.val_shards))
            except TextEncoderError as e:
                raise EvalError(f"the held-out shards store caption ids only; encoding them needs their text "
                                f"encoder: {e}") from None
        return self._encoder

    def contexts(self, rows: np.ndarray, ks: np.ndarray) -> torch.Tensor:
        """(n, L, C) float16 contexts of the (row, caption) pairs, in their order (ids-only shards:
        encoded here, rounded to fp16 as stored contexts are)."""
        rows, ks = np.asarray(rows, np.int64), np.asarray(ks, np.int64)
        if self.storage == "ids":
            ids = torch.from_numpy(np.asarray(self.data.caption_ids(rows, ks), dtype=np.int64))
            return self.encoder().encode_ids(ids).half().cpu()
        return torch.from_numpy(np.asarray(self.data.contexts(rows, ks)))

    def check_model(self, model) -> None:
        """The shards' null context (the encoding of '') must be the model's: else the captions
        were encoded by another encoder than the one the model was trained with."""
        ours = torch.as_tensor(np.asarray(self.data.null_context())).float()
        theirs = model.text_embed.null_context.detach().float().cpu()
        if ours.shape != theirs.shape:
            raise EvalError(f"held-out contexts are {tuple(ours.shape)} (L x C) but the model takes "
                            f"{tuple(theirs.shape)}")
        ok, gap = null_gap(ours, theirs)
        if not ok:
            raise EvalError(f"{self.cfg.data.val_shards} was encoded with another text encoder than the model was "
                            f"trained with: the null contexts (encodings of '') differ by up to {gap:.3g}")


def check_clip_model(path: str) -> None:
    """Fail before any sampling when eval.clip_model is not a local CLIP directory."""
    try:
        local_model_dir(path, what="CLIP model", key="eval.clip_model")
    except TextEncoderError as e:
        raise EvalError(str(e)) from None


def clip_score(images: np.ndarray, captions: list[str], clip_model: str, device="cpu") -> tuple[float, int]:
    """(mean CLIP score, count) of uint8 images (n, H, W, 3) against their captions."""
    if len(captions) == 0:
        return float("nan"), 0
    try:
        return float(text_clip_score(images, captions, clip_model, device=device)), len(captions)
    except TextEncoderError as e:
        raise EvalError(str(e)) from None
