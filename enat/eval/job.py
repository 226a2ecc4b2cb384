"""The evaluation job: checkpoint -> class-balanced samples -> features -> metrics -> result file.

    enat eval --run RUN --checkpoint STEP|latest|PATH [--num-samples N] [key=value ...]
    enat eval reference --config C [--out FILE.npz]      reference statistics of the real images

Sample i has class i mod C (a text-conditioned model: a caption of a held-out image chosen from
counters, enat/eval/captions.py) and noise from (eval.seed, i), so any number of ranks (each takes
i = rank, rank + world, ...) produces the same images. Each rank extracts its samples' features;
rank 0 gathers them and computes FID (float64), IS, KID and precision/recall against the
reference statistics (enat/eval/reference.py: an npz by path, or the held-out images' features,
cached). The model comes from a weights file or a verified checkpoint (enat/eval/load.py).
Text-conditioned models: the result records the captions' protocol (shards, manifest hash,
selection rule, seed) and the captions used (PATH.captions.json); eval.clip_model (a local
CLIPModel directory) adds the CLIP score.
The result goes to RUN/eval/<step>/<eval-config-hash>.json, the hash of the settings and of the
weights' content (other weights of the same step, an exported file beside the run's checkpoint, get
results of their own), written atomically; a rerun with the same settings and weights prints it
instead of recomputing. It is appended to RUN/eval.jsonl, and is logged to
the training run's wandb run under eval/ against the checkpoint's step.
"""

from __future__ import annotations

import contextlib
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
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from enat.config import Config
from enat.data.prepare import check_text_encoder, tokenizer_mismatch
from enat.dist import setup_env
from enat.eval.fidelity import EvalError, build_extractor, class_fid, extract, metrics
from enat.eval.captions import HeldOutCaptions, caption_spec, check_clip_model, clip_score
from enat.eval.load import load_checkpoint
from enat.eval.reference import extractor_mismatch, reference_spec, reference_stats
from enat.files import write_json, write_npz
from enat.images import save_captioned_grid, save_grid, to_uint8
from enat.sampling import generate
from enat.tokenizer import load_tokenizer
from enat.train.checkpoint import checkpoint_dir, content_id, tag_for


def eval_settings(cfg: Config, weights: str, num_samples: int, reference: dict, content: str) -> dict:
    """What a stored result is the result of. `content`: the weights' identity (load_checkpoint's
    sha256): the step alone would give any other weights of that step this one's metrics."""
    settings = {"sample": dataclasses.asdict(cfg.sample), "num_samples": num_samples, "weights": weights,
                "content": content, "eval_seed": cfg.eval.seed, "extractor": cfg.eval.extractor,
                "reference": reference["id"]}
    if cfg.model.condition == "text":  # class settings (and their result paths) stay as they were
        settings["captions"] = caption_spec(cfg)["id"]
        if cfg.eval.clip_model:
            settings["clip_model"] = str(cfg.eval.clip_model)
    return settings


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def result_path(cfg: Config, base: str | Path, step: int, weights: str | None = None,
                num_samples: int | None = None) -> Path:
    """Where the result of evaluating the run `base`'s checkpoint of step `step` with these
    settings goes (it exists once done), known without loading anything (the weights' identity is
    read from the checkpoint's manifest): the eval launcher skips checkpoints that have one."""
    settings = eval_settings(cfg, weights or cfg.eval.weights, num_samples or cfg.eval.num_samples,
                             reference_spec(cfg), content_id(checkpoint_dir(base), tag_for(step)))
    return _result_file(base, step, settings)


def _result_file(base: str | Path, step: int, settings: dict) -> Path:
    return Path(base) / "eval" / f"{step:08d}" / f"{settings_hash(settings)}.json"


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(model, tokenizer, cfg: Config, indices: np.ndarray, progress: bool = False,
                    timings: dict | None = None, conditions=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) and labels of the given global sample indices. `conditions`:
    global indices -> (condition, labels) (text: the held-out captions' contexts); default the
    class-balanced labels i mod C."""
    sc = dataclasses.replace(cfg.sample, seed=cfg.eval.seed)
    C = cfg.model.num_classes
    if conditions is None:
        conditions = lambda idx: (torch.from_numpy(idx % C), idx % C)  # noqa: E731
    out, labels = [], []
    timings = timings if timings is not None else {}
    for s in tqdm(range(0, len(indices), cfg.eval.batch_size), desc="sampling", unit="batch", disable=not progress):
        chunk = np.asarray(indices[s:s + cfg.eval.batch_size])
        t0 = time.perf_counter()
        cond, lab = conditions(chunk)
        labels.append(np.asarray(lab, dtype=np.int64))
        t1 = time.perf_counter()
        ids = generate(model, cond, sc, indices=torch.from_numpy(chunk))
        if ids.is_cuda:  # the sampler never waits for the device: wait here, or the time is the queueing
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        images = tokenizer.decode(ids)
        out.append(to_uint8(images))
        timings["conditions"] = timings.get("conditions", 0.0) + t1 - t0
        timings["sampling"] = timings.get("sampling", 0.0) + t2 - t1
        timings["decoding"] = timings.get("decoding", 0.0) + time.perf_counter() - t2
    empty = np.empty((0, cfg.tokenizer.resolution, cfg.tokenizer.resolution, 3), np.uint8)
    return ((np.concatenate(out) if out else empty),
            (np.concatenate(labels) if labels else np.empty(0, np.int64)))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def score(cfg: Config, gen: dict, ref: dict) -> dict:
    """The job's metrics of generated features {"pool", "logits", "labels" (or None)} against the
    reference: FID, IS, KID, precision/recall, and class FID when both sides have labels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's warning on near-singular products; values stay accurate
        values = metrics(gen, ref, cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)
        labels = gen.get("labels")
        if labels is not None and "labels" in ref and len(np.unique(ref["labels"])) > 1:  # one class (COCO): FID
            values["class_fid"] = class_fid(gen["pool"], labels, ref["pool"], ref["labels"])
    return values


def _gather(obj, world: int):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(cfg: Config, run_dir: str | Path | None, checkpoint: str = "latest", num_samples: int | None = None,
             weights: str | None = None, out_dir: str | Path | None = None, log=print) -> dict:
    """Run (or look up) one evaluation; returns the result record (on every rank)."""
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
    text = cfg.model.condition == "text"
    if not text and num_samples % C:
        raise EvalError(f"--num-samples {num_samples} is not a multiple of the {C} classes (class-balanced)")
    if cfg.eval.clip_model:
        if not text:
            raise EvalError("eval.clip_model: the CLIP score needs captions, a text-conditioned model "
                            "(model.condition=text)")
        check_clip_model(cfg.eval.clip_model)  # a hub name or a missing directory fails before any sampling

    check_text_encoder(cfg)  # a text.encoder that does not exist (a hub name) is refused before any work
    problem = tokenizer_mismatch(cfg) or extractor_mismatch(cfg)  # before any work: samples would be noise
    if problem:
        raise EvalError(problem)
    spec = reference_spec(cfg)  # a reference npz of the wrong layout: named before a checkpoint is read
    ck = load_checkpoint(cfg, run_dir, checkpoint, weights, log=log, rank=rank, world=world)
    settings = eval_settings(cfg, weights, num_samples, spec, ck["sha256"])
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
    conditions, chosen, cap_spec = None, None, None
    if text:
        cap_spec = caption_spec(cfg)
        held = HeldOutCaptions(cfg, device=device, log=log)
        held.check_model(model)

        def conditions(idx):
            rows, ks = held.select(idx)
            return held.contexts(rows, ks), held.labels[rows]

        rows, ks = held.select(indices)
        chosen = {"rows": rows, "ks": ks, "captions": held.captions(rows, ks)}
        cap_spec = {**cap_spec, "num_rows": len(held), "storage": held.storage,
                    "encoder": (held.text.get("encoder") or {}).get("path")}
    images, labels = generate_images(model, tokenizer, cfg, indices, progress=rank == 0 and sys.stderr.isatty(),
                                     timings=timings, conditions=conditions)
    t0 = time.perf_counter()
    feats = extract(extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                    progress=rank == 0 and sys.stderr.isatty())
    timings["features"] = time.perf_counter() - t0
    clip = None
    if cfg.eval.clip_model:
        t0 = time.perf_counter()
        clip = clip_score(images, chosen["captions"], cfg.eval.clip_model, device=device)
        timings["clip"] = time.perf_counter() - t0
    parts = _gather({"indices": indices, "labels": labels, "pool": feats["pool"], "logits": feats["logits"],
                     "images": images if (cfg.eval.save_npz or cfg.eval.save_png) else None,
                     "chosen": chosen, "clip": clip}, world)
    record = None
    if rank == 0:
        order = np.argsort(np.concatenate([p["indices"] for p in parts]), kind="stable")
        gen = {k: np.concatenate([p[k] for p in parts])[order] for k in ("pool", "logits", "labels")}
        ref = reference_stats(cfg, spec, extractor, tokenizer, log=log)
        values = score(cfg, gen, ref)
        if cfg.eval.clip_model:
            n_clip = sum(p["clip"][1] for p in parts)
            values["clip_score"] = float(sum(p["clip"][0] * p["clip"][1] for p in parts if p["clip"][1]) / n_clip)
        out.parent.mkdir(parents=True, exist_ok=True)
        files, extra = {}, {}
        if text:  # the protocol's captions: which held-out row and caption each sample took
            cat = {k: np.concatenate([np.asarray(p["chosen"][k], dtype=object if k == "captions" else np.int64)
                                      for p in parts])[order] for k in ("rows", "ks", "captions")}
            extra = {"caption_rows": cat["rows"].astype(np.int64), "caption_k": cat["ks"].astype(np.int64)}
            files["captions"] = str(out.with_suffix(".captions.json"))
            samples = [{"index": i, "row": int(r), "k": int(k), "caption": c}
                       for i, (r, k, c) in enumerate(zip(cat["rows"], cat["ks"], cat["captions"]))]
            write_json(Path(files["captions"]), {
                "rule": cap_spec["rule"], "shards": cap_spec["path"], "manifest_sha256": cap_spec["manifest_sha256"],
                "seed": cfg.eval.seed, "samples": samples})
        if cfg.eval.save_npz or cfg.eval.save_png:
            arr = np.concatenate([p["images"] for p in parts])[order]
            if cfg.eval.save_npz:
                files["npz"] = str(out.with_suffix(".npz"))
                write_npz(Path(files["npz"]), arr_0=arr, labels=gen["labels"], **extra)
            if text:
                k = min(len(arr), 40)
                grid = torch.from_numpy(arr[:k]).permute(0, 3, 1, 2).float() / 255
                files["grid"] = str(save_captioned_grid(grid, list(cat["captions"][:k]), out.with_suffix(".png"),
                                                        ncol=8))
            else:
                grid = torch.from_numpy(arr[: min(len(arr), 10 * C)]).permute(0, 3, 1, 2).float() / 255
                files["grid"] = str(save_grid(grid, out.with_suffix(".png"), nrow=C))
            if cfg.eval.save_png:
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
        if text:
            record["condition"] = "text"
            record["captions"] = cap_spec
            if cfg.eval.clip_model:
                record["clip_model"] = str(cfg.eval.clip_model)
        write_json(out, record)  # a half-written result never looks done
        if run_dir is not None:
            with open(run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": ck["step"], "flops_seen": ck["flops_seen"],
                                    **{f"eval/{k}": v for k, v in values.items()},
                                    "settings_hash": out.stem, "num_samples": num_samples}) + "\n")
            _log_wandb(cfg, run_dir, ck["step"], values, ck["flops_seen"])
        log(f"wrote {out}\n" + json.dumps(values, indent=1))
    record = _gather(record, world)[0]
    return {**record, "cached": False, "path": str(out)}


def _log_wandb(cfg: Config, run_dir: Path, step: int, values: dict, flops: int | None = None) -> None:
    """Into the training run's wandb run (same id), under eval/: against the training FLOPs that
    made the checkpoint (the axis the training losses use); a checkpoint older than the exact count
    logs eval/step only."""
    with training_wandb_run(cfg, run_dir) as run:
        if run is not None:
            if flops is not None:
                run.define_metric("eval/flops_seen")
                run.define_metric("eval/*", step_metric="eval/flops_seen")
            # else (a checkpoint older than the count): no declaration, so a run's evaluations keep one
            # x-axis whatever order the jobs run in; eval/step is logged either way
            extra = {"eval/flops_seen": flops} if flops is not None else {}
            run.log({"eval/step": step, **extra, **{f"eval/{k}": v for k, v in values.items()}})


@contextlib.contextmanager
def training_wandb_run(cfg: Config, run_dir: Path | None):
    """The training run's wandb run resumed (same id), or None when the run has none (or wandb is
    disabled). Eval jobs and analyses of one run (an array) take it in turn under a file lock."""
    rid_file = run_dir / "wandb_run_id" if run_dir is not None else None
    if cfg.train.wandb.mode == "disabled" or rid_file is None or not rid_file.is_file():
        yield None
        return
    import wandb  # seconds of start-up: only for a run that logs to wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    w = cfg.train.wandb
    lock = run_dir / "wandb" / ".eval.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        run = wandb.init(project=w.project, entity=w.entity, id=rid_file.read_text().strip(), resume="allow",
                         dir=str(run_dir), mode=w.mode)
        try:
            yield run
        finally:
            run.finish()


