"""Which validation points a law is fitted to, and the names of their loss column: the floor that
scaling/holdout.py (the pre-registration, leave-one-out) and scaling/report.py both stand on.

    loss_column("val/loss_r0.7") -> "val_loss_r0.7"   the metric's column in collect.py's rows
    loss_name("val_loss_r0.7") -> "val/loss_r0.7"     and back
    choose_points(rows, "auto")                       every logged point, or each run's last
    fitting_points(sweep, loss)                       a sweep's collection and the points fitted
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling.collect import ScalingError, collect


def loss_column(loss: str) -> str:
    """A validation metric's column in collect.py's rows: val/loss_r0.7 -> val_loss_r0.7."""
    return loss.replace("/", "_")


def loss_name(key: str) -> str:
    """points' key -> the metric's name: val_loss_r0.7 -> val/loss_r0.7, val_ema_loss_r0.7 -> val_ema/loss_r0.7."""
    return key.replace("_loss", "/loss", 1)


def weights_of(key: str) -> str:
    """Which weights a validation loss is of: "ema" (val_ema/) or "online" (val/)."""
    return "ema" if key.startswith("val_ema_") else "online"


def choose_points(rows: list[dict], which: str) -> tuple[list[dict], str]:
    """Which validation points are measurements of L(N, D). Along a constant-LR run every point is
    (the loss after D samples does not depend on the planned length); under a decaying schedule
    only a run's final point is what its budget reaches, the earlier ones are biased high."""
    if which == "auto":
        which = "final" if any(r["schedule"] != "constant" for r in rows) else "all"
    if which == "final":
        return [r for r in rows if r["final"]], "each run's final validation loss (decaying LR schedules)"
    return rows, "validation loss at every logged step (constant LR after warm-up)"


def fitting_points(sweep: str | Path, loss_key: str, points: str = "auto"):
    """The fitting sweep's collection and the points the report fits: (collection, points, which)."""
    col = collect(sweep)
    if not col.runs:
        raise ScalingError(f"no finished runs in the fitting sweep {sweep}: "
                           + "; ".join(f"{e['run']}: {e['reason']}" for e in col.excluded))
    key = loss_column(loss_key)
    rows, which = choose_points(col.rows, points)
    pts = [p for p in rows if p.get(key) is not None and np.isfinite(p[key]) and p[key] > 0]
    if not pts:
        have = sorted({k for p in col.rows for k in p if k.startswith("val")})
        raise ScalingError(f"no {loss_key} in the fitting sweep's validation records; have {have or 'none'}")
    return col, pts, which
