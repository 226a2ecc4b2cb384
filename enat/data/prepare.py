"""Build what a config's data needs and is missing: for the embedded demo (data.dataset=digits, and
digits_aug: the digits through random affine + elastic transforms, data.augmented_train /
data.augmented_val images from data.augment_seed), the tokenizer (trained here, on the plain
training digits for both), with `text.encoder: demo` the demo text encoder (built here in
text.demo_dir: a tiny random frozen CLIP text model and a word tokenizer), and the train/val token
shards; for image folders and COCO, the shards (the tokenizer and text encoder are given by path).
A text.encoder that names no existing directory (a hub name) is refused before anything is made.
`check_data` is the trainer's side: it only checks the shards exist and names the command that
makes them. (The demo's FID feature extractor is evaluation's: enat/eval/prepare.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from enat.config import Config
from enat.data.captions import DEMO_WORDS
from enat.data.digits import AUGMENT_VERSION, load_digits
from enat.data.fashion import FashionError, files_id, load_fashion, split_size
from enat.data.shards import MANIFEST, ShardError
from enat.data.tokenize import make_source, merge_parts, tokenize_part
from enat.files import file_sha256
from enat.models.weights import torch_load
from enat.text import DEMO, TextEncoderError, build_demo_text_encoder, encoder_dir, encoder_for, local_model_dir
from enat.tokenizer import load_tokenizer
from enat.tokenizer.train import train_tokenizer

# The datasets whose tokenizer this project trains itself (no released tokenizer fits them): the
# embedded digits, and Fashion-MNIST read from its local IDX files.
EMBEDDED = ("digits", "digits_aug", "fashion_mnist")


def tokenizer_images(cfg: Config, split: str):
    """(n, 3, R, R) float images the project's own tokenizer trains on (split train) and reports
    its held-out reconstruction on (split val): the plain digits (for digits_aug too), or Fashion-MNIST."""
    if cfg.data.dataset == "fashion_mnist":
        try:
            return load_fashion(split, cfg.tokenizer.resolution, cfg.data.fashion_dir, limit=cfg.data.subset)[0]
        except FashionError as e:
            raise ShardError(str(e)) from None
    return load_digits(split, cfg.tokenizer.resolution)[0]


def stale_shards(cfg: Config) -> list[str]:
    """digits_aug: the splits whose existing manifest records another image set than the config
    asks for (count, seed, split, generator version), each with what differs; fashion_mnist: the
    same for the subset and the files, and a tokenizer trained on another number of images (a
    smoke test's left at the default paths). Other datasets: []."""
    if cfg.data.dataset == "fashion_mnist":
        return _stale_fashion(cfg)
    if cfg.data.dataset != "digits_aug":
        return []
    d, out = cfg.data, []
    for split, path, count in (("train", d.shards, d.augmented_train), ("val", d.val_shards, d.augmented_val)):
        if path is None or not (Path(path) / MANIFEST).is_file():
            continue
        try:
            src = json.loads((Path(path) / MANIFEST).read_text()).get("source", {})
        except ValueError:
            continue  # an unreadable manifest is the loader's to report
        want = {"dataset": "digits_aug", "split": split, "count": count, "seed": d.augment_seed,
                "augment_version": AUGMENT_VERSION}
        diff = [f"{k} {src.get(k)!r} (config: {v!r})" for k, v in want.items() if src.get(k) != v]
        if diff:
            out.append(f"{path} ({split}) holds another image set: " + ", ".join(diff))
    return out


def _stale_fashion(cfg: Config) -> list[str]:
    d, out = cfg.data, []
    for split, path in (("train", d.shards), ("val", d.val_shards)):
        if path is None or not (Path(path) / MANIFEST).is_file():
            continue
        try:
            src = json.loads((Path(path) / MANIFEST).read_text()).get("source", {})
            want = {"subset": d.subset, "images": split_size(split, d.subset), "files": files_id(split, d.fashion_dir)}
        except (ValueError, FashionError):
            continue  # an unreadable manifest is the loader's to report, missing files the reader's
        diff = [f"{k} {src.get(k)!r} (config: {v!r})" for k, v in want.items() if src.get(k) != v]
        if diff:
            out.append(f"{path} ({split}) holds other Fashion-MNIST images: " + ", ".join(diff))
    tok = cfg.tokenizer.checkpoint
    if tok is not None and Path(tok).is_file():
        meta = torch_load(tok, "tokenizer checkpoint").get("meta") or {}
        trained, want = meta.get("num_images"), split_size("train", d.subset)
        if trained is not None and trained != want:
            out.append(f"the tokenizer {tok} was trained on {trained} images, this config reads {want} "
                       f"(data.subset={d.subset}); point tokenizer.checkpoint at a new path")
    return out


def _refuse_stale(cfg: Config) -> None:
    stale = stale_shards(cfg)
    if stale:
        raise ShardError("; ".join(stale) + ". Point data.shards / data.val_shards at a fresh folder (or delete "
                         "these) and run `enat data prepare` again")


def split_dir(cfg: Config, split: str) -> str:
    """The shard folder of a split: data.shards (train) or data.val_shards (val)."""
    out = cfg.data.shards if split == "train" else cfg.data.val_shards
    if out is None:
        raise ShardError(f"no output folder for the {split} split: set data.val_shards")
    return out


def merge_split(cfg: Config, split: str, out: str | None = None, log=print):
    """Check every part of a split finished and write its manifest."""
    out = out or split_dir(cfg, split)
    manifest = merge_parts(out, cfg.tokenizer.checkpoint,
                           extra={"resolution": cfg.tokenizer.resolution, "flip": cfg.data.flip, "split": split})
    log(f"wrote {Path(out) / MANIFEST}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
        f"{len(manifest.failed)} unreadable images")
    return manifest


def tokenize_split(cfg: Config, split: str, input_: str | None = None, out: str | None = None,
                   part: int = 0, num_parts: int = 1, merge: bool | None = None, device: str = "cpu",
                   progress: bool | None = None, log=print):
    """Tokenize one split (train/val) of the configured data; merge when all parts are done
    (by default when there is a single part)."""
    d = cfg.data
    check_text_encoder(cfg)  # before the tokenizer loads: a hub name is refused as such
    if input_ is None:
        input_ = d.dataset if d.dataset in EMBEDDED else (d.image_dir if split == "train" else d.val_image_dir)
        if input_ is None:
            raise ShardError(f"no input for the {split} split: set data.{'image_dir' if split == 'train' else 'val_image_dir'}")
    captions = None
    if d.dataset == "coco":
        captions = d.captions if split == "train" else d.val_captions
        if captions is None:
            raise ShardError(f"no captions for the COCO {split} split: set "
                             f"data.{'captions' if split == 'train' else 'val_captions'} (captions_*2014.json)")
    out = out or split_dir(cfg, split)
    progress = sys.stderr.isatty() if progress is None else progress
    tokenizer = load_tokenizer(cfg.tokenizer)
    source = make_source(input_, cfg.tokenizer.resolution, split, captions=captions,
                         captioned=cfg.model.condition == "text",
                         count=d.augmented_train if split == "train" else d.augmented_val, seed=d.augment_seed,
                         root=d.fashion_dir, limit=d.subset)
    text_encoder = None
    if getattr(source, "captioned", False):
        try:
            text_encoder = encoder_for(encoder_dir(cfg.text), device, length=cfg.model.text_len,
                                       dim=cfg.model.text_dim)
        except TextEncoderError as e:  # the data commands report ShardErrors
            raise ShardError(str(e)) from None
    tokenize_part(source, tokenizer, out, part=part, num_parts=num_parts, shard_size=d.shard_size, flip=d.flip,
                  batch_size=d.tokenize_batch_size, num_workers=d.num_workers, device=device, progress=progress,
                  log=log, text_encoder=text_encoder, text_storage=cfg.text.storage,
                  text_batch_size=cfg.text.batch_size)
    if merge if merge is not None else num_parts == 1:
        return merge_split(cfg, split, out, log=log)
    return None


def text_encoder_missing(cfg: Config) -> bool:
    """Whether the demo text encoder must be built first (`prepare_text_encoder` would build it)."""
    return (cfg.model.condition == "text" and cfg.text.encoder == DEMO
            and not (Path(cfg.text.demo_dir) / "config.json").is_file())


def check_text_encoder(cfg: Config) -> None:
    """A text-conditioned config's text.encoder names an encoder that exists (`demo`: once built):
    refused otherwise, before anything is made, with the loader's message (a hub name: how to
    fetch it). Unset is left to the commands that need an encoder (ids-only shards, prompts)."""
    if cfg.model.condition != "text" or cfg.text.encoder is None:
        return
    try:
        local_model_dir(encoder_dir(cfg.text))
    except TextEncoderError as e:  # the data commands report ShardErrors
        raise ShardError(str(e)) from None


def tokenizer_missing(cfg: Config) -> bool:
    """Whether the demo tokenizer must be trained (or the demo text encoder built) first: what
    `prepare_tokenizer` would do."""
    tok = cfg.tokenizer.checkpoint
    return (cfg.data.dataset in EMBEDDED and tok is not None and not Path(tok).is_file()) or text_encoder_missing(cfg)


def prepare_text_encoder(cfg: Config, log=print) -> None:
    """The text encoder captions are encoded with (model.condition=text): the demo's
    (`text.encoder: demo`) is built in text.demo_dir when missing (words:
    enat.data.captions.DEMO_WORDS, L x C = model.text_len x model.text_dim, seed 0); any other
    must be given by local path (text.encoder) and is never built."""
    if cfg.model.condition != "text":
        return
    if cfg.text.encoder is None:
        raise ShardError("model.condition=text needs text.encoder: a local directory with a CLIP text encoder "
                         "(save_pretrained output), or `demo` for the captioned digits demo's word encoder "
                         "(built here in text.demo_dir)")
    if text_encoder_missing(cfg):
        log(f"no demo text encoder in {cfg.text.demo_dir}: building it ({len(DEMO_WORDS)} words, "
            f"{cfg.model.text_len} x {cfg.model.text_dim})")
        build_demo_text_encoder(cfg.text.demo_dir, list(DEMO_WORDS), cfg.model.text_len, cfg.model.text_dim, seed=0)
    check_text_encoder(cfg)


def prepare_tokenizer(cfg: Config, log=print) -> None:
    """The tokenizers the data is tokenized with: the image tokenizer (the demo's is trained here
    when missing; any other must be given by path, tokenizer.checkpoint) and, for text-to-image,
    the text encoder (`prepare_text_encoder`)."""
    prepare_text_encoder(cfg, log=log)
    tok = cfg.tokenizer
    if tok.checkpoint is None:
        raise ShardError("tokenizer.checkpoint is not set")
    if Path(tok.checkpoint).is_file():
        return
    if cfg.data.dataset not in EMBEDDED:
        raise ShardError(f"tokenizer checkpoint {tok.checkpoint} not found; this project trains its own "
                         f"tokenizer only for {', '.join(EMBEDDED)}: give the released VQGAN's path in "
                         f"tokenizer.checkpoint")
    log(f"no tokenizer at {tok.checkpoint}: training the {cfg.data.dataset} tokenizer ({tok.train.steps} steps)")
    train_tokenizer(cfg, tokenizer_images(cfg, "train"), tok.checkpoint, log=log,
                    val_images=tokenizer_images(cfg, "val"))


def tokenizer_mismatch(cfg: Config) -> str | None:
    """Why tokenizer.checkpoint is not the tokenizer the shards were made with (their manifests
    record its sha256), or None: ids of one codebook decoded by another are noise, and a
    retrained tokenizer at the same path is the easy way to get there."""
    tok = cfg.tokenizer.checkpoint
    if tok is None or not Path(tok).is_file():
        return None
    sha = None
    for out in (cfg.data.shards, cfg.data.val_shards):
        manifest = Path(out) / MANIFEST if out is not None else None
        if manifest is None or not manifest.is_file():
            continue
        try:
            made_with = json.loads(manifest.read_text()).get("tokenizer") or {}
        except ValueError:
            continue  # an unreadable manifest is the loader's to report
        if not made_with.get("sha256"):
            continue
        sha = sha or file_sha256(tok)
        if made_with["sha256"] != sha:
            return (f"the shards at {out} were tokenized with {made_with.get('path')} (sha256 "
                    f"{made_with['sha256'][:12]}), but tokenizer.checkpoint {tok} is another tokenizer (sha256 "
                    f"{sha[:12]}): its codebook would decode these ids into noise. Point tokenizer.checkpoint at the "
                    f"tokenizer the shards were made with, or write new shards with this one (fresh "
                    f"data.shards / data.val_shards folders, then `enat data prepare`)")
    return None


def prepared(cfg: Config) -> list[tuple[str, str]] | None:
    """[(what, where)] of everything the data of this config needs when all of it is already
    there (what `prepare_data` would keep), or None when something is missing."""
    if tokenizer_missing(cfg):
        return None
    have = [("tokenizer", str(cfg.tokenizer.checkpoint))] if cfg.tokenizer.checkpoint else []
    if cfg.model.condition == "text" and cfg.text.encoder:
        have.append(("text encoder", cfg.text.demo_dir if cfg.text.encoder == DEMO else cfg.text.encoder))
    for what, out in (("training shards", cfg.data.shards), ("validation shards", cfg.data.val_shards)):
        if out is None:
            continue
        manifest = Path(out) / MANIFEST
        if not manifest.is_file():
            return None
        try:
            n = f" ({json.loads(manifest.read_text())['num_samples']} samples)"
        except (ValueError, KeyError):
            n = ""  # an unreadable manifest is the loader's to report
        have.append((what, f"{out}{n}"))
    return have


def prepare_data(cfg: Config, progress: bool | None = None, log=print) -> None:
    """Make sure the tokenizer and the shards of both splits exist, building what is missing."""
    _refuse_stale(cfg)  # a manifest present but of another count or seed must not be taken as done
    prepare_tokenizer(cfg, log=log)
    problem = tokenizer_mismatch(cfg)
    if problem:
        raise ShardError(problem)
    for split, out in (("train", cfg.data.shards), ("val", cfg.data.val_shards)):
        if out is None or (Path(out) / MANIFEST).is_file():
            continue
        log(f"no token shards at {out}: tokenizing the {split} split")
        tokenize_split(cfg, split, progress=progress, log=log)


def check_data(cfg: Config) -> None:
    """What the trainer calls before it starts: the training shards (and the validation shards
    when data.val_shards is set) must be there, each with its manifest (digits_aug: of the
    configured count and seed, `stale_shards`), and a text encoder named must exist. It builds nothing."""
    check_text_encoder(cfg)
    missing = [f"{what} shards: no {Path(out) / MANIFEST}"
               for what, out in (("training", cfg.data.shards), ("validation", cfg.data.val_shards))
               if out is not None and not (Path(out) / MANIFEST).is_file()]
    _refuse_stale(cfg)
    problem = tokenizer_mismatch(cfg)
    if problem:
        raise ShardError(problem)
    if missing:
        raise ShardError(
            "the data of this run is not prepared (" + "; ".join(missing) + "). Prepare it first, with this "
            "run's config and overrides: `enat data prepare --config CONFIG [key=value ...]`, or on a cluster "
            "`python launch/tokenize.py --config CONFIG [key=value ...]` (launch/pipeline.py runs that "
            "before training)")
