"""Metrics: `metrics.jsonl` in the run directory is the source of truth (one JSON object per log
interval, the scaling scripts read it); wandb mirrors it (offline by default). The wandb run id
is created once, stored in the run directory and in every checkpoint, so a resumed or requeued
run continues the same wandb run."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import resource
import threading
import time
import uuid
from pathlib import Path

import torch

from enat.train.checkpoint import NO_SPACE, write_atomic

# Dense bf16 peak TFLOP/s per GPU, for MFU. Override with train.peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def run_id(run_dir: Path) -> str:
    """The run's wandb id: read from the run directory, or created there once."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    write_atomic(path, rid)  # a run killed here leaves no empty id behind
    return rid


class MetricsWriter:
    """Rank 0 only; other ranks get a writer that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, rid: str | None = None, config: dict | None = None,
                 name: str = "metrics.jsonl", fence=None):
        self.enabled = enabled
        self.fence = fence  # () -> truthy once this process may no longer write the run directory
        self.path = run_dir / name
        self.wandb = None
        # wandb's import and init take about 2 s of CPU (it starts a service process), a third of
        # the demo's start-up. They wait for start(), which the trainer calls once its first step
        # is done (on a busy CPU even a thread of its own slows that step), and then run in a
        # thread beside the training; the first record handed to wandb waits for them
        # (metrics.jsonl never does).
        self._wandb_args = None  # wandb.init's arguments until start()
        self._starting = None
        self._start_error = None
        self._axes = []  # define_axis calls made before wandb was up
        self._pending: list[str] = []  # lines not yet appended (a full disk)
        if enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb_args = dict(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                                    tags=wandb_cfg.tags or None, id=rid, resume="allow", dir=str(run_dir),
                                    mode=wandb_cfg.mode, config=config, name=run_dir.name)

    def start(self) -> None:
        """Start wandb in a background thread (once; nothing without wandb)."""
        if self._wandb_args is not None:
            args, self._wandb_args = self._wandb_args, None
            self._starting = threading.Thread(target=self._start_wandb, args=(args,), name="wandb-init", daemon=True)
            self._starting.start()

    def _start_wandb(self, kwargs: dict) -> None:
        try:
            import wandb  # wandb: slow to import, only when logging to it

            self.wandb = wandb.init(**kwargs)
        except BaseException as e:  # raised where the run is waited for (_run), not lost in the thread
            self._start_error = e

    def _run(self):
        """The wandb run (None without wandb), once its start in the background is done."""
        self.start()  # a no-op unless nothing started it yet
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._start_error is not None:
                raise self._start_error
            for axis, metrics, also in self._axes:
                self.define_axis(axis, metrics, also)
        return self.wandb

    def define_axis(self, axis: str, metrics: list[str], also: list[str] = ()) -> None:
        """Declare `axis` (and `also`, other cumulative counters) as wandb metrics and make `axis`
        the default x-axis of `metrics` (names or globs), so the UI plots them against it. Every
        record that logs one of `metrics` must carry `axis`."""
        if self._wandb_args is not None or self._starting is not None:
            self._axes.append((axis, metrics, also))  # applied once wandb is up (_run)
            return
        if self.wandb is None:
            return
        for name in (axis, *also):
            self.wandb.define_metric(name)
        for pattern in metrics:
            self.wandb.define_metric(pattern, step_metric=axis)

    def truncate_after(self, step: int) -> int:
        """Drop lines of steps after `step` (written after the checkpoint a run resumes from), so
        every step appears exactly once, and lines cut short by a killed process. Returns how many
        were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0

        def step_of(line: str) -> float:
            try:
                return json.loads(line).get("step", 0)
            except ValueError:
                return float("inf")  # torn by a kill mid-write

        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)
        return len(lines) - len(keep)

    def log(self, record: dict, images: dict | None = None) -> None:
        if not self.enabled or (self.fence is not None and self.fence()):
            return
        self._pending.append(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        end = None
        try:
            with open(self.path, "a") as f:
                end = f.tell()
                f.write("".join(self._pending))
            self._pending.clear()
        except OSError as e:
            if end is not None:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, end)  # no torn line for the next append to run into
            if e.errno not in NO_SPACE:
                raise
            # a full disk or a quota: the lines wait here and go out with the next line that fits
            # (a save failing on the same disk stops or retries the run: train.on_save_error)
            if len(self._pending) == 1 or len(self._pending) % 100 == 0:
                print(f"warning: cannot append to {self.path} ({e.strerror or e}): {len(self._pending)} lines "
                      f"held in memory until it can", file=sys.stderr, flush=True)
        if self._run() is not None:
            data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if images:
                import wandb  # wandb: loaded by __init__ already (self.wandb is set); not at module top, see there

                data.update({k: wandb.Image(str(v)) for k, v in images.items()})
            self._wandb_call(self.wandb.log, data, step=record["step"])

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        """A call into wandb that must not end the run: its service process dies with the job's
        SIGTERM (SLURM signals every process of a job step, at a time limit or a preemption) while
        the trainer is still writing its checkpoint. metrics.jsonl keeps every record; the wandb
        run goes on at the requeue (same id)."""
        try:
            fn(*args, **kwargs)
        except Exception as e:  # wandb raises a variety (ConnectionResetError, its own errors)
            print(f"warning: wandb stopped answering ({type(e).__name__}: {e}); logging to {self.path} only "
                  f"from here on", file=sys.stderr, flush=True)
            self.wandb = None

    def finish(self) -> None:
        if self._pending:  # lines held back by a full disk: a last try
            try:
                with open(self.path, "a") as f:
                    f.write("".join(self._pending))
                self._pending.clear()
            except OSError as e:
                print(f"warning: {len(self._pending)} lines could not be appended to {self.path} ({e.strerror or e}); "
                      f"the last: {self._pending[-1].strip()}", file=sys.stderr, flush=True)
        if self._run() is not None:
            self._wandb_call(self.wandb.finish)
            self.wandb = None
