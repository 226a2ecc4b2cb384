"""The regime gate: is a sweep's validation loss worth fitting a law to?

A scaling law fitted on runs that do not beat a frequency table, or that ignore the visible
tokens, describes optimisation progress, not capacity. So before the report states a law it checks
two things on each run's final validation point:

- the loss is below that of the per-position frequency table fitted on the training tokens (the
  best predictor that knows where a token is but looks at no other token);
- the model uses context: its loss with half the tokens masked (ratio 0.5) is clearly below its
  loss with 90 % masked. A predictor that ignores the visible tokens scores the same at any ratio.

The trainer's `val/loss_r<ratio>` is the mean cross-entropy (nats) of the true token at the masked
positions. A frequency table's prediction does not depend on what is masked, so its loss is the
mean over all validation tokens, comparable with every ratio.

    frequency_baselines(train_tokens, train_labels, val_tokens, val_labels, V)  arrays -> nats
    sweep_baselines(cfg)                 the same, on cfg.data.shards / cfg.data.val_shards
    regime_gate(final_points, baselines, loss_key) -> {"passed", "reasons", "per_run", ...}
    gate_markdown(gate)                  the report's "## Regime gate" section
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from enat.data.loader import ShardSet
from enat.data.shards import ShardError
from scaling.collect import ScalingError

CHUNK = 1 << 22  # tokens per bincount pass: bounds the int64 key arrays (32 MiB)
BASELINE_ROWS = (("uniform", "uniform (log V)"), ("unigram", "unigram"), ("per_position", "per position"),
                 ("per_class_position", "per class (and position)"))


# --- frequency tables ---------------------------------------------------------------------------


def _pair_counts(train: np.ndarray, val: np.ndarray, vocab_size: int) -> np.ndarray:
    """For each validation token, how often its (position, code) pair occurs in training -> (m, N).

    Dense bincount over the N x V pairs when the training set is large enough to fill them (in
    chunks of rows, so the keys stay small); else sort the few training pairs and look them up, so
    a small class never costs an N x V array (N = 1024, V = 16384: 16.7 M cells)."""
    n, N = train.shape
    offsets = np.arange(N, dtype=np.int64) * vocab_size
    val_keys = offsets + val  # (m, N) int64
    if train.size >= N * vocab_size // 8:
        counts = np.zeros(N * vocab_size, dtype=np.int64)
        step = max(1, CHUNK // N)
        for i in range(0, n, step):
            counts += np.bincount((offsets + train[i:i + step]).ravel(), minlength=N * vocab_size)
        return counts[val_keys]
    keys = np.sort((offsets + train).ravel())
    return np.searchsorted(keys, val_keys, "right") - np.searchsorted(keys, val_keys, "left")


def _table_nll(train: np.ndarray, val: np.ndarray, vocab_size: int, smoothing: float) -> float:
    """Summed cross-entropy (nats) of `val` under per-position tables fitted on `train`.

    Every training row fills every position once, so each position's table holds n = len(train)
    tokens: p(code | position) = (count + s) / (n + s V)."""
    counts = _pair_counts(train, val, vocab_size)
    return float(val.size * math.log(len(train) + smoothing * vocab_size) - np.log(counts + smoothing).sum())


def _check(tokens: np.ndarray, labels: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not len(tokens):
        raise ScalingError(f"{what} tokens: expected a non-empty (rows, N) array, got shape {tokens.shape}")
    if len(labels) != len(tokens):
        raise ScalingError(f"{what}: {len(labels)} labels for {len(tokens)} token rows")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ScalingError(f"{what} tokens span [{tokens.min()}, {tokens.max()}], outside the codebook [0, "
                           f"{vocab_size}): wrong model.codebook_size for these shards?")
    return tokens


def frequency_baselines(train_tokens, train_labels, val_tokens, val_labels, vocab_size: int,
                        smoothing: float = 1.0) -> dict:
    """Cross-entropy (nats per validation token) of frequency tables fitted on the training tokens.

    The losses a model must beat before its loss says anything about capacity:
    "uniform" log V (knows nothing), "unigram" (the code mix), "per_position" (one table per
    position), "per_class_position" (one per class and position: all a class-conditional model can
    learn without looking at other tokens). Additive smoothing `s` (Laplace at 1) keeps codes unseen
    in training finite; a class absent from training falls back to the uniform table. Each value
    is the mean over every validation token, as a table's loss does not depend on the mask."""
    if smoothing <= 0:
        raise ScalingError(f"smoothing must be > 0 (got {smoothing}): without it a code unseen in training has "
                           f"probability 0 and the loss is infinite")
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    train = _check(train_tokens, train_labels, vocab_size, "training")
    val = _check(val_tokens, val_labels, vocab_size, "validation")
    if train.shape[1] != val.shape[1]:
        raise ScalingError(f"training rows hold {train.shape[1]} tokens, validation rows {val.shape[1]}")
    s, V = smoothing, vocab_size

    unigram = np.bincount(train.ravel(), minlength=V)
    uni_nll = val.size * math.log(train.size + s * V) - np.log(unigram[val] + s).sum()

    # Class by class: one class's (N, V) table at a time, never (classes, N, V).
    order = np.argsort(train_labels, kind="stable")
    classes, starts = np.unique(train_labels[order], return_index=True)
    bounds = dict(zip(classes.tolist(), zip(starts.tolist(), [*starts[1:].tolist(), len(order)])))
    class_nll = 0.0
    for c in np.unique(val_labels).tolist():
        lo, hi = bounds.get(c, (0, 0))
        class_nll += _table_nll(train[order[lo:hi]], val[val_labels == c], V, s)

    return {"uniform": math.log(V), "unigram": float(uni_nll) / val.size,
            "per_position": _table_nll(train, val, V, s) / val.size,
            "per_class_position": class_nll / val.size, "smoothing": s, "vocab_size": V}


def _read(path, what: str):
    if not path or not Path(path).is_dir():
        fix = ("tokenize the split (`enat tokenize`) or point it at the token shards"
               if what == "data.val_shards" else "point it at the token shards of the training split")
        raise ScalingError(f"{what} = {path!r} is not a directory: the regime gate fits frequency tables on "
                           f"data.shards and scores them on data.val_shards; {fix}")
    try:
        return ShardSet(path, strict=False, log=lambda *_: None)
    except ShardError as e:
        raise ScalingError(f"{what}: {e}") from e


def _all_tokens(shards) -> np.ndarray:
    """Every row's tokens as uint16 (2 bytes a token: ImageNet at 16x16 is 0.7 GB), read in chunks."""
    rows = np.arange(len(shards))
    out = np.empty((len(rows), shards.seq_len), dtype=np.uint16)
    for i in range(0, len(rows), 8192):
        out[i:i + 8192] = shards.tokens(rows[i:i + 8192])
    return out


def sweep_baselines(cfg) -> dict:
    """frequency_baselines of a sweep's data: fitted on cfg.data.shards, scored on cfg.data.val_shards
    (the split the trainer's validation loss is measured on), with V = cfg.model.codebook_size."""
    train, val = _read(cfg.data.shards, "data.shards"), _read(cfg.data.val_shards, "data.val_shards")
    V = cfg.model.codebook_size
    for what, sh in (("data.shards", train), ("data.val_shards", val)):
        if sh.manifest.codebook_size != V:
            raise ScalingError(f"{what} = {sh.dir} holds codes of a {sh.manifest.codebook_size}-code tokenizer, "
                               f"model.codebook_size is {V}: use the sweep's config")
        if not len(sh):
            raise ScalingError(f"{what} = {sh.dir} holds no readable samples")
    out = frequency_baselines(_all_tokens(train), train.label, _all_tokens(val), val.label, V)
    out.update(train_tokens=len(train) * train.seq_len, val_tokens=len(val) * val.seq_len,
               shards=str(cfg.data.shards), val_shards=str(cfg.data.val_shards))
    return out


# --- the gate -----------------------------------------------------------------------------------


def _key(k: str) -> str:
    return k.replace("/", "_")


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _one_per_run(points: list[dict]) -> list[dict]:
    """One row per run, in order of first appearance: its final (else latest) validation point."""
    best: dict = {}
    for p in points:
        rank = (bool(p.get("final", True)), p.get("step", 0))
        if p["run"] not in best or rank >= best[p["run"]][0]:
            best[p["run"]] = (rank, p)
    return [p for _, p in best.values()]


def _listing(items: list[str], most: int = 8) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def regime_gate(final_points: list[dict], baselines: dict, loss_key: str,
                context_keys=("val_loss_r0.5", "val_loss_r0.9"), margin: float = 0.02) -> dict:
    """Whether the runs are in the regime where a scaling law measures capacity.

    (a) every run's `loss_key` is below the per-position frequency table: otherwise the model has
    learned no more than token statistics. (b) every run uses context: l(0.5) < (1 - margin) l(0.9);
    a model that ignores the visible tokens has the same loss at any mask ratio. A run missing a
    key fails, by name. -> {"passed", "reasons" (sentences), "per_run", "baselines", "margin"}."""
    key, (k05, k09) = _key(loss_key), (_key(k) for k in context_keys)
    if "per_position" not in baselines:
        raise ScalingError("the baselines hold no per_position loss: compute them with sweep_baselines(cfg)")
    base = baselines["per_position"]
    rows = _one_per_run(final_points)
    if not rows:
        return {"passed": False, "reasons": ["There are no runs to check, so there is nothing to fit a law to."],
                "per_run": [], "baselines": baselines, "margin": margin}
    per_run, no_loss, above, missing, flat = [], [], [], [], []
    for p in rows:
        name, loss, l05, l09 = p["run"], p.get(key), p.get(k05), p.get(k09)
        beats = bool(_finite(loss) and loss < base)
        if not _finite(loss):
            no_loss.append(f"{name} ({'missing' if loss is None else loss})")
        elif not beats:
            above.append(f"{name} {loss:.3f}")
        lacks = [k for k, v in ((k05, l05), (k09, l09)) if not _finite(v)]
        uses = bool(not lacks and l05 < (1 - margin) * l09)
        if lacks:
            missing.append(f"{name} (no {' or '.join(lacks)})")
        elif not uses:
            flat.append(f"{name} {l05:.3f} vs {l09:.3f}")
        per_run.append({"run": name, "loss": loss, "beats_per_position": beats, "l05": l05, "l09": l09,
                        "uses_context": uses})

    n, reasons = len(rows), []
    r05, r09 = (k.rsplit("_r", 1)[-1] for k in (k05, k09))
    if no_loss:
        reasons.append(f"{len(no_loss)} of {n} runs have no finite {key} at their final validation point: "
                       f"{_listing(no_loss)} — choose a loss the runs log (--loss) or fix the runs.")
    if above:
        reasons.append(f"{len(above)} of {n} runs do not beat the per-position frequency table ({base:.3f} nats): "
                       f"{_listing(above)} — the models have not learned more than token statistics; train longer "
                       f"or with a better learning rate before fitting a law.")
    if flat:
        reasons.append(f"{len(flat)} of {n} runs do not use context: their loss at mask ratio {r05} is not more than "
                       f"{margin:.0%} below that at {r09} ({_listing(flat)}) — they predict each token without "
                       f"looking at the visible ones, so their loss measures token statistics, not capacity; "
                       f"train longer or with a better learning rate before fitting a law.")
    if missing:
        reasons.append(f"{len(missing)} of {n} runs cannot be checked for the use of context: {_listing(missing)} — "
                       f"train.val_mask_ratios must include {r05} and {r09}; set it and re-run their validation.")
    return {"passed": not reasons, "reasons": reasons, "per_run": per_run, "baselines": baselines, "margin": margin}


def _nats(x) -> str:
    return f"{x:.3f}" if _finite(x) else ("missing" if x is None else str(x))


def gate_markdown(gate: dict) -> list[str]:
    """The report's "## Regime gate" section: the baselines, the per-run checks and the verdict."""
    b, m = gate["baselines"], gate["margin"]
    lines = ["## Regime gate", "",
             "A law is fitted only on runs that beat the per-position frequency table and use context (loss at "
             f"mask ratio 0.5 more than {m:.0%} below that at 0.9). Frequency tables are fitted on the training "
             "tokens (additive smoothing"
             + (f" {b['smoothing']:g}" if "smoothing" in b else "") + ") and scored on every validation token.", "",
             "| baseline | nats per token |", "|---|---|"]
    lines += [f"| {label} | {_nats(b.get(k))} |" for k, label in BASELINE_ROWS if k in b]
    lines += ["", "| run | loss | beats per-position | loss at 0.5 | loss at 0.9 | uses context |",
              "|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "**no**"}
    lines += [f"| {r['run']} | {_nats(r['loss'])} | {yes[r['beats_per_position']]} | {_nats(r['l05'])} | "
              f"{_nats(r['l09'])} | {yes[r['uses_context']]} |" for r in gate["per_run"]]
    lines.append("")
    if gate["passed"]:
        lines.append(f"Passed: all {len(gate['per_run'])} runs beat the per-position frequency table and use "
                     f"context, so a law fitted to them measures capacity rather than optimisation progress.")
    else:
        lines += ["Failed: the report states no law.", ""] + [f"- {r}" for r in gate["reasons"]]
    return lines
