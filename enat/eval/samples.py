"""`enat sample`: a checkpoint's samples for given labels or prompts, to a folder: token ids
(tokens.npy), the conditions, a grid of the decoded images and, on request, the grid of every
sampling step (the progressive-decoding figure). The checkpoint is a weights file or, as `enat
eval` takes it, a training checkpoint: a tag directory (RUN/checkpoints/stepNNNNNNNN), a run's
checkpoints/ folder or the run directory (their `latest`), verified before it is loaded."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from enat.config import Config, ConfigError
from enat.eval.load import load_checkpoint
from enat.images import decode_partial, save_captioned_grid, save_grid
from enat.models.weights import load_state, load_weights
from enat.models.zoo import build_model, model_differences
from enat.sampling import generate, generate_all
from enat.text import encoder_dir, encoder_for
from enat.tokenizer import load_tokenizer
from enat.train.checkpoint import LATEST, META, TAG_RE, ckpt_dir_of


def parse_labels(text: str, num_classes: int) -> torch.Tensor:
    try:
        labels = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated class ids, got {text!r}") from None
    bad = [x for x in labels if not 0 <= x < num_classes]
    if not labels or bad:
        raise ConfigError(f"--labels must be class ids in [0, {num_classes}); got {text!r}")
    return torch.tensor(labels)


def text_condition(cfg, model, prompts: list[str], device="cpu") -> torch.Tensor:
    """Prompts -> contexts through the configured encoder (text.encoder), checked to be the one
    the model was trained with. Words the demo vocabulary lacks fail; over-long prompts warn."""
    if not cfg.text.encoder:
        raise ConfigError("sampling from prompts needs the text encoder the model was trained with: set "
                          "text.encoder=/local/dir (the shards' manifest.json names it under text.encoder.path)")
    m = model.cfg
    encoder = encoder_for(encoder_dir(cfg.text), device, length=m.text_len, dim=m.text_dim,
                          null_context=model.text_embed.null_context, what="this checkpoint")
    unknown, cut = encoder.prompt_problems(prompts)
    if unknown:
        raise ConfigError("words the text encoder does not know (they would become <unk>): "
                          + "; ".join(f"{p!r}: {', '.join(w)}" for p, w in unknown.items())
                          + f". Its vocabulary: {encoder.path}/vocab.json")
    for p in cut:
        print(f"warning: prompt longer than {encoder.length} tokens, cut: {p!r}", file=sys.stderr)
    return torch.cat([encoder.encode(prompts[i:i + 256]).cpu() for i in range(0, len(prompts), 256)])


def sample_to_folder(cfg: Config, checkpoint: str | None, weights: str, out: str | Path, labels: str | None = None,
                     prompts: list[str] = (), per_label: int = 1, images: bool = True, steps_grid: bool = False,
                     check_config: bool = True) -> dict:
    """Sample `per_label` images per label (or prompt) from `checkpoint` (a weights file; None: a
    random model, with a warning) into `out`; returns the sample.json record. check_config: the
    checkpoint's model must be the config's (False when no config was given)."""
    if checkpoint and Path(checkpoint).is_dir():
        model, source = _training_checkpoint(cfg, Path(checkpoint), weights, check_config)
        cfg.model = model.cfg
    elif checkpoint:
        mcfg, sd, meta = load_weights(checkpoint, weights)
        _check_model(cfg, mcfg, check_config)
        model = build_model(mcfg)
        load_state(model, sd, f"{checkpoint} [{weights}]")
        cfg.model = mcfg
        source = str(checkpoint)
    else:
        print("warning: no --checkpoint given: sampling from a randomly initialised model "
              f"(seed {cfg.seed}); the tokens are noise", file=sys.stderr)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        source = "random-init"
    model.eval()
    text = cfg.model.condition == "text"
    if text and (labels or not prompts):
        raise ConfigError("a text-conditioned model samples from prompts: give --prompts \"...\" or --prompts-file F"
                          + (" (--labels are class ids, for class-conditional models)" if labels else ""))
    if not text and (prompts or not labels):
        C = cfg.model.num_classes
        raise ConfigError(("--prompts need a text-conditioned model; this one " if prompts else "this model ")
                          + f"is class-conditional: give --labels, class ids in [0, {C}) (e.g. --labels 0,1,2)")
    if text:
        captions = [p for p in prompts for _ in range(per_label)]
        cond = text_condition(cfg, model, captions)
    else:
        cond = parse_labels(labels, cfg.model.num_classes).repeat_interleave(per_label)
    ids = generate_all(model, cond, cfg.sample, progress=sys.stderr.isatty())
    g = cfg.model.grid_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", ids.view(-1, g, g).numpy().astype(np.uint16))
    if text:
        (out / "prompts.json").write_text(json.dumps(captions, indent=1))
    else:
        np.save(out / "labels.npy", cond.numpy())
    record = {"source": source, "num_samples": int(ids.shape[0]), "model": dataclasses.asdict(cfg.model),
              "sample": dataclasses.asdict(cfg.sample)}
    if text:
        record["text_encoder"] = cfg.text.encoder
    tok_path = cfg.tokenizer.checkpoint
    if images and tok_path and Path(tok_path).is_file():
        tokenizer = load_tokenizer(cfg.tokenizer)
        decoded = tokenizer.decode(ids, batch_size=64)
        record["tokenizer"] = str(tok_path)
        if text:
            grid = save_captioned_grid(decoded, captions, out / "samples.png",
                                       ncol=per_label if per_label > 1 else None)
        else:
            grid = save_grid(decoded, out / "samples.png", nrow=per_label if per_label > 1 else None)
        print(f"wrote {grid}")
        if steps_grid:
            record["steps_grid"] = str(save_steps_grid(model, cond, cfg, tokenizer, ids, out / "steps.png"))
            print(f"wrote {record['steps_grid']}")
    elif images:
        print(f"no tokenizer at {tok_path}: token ids only (build it with `enat data prepare`)", file=sys.stderr)
    (out / "sample.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {ids.shape[0]} samples ({g}x{g} token ids, uint16) to {out / 'tokens.npy'}")
    return record


def _check_model(cfg: Config, found, check_config: bool) -> None:
    diff = model_differences(cfg.model, found) if check_config else []
    if diff:
        raise ConfigError("the checkpoint's model differs from the config's model section: " + "; ".join(diff))


def _training_checkpoint(cfg: Config, path: Path, weights: str, check_config: bool):
    """(model, its id) of a training checkpoint given by directory, loaded as `enat eval` loads it."""
    if TAG_RE.match(path.name) or (path / META).is_file():  # RUN/checkpoints/stepNNNNNNNN
        ckpt_dir, which = path.parent, path.name
    else:  # the run directory or its checkpoints/ folder: the checkpoint `latest` names
        ckpt_dir, which = ckpt_dir_of(path), LATEST
    if ckpt_dir.name != "checkpoints" or not ckpt_dir.is_dir():
        raise ConfigError(f"--checkpoint {path} is a directory but not a training checkpoint (a run directory, its "
                          f"checkpoints/ folder or one of its stepNNNNNNNN tags) nor a weights file: give one of "
                          f"those, or write a weights file with `enat export RUN OUT.pt`")
    ck = load_checkpoint(cfg, ckpt_dir.parent, which, weights, check=lambda _, found, __: _check_model(
        cfg, found, check_config))
    return ck["model"], ck["id"]


def save_steps_grid(model, cond, cfg, tokenizer, ids, path, rows: int = 8) -> Path:
    """The first `rows` samples decoded after every step (undecided tokens grey), one row per
    sample, one column per step: the progressive-decoding figure."""
    k = min(rows, len(cond))
    trace = []
    final = generate(model, cond[:k], cfg.sample, indices=torch.arange(k), trace=trace)
    if not torch.equal(final.cpu(), ids[:k]):  # the noise is per sample index: they must be the same
        raise RuntimeError("the traced samples differ from the sampled ones")
    steps = torch.stack([decode_partial(tokenizer, t.ids, cfg.model.mask_id) for t in trace], dim=1)
    return save_grid(steps.flatten(0, 1), path, nrow=len(trace))
