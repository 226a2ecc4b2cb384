"""The single-file weights format: one consolidated fp32 file per model, for sampling, evaluation
and sharing. Training checkpoints (sharded, with optimizer state) are another thing; `enat export`
turns them into this.

    {"format": "enat-weights", "version": 1,
     "model_config": {...ModelConfig fields...},
     "weights": {"ema": state_dict, "online": state_dict},   # either or both
     "meta": {...free-form provenance: source file, step, git commit...}}

Everything loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from enat.config import ConfigError, ModelConfig, from_dict
from enat.models.zoo import build_model

FORMAT = "enat-weights"
VERSION = 1


class WeightsError(ValueError):
    """A weights file that is missing, truncated or of another format/model."""


def torch_load(path: str | Path, what: str) -> object:
    """torch.load(weights_only=True) with errors that name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, not a torch file at all
        raise WeightsError(f"cannot read {what} {path}: {type(e).__name__}: {e}. The file may be "
                           f"truncated (re-copy it) or not a PyTorch state file.") from None


def torch_save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temp file, then rename: never a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def save_weights(path: str | Path, cfg: ModelConfig, weights: dict[str, dict], meta: dict | None = None) -> None:
    if not weights or not set(weights) <= {"ema", "online"}:
        raise ValueError(f"weights must map 'ema' and/or 'online' to state dicts, got {list(weights)}")
    obj = {"format": FORMAT, "version": VERSION, "model_config": dataclasses.asdict(cfg),
           "weights": {k: {n: t.detach().cpu().contiguous() for n, t in sd.items()} for k, sd in weights.items()},
           "meta": meta or {}}
    torch_save_atomic(obj, path)


def load_weights(path: str | Path, which: str = "ema") -> tuple[ModelConfig, dict, dict]:
    """-> (model config, state dict of `which`, meta)."""
    obj = torch_load(path, "weights file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and any(k.startswith(("blocks.", "module.blocks.", "x_embedder")) for k in obj):
            hint = " It looks like an official ENAT checkpoint: convert it with `enat convert official-enat IN OUT`."
        raise WeightsError(f"{path} is not an {FORMAT} file.{hint}")
    if obj.get("version") != VERSION:
        raise WeightsError(f"{path}: {FORMAT} version {obj.get('version')} is not supported (expected {VERSION})")
    if which not in obj["weights"]:
        raise WeightsError(f"{path} holds no '{which}' weights; it has {sorted(obj['weights'])}")
    try:
        cfg = from_dict(ModelConfig, obj["model_config"])
    except ConfigError as e:
        raise WeightsError(f"{path}: stored model config is invalid: {e}") from None
    return cfg, obj["weights"][which], obj.get("meta", {})


def load_state(model: nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict(strict) with an error that lists what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:8]}")
        raise WeightsError(f"{source} does not fit the model config: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> nn.Module:
    """Build the network a weights file describes and load it, in eval mode."""
    cfg, sd, _ = load_weights(path, which)
    model = build_model(cfg)
    load_state(model, sd, f"{path} [{which}]")
    return model.to(device).eval()
