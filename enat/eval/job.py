"""The evaluation job: checkpoint -> class-balanced samples -> features -> metrics -> result file.

    enat eval --run RUN --checkpoint STEP|latest|PATH [--num-samples N] [key=value ...]
    enat eval reference --config C [--out FILE.npz]      reference statistics of the real images

Sample i has class i mod C (a text-conditioned model: a caption of a held-out image chosen from
counters, enat/eval/text.py) and noise from (eval.seed, i), so any number of ranks (each takes
i = rank, rank + world, ...) produces the same images. Each rank extracts its samples' features;
rank 0 gathers them and computes FID (float64), IS, KID and precision/recall against the
reference statistics:
  - eval.reference_npz: ADM-style statistics (mu, sigma) (the ImageNet protocol);
  - otherwise the held-out images: the digits' validation split for the demo; for COCO the real
    images (data.val_image_dir, the images data.val_captions lists) at tokenizer.resolution with
    the tokenizing centre crop ("images"); else data.val_shards decoded once with the tokenizer.
    Their features are cached on disk (eval.cache_dir), keyed by dataset, resolution, extractor
    and the shards' manifest or the image set. `enat eval reference` computes them ahead (an npz
    of mu, sigma, resolution and a JSON sidecar naming images, crop, count and extractor).
Text-conditioned models: the result records the captions' protocol (shards, manifest hash,
selection rule, seed) and the captions used (PATH.captions.json); eval.clip_model (a local
CLIPModel directory) adds the CLIP score.
The result goes to RUN/eval/<step>/<eval-config-hash>.json (written atomically; a rerun with the
same settings prints it instead of recomputing), is appended to RUN/eval.jsonl, and is logged to
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

from enat.config import Config, ModelConfig, from_dict
from enat.dist import setup_env
from enat.eval.fidelity import EvalError
from enat.files import file_sha256
from enat.images import to_uint8


def check_model(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    from enat.models.zoo import model_differences

    diff = model_differences(expected, found)
    if diff:
        raise EvalError(f"{source} holds another model than the config describes: " + "; ".join(diff))


def load_checkpoint(cfg: Config, run_dir: Path | None, checkpoint: str, weights: str, log=print, rank: int = 0,
                    world: int = 1, check=check_model) -> dict:
    """-> {"model", "step", "id", "sha256", "model_cfg", "flops_seen"} from a weights file or a run checkpoint
    (verified against its manifest first: a damaged checkpoint is named, never evaluated).
    check(cfg.model, checkpoint's model config, source) raises when they do not match."""
    from enat.models.weights import load_state, load_weights
    from enat.models.zoo import build_model

    path = Path(checkpoint)
    if path.suffix in (".pt", ".pth") or path.is_file():
        if not path.is_file():
            raise EvalError(f"checkpoint file {path} not found")
        mcfg, sd, meta = load_weights(path, weights)
        step, ident, digest = int(meta.get("step", 0)), str(path), file_sha256(path)
        flops = meta.get("flops_seen")
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
        flops = state.get("flops_seen")  # the training FLOPs that made these weights (exact, from the step plans)
    check(cfg.model, mcfg, ident)
    model = build_model(mcfg)
    load_state(model, {k: v.float() for k, v in sd.items()}, f"{ident} [{weights}]")
    return {"model": model.eval(), "step": step, "id": ident, "sha256": digest, "model_cfg": mcfg, "flops_seen": flops}


def eval_settings(cfg: Config, weights: str, num_samples: int, reference: dict) -> dict:
    settings = {"sample": dataclasses.asdict(cfg.sample), "num_samples": num_samples, "weights": weights,
                "eval_seed": cfg.eval.seed, "extractor": cfg.eval.extractor, "reference": reference["id"]}
    if cfg.model.condition == "text":  # class settings (and their result paths) stay as they were
        from enat.eval.text import caption_spec

        settings["captions"] = caption_spec(cfg)["id"]
        if cfg.eval.clip_model:
            settings["clip_model"] = str(cfg.eval.clip_model)
    return settings


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
        spec = {"kind": "npz", "path": str(path), "id": f"npz:{file_sha256(path)[:16]}", "resolution": res}
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():  # written by `enat eval reference`: what the statistics are of
            try:
                recorded = json.loads(sidecar.read_text())
            except ValueError:
                recorded = None
            if isinstance(recorded, dict):
                made_with = (recorded.get("extractor") or {}).get("name")
                if made_with and made_with != cfg.eval.extractor:
                    raise EvalError(f"reference {path} holds {made_with} features ({sidecar}) but eval.extractor is "
                                    f"{cfg.eval.extractor}")
                spec["recorded"] = recorded
        return spec
    if cfg.data.dataset == "digits":
        return {"kind": "digits-val", "id": f"digits-val-{res}px-{cfg.eval.extractor}", "resolution": res}
    if cfg.data.dataset == "fashion_mnist":  # real images (the test split by default), not reconstructions
        w = cfg.eval.extractor_weights
        weights = file_sha256(w)[:12] if w and Path(w).is_file() else "none"
        from enat.data.fashion import files_id

        split = cfg.eval.reference_split
        subset = f"-first{cfg.data.subset}" if cfg.data.subset else ""
        files = files_id(split, cfg.data.fashion_dir)  # which files: MNIST's have the same names and shapes
        return {"kind": f"fashion-{split}", "split": split, "path": str(cfg.data.fashion_dir), "resolution": res,
                "subset": cfg.data.subset, "files": files,
                "crop": "28 px zero-padded to 32, bilinear to the resolution",
                "id": f"fashion-{split}{subset}-{files}-{res}px-{cfg.eval.extractor}-{weights}"}
    if cfg.data.dataset == "coco":
        return images_spec(cfg)
    if cfg.data.val_shards is None:
        raise EvalError("no reference: set eval.reference_npz or data.val_shards")
    manifest = Path(cfg.data.val_shards) / "manifest.json"
    if not manifest.is_file():
        raise EvalError(f"no manifest at {manifest}: tokenize the validation split first")
    return {"kind": "shards", "path": str(cfg.data.val_shards), "resolution": res,
            "id": f"shards-{file_sha256(manifest)[:12]}-{res}px-{cfg.eval.extractor}"}


def extractor_mismatch(cfg: Config) -> str | None:
    """A classifier extractor of this project (digits-cnn, fashion-cnn) belongs to one dataset:
    its features of another dataset's images say nothing. Why eval.extractor does not fit
    data.dataset, or None."""
    from enat.eval.fidelity import CLASSIFIERS

    name = cfg.eval.extractor
    if name in CLASSIFIERS and not cfg.data.dataset.startswith(CLASSIFIERS[name][2]):
        fits = [n for n, c in CLASSIFIERS.items() if cfg.data.dataset.startswith(c[2])]
        return (f"eval.extractor={name} is the {CLASSIFIERS[name][2]} classifier but data.dataset="
                f"{cfg.data.dataset}: use the extractor of this data ("
                f"{fits[0] if fits else 'inception-v3-compat, by path'})")
    w = cfg.eval.extractor_weights
    if name == "fashion-cnn" and w and Path(w).is_file():
        from enat.data.fashion import split_size
        from enat.models.weights import torch_load

        trained = (torch_load(w, "fashion-cnn classifier").get("trained_on") or {}).get("images")
        want = split_size("train", cfg.data.subset)
        if trained is not None and trained != want:
            return (f"the classifier {w} was trained on {trained} Fashion-MNIST images, this config reads {want} "
                    f"(data.subset={cfg.data.subset}): features of a smoke-test classifier are not the benchmark's. "
                    f"Point eval.extractor_weights at a new path (`enat data prepare` trains it there)")
    return None


def images_spec(cfg: Config) -> dict:
    """The real held-out images as the reference: COCO's val images (those data.val_captions
    lists, with a caption) with the tokenizing crop (U-ViT's: central square, Lanczos), or an
    ImageFolder tree (data.val_image_dir) with
    the ADM crop, at tokenizer.resolution."""
    res = cfg.tokenizer.resolution
    coco = cfg.data.dataset == "coco"
    if not cfg.data.val_image_dir or (coco and not cfg.data.val_captions):
        need = "data.val_image_dir and data.val_captions (val2014/ and captions_val2014.json)" if coco else \
            "data.val_image_dir"
        raise EvalError(f"no reference images: set {need}, or give statistics by path (eval.reference_npz)")
    image_dir = Path(cfg.data.val_image_dir)
    if not image_dir.is_dir():
        raise EvalError(f"reference images: {image_dir} (data.val_image_dir) is not a directory")
    captions, captions_sha = None, None
    if coco:
        captions = Path(cfg.data.val_captions)
        if not captions.is_file():
            raise EvalError(f"reference images: {captions} (data.val_captions) not found")
        captions_sha = file_sha256(captions)
    crop = "uvit-center" if coco else "adm"
    key = json.dumps({"images": str(image_dir.resolve()), "captions_sha256": captions_sha, "crop": crop})
    return {"kind": "images", "dataset": cfg.data.dataset, "path": str(image_dir),
            "captions": str(captions) if captions else None, "captions_sha256": captions_sha, "crop": crop,
            "resolution": res,
            "id": f"images-{hashlib.sha256(key.encode()).hexdigest()[:12]}-{res}px-{cfg.eval.extractor}"}


def _image_source(cfg: Config, spec: dict):
    """The image source of an "images" reference (the data module's, so the crop is the tokenizer's)."""
    from enat.data import tokenize

    res = spec["resolution"]
    if spec["crop"] == "adm":
        return tokenize.ImageFolderSource(spec["path"], res)
    return tokenize.CocoSource(spec["path"], spec["captions"], res)


def image_features(cfg: Config, spec: dict, extractor, log=print) -> tuple[dict, dict]:
    """Features of the reference images, loaded in DataLoader workers and extracted chunk by chunk
    (never all images in memory) -> ({"pool", "logits", "labels"}, {"count", "skipped"})."""
    from tqdm import tqdm

    from enat.data.tokenize import _Loading
    from enat.eval.fidelity import extract

    source = _image_source(cfg, spec)
    loader = torch.utils.data.DataLoader(_Loading(source, list(range(len(source)))), batch_size=250,
                                         num_workers=cfg.data.num_workers, collate_fn=list)
    pools, logits, labels, skipped = [], [], [], []
    for batch in tqdm(loader, desc="reference images", unit="batch", disable=not sys.stderr.isatty()):
        good = [(i, x) for i, x, err in batch if not err]
        for i, _, err in batch:
            if err:
                skipped.append(f"{source.name(i)}: {err}")
                log(f"warning: reference image skipped: {source.name(i)}: {err}")
        if not good:
            continue
        u8 = torch.from_numpy(to_uint8(torch.stack([x for _, x in good]))).permute(0, 3, 1, 2).contiguous()
        f = extract(extractor, u8)
        pools.append(f["pool"])
        logits.append(f["logits"])
        labels += [source.label(i) for i, _ in good]
    if not pools:
        raise EvalError(f"no readable reference images under {spec['path']}")
    return ({"pool": np.concatenate(pools), "logits": np.concatenate(logits), "labels": np.asarray(labels)},
            {"count": len(labels), "skipped": len(skipped), "skipped_names": skipped[:100]})


def _reference_record(cfg: Config, spec: dict, info: dict) -> dict:
    """The JSON sidecar of reference statistics: what they are of and how they were made."""
    w = cfg.eval.extractor_weights
    return {"id": spec["id"], "kind": spec["kind"], "images": spec.get("path", "digits: validation split"),
            "captions": spec.get("captions"), "captions_sha256": spec.get("captions_sha256"),
            "crop": spec.get("crop", "none (the demo's 32 px digits)" if spec["kind"] == "digits-val"
                             else "decoded shards"),
            "resolution": spec["resolution"], **info,
            "extractor": {"name": cfg.eval.extractor, "weights": w,
                          "weights_sha256": file_sha256(w) if w and Path(w).is_file() else None},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


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
    info = {}
    if spec["kind"] == "images":
        feats, info = image_features(cfg, spec, extractor, log=log)
        labels = torch.from_numpy(feats["labels"])
    else:
        if spec["kind"] == "digits-val":
            from enat.data.digits import load_digits

            images, labels, _ = load_digits("val", cfg.tokenizer.resolution)
            u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
        elif spec["kind"].startswith("fashion-"):
            from enat.data.fashion import FashionError, load_fashion

            try:
                images, labels, _ = load_fashion(spec["split"], cfg.tokenizer.resolution, cfg.data.fashion_dir,
                                                 limit=spec.get("subset"))
            except FashionError as e:
                raise EvalError(str(e)) from None
            # grey: convert one channel, then repeat (float copies of all three would be 3x the memory)
            u8 = torch.from_numpy(to_uint8(images[:, :1])).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
        else:
            from enat.data.loader import ShardSet

            data = ShardSet(spec["path"], log=log)
            tokens = torch.from_numpy(data.tokens(np.arange(len(data))))
            # uint8 chunk by chunk: a float copy of a large reference set would not fit in memory
            u8 = torch.cat([torch.from_numpy(to_uint8(tokenizer.decode(chunk))).permute(0, 3, 1, 2)
                            for chunk in tokens.split(64)])
            labels = torch.from_numpy(data.label)
        feats = extract(extractor, u8, progress=sys.stderr.isatty())
        info = {"count": len(u8), "skipped": 0}
    mu, sigma = statistics(feats["pool"])
    out = {"mu": mu, "sigma": sigma, "pool": feats["pool"], "labels": labels.numpy()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_npz(cache, resolution=cfg.tokenizer.resolution, **out)
    _write_json(cache.with_suffix(".json"), _reference_record(cfg, spec, info))
    return out


def _replace_atomic(path: Path, write) -> None:
    """write(file) into a temp name of this writer's own, then rename over `path`. The eval jobs of
    one sweep start together and fill the same reference cache: a shared temp name would let one
    job rename away the file another is still writing."""
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_npz(path: Path, **arrays) -> None:
    _replace_atomic(path, lambda f: np.savez(f, **arrays))


def _write_json(path: Path, obj) -> None:
    _replace_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def compute_reference(cfg: Config, out: str | Path | None = None, log=print) -> tuple[Path, dict]:
    """`enat eval reference`: the statistics of the real held-out images (COCO val with the
    tokenizing crop, an ImageFolder val tree, the demo's validation digits, or Fashion-MNIST's
    test images), cached in
    eval.cache_dir (the FID job uses them from there) and, with `out`, written to FILE.npz (mu,
    sigma, resolution) + FILE.json (images, crop, count, extractor) for eval.reference_npz."""
    from enat.eval.fidelity import build_extractor

    if cfg.data.dataset in ("digits", "fashion_mnist"):
        spec = reference_spec(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference_npz=None)))
    elif cfg.data.val_image_dir or cfg.data.dataset == "coco":
        spec = images_spec(cfg)
    else:
        raise EvalError("reference images: set data.val_image_dir (the held-out images), or use data.dataset "
                        "digits or fashion_mnist (whose held-out images the project reads itself)")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights, device)
    stats = reference_stats(cfg, spec, extractor, None, log=log)
    cache = Path(cfg.eval.cache_dir) / f"{spec['id']}.npz"
    sidecar = cache.with_suffix(".json")
    record = json.loads(sidecar.read_text()) if sidecar.is_file() else _reference_record(cfg, spec, {})
    target = cache
    if out is not None:
        target = Path(out)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_npz(target, mu=stats["mu"], sigma=stats["sigma"], resolution=cfg.tokenizer.resolution)
        _write_json(target.with_suffix(".json"), {**record, "cache": str(cache)})
    log(f"reference statistics of {record.get('count', '?')} images ({spec['id']}): {target} "
        f"(+ {target.with_suffix('.json').name}); use them by path with eval.reference_npz={target}")
    return target, record


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(model, tokenizer, cfg: Config, indices: np.ndarray, progress: bool = False,
                    timings: dict | None = None, conditions=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) and labels of the given global sample indices. `conditions`:
    global indices -> (condition, labels) (text: the held-out captions' contexts); default the
    class-balanced labels i mod C."""
    from tqdm import tqdm

    from enat.sampling import generate

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
    from enat.eval.fidelity import class_fid, metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's warning on near-singular products; values stay accurate
        values = metrics(gen, ref, cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)
        labels = gen.get("labels")
        if labels is not None and "labels" in ref and len(np.unique(ref["labels"])) > 1:  # one class (COCO): FID
            values["class_fid"] = class_fid(gen["pool"], labels, ref["pool"], ref["labels"])
    return values


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

    from enat.eval.fidelity import build_extractor, extract
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
    text = cfg.model.condition == "text"
    if not text and num_samples % C:
        raise EvalError(f"--num-samples {num_samples} is not a multiple of the {C} classes (class-balanced)")
    if cfg.eval.clip_model:
        from enat.eval.text import check_clip_model

        if not text:
            raise EvalError("eval.clip_model: the CLIP score needs captions, a text-conditioned model "
                            "(model.condition=text)")
        check_clip_model(cfg.eval.clip_model)  # a hub name or a missing directory fails before any sampling

    from enat.data.prepare import tokenizer_mismatch

    problem = tokenizer_mismatch(cfg) or extractor_mismatch(cfg)  # before any work: samples would be noise
    if problem:
        raise EvalError(problem)
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
    conditions, chosen, cap_spec = None, None, None
    if text:
        from enat.eval.text import HeldOutCaptions, caption_spec

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
        from enat.eval.text import clip_score

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
            _write_json(Path(files["captions"]), {
                "rule": cap_spec["rule"], "shards": cap_spec["path"], "manifest_sha256": cap_spec["manifest_sha256"],
                "seed": cfg.eval.seed, "samples": samples})
        if cfg.eval.save_npz or cfg.eval.save_png:
            arr = np.concatenate([p["images"] for p in parts])[order]
            if cfg.eval.save_npz:
                files["npz"] = str(out.with_suffix(".npz"))
                _write_npz(Path(files["npz"]), arr_0=arr, labels=gen["labels"], **extra)
            from enat.images import save_captioned_grid, save_grid

            if text:
                k = min(len(arr), 40)
                grid = torch.from_numpy(arr[:k]).permute(0, 3, 1, 2).float() / 255
                files["grid"] = str(save_captioned_grid(grid, list(cat["captions"][:k]), out.with_suffix(".png"),
                                                        ncol=8))
            else:
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
        if text:
            record["condition"] = "text"
            record["captions"] = cap_spec
            if cfg.eval.clip_model:
                record["clip_model"] = str(cfg.eval.clip_model)
        _write_json(out, record)  # a half-written result never looks done
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
    import wandb

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


def tokenizer_report(cfg: Config, checkpoint: str | None = None, out: str | Path | None = None, log=print) -> dict:
    """`enat tokenizer eval`: how well the tokenizer reconstructs the held-out images: PSNR and the
    reconstruction FID (encode -> decode every reference image, scored against the references
    with the FID job's extractor): the floor under any generator's FID on these tokens. For the
    datasets whose held-out images the project reads itself (fashion_mnist, digits)."""
    from enat.data.prepare import tokenizer_images
    from enat.eval.fidelity import build_extractor, extract, metrics
    from enat.tokenizer import load_tokenizer
    from enat.tokenizer.train import reconstruction_stats

    if cfg.data.dataset not in ("fashion_mnist", "digits"):
        raise EvalError(f"`enat tokenizer eval` reads the held-out images of fashion_mnist and the digits; "
                        f"data.dataset={cfg.data.dataset}")
    problem = extractor_mismatch(cfg)
    if problem:
        raise EvalError(problem)
    path = checkpoint or cfg.tokenizer.checkpoint
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer, path)
    images = tokenizer_images(cfg, "val")
    spec = reference_spec(cfg)
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights)
    ref = reference_stats(cfg, spec, extractor, tokenizer, log=log)
    rec, recon = reconstruction_stats(tokenizer, images, keep=True)
    u8 = torch.from_numpy(to_uint8(recon)).permute(0, 3, 1, 2).contiguous()
    values = metrics(extract(extractor, u8), ref, cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)
    record = {"tokenizer": str(path), "sha256": file_sha256(path), "codebook_size": cfg.tokenizer.codebook_size,
              "resolution": cfg.tokenizer.resolution, "grid": cfg.tokenizer.grid_size, **rec,
              "reconstruction": values, "reference": spec, "extractor": cfg.eval.extractor,
              "seconds": time.perf_counter() - t0}
    log(f"tokenizer {path}: held-out PSNR {rec['psnr_db']:.2f} dB over {rec['images']} images, "
        f"{rec['codes_used']}/{cfg.tokenizer.codebook_size} codes used; reconstruction FID {values['fid']:.3f} "
        f"({cfg.eval.extractor})")
    if out is not None:
        _write_json(Path(out), record)
    return record
