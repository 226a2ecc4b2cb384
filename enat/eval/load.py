"""The model an evaluation or an analysis samples from: a weights file or a verified run
checkpoint (EMA or raw weights), checked against the config's model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from enat.config import Config, ModelConfig, from_dict
from enat.eval.fidelity import EvalError
from enat.files import file_sha256
from enat.models.weights import load_state, load_weights
from enat.models.zoo import build_model, model_differences
from enat.dist import barrier, broadcast_object
from enat.train.checkpoint import (CheckpointError, checkpoint_dir, checkpoint_weights, content_id, pinned,
                                   require_intact)


def check_model(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    diff = model_differences(expected, found)
    if diff:
        raise EvalError(f"{source} holds another model than the config describes: " + "; ".join(diff))


def load_checkpoint(cfg: Config, run_dir: Path | None, checkpoint: str, weights: str, log=print, rank: int = 0,
                    world: int = 1, check=check_model) -> dict:
    """-> {"model", "step", "id", "sha256", "model_cfg", "flops_seen"} from a weights file or a run checkpoint
    (verified against its manifest first: a damaged checkpoint is named, never evaluated). "sha256"
    identifies the weights' bytes: the file's sha256 (read once here), or a checkpoint's
    `content_id` (from its manifest: the multi-GB files are not read again to hash them).
    check(cfg.model, checkpoint's model config, source) raises when they do not match."""
    path = Path(checkpoint)
    if path.suffix in (".pt", ".pth") or path.is_file():
        if not path.is_file():
            raise EvalError(f"checkpoint file {path} not found")
        mcfg, sd, meta = load_weights(path, weights)
        step, ident, digest = int(meta.get("step", 0)), str(path), file_sha256(path)
        flops = meta.get("flops_seen")
    else:
        if run_dir is None:
            raise EvalError("give --run RUN_DIR to evaluate a training checkpoint by step")
        ckpt_dir = checkpoint_dir(run_dir)
        with contextlib.ExitStack() as pin:
            # Rank 0 resolves the tag and pins it against retention until every rank has read it
            # (a trainer may be saving and pruning this run right now); the others read that tag.
            got = None
            if rank == 0:
                try:
                    got = ("tag", pin.enter_context(pinned(ckpt_dir, checkpoint, "eval", log=log)))
                except CheckpointError as e:
                    got = ("error", str(e))
            kind, value = broadcast_object(got) if world > 1 else got
            if kind == "error":
                raise CheckpointError(value)
            tag = value
            require_intact(ckpt_dir, tag, log=log, rank=rank, world=world)  # the ranks share the reading
            state, sds = checkpoint_weights(ckpt_dir, tag, kinds=(weights,))
            step, ident, digest = state["step"], str(ckpt_dir / tag), content_id(ckpt_dir, tag)
            if world > 1:
                barrier()
        mcfg, sd = from_dict(ModelConfig, state["config"]["model"]), sds[weights]
        flops = state.get("flops_seen")  # the training FLOPs that made these weights (exact, from the step plans)
    check(cfg.model, mcfg, ident)
    model = build_model(mcfg)
    load_state(model, {k: v.float() for k, v in sd.items()}, f"{ident} [{weights}]")
    return {"model": model.eval(), "step": step, "id": ident, "sha256": digest, "model_cfg": mcfg, "flops_seen": flops}
