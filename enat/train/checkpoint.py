"""Training checkpoints: DeepSpeed engine state (ZeRO shards, optimizer, LR schedule) plus this
project's state in `client_state["enat"]`: step, samples seen, the data loader position, the
gathered EMA, the wandb run id, the resolved config and the git commit.

    RUN/checkpoints/step00001000/...      one DeepSpeed checkpoint per tag
    RUN/checkpoints/step00001000/enat_meta.json   world size, ZeRO stage, step (read before loading)
    RUN/checkpoints/latest                the newest complete tag

`latest` is written by rank 0 only after every rank finished saving (a barrier), atomically, so a
crash mid-save leaves the previous checkpoint as the one to resume from. The last `keep_last`
tags and every `keep_every`-th step are kept. A checkpoint from another world size is resumed
through DeepSpeed's universal format (converted once, next to the original).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from enat.dist import barrier

LATEST = "latest"
META = "enat_meta.json"
CLIENT_KEY = "enat"


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step").split("_")[0])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{path} names {tag}, which is missing: restore it or point latest at another tag")
    return tag


def latest_step(run_dir: str | Path) -> int | None:
    """The step of a run's newest complete checkpoint (None before the first)."""
    tag = latest_tag(checkpoint_dir(run_dir))
    return None if tag is None else step_of(tag)


def resolve_tag(ckpt_dir: Path, which: str | None) -> str:
    """'latest'/None, a step number or a tag -> an existing tag."""
    if which in (None, "latest"):
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"no checkpoint in {ckpt_dir} (no '{LATEST}' pointer)")
        return tag
    tag = tag_for(int(which)) if str(which).isdigit() else str(which)
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise CheckpointError(f"checkpoint {tag} not found in {ckpt_dir}; available: {have or 'none'}")
    return tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    path = ckpt_dir / tag / META
    if not path.is_file():
        raise CheckpointError(f"{path} missing: {tag} is not a complete enat checkpoint")
    return json.loads(path.read_text())


class Checkpointer:
    def __init__(self, run_dir: str | Path, rank: int, keep_last: int = 3, keep_every: int = 0):
        self.dir = checkpoint_dir(run_dir)
        self.rank, self.keep_last, self.keep_every = rank, keep_last, keep_every

    def save(self, engine, step: int, client_state: dict, meta: dict) -> str:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
        barrier()  # every rank's shards are on disk
        if self.rank == 0:
            (self.dir / tag / META).write_text(json.dumps({**meta, "step": step, "tag": tag}))
            tmp = self.dir / (LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
            self.prune()
        barrier()
        return tag

    def prune(self) -> None:
        tags = sorted((p.name for p in self.dir.glob("step*") if p.is_dir() and "_universal" not in p.name),
                      key=step_of)
        keep = set(tags[-self.keep_last:]) if self.keep_last > 0 else set()
        if self.keep_every:
            keep |= {t for t in tags if step_of(t) % self.keep_every == 0}
        keep.add(latest_tag(self.dir))
        for t in tags:
            if t not in keep:
                shutil.rmtree(self.dir / t, ignore_errors=True)
                shutil.rmtree(self.dir / f"{t}_universal", ignore_errors=True)

    def load(self, engine, tag: str) -> dict:
        path, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.dir / tag}")
        if CLIENT_KEY not in client:
            raise CheckpointError(f"{self.dir / tag} has no enat state: not written by this trainer")
        return client[CLIENT_KEY]


def to_universal(ckpt_dir: Path, tag: str, log=print) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent);
    returns the new tag. Idempotent."""
    out_tag = f"{tag}_universal"
    out = ckpt_dir / out_tag
    if (out / "done").is_file():
        return out_tag
    shutil.rmtree(out, ignore_errors=True)
    log(f"converting {ckpt_dir / tag} to the universal format (another world size)")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed for {ckpt_dir / tag}:\n{res.stderr[-3000:]}")
    shutil.copy(ckpt_dir / tag / META, out / META)
    (out / "done").write_text("ok")
    return out_tag


def read_client_state(ckpt_dir: Path, tag: str) -> dict:
    """The enat client state of a checkpoint, without an engine (rank 0's model-states file)."""
    import torch

    files = sorted((ckpt_dir / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"no model states file in {ckpt_dir / tag}")
    # Our own checkpoint, written by DeepSpeed with non-tensor objects: a trusted full load.
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    if CLIENT_KEY not in state:
        raise CheckpointError(f"{files[0]} has no enat state")
    return state


def checkpoint_weights(ckpt_dir: Path, tag: str, kinds=("ema", "online")) -> tuple[dict, dict]:
    """-> (the checkpoint's enat state, {kind: fp32 state dict}) for kinds "ema" (kept gathered in
    the client state) and "online" (the module itself at ZeRO-0, consolidated by zero_to_fp32
    otherwise). Reads the model-states file once."""
    state = read_client_state(ckpt_dir, tag)
    weights = {}
    for kind in kinds:
        if kind == "ema":
            sd = state[CLIENT_KEY]["ema"]["model"]
        elif kind == "online" and read_meta(ckpt_dir, tag).get("zero_stage", 0) == 0:
            sd = state["module"]
        elif kind == "online":
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            raise ValueError(f"weights must be 'ema' or 'online', got {kind!r}")
        weights[kind] = {k: v.float() for k, v in sd.items()}
    return state[CLIENT_KEY], weights


def export_weights(run_or_ckpt: str | Path, out: str | Path, which: str | None = None, log=print) -> Path:
    """Consolidated fp32 EMA and online weights of a checkpoint -> one enat-weights file."""
    from enat.config import ModelConfig, from_dict
    from enat.models.weights import save_weights

    path = Path(run_or_ckpt)
    ckpt_dir = path if (path / LATEST).is_file() or path.name == "checkpoints" else checkpoint_dir(path)
    tag = resolve_tag(ckpt_dir, which)
    enat_state, weights = checkpoint_weights(ckpt_dir, tag)
    model_cfg = from_dict(ModelConfig, enat_state["config"]["model"])
    save_weights(out, model_cfg, weights, meta={"step": enat_state["step"], "tag": tag, "run_dir": str(ckpt_dir.parent),
                                                "git_commit": enat_state.get("git_commit"),
                                                "samples_seen": enat_state["samples_seen"]})
    log(f"wrote {out}: EMA and online weights of {ckpt_dir / tag} (step {enat_state['step']})")
    return Path(out)
