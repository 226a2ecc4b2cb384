"""The frozen text encoder of text-conditioned models, loaded by local path only.

A text encoder directory is one of two kinds:

- a CLIP text encoder as transformers' `save_pretrained` writes it: `config.json` + weights of a
  `CLIPTextModel` (a full `CLIPModel` directory works too) and its tokenizer files in the same
  folder. Captions are padded/truncated to the model's 77 positions (padding="max_length", no
  attention mask) and encoded to `last_hidden_state` (77 x 768 for ViT-L/14), as U-ViT does.
- the demo encoder (`build_demo_text_encoder`; a config asks for it by `text.encoder: demo`, built
  by `enat data prepare` in `text.demo_dir`): a tiny randomly initialised, frozen
  `CLIPTextModel` built from a `CLIPTextConfig` (no download) and a word tokenizer
  (`vocab.json`: lower-case words -> ids, with <pad>, <unk>, <bos>, <eos>), marked by the file
  `enat_text_encoder.json` {"kind": "words", ...}. A caption is <bos> words <eos> <pad>...

Nothing here reaches the network: a path that is not an existing directory (for example a hub
name such as "openai/clip-vit-large-patch14") fails at once, and transformers is called with
`local_files_only=True` under HF_HUB_OFFLINE=1. To use a hub model, download it once on a
machine with access (`CLIPTextModel.from_pretrained(name).save_pretrained(DIR)` and the same for
`CLIPTokenizer`), copy DIR over, and set `text.encoder=DIR`.

`clip_score` (optional evaluation): 100 x max(cos(image, caption), 0), averaged, with a local
`CLIPModel` directory (tokenizer of either kind beside it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from enat.files import file_sha256
from enat.torchvision_guard import import_guarded

MARKER = "enat_text_encoder.json"
VOCAB = "vocab.json"
# <eos> is id 3, not 2: transformers' CLIP pooling treats eos_token_id == 2 as "take the
# largest id" (a legacy rule), which would pool the wrong position of a word caption.
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# OpenAI CLIP's image normalisation, used when the directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TextEncoderError(ValueError):
    """A text encoder (or CLIP model) directory that is missing, not local, or unreadable."""


DEMO = "demo"  # text.encoder: demo -> the demo's word encoder in text.demo_dir


def encoder_dir(text) -> str | None:
    """The directory a config's text section (`TextConfig`) loads its encoder from: text.demo_dir
    for `demo` (refused until `enat data prepare` has built it there), else text.encoder itself."""
    if text.encoder != DEMO:
        return text.encoder
    if not (Path(text.demo_dir) / "config.json").is_file():
        raise TextEncoderError(f"the demo text encoder (text.encoder: demo) is not built in {text.demo_dir}: "
                               f"`enat data prepare --config CONFIG` builds it")
    return text.demo_dir


def _transformers():
    """transformers, importable on a CPU-only torch: its CLIP classes pull in torchvision, whose
    missing op schemas the guard defines first. Imported here, not at the top: an optional
    dependency (enat[text]) and seconds of start-up."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only is passed everywhere too
    import_guarded("torchvision")
    import transformers

    transformers.logging.set_verbosity_error()  # tiny demo configs trip harmless config warnings
    transformers.logging.disable_progress_bar()  # no bars in logs for a few-MB save or load
    return transformers


def local_model_dir(path, what: str = "text encoder", key: str = "text.encoder") -> Path:
    """`path` as an existing local save_pretrained directory, or a TextEncoderError naming the
    problem and the fix (never a network look-up)."""
    fix = (f"this project loads models by local path only: download it once where the hub is reachable "
           f"(`CLIPTextModel.from_pretrained(NAME).save_pretrained(DIR)`, and the tokenizer likewise), "
           f"copy DIR here and set {key}=DIR")
    if path is None or str(path) == "":
        raise TextEncoderError(f"no {what} given ({key} is not set); {fix}")
    p = Path(path).expanduser()
    if not p.is_dir():
        looks_hub = not p.is_absolute() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None
        kind = "looks like a Hugging Face hub name, not a local directory" if looks_hub else "is not a directory"
        raise TextEncoderError(f"{what} {str(path)!r} {kind}; {fix}")
    if not (p / "config.json").is_file():
        raise TextEncoderError(f"{what} directory {p} has no config.json (not a save_pretrained output); {fix}")
    return p


def words_of(text: str) -> list[str]:
    """The demo tokenizer's split: lower-case runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


class WordTokenizer:
    """Captions -> (B, length) ids: <bos> words <eos>, then <pad>; unknown words -> <unk>;
    words beyond length - 2 are cut (the <eos> stays)."""

    def __init__(self, vocab: dict[str, int], length: int):
        if length < 2:
            raise ValueError(f"a caption needs at least 2 positions (<bos>, <eos>), got {length}")
        self.vocab, self.length = vocab, length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.length), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [BOS] + [self.vocab.get(w, UNK) for w in words_of(t)][: self.length - 2] + [EOS]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def mask(self, texts: list[str]) -> torch.Tensor:
        return (self(texts) != PAD).long()


class _HFTokenizer:
    """A saved transformers tokenizer, padded to max_length (CLIP: 77) and truncated."""

    def __init__(self, hf, length: int):
        self.hf, self.length = hf, length

    def _run(self, texts):
        return self.hf(list(texts), padding="max_length", max_length=self.length, truncation=True,
                       return_tensors="pt")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self._run(texts).input_ids

    def mask(self, texts: list[str]) -> torch.Tensor:
        return self._run(texts).attention_mask


def _load_tokenizer(d: Path, length: int | None = None):
    """The tokenizer saved in directory d (either kind), padding to `length` (default: its own)."""
    marker = d / MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("kind") != "words":
            raise TextEncoderError(f"{marker}: unknown encoder kind {meta.get('kind')!r} (expected 'words')")
        try:
            vocab = json.loads((d / VOCAB).read_text())
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"{d / VOCAB}: unreadable word vocabulary ({e})") from None
        return WordTokenizer(vocab, int(length or meta["length"]))
    tf = _transformers()
    try:
        hf = tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # no or broken tokenizer files: say which directory
        raise TextEncoderError(f"{d}: cannot load the tokenizer saved beside the model "
                               f"({type(e).__name__}: {e}); save it there with save_pretrained") from None
    return _HFTokenizer(hf, int(length or min(hf.model_max_length, 77)))


def _weights_file(d: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    return None


class TextEncoder:
    """Captions -> (B, L, C) float32 hidden states of a frozen encoder (eval mode, no grad)."""

    def __init__(self, model, tokenize, length: int, kind: str, path: Path):
        self.model = model.eval().requires_grad_(False)
        self._tokenize = tokenize
        self.length = length
        self.dim = int(model.config.hidden_size)
        self.kind = kind
        self.path = path
        self._sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, L) int64 ids (CPU)."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of captions, got one string")
        return self._tokenize(list(texts)).long()

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, C) float32 last_hidden_state, on the encoder's device."""
        if ids.ndim != 2 or ids.shape[1] != self.length:
            raise ValueError(f"ids must be (B, {self.length}), got {tuple(ids.shape)}")
        out = self.model(input_ids=ids.to(self.device, torch.long)).last_hidden_state
        return out.float()

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))

    def prompt_problems(self, texts: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        """What encoding would silently lose: ({prompt: words the demo vocabulary lacks (they
        become <unk>)}, [prompts longer than L tokens (cut)])."""
        unknown, cut = {}, []
        for t in texts:
            if isinstance(self._tokenize, WordTokenizer):
                words = words_of(t)
                missing = [w for w in words if w not in self._tokenize.vocab]
                if missing:
                    unknown[t] = missing
                n = len(words) + 2
            else:
                n = len(self._tokenize.hf(t, truncation=False).input_ids)
            if n > self.length:
                cut.append(t)
        return unknown, cut

    def sha256(self) -> str:
        if self._sha256 is None:
            w = _weights_file(self.path)
            self._sha256 = file_sha256(w) if w is not None else ""
        return self._sha256

    def describe(self) -> dict:
        """What a manifest records: path, weights checksum, kind, config, L, C."""
        config = {k: v for k, v in self.model.config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version")}
        return {"path": str(self.path), "sha256": self.sha256(), "kind": self.kind, "config": config,
                "length": self.length, "dim": self.dim}


def load_text_encoder(path, device="cpu") -> TextEncoder:
    """A text encoder from a local directory (either kind, see the module docstring)."""
    d = local_model_dir(path)
    tf = _transformers()
    tokenizer = _load_tokenizer(d)
    length = tokenizer.length
    kind = "words" if (d / MARKER).is_file() else "clip"
    try:
        model = tf.CLIPTextModel.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # corrupt weights, another architecture: name the directory
        raise TextEncoderError(f"{d}: cannot load a CLIPTextModel ({type(e).__name__}: {e})") from None
    max_pos = int(model.config.max_position_embeddings)
    if length > max_pos:
        raise TextEncoderError(f"{d}: the tokenizer pads to {length} tokens but the model has {max_pos} positions")
    return TextEncoder(model, tokenizer, length, kind, d).to(device)


def null_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Whether two null contexts (encodings of '') are the same encoder's, and their largest
    difference. Stored in fp16 (and bf16 in a bf16 engine's copy), so within 1e-2 of the scale."""
    gap = float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())
    return gap <= 1e-2 * max(1.0, float(b.detach().float().abs().max())), gap


def encoder_for(path, device="cpu", *, length: int | None = None, dim: int | None = None,
                sha256: str | None = None, null_context: torch.Tensor | None = None,
                what: str = "the model") -> TextEncoder:
    """The text encoder at `path`, checked to be the expected one: contexts of length x dim,
    the weights checksum a shard manifest recorded, and an encoding of '' equal to
    `null_context` (a model's or the shards'): an encoder with the same shapes but other weights
    would otherwise condition on contexts the model never saw, silently."""
    enc = load_text_encoder(path, device)
    if (length, dim) != (None, None) and (enc.length, enc.dim) != (length, dim):
        raise TextEncoderError(f"the text encoder {path} gives {enc.length} x {enc.dim} contexts but {what} expects "
                               f"model.text_len {length} x model.text_dim {dim}; make them agree")
    if sha256 and enc.sha256() and enc.sha256() != sha256:
        raise TextEncoderError(f"text encoder {path} is not the one {what} was made with (weights sha256 "
                               f"{enc.sha256()[:12]} vs {sha256[:12]} recorded)")
    if null_context is not None:
        if not bool(null_context.detach().float().abs().sum()):
            raise TextEncoderError(f"{what} has no null context (all zeros): it never saw caption shards "
                                   f"(a randomly initialised model?); train it, or load a trained checkpoint")
        ok, gap = null_gap(enc.encode([""])[0], null_context)
        if not ok:
            raise TextEncoderError(f"text encoder {path} is not the encoder {what} was trained with: its encoding of "
                                   f"'' differs from the null context by up to {gap:.3g}")
    return enc


def _heads_for(dim: int) -> int:
    return next(h for h in (8, 4, 2, 1) if dim % h == 0 and (dim // h >= 8 or h == 1))


def build_demo_text_encoder(out_dir, words: list[str], length: int, dim: int, seed: int = 0,
                            layers: int = 2, heads: int | None = None) -> TextEncoder:
    """Write the demo encoder directory: a tiny random frozen CLIPTextModel (seeded, so the
    same arguments give the same weights) + the word vocabulary. Built in a temporary folder and
    renamed, so a crash never leaves a half directory that looks complete. Returns the encoder
    as built (in memory; `load_text_encoder(out_dir)` gives an equal one)."""
    tf = _transformers()
    out = Path(out_dir)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in sorted({w for word in words for w in words_of(word)}):
        vocab.setdefault(w, len(vocab))
    heads = heads or _heads_for(dim)
    config = tf.CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=4 * dim,
                               projection_dim=dim, num_hidden_layers=layers, num_attention_heads=heads,
                               max_position_embeddings=length, pad_token_id=PAD, bos_token_id=BOS,
                               eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stream is left as it was
        torch.manual_seed(seed)
        model = tf.CLIPTextModel(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    (tmp / VOCAB).write_text(json.dumps(vocab, indent=0))
    (tmp / MARKER).write_text(json.dumps({"kind": "words", "length": length, "dim": dim, "seed": seed,
                                          "layers": layers, "heads": heads, "vocab_size": len(vocab)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return TextEncoder(model, WordTokenizer(vocab, length), length, "words", out)


# ---------------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------------


def _images_for_clip(images, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> normalised (B, 3, size, size):
    short side resized to size (bicubic, antialiased), centre crop."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0 if x.shape[-1] == 3 else x.float() / 255.0
    x = x.float()
    if x.shape[1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8 or (B, 3, H, W) float, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                                        align_corners=False, antialias=True).clamp_(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def clip_score(images, captions: list[str], clip_dir, device="cpu", batch_size: int = 64) -> float:
    """Mean over pairs of 100 * max(cos(image_i, caption_i), 0), with a local CLIPModel."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    d = local_model_dir(clip_dir, what="CLIP model", key="the CLIP directory")
    tf = _transformers()
    try:
        model = tf.CLIPModel.from_pretrained(str(d), local_files_only=True).eval().to(device)
    except Exception as e:
        raise TextEncoderError(f"{d}: cannot load a CLIPModel ({type(e).__name__}: {e})") from None
    tokenizer = _load_tokenizer(d, int(model.config.text_config.max_position_embeddings)
                                if (d / MARKER).is_file() else None)
    mean, std = CLIP_MEAN, CLIP_STD
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    size = int(model.config.vision_config.image_size)
    scores = []
    for a in range(0, len(captions), batch_size):
        texts = list(captions[a:a + batch_size])
        ids, mask = tokenizer(texts), tokenizer.mask(texts)
        t = model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))
        pixels = _images_for_clip(images[a:a + batch_size], size, mean, std).to(device)
        v = model.get_image_features(pixel_values=pixels)
        # transformers 5 returns an output object whose pooler_output is the projected embedding
        t, v = (getattr(x, "pooler_output", x) for x in (t, v))
        cos = torch.nn.functional.cosine_similarity(t.float(), v.float(), dim=-1)
        scores.append(100 * cos.clamp(min=0))
    return float(torch.cat(scores).mean()) if scores else float("nan")
