"""Text control of text-conditioned models (the captions of their FID: enat/eval/captions.py).

Text control (`enat eval control`, the captioned digits demo): prompts from the caption
templates, every digit x thickness (thin / unsaid / thick) x width (narrow / unsaid / wide),
balanced; for each CFG scale (with and without reuse) the same sample indices, so the same noise:
a paired comparison. Measured on the decoded images: digit accuracy (the demo classifier's argmax
equals the prompt's digit), attribute agreement (among prompts that state an attribute, the
fraction of images whose measured attribute, judged against the prompt digit's thresholds, is
the one asked: enat/data/captions.py), and FID against the held-out digits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from enat.config import Config
from enat.data.captions import AttributeModel, attribute_agreement, caption_attributes, captions_for
from enat.data.digits import load_digits
from enat.eval.fidelity import EvalError, build_extractor, extract, frechet_distance, statistics
from enat.eval.load import load_checkpoint
from enat.eval.reference import reference_stats
from enat.images import save_captioned_grid, to_uint8
from enat.sampling import generate
from enat.text import TextEncoderError, encoder_dir, encoder_for
from enat.tokenizer import load_tokenizer


# ---------------------------------------------------------------------------------------------
# Text control (the captioned digits demo)
# ---------------------------------------------------------------------------------------------


THICKNESS = ("thin", "", "thick")
WIDTH = ("narrow", "", "wide")


def control_prompts(n: int) -> list[dict]:
    """n prompts, balanced over digit x thickness x width (90 combinations, "" = unsaid): prompt i
    is combination i mod 90, in a template stating exactly those words (cycling over the
    templates that do, by i // 90)."""
    combos = [(d, t, w) for d in range(10) for t in THICKNESS for w in WIDTH]
    out = []
    for i in range(n):
        d, t, w = combos[i % len(combos)]
        wanted = {"digit": d, **({"thickness": t} if t else {}), **({"width": w} if w else {})}
        fits = [c for c in captions_for(d, t, w) if caption_attributes(c) == wanted]
        if not fits:
            raise AssertionError(f"no caption template states exactly {wanted}")
        out.append({"caption": fits[(i // len(combos)) % len(fits)], **wanted})
    return out


def prompt_encoder(cfg: Config, model, device="cpu"):
    """The text encoder prompts go through: text.encoder, else the one the shards' manifest
    names; checked to be the model's (its encoding of '' is the model's null context)."""
    try:
        path = encoder_dir(cfg.text)
    except TextEncoderError as e:
        raise EvalError(str(e)) from None
    for shards in (cfg.data.val_shards, cfg.data.shards):
        manifest = Path(shards) / "manifest.json" if shards else None
        if path is None and manifest is not None and manifest.is_file():
            path = ((json.loads(manifest.read_text()).get("text") or {}).get("encoder") or {}).get("path")
    if not path:
        raise EvalError("prompts need the text encoder the model was trained with: set text.encoder=/local/dir")
    m = model.cfg
    try:
        return encoder_for(path, device, length=m.text_len, dim=m.text_dim, null_context=model.text_embed.null_context)
    except TextEncoderError as e:
        raise EvalError(str(e)) from None


@torch.no_grad()
def sample_images(model, tokenizer, cond: torch.Tensor, sample_cfg, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) images of conditions `cond` with the noise of the global `indices`."""
    out = []
    for s in range(0, len(indices), batch_size):
        ids = generate(model, cond[s:s + batch_size], sample_cfg, indices=torch.from_numpy(indices[s:s + batch_size]))
        out.append(to_uint8(tokenizer.decode(ids)))
    return np.concatenate(out)


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Real images (n, 3, H, W) in [0, 1] through the tokenizer (encode, decode) -> uint8 (n, H, W, 3)."""
    device = next(tokenizer.parameters()).device
    return np.concatenate([to_uint8(tokenizer.decode(tokenizer.encode(c.to(device))))
                           for c in images.split(batch_size)])


_RECONSTRUCTIONS: dict = {}


def reconstructed_digits(tokenizer, split: str, key=None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images, labels, reconstructions) of a digits split; cached per tokenizer file `key`."""
    x, y, _ = load_digits(split)
    if key is None or (key, split) not in _RECONSTRUCTIONS:
        rec = reconstruct(tokenizer, x)
        if key is None:
            return x, y.numpy(), rec
        if len(_RECONSTRUCTIONS) > 4:
            _RECONSTRUCTIONS.clear()
        _RECONSTRUCTIONS[(key, split)] = rec
    return x, y.numpy(), _RECONSTRUCTIONS[(key, split)]


def tokenizer_attributes(tokenizer, key=None):
    """The attribute thresholds refitted on the tokenizer's reconstructions of the training
    digits: what a decoded image can show (a tokenizer that evens out stroke width moves every
    image towards the middle third of the real images' thresholds)."""
    _, y, rec = reconstructed_digits(tokenizer, "train", key)
    return AttributeModel.fit(rec, y)


def reconstruction_ceiling(tokenizer, extractor, models: dict, key=None) -> dict:
    """The same measures on the held-out digits encoded and decoded by the tokenizer, against
    their own captions' words: what a perfect generator of these tokens would score."""
    x, y, rec = reconstructed_digits(tokenizer, "val", key)
    said = models["pixels"].judge(x, y)  # the words the held-out images' captions state
    logits = extract(extractor, torch.from_numpy(rec).permute(0, 3, 1, 2).contiguous())["logits"]
    row = {"setting": "tokenizer reconstructions of the held-out digits (ceiling)", "cfg_scale": None, "reuse": None,
           "digit_accuracy": float((logits.argmax(1) == y).mean())}
    for name, model in models.items():
        seen = model.judge(rec, y)
        for attr in said:
            stated = said[attr] != ""
            key = attr if name == "pixels" else f"{attr}_tok"
            row[key] = float((seen[attr][stated] == said[attr][stated]).mean())
            row[f"{attr}_n"] = int(stated.sum())
    return row


def parse_scales(text: str | None) -> list[float]:
    if text is None:
        return [0.0, 1.0, 2.0, 4.0]
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--cfg-scales takes comma-separated numbers, e.g. 0,1,2,4; got {text!r}") from None
    if not scales:
        raise EvalError("--cfg-scales is empty")
    return scales


def control_table(rows: list[dict]) -> str:
    def num(v, fmt=".3f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    head = ("| CFG | reuse | digit accuracy | thickness agreement | width agreement | thickness (tok.) | "
            "width (tok.) | FID | sampling s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cfg = "recon." if r["cfg_scale"] is None else f"{r['cfg_scale']:g}"
        reuse = "-" if r["reuse"] is None else ("yes" if r["reuse"] else "no")
        lines.append(f"| {cfg} | {reuse} | {num(r['digit_accuracy'])} | {num(r['thickness'])} ({r['thickness_n']}) | "
                     f"{num(r['width'])} ({r['width_n']}) | {num(r.get('thickness_tok'))} | {num(r.get('width_tok'))} | "
                     f"{num(r.get('fid'), '.2f')} | {num(r.get('sampling_s'), '.1f')} |")
    return "\n".join(lines)


def evaluate_control(cfg: Config, run_dir: str | Path | None, checkpoint: str, cfg_scales: list[float] | None = None,
                     num_samples: int | None = None, reuse: tuple[bool, ...] | None = None,
                     out_dir: str | Path | None = None, weights: str | None = None, fid: bool = True,
                     log=print) -> dict:
    """Digit accuracy and attribute agreement (and FID) of a captioned-demo model by CFG scale,
    with and without reuse; writes OUT/control.json and OUT/control.md, returns the record."""
    if cfg.model.condition != "text" or cfg.data.dataset != "digits":
        raise EvalError("the text-control evaluation is for the captioned digits demo (data.dataset=digits, "
                        "model.condition=text)")
    t_start = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    scales = list(cfg_scales) if cfg_scales is not None else [0.0, 1.0, 2.0, 4.0]
    n = int(num_samples or 900)
    weights = weights or cfg.eval.weights
    run_dir = Path(run_dir) if run_dir is not None else None
    ck = load_checkpoint(cfg, run_dir, checkpoint, weights, log=log)
    model = ck["model"].to(device)
    modes = tuple(reuse) if reuse is not None else ((True, False) if model.supports_reuse else (False,))
    if any(modes) and not model.supports_reuse:
        raise EvalError(f"{type(model).__name__} has no reuse mode: evaluate with --no-reuse")
    base = run_dir if run_dir is not None else Path(ck["id"]).parent
    out = Path(out_dir) if out_dir is not None else base / "eval" / "control" / f"{ck['step']:08d}"
    out.mkdir(parents=True, exist_ok=True)

    prompts = control_prompts(n)
    captions = [p["caption"] for p in prompts]
    digits = np.array([p["digit"] for p in prompts])
    enc = prompt_encoder(cfg, model, device)
    cond = torch.cat([enc.encode(captions[i:i + 256]).float().cpu() for i in range(0, n, 256)])
    del enc
    tokenizer = load_tokenizer(cfg.tokenizer).to(device)
    extractor = build_extractor("digits-cnn", cfg.eval.extractor_weights, device)
    tok_file = Path(cfg.tokenizer.checkpoint) if cfg.tokenizer.checkpoint else None
    tok_key = (str(tok_file.resolve()), tok_file.stat().st_mtime_ns) if tok_file and tok_file.is_file() else None
    models = {"pixels": AttributeModel.default(), "tokenizer": tokenizer_attributes(tokenizer, tok_key)}
    ref = None
    if fid:
        res = cfg.tokenizer.resolution
        ref = reference_stats(cfg, {"kind": "digits-val", "id": f"digits-val-{res}px-digits-cnn", "resolution": res},
                              extractor, tokenizer, log=log)
    indices = np.arange(n)
    results = []
    for use_reuse in modes:
        for scale in scales:
            sc = dataclasses.replace(cfg.sample, seed=cfg.eval.seed, cfg_scale=float(scale), reuse=bool(use_reuse))
            t0 = time.perf_counter()
            images = sample_images(model, tokenizer, cond, sc, indices, cfg.eval.batch_size)
            took = time.perf_counter() - t0
            feats = extract(extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
            pred = feats["logits"].argmax(1)
            agree = attribute_agreement(images, captions, models["pixels"])
            agree_tok = attribute_agreement(images, captions, models["tokenizer"])
            row = {"cfg_scale": float(scale), "reuse": bool(use_reuse),
                   "digit_accuracy": float((pred == digits).mean()),
                   "per_digit_accuracy": [float((pred[digits == d] == d).mean()) if (digits == d).any() else None
                                          for d in range(10)],
                   **{k: (float(v) if isinstance(v, float) else int(v)) for k, v in agree.items()},
                   **{f"{k}_tok": float(agree_tok[k]) for k in ("thickness", "width")},
                   "fid": (frechet_distance(*statistics(feats["pool"]), ref["mu"], ref["sigma"])
                           if ref is not None else None),
                   "sampling_s": took}
            grid = out / f"samples_cfg{scale:g}_{'reuse' if use_reuse else 'noreuse'}.png"
            k = min(n, 30)
            save_captioned_grid(torch.from_numpy(images[:k]).permute(0, 3, 1, 2).float() / 255, captions[:k], grid,
                                ncol=10)
            row["grid"] = str(grid)
            results.append(row)
            log(f"cfg {scale:g} reuse {use_reuse}: digit accuracy {row['digit_accuracy']:.3f}, thickness "
                f"{row['thickness']:.3f}, width {row['width']:.3f}"
                + (f", FID {row['fid']:.2f}" if row["fid"] is not None else ""))
    ceiling = reconstruction_ceiling(tokenizer, extractor, models, tok_key)
    table = control_table(results + [ceiling])
    record = {"checkpoint": {"id": ck["id"], "sha256": ck["sha256"]}, "step": ck["step"], "weights": weights,
              "num_samples": n, "prompts": "templates: digit x thickness {thin, -, thick} x width {narrow, -, wide}, "
              "balanced (control_prompts)", "seed": cfg.eval.seed, "paired": "same sample indices (noise) per setting",
              "sample": dataclasses.asdict(cfg.sample), "classifier": cfg.eval.extractor_weights,
              "attribute_thresholds": {"pixels": "AttributeModel.default(): terciles of the real training digits",
                                       "tokenizer": "terciles of the training digits encoded and decoded by the "
                                                    "tokenizer (columns *_tok)"},
              "fid_reference": "digits-val" if fid else None, "results": results, "ceiling": ceiling, "table": table,
              "wall_time_s": time.perf_counter() - t_start, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "prompts.json").write_text(json.dumps(prompts, indent=0))
    tmp = out / "control.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "control.json")
    (out / "control.md").write_text(
        f"# Text control: {ck['id']} (step {ck['step']})\n\n{n} prompts ({record['prompts']}), {cfg.sample.steps} "
        f"steps, the same noise per sample in every row. Digit accuracy: the demo classifier's argmax is the "
        f"prompt's digit. Agreement: among prompts stating the attribute (count in brackets), the fraction "
        f"of images showing it (judged against the prompt digit's thresholds, the terciles of its training "
        f"images: a real image of the digit drawn at random agrees 1/3 of the time; tok.: the terciles of the "
        f"training digits after the tokenizer, what a decoded image can show). The last row is the ceiling: the "
        f"held-out digits encoded and decoded by the tokenizer, against their own captions.\n\n{table}\n")
    log(table)
    log(f"wrote {out / 'control.json'} and {out / 'control.md'}")
    return {**record, "path": str(out / "control.json")}
