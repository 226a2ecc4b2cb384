"""The evaluation job: checkpoint -> class-balanced samples -> features -> metrics -> result file.

    enat eval --run RUN --checkpoint STEP|latest|PATH [--num-samples N] [key=value ...]

Sample i has class i mod C and noise from (eval.seed, i), so any number of ranks (each takes
i = rank, rank + world, ...) produces the same images. Each rank extracts its samples' features;
rank 0 gathers them and computes FID (float64), IS, KID and precision/recall against the
reference statistics:
  - eval.reference_npz: ADM-style statistics (mu, sigma) (the ImageNet protocol);
  - otherwise the held-out images: the digits' validation split for the demo, else
    data.val_shards decoded once with the tokenizer; their features are cached on disk, keyed by
    dataset, resolution, extractor and the shards' manifest.
The result goes to RUN/eval/<step>/<eval-config-hash>.json (written atomically; a rerun with the
same settings prints it instead of recomputing), is appended to RUN/eval.jsonl, and is logged to
the training run's wandb run under eval/ against the checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from enat.config import Config, ModelConfig, from_dict
from enat.data.shards import file_sha256
from enat.dist import setup_env
from enat.eval.fidelity import EvalError
from enat.images import to_uint8


def check_model(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    from enat.models.zoo import model_differences

    diff = model_differences(expected, found)
    if diff:
        raise EvalError(f"{source} holds another model than the config describes: " + "; ".join(diff))


def load_checkpoint(cfg: Config, run_dir: Path | None, checkpoint: str, weights: str, log=print, rank: int = 0,
                    world: int = 1) -> dict:
    """-> {"model", "step", "id", "sha256", "model_cfg"} from a weights file or a run checkpoint
    (verified against its manifest first: a damaged checkpoint is named, never evaluated)."""
    from enat.models.weights import load_state, load_weights
    from enat.models.zoo import build_model

    path = Path(checkpoint)
    if path.suffix in (".pt", ".pth") or path.is_file():
        if not path.is_file():
            raise EvalError(f"checkpoint file {path} not found")
        mcfg, sd, meta = load_weights(path, weights)
        step, ident, digest = int(meta.get("step", 0)), str(path), file_sha256(path)
    else:
        from enat.train.checkpoint import checkpoint_dir, checkpoint_weights, require_intact, resolve_tag

        if run_dir is None:
            raise EvalError("give --run RUN_DIR to evaluate a training checkpoint by step")
        ckpt_dir = checkpoint_dir(run_dir)
        tag = resolve_tag(ckpt_dir, checkpoint)
        require_intact(ckpt_dir, tag, log=log, rank=rank, world=world)  # the ranks share the reading
        state, sds = checkpoint_weights(ckpt_dir, tag, kinds=(weights,))
        mcfg, sd = from_dict(ModelConfig, state["config"]["model"]), sds[weights]
        states = sorted((ckpt_dir / tag).glob("*model_states.pt"))
        step, ident, digest = state["step"], str(ckpt_dir / tag), file_sha256(states[0])
    check_model(cfg.model, mcfg, ident)
    model = build_model(mcfg)
    load_state(model, {k: v.float() for k, v in sd.items()}, f"{ident} [{weights}]")
    return {"model": model.eval(), "step": step, "id": ident, "sha256": digest, "model_cfg": mcfg}


def eval_settings(cfg: Config, weights: str, num_samples: int, reference: dict) -> dict:
    return {"sample": dataclasses.asdict(cfg.sample), "num_samples": num_samples, "weights": weights,
            "eval_seed": cfg.eval.seed, "extractor": cfg.eval.extractor, "reference": reference["id"]}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def result_path(cfg: Config, base: str | Path, step: int, weights: str | None = None,
                num_samples: int | None = None) -> Path:
    """Where the result of evaluating step `step` with these settings goes (it exists once done),
    known without loading anything: the eval launcher skips checkpoints that have one."""
    settings = eval_settings(cfg, weights or cfg.eval.weights, num_samples or cfg.eval.num_samples,
                             reference_spec(cfg))
    return _result_file(base, step, settings)


def _result_file(base: str | Path, step: int, settings: dict) -> Path:
    return Path(base) / "eval" / f"{step:08d}" / f"{settings_hash(settings)}.json"


# ---------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------


def reference_spec(cfg: Config) -> dict:
    """What the reference is, without computing it (its id keys the result and the cache)."""
    res = cfg.tokenizer.resolution
    if cfg.eval.reference_npz:
        path = Path(cfg.eval.reference_npz)
        if not path.is_file():
            raise EvalError(f"reference statistics {path} not found")
        return {"kind": "npz", "path": str(path), "id": f"npz:{file_sha256(path)[:16]}", "resolution": res}
    if cfg.data.dataset == "digits":
        return {"kind": "digits-val", "id": f"digits-val-{res}px-{cfg.eval.extractor}", "resolution": res}
    if cfg.data.val_shards is None:
        raise EvalError("no reference: set eval.reference_npz or data.val_shards")
    manifest = Path(cfg.data.val_shards) / "manifest.json"
    if not manifest.is_file():
        raise EvalError(f"no manifest at {manifest}: tokenize the validation split first")
    return {"kind": "shards", "path": str(cfg.data.val_shards), "resolution": res,
            "id": f"shards-{file_sha256(manifest)[:12]}-{res}px-{cfg.eval.extractor}"}


def reference_stats(cfg: Config, spec: dict, extractor, tokenizer, log=print) -> dict:
    from enat.eval.fidelity import extract, statistics

    if spec["kind"] == "npz":
        with np.load(spec["path"]) as z:
            if "mu" not in z or "sigma" not in z:
                raise EvalError(f"{spec['path']} holds no mu/sigma (keys: {list(z.keys())})")
            res = int(z["resolution"]) if "resolution" in z else (z["arr_0"].shape[1] if "arr_0" in z else None)
            if res is not None and res != cfg.tokenizer.resolution:
                raise EvalError(f"reference {spec['path']} is for {res} px images but the samples are "
                                f"{cfg.tokenizer.resolution} px (tokenizer.resolution)")
            return {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
    cache = Path(cfg.eval.cache_dir) / f"{spec['id']}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if int(z["resolution"]) != cfg.tokenizer.resolution:
                raise EvalError(f"cached reference {cache} is for {int(z['resolution'])} px, samples are "
                                f"{cfg.tokenizer.resolution} px")
            return {k: z[k] for k in ("mu", "sigma", "pool", "labels")}
    log(f"computing reference statistics ({spec['id']}), cached at {cache}")
    if spec["kind"] == "digits-val":
        from enat.data.digits import load_digits

        images, labels, _ = load_digits("val", cfg.tokenizer.resolution)
        u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
    else:
        from enat.data.loader import ShardSet

        data = ShardSet(spec["path"], log=log)
        tokens = torch.from_numpy(data.tokens(np.arange(len(data))))
        # uint8 chunk by chunk: a float copy of a large reference set would not fit in memory
        u8 = torch.cat([torch.from_numpy(to_uint8(tokenizer.decode(chunk))).permute(0, 3, 1, 2)
                        for chunk in tokens.split(64)])
        labels = torch.from_numpy(data.label)
    feats = extract(extractor, u8, progress=sys.stderr.isatty())
    mu, sigma = statistics(feats["pool"])
    out = {"mu": mu, "sigma": sigma, "pool": feats["pool"], "labels": labels.numpy()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, resolution=cfg.tokenizer.resolution, **out)
    os.replace(tmp, cache)
    return out


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(model, tokenizer, cfg: Config, indices: np.ndarray, progress: bool = False,
                    timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) and labels of the given global sample indices."""
    from tqdm import tqdm

    from enat.sampling import generate

    sc = dataclasses.replace(cfg.sample, seed=cfg.eval.seed)
    C = cfg.model.num_classes
    labels = indices % C
    out = []
    timings = timings if timings is not None else {}
    for s in tqdm(range(0, len(indices), cfg.eval.batch_size), desc="sampling", unit="batch", disable=not progress):
        idx = torch.from_numpy(indices[s:s + cfg.eval.batch_size])
        t0 = time.perf_counter()
        ids = generate(model, torch.from_numpy(labels[s:s + cfg.eval.batch_size]), sc, indices=idx)
        t1 = time.perf_counter()
        images = tokenizer.decode(ids)
        out.append(to_uint8(images))
        timings["sampling"] = timings.get("sampling", 0.0) + t1 - t0
        timings["decoding"] = timings.get("decoding", 0.0) + time.perf_counter() - t1
    empty = np.empty((0, cfg.tokenizer.resolution, cfg.tokenizer.resolution, 3), np.uint8)
    return (np.concatenate(out) if out else empty), labels


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _gather(obj, world: int):
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(cfg: Config, run_dir: str | Path | None, checkpoint: str = "latest", num_samples: int | None = None,
             weights: str | None = None, out_dir: str | Path | None = None, log=print) -> dict:
    """Run (or look up) one evaluation; returns the result record (on every rank)."""
    import torch.distributed as dist

    from enat.eval.fidelity import build_extractor, class_fid, extract, metrics
    from enat.tokenizer import load_tokenizer

    rank, world, local = setup_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    log = log if rank == 0 else (lambda *_: None)
    t_start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else None
    weights = weights or cfg.eval.weights
    num_samples = num_samples or cfg.eval.num_samples
    C = cfg.model.num_classes
    if num_samples % C:
        raise EvalError(f"--num-samples {num_samples} is not a multiple of the {C} classes (class-balanced)")

    ck = load_checkpoint(cfg, run_dir, checkpoint, weights, log=log, rank=rank, world=world)
    spec = reference_spec(cfg)
    settings = eval_settings(cfg, weights, num_samples, spec)
    base = Path(out_dir) if out_dir is not None else (run_dir if run_dir is not None else Path(ck["id"]).parent)
    out = _result_file(base, ck["step"], settings)
    if out.is_file():
        record = json.loads(out.read_text())
        log(f"already evaluated: {out}\n" + json.dumps(record["metrics"], indent=1))
        return {**record, "cached": True, "path": str(out)}

    tokenizer = load_tokenizer(cfg.tokenizer).to(device)
    model = ck["model"].to(device)
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights, device)
    timings: dict = {}
    indices = np.arange(num_samples)[rank::world]
    images, labels = generate_images(model, tokenizer, cfg, indices, progress=rank == 0 and sys.stderr.isatty(),
                                     timings=timings)
    t0 = time.perf_counter()
    feats = extract(extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                    progress=rank == 0 and sys.stderr.isatty())
    timings["features"] = time.perf_counter() - t0
    parts = _gather({"indices": indices, "labels": labels, "pool": feats["pool"], "logits": feats["logits"],
                     "images": images if (cfg.eval.save_npz or cfg.eval.save_png) else None}, world)
    record = None
    if rank == 0:
        order = np.argsort(np.concatenate([p["indices"] for p in parts]), kind="stable")
        gen = {k: np.concatenate([p[k] for p in parts])[order] for k in ("pool", "logits", "labels")}
        ref = reference_stats(cfg, spec, extractor, tokenizer, log=log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sqrtm's warning on near-singular products; values stay accurate
            values = metrics(gen, ref, cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)
            if "labels" in ref:
                values["class_fid"] = class_fid(gen["pool"], gen["labels"], ref["pool"], ref["labels"])
        out.parent.mkdir(parents=True, exist_ok=True)
        files = {}
        if cfg.eval.save_npz or cfg.eval.save_png:
            arr = np.concatenate([p["images"] for p in parts])[order]
            if cfg.eval.save_npz:
                files["npz"] = str(out.with_suffix(".npz"))
                tmp = out.with_suffix(".tmp.npz")
                np.savez(tmp, arr_0=arr, labels=gen["labels"])
                os.replace(tmp, files["npz"])
            from enat.images import save_grid

            grid = torch.from_numpy(arr[: min(len(arr), 10 * C)]).permute(0, 3, 1, 2).float() / 255
            files["grid"] = str(save_grid(grid, out.with_suffix(".png"), nrow=C))
            if cfg.eval.save_png:
                from PIL import Image

                png_dir = out.with_suffix("")
                png_dir.mkdir(exist_ok=True)
                for i, im in enumerate(arr):
                    Image.fromarray(im).save(png_dir / f"{i:06d}.png")
                files["png_dir"] = str(png_dir)
        record = {"step": ck["step"], "metrics": values, "checkpoint": {"id": ck["id"], "sha256": ck["sha256"]},
                  "settings": settings, "reference": spec, "extractor": {"name": cfg.eval.extractor,
                                                                        "weights": cfg.eval.extractor_weights},
                  "num_samples": num_samples, "world_size": world, "wall_time_s": time.perf_counter() - t_start,
                  "timings_s_rank0": timings, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)  # a half-written result never looks done
        if run_dir is not None:
            with open(run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": ck["step"], **{f"eval/{k}": v for k, v in values.items()},
                                    "settings_hash": out.stem, "num_samples": num_samples}) + "\n")
            _log_wandb(cfg, run_dir, ck["step"], values)
        log(f"wrote {out}\n" + json.dumps(values, indent=1))
    record = _gather(record, world)[0]
    return {**record, "cached": False, "path": str(out)}


def _log_wandb(cfg: Config, run_dir: Path, step: int, values: dict) -> None:
    """Into the training run's wandb run (same id), under eval/, against the checkpoint's step."""
    rid_file = run_dir / "wandb_run_id"
    if cfg.train.wandb.mode == "disabled" or not rid_file.is_file():
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    w = cfg.train.wandb
    lock = run_dir / "wandb" / ".eval.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the eval jobs of one run (an array) resume its wandb run in turn
        run = wandb.init(project=w.project, entity=w.entity, id=rid_file.read_text().strip(), resume="allow",
                         dir=str(run_dir), mode=w.mode)
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        run.log({"eval/step": step, **{f"eval/{k}": v for k, v in values.items()}})
        run.finish()
