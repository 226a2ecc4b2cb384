"""Captions for the digits demo that say more than the class, and the measurements behind them.

Two attributes are measured from an image's pixels (grey = channel mean, values in [0, 1]):
- thickness, from the ink: the mean intensity (more and wider strokes, more ink);
- width, from the horizontal spread: the intensity-weighted standard deviation of the column
  coordinate (in [-1, 1] units, so independent of the resolution).
Both are horizontal-flip invariant, so a flipped training view keeps its image's captions.
Each is judged against the image's own class (a thick one is thick for a seven): below the
class's 1/3 quantile -> "thin" / "narrow", above its 2/3 quantile -> "thick" / "wide", nothing
said in the middle third. The per-class quantiles (`AttributeModel`) are fitted on the real
training split and saved, so a generated image is judged by the same rule; `default()` refits
them from the embedded training split, deterministically.

Every image gets K = 5 captions from fixed templates (no randomness):
"the digit 7", "a handwritten seven", "a thick handwritten seven" (or "a seven written by hand"),
"a wide seven" (or "the number seven"), "a wide seven drawn with thick strokes" (or what of it
applies). `caption_attributes` reads back what a caption asks for, so an evaluator can check a
generated image against its prompt (`attribute_agreement`). All words are in DEMO_WORDS.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enat.data.digits import load_digits
from enat.text import words_of

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# attribute -> (measurement, (word below the class's 1/3 quantile, word above its 2/3 quantile))
ATTRIBUTES = {"thickness": ("ink", ("thin", "thick")), "width": ("width", ("narrow", "wide"))}
DEMO_WORDS = tuple(sorted({
    *NAMES, *(str(d) for d in range(10)), "the", "digit", "a", "handwritten", "written", "by", "hand",
    "number", "drawn", "with", "strokes", *(w for _, words in ATTRIBUTES.values() for w in words)}))
CAPTIONS_PER_IMAGE = 5


def _grey(images) -> np.ndarray:
    """(n, 3, H, W) float in [0, 1] (numpy or torch) or (n, H, W, 3) uint8 -> (n, H, W) float64."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float64) / 255.0
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, H, W) in [0, 1] or (n, H, W, 3) uint8, got {x.shape}")
    return x.astype(np.float64).mean(1)


def digit_attributes(images) -> dict[str, np.ndarray]:
    """Per image: "ink" (mean intensity) and "width" (horizontal spread of the ink)."""
    g = _grey(images)
    n, _, w = g.shape
    xs = (np.arange(w) + 0.5) / w * 2 - 1  # column centres in [-1, 1]
    col = g.sum(1)  # (n, W) ink per column
    mass = np.maximum(col.sum(1), 1e-12)  # a blank image has no spread, not a NaN
    mx = (col * xs).sum(1) / mass
    width = np.sqrt((col * (xs[None] - mx[:, None]) ** 2).sum(1) / mass)
    return {"ink": g.mean((1, 2)), "width": width}


@dataclass
class AttributeModel:
    """Per-class thresholds: thresholds[attribute][c] = [1/3 quantile, 2/3 quantile] of the
    attribute's measurement over class c's training images."""

    thresholds: dict[str, list[list[float]]]

    @classmethod
    def fit(cls, images, labels) -> "AttributeModel":
        labels = np.asarray(labels)
        m = digit_attributes(images)
        out = {}
        for attr, (measure, _) in ATTRIBUTES.items():
            rows = []
            for c in range(len(NAMES)):
                v = m[measure][labels == c]
                if len(v) == 0:
                    raise ValueError(f"no images of class {c} to fit the {attr} thresholds on")
                rows.append([float(q) for q in np.quantile(v, [1 / 3, 2 / 3])])
            out[attr] = rows
        return cls(out)

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> "AttributeModel":
        """Fitted on the embedded digits training split (32 px): the same every time."""
        images, labels, _ = load_digits("train")
        return cls.fit(images, labels.numpy())

    def judge(self, images, labels) -> dict[str, np.ndarray]:
        """attribute -> per image the word that holds ("thin", "thick", ...) or "" (middle third),
        each image judged against the thresholds of its (intended) class `labels`."""
        labels = np.asarray(labels, dtype=np.int64)
        m = digit_attributes(images)
        out = {}
        for attr, (measure, (low_word, high_word)) in ATTRIBUTES.items():
            t = np.asarray(self.thresholds[attr])[labels]  # (n, 2)
            v = m[measure]
            word = np.full(len(v), "", dtype=object)
            word[v < t[:, 0]] = low_word
            word[v > t[:, 1]] = high_word
            out[attr] = word
        return out

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"kind": "digit-attributes", "thresholds": self.thresholds}, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "AttributeModel":
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "digit-attributes":
            raise ValueError(f"{path} is not a digit attribute model")
        return cls(data["thresholds"])


def captions_for(digit: int, thickness: str = "", width: str = "") -> list[str]:
    """The K = 5 captions of an image of `digit` with the given attribute words ("" = unsaid)."""
    name, t, w = NAMES[digit], thickness, width
    caps = [f"the digit {digit}", f"a handwritten {name}",
            f"a {t} handwritten {name}" if t else f"a {name} written by hand",
            f"a {w} {name}" if w else f"the number {name}"]
    if t:
        caps.append(f"a {w} {name} drawn with {t} strokes" if w else f"a {name} drawn with {t} strokes")
    else:
        caps.append(f"a {w} handwritten {name}" if w else f"a {name} drawn by hand")
    return caps


def digit_captions(images, labels, model: AttributeModel | None = None) -> list[list[str]]:
    """K = 5 captions per image, true of its pixels (judged with `model`, default: the
    thresholds of the embedded training split)."""
    labels = np.asarray(labels, dtype=np.int64)
    judged = (model or AttributeModel.default()).judge(images, labels)
    return [captions_for(int(d), judged["thickness"][i], judged["width"][i]) for i, d in enumerate(labels)]


_WORD_TO_DIGIT = {**{n: d for d, n in enumerate(NAMES)}, **{str(d): d for d in range(10)}}


def caption_attributes(caption: str) -> dict:
    """What a caption asks for: {"digit": 7, "thickness": "thick", "width": "wide"}, with only the
    attributes it names ("digit" is None when it names none)."""
    words = words_of(caption)
    out: dict = {"digit": next((_WORD_TO_DIGIT[w] for w in words if w in _WORD_TO_DIGIT), None)}
    for attr, (_, pair) in ATTRIBUTES.items():
        said = [w for w in words if w in pair]
        if said:
            out[attr] = said[0]
    return out


def attribute_agreement(images, captions: list[str], model: AttributeModel | None = None) -> dict:
    """For generated images and their prompts: per attribute, the fraction of the images whose
    prompt names it that show it (judged against the prompt's digit), and how many were asked."""
    asked = [caption_attributes(c) for c in captions]
    if any(a["digit"] is None for a in asked):
        raise ValueError("every caption must name its digit to judge its attributes")
    judged = (model or AttributeModel.default()).judge(images, [a["digit"] for a in asked])
    out = {}
    for attr in ATTRIBUTES:
        rows = [i for i, a in enumerate(asked) if attr in a]
        hits = sum(judged[attr][i] == asked[i][attr] for i in rows)
        out[attr] = hits / len(rows) if rows else float("nan")
        out[f"{attr}_n"] = len(rows)
    return out
