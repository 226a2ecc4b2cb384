"""Official ENAT checkpoints <-> this project's parameter names.

The released checkpoints are plain state dicts of the official `DiT` class (`libs/models.py`),
possibly with a `module.` prefix and `position_ids` buffers. The official key layout:
`blocks.{i}` are encoder blocks for i < enc_depth and decoder blocks after; `attn.kv.A` is the
context K/V projection, `attn.kv.B` the own-token one; `adaLN_modulation.1` the 8-chunk adaLN
linear; `mlm_layer.*` the head (with the final `norm` in front of it); `prev_proj` the reuse
projection f; `prev_embedder` an MLP that is built and saved but never used (dropped here).

The weights do not record the number of heads or where the encoder ends: those come from the
caller, or from the zoo entry whose shape matches.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from enat.config import ZOO, ConfigError, ModelConfig, resolve_model_config
from enat.models.enat import ENAT
from enat.models.weights import WeightsError, load_state, save_weights, torch_load

UNUSED_PREFIX = "prev_embedder."

# official suffix inside a block -> ours
_BLOCK = {
    "attn.q.weight": "attn.q.weight", "attn.q.bias": "attn.q.bias",
    "attn.kv.A.weight": "attn.kv_ctx.weight", "attn.kv.A.bias": "attn.kv_ctx.bias",
    "attn.kv.B.weight": "attn.kv.weight", "attn.kv.B.bias": "attn.kv.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "adaLN_modulation.1.weight": "adaLN.weight", "adaLN_modulation.1.bias": "adaLN.bias",
}
# official top-level key -> ours
_TOP = {
    "x_embedder.word_embeddings.weight": "embed.tokens.weight",
    "x_embedder.position_embeddings.weight": "embed.positions",
    "x_embedder.LayerNorm.weight": "embed.norm.weight",
    "x_embedder.LayerNorm.bias": "embed.norm.bias",
    "y_embedder.embedding_table.weight": "label_embed.table.weight",
    "prev_proj.norm.weight": "reuse_proj.norm.weight",
    "prev_proj.norm.bias": "reuse_proj.norm.bias",
    "prev_proj.mlp.fc1.weight": "reuse_proj.mlp.fc1.weight",
    "prev_proj.mlp.fc1.bias": "reuse_proj.mlp.fc1.bias",
    "prev_proj.mlp.fc2.weight": "reuse_proj.mlp.fc2.weight",
    "prev_proj.mlp.fc2.bias": "reuse_proj.mlp.fc2.bias",
    "norm.weight": "head.norm.weight",
    "norm.bias": "head.norm.bias",
    "mlm_layer.fc.weight": "head.fc.weight",
    "mlm_layer.fc.bias": "head.fc.bias",
    "mlm_layer.ln.weight": "head.ln.weight",
    "mlm_layer.ln.bias": "head.ln.bias",
    "mlm_layer.bias": "head.bias",  # (1, 1, V) officially, (V,) here
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def clean_official(sd: dict) -> tuple[dict, list[str]]:
    """Strip a `module.` prefix and `position_ids` buffers, drop the unused prev_embedder.
    Returns the cleaned dict and notices for what was dropped."""
    notices = []
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise WeightsError("an official ENAT checkpoint is a state dict (str -> tensor)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {k: v for k, v in sd.items() if "position_ids" not in k and not k.startswith(UNUSED_PREFIX)}
    dropped = [k for k in sd if k.startswith(UNUSED_PREFIX)]
    if dropped:
        n = sum(sd[k].numel() for k in dropped)
        notices.append(f"dropped the unused prev_embedder ({len(dropped)} tensors, {n:,} parameters)")
    if any("position_ids" in k for k in sd):
        notices.append("dropped position_ids buffers")
    return out, notices


def infer_config(sd: dict, num_heads: int | None = None, enc_depth: int | None = None) -> ModelConfig:
    """Shape-derived ModelConfig of a cleaned official state dict. Heads and the encoder depth
    come from the arguments or, when both are omitted, from the zoo entry of the same shape."""
    need = ["x_embedder.word_embeddings.weight", "x_embedder.position_embeddings.weight",
            "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise WeightsError(f"not an official ENAT state dict: missing {absent}")
    vocab, width = sd[need[0]].shape
    seq_len = sd[need[1]].shape[0]
    grid = math.isqrt(seq_len)
    if grid * grid != seq_len:
        raise WeightsError(f"position table has {seq_len} rows, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    mlp_ratio = sd[need[3]].shape[0] / width
    size = None
    if num_heads is None and enc_depth is None:
        for name, entry in ZOO.items():
            if entry["width"] == width and entry["enc_depth"] + entry["dec_depth"] == depth:
                size, num_heads, enc_depth = name, entry["num_heads"], entry["enc_depth"]
                break
        else:
            raise WeightsError(f"the checkpoint (width {width}, {depth} blocks) matches no zoo size; "
                               f"give the number of heads and the encoder depth (--num-heads, --enc-depth)")
    if num_heads is None or enc_depth is None:
        raise WeightsError("give both the number of heads and the encoder depth, or neither")
    try:
        return resolve_model_config(ModelConfig(
            size=size, arch="enat", width=width, num_heads=num_heads, enc_depth=enc_depth,
            dec_depth=depth - enc_depth, mlp_ratio=mlp_ratio, grid_size=grid, codebook_size=vocab - 1,
            num_classes=sd[need[2]].shape[0] - 1))
    except ConfigError as e:
        raise WeightsError(str(e)) from None


def config_from_official_args(args: dict) -> ModelConfig:
    """ModelConfig from the official training arguments (embed_dim, num_heads, enc_dec,
    latent_size, codebook_size, num_classes, mlp_ratio), as stored with recorded references."""
    enc, dec = args["enc_dec"]
    return resolve_model_config(ModelConfig(
        size=None, arch="enat", width=args["embed_dim"], num_heads=args["num_heads"], enc_depth=enc,
        dec_depth=dec, mlp_ratio=float(args.get("mlp_ratio", 4.0)), grid_size=args["latent_size"],
        codebook_size=args.get("codebook_size", 1024), num_classes=args.get("num_classes", 1000)))


def from_official(sd: dict, cfg: ModelConfig) -> dict:
    """Cleaned official state dict -> this project's ENAT state dict."""
    out = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest not in _BLOCK:
                raise WeightsError(f"unknown key in an official block: {key}")
            where = f"encoder.{i}" if i < cfg.enc_depth else f"decoder.{i - cfg.enc_depth}"
            out[f"{where}.{_BLOCK[rest]}"] = value
        elif key in _TOP:
            out[_TOP[key]] = value.reshape(-1) if key == "mlm_layer.bias" else value
        else:
            raise WeightsError(f"unknown key in an official ENAT checkpoint: {key}")
    return out


def to_official(sd: dict, cfg: ModelConfig) -> dict:
    """This project's ENAT state dict -> official key names (without the unused prev_embedder)."""
    if cfg.decoder_attention != "sc" or cfg.condition != "class":
        raise WeightsError("the official format holds class-conditional ENAT with SC-attention only; this model has "
                           f"model.condition={cfg.condition}, model.decoder_attention={cfg.decoder_attention}")
    top = {ours: theirs for theirs, ours in _TOP.items()}
    block = {ours: theirs for theirs, ours in _BLOCK.items()}
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(encoder|decoder)\.(\d+)\.(.+)$", key)
        if m:
            i = int(m.group(2)) + (cfg.enc_depth if m.group(1) == "decoder" else 0)
            out[f"blocks.{i}.{block[m.group(3)]}"] = value
        else:
            out[top[key]] = value.reshape(1, 1, -1) if key == "head.bias" else value
    return out


def convert_official(src: str | Path, dst: str | Path, num_heads: int | None = None,
                     enc_depth: int | None = None, which: str = "ema", log=print) -> ModelConfig:
    """Read an official checkpoint, check it loads into ENAT, write an enat-weights file."""
    raw = torch_load(src, "official ENAT checkpoint")
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]  # a dict wrapping the state dict (as the golden files do)
    sd, notices = clean_official(raw)
    for notice in notices:
        log(f"note: {notice}")
    cfg = infer_config(sd, num_heads, enc_depth)
    ours = from_official(sd, cfg)
    load_state(ENAT(cfg), ours, str(src))  # shape check against the real module
    save_weights(dst, cfg, {which: ours}, meta={"source": str(src), "converted_from": "official-enat"})
    fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
    log(f"wrote {dst} ({which} weights; {fields})")
    return cfg
