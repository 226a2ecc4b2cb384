"""Reference statistics: what the real images of an FID are (`reference_spec`, its id keys
results and the cache) and their features and (mu, sigma), computed once and cached on disk.

  - eval.reference_npz: ADM-style statistics (mu, sigma) (the ImageNet protocol);
  - otherwise the held-out images: the digits' validation split for the demo; Fashion-MNIST's
    test (or training) images; for COCO the real images (data.val_image_dir, the images
    data.val_captions lists) at tokenizer.resolution with the tokenizing centre crop ("images");
    else data.val_shards decoded once with the tokenizer.
Their features are cached in eval.cache_dir, keyed by dataset, resolution, extractor and the
shards' manifest or the image set. `enat eval reference` computes them ahead (an npz of mu,
sigma, resolution and a JSON sidecar naming images, crop, count and extractor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from enat.config import Config
from enat.data import tokenize
from enat.data.digits import load_digits
from enat.data.fashion import FashionError, files_id, load_fashion, split_size
from enat.data.loader import ShardSet
from enat.data.tokenize import _Loading
from enat.eval.fidelity import CLASSIFIERS, EvalError, build_extractor, extract, feature_size, statistics
from enat.files import file_sha256, write_json, write_npz
from enat.images import to_uint8
from enat.models.weights import torch_load


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
        npz_statistics(cfg, path)  # a wrong layout stops the job here, before any sampling
        return spec
    if cfg.data.dataset in ("digits", "digits_aug"):  # the real held-out digits, not reconstructions
        return {"kind": "digits-val", "id": f"digits-val-{res}px-{cfg.eval.extractor}", "resolution": res}
    if cfg.data.dataset == "fashion_mnist":  # real images (the test split by default), not reconstructions
        w = cfg.eval.extractor_weights
        weights = file_sha256(w)[:12] if w and Path(w).is_file() else "none"
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


NPZ_LAYOUT = ("ADM's layout: mu (D,) and sigma (D, D), floats, the mean and covariance of the D-d features of "
              "eval.extractor (ADM's reference batches, VIRTUAL_*.npz, hold them beside arr_0, mu_s, sigma_s; "
              "`enat eval reference --config C --out FILE.npz` writes them)")


def _npz_arrays(z) -> dict:
    """{name: (shape, dtype)} of an npz's arrays, read from their headers: ADM's reference batches
    hold 10,000 images as arr_0 (2 GB at 256 px), which need not be read for their size."""
    out = {}
    for name in z.files:
        with z.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # (3, 0): a structured dtype's unicode field names, never statistics
                shape, dtype = z[name].shape, z[name].dtype
        out[name] = (tuple(shape), np.dtype(dtype))
    return out


def npz_statistics(cfg: Config, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from reference statistics given by path (eval.reference_npz), checked
    against ADM's layout (mu, sigma; other arrays such as arr_0, mu_s, sigma_s are left alone), the
    extractor's feature size and the samples' resolution. A file of another layout is an EvalError
    naming the file, what it holds and the layout it needs: FID against it would be a number of
    nothing (or a broadcasting error after all the sampling)."""
    path = Path(path)

    def bad(problem: str, found: str) -> EvalError:
        return EvalError(f"reference {path} (eval.reference_npz): {problem} (found {found}); it needs {NPZ_LAYOUT}")

    try:
        z = np.load(path)
    except Exception as e:  # not a zip / npy at all, a pickle: numpy's own error says which
        raise bad("not readable as an npz", f"{type(e).__name__}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise bad("a single array, not an npz of arrays", f"a .npy array of shape {z.shape}")
    with z:
        arrays = _npz_arrays(z)
        found = ", ".join(f"{k} {shape} {dtype}" for k, (shape, dtype) in arrays.items()) or "no arrays"
        missing = [k for k in ("mu", "sigma") if k not in arrays]
        if missing:
            what = ("images (arr_0) without statistics: a sample batch, not a reference batch"
                    if set(arrays) <= {"arr_0", "labels"} and arrays else f"no {' and no '.join(missing)}")
            raise bad(what, found)
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = arrays["mu"], arrays["sigma"]
        if mu_dtype.kind != "f" or sigma_dtype.kind != "f":
            raise bad("mu and sigma must be floating point", found)
        if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]):
            raise bad("mu must be a vector (D,) and sigma a square matrix (D, D) of the same D", found)
        dim, want = mu_shape[0], feature_size(cfg.eval.extractor)
        if want is not None and dim != want:
            raise bad(f"statistics of {dim}-d features, but eval.extractor={cfg.eval.extractor} gives {want}-d "
                      f"features: statistics of another extractor (or of ADM's spatial features, mu_s)", found)
        res = None
        if "resolution" in arrays:
            res = int(z["resolution"])
        elif "arr_0" in arrays and len(arrays["arr_0"][0]) == 4:  # ADM's images: (N, H, W, 3)
            res = arrays["arr_0"][0][1]
        if res is not None and res != cfg.tokenizer.resolution:
            raise EvalError(f"reference {path} is for {res} px images but the samples are "
                            f"{cfg.tokenizer.resolution} px (tokenizer.resolution): give statistics of "
                            f"{cfg.tokenizer.resolution} px images")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise bad("mu or sigma holds NaN or infinite values", found)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * max(float(np.abs(sigma).max()), 1e-300) or (np.diagonal(sigma) < 0).any():
        raise bad(f"sigma is not a covariance matrix (largest |sigma - sigma.T| {asym:.3g}, smallest diagonal "
                  f"{np.diagonal(sigma).min():.3g})", found)
    return mu, sigma


def extractor_mismatch(cfg: Config) -> str | None:
    """A classifier extractor of this project (digits-cnn, fashion-cnn) belongs to one dataset:
    its features of another dataset's images say nothing. Why eval.extractor does not fit
    data.dataset, or None."""
    name = cfg.eval.extractor
    if name in CLASSIFIERS and not cfg.data.dataset.startswith(CLASSIFIERS[name][2]):
        fits = [n for n, c in CLASSIFIERS.items() if cfg.data.dataset.startswith(c[2])]
        return (f"eval.extractor={name} is the {CLASSIFIERS[name][2]} classifier but data.dataset="
                f"{cfg.data.dataset}: use the extractor of this data ("
                f"{fits[0] if fits else 'inception-v3-compat, by path'})")
    w = cfg.eval.extractor_weights
    if name == "fashion-cnn" and w and Path(w).is_file():
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
    res = spec["resolution"]
    if spec["crop"] == "adm":
        return tokenize.ImageFolderSource(spec["path"], res)
    return tokenize.CocoSource(spec["path"], spec["captions"], res)


def image_features(cfg: Config, spec: dict, extractor, log=print) -> tuple[dict, dict]:
    """Features of the reference images, loaded in DataLoader workers and extracted chunk by chunk
    (never all images in memory) -> ({"pool", "logits", "labels"}, {"count", "skipped"})."""
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
    if spec["kind"] == "npz":
        mu, sigma = npz_statistics(cfg, spec["path"])
        return {"mu": mu, "sigma": sigma}
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
            images, labels, _ = load_digits("val", cfg.tokenizer.resolution)
            u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
        elif spec["kind"].startswith("fashion-"):
            try:
                images, labels, _ = load_fashion(spec["split"], cfg.tokenizer.resolution, cfg.data.fashion_dir,
                                                 limit=spec.get("subset"))
            except FashionError as e:
                raise EvalError(str(e)) from None
            # grey: convert one channel, then repeat (float copies of all three would be 3x the memory)
            u8 = torch.from_numpy(to_uint8(images[:, :1])).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
        else:
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
    write_npz(cache, resolution=cfg.tokenizer.resolution, **out)
    write_json(cache.with_suffix(".json"), _reference_record(cfg, spec, info))
    return out


def compute_reference(cfg: Config, out: str | Path | None = None, log=print) -> tuple[Path, dict]:
    """`enat eval reference`: the statistics of the real held-out images (COCO val with the
    tokenizing crop, an ImageFolder val tree, the demo's validation digits, or Fashion-MNIST's
    test images), cached in
    eval.cache_dir (the FID job uses them from there) and, with `out`, written to FILE.npz (mu,
    sigma, resolution) + FILE.json (images, crop, count, extractor) for eval.reference_npz."""
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
        write_npz(target, mu=stats["mu"], sigma=stats["sigma"], resolution=cfg.tokenizer.resolution)
        write_json(target.with_suffix(".json"), {**record, "cache": str(cache)})
    log(f"reference statistics of {record.get('count', '?')} images ({spec['id']}): {target} "
        f"(+ {target.with_suffix('.json').name}); use them by path with eval.reference_npz={target}")
    return target, record
