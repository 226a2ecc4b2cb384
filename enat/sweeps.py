"""Sweep specs: a grid of config overrides over one experiment, expanded into named runs.

    name: mini                              # the sweep's name (wandb group, manifest)
    config: ../experiments/demo.yaml        # the experiment every run starts from (relative to this file)
    out_dir: runs/sweeps/mini               # runs go to OUT_DIR/<run name>; the manifest to OUT_DIR/sweep.json
    overrides: {train.log_every: 10}        # for every run
    grid:                                   # the product of these lists, in this order
      model.width: [32, 64]
      train.steps: [200, 400]
      seed: [0]
    runs: [{model.width: 48, train.steps: 300}]   # optional extra points (e.g. an isoFLOP plan)
    runs: [{name: w48-c1e12, model.width: 48, train.steps: 300}]   # `name` (not a key) names the run

`launch/sweep.py` submits the runs; `scaling/` reads the manifest. Each run's name is built from
the values that vary (`width32-steps200`) unless a `runs` entry names itself, so it is stable
across resubmissions.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from enat.config import Config, ConfigError, load_config
from enat.flops import expected_train_flops
from enat.models.zoo import parameter_counts

MANIFEST = "sweep.json"
KEYS = {"name", "config", "out_dir", "overrides", "grid", "runs"}


@dataclass
class SweepRun:
    name: str
    params: dict  # the grid values of this run, by dotted key
    overrides: list[str]
    run_dir: str


@dataclass
class Sweep:
    name: str
    config: Path
    out_dir: Path
    overrides: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    source: str = ""


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; valid: {sorted(KEYS)}")
    for key in ("name", "config", "out_dir"):
        if key not in spec:
            raise ConfigError(f"{path}: the sweep needs '{key}'")
    grid = spec.get("grid") or {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k} must be a non-empty list, got {v!r}")
    if not grid and not spec.get("runs"):
        raise ConfigError(f"{path}: the sweep has no 'grid' and no 'runs'")
    return Sweep(name=str(spec["name"]), config=(path.parent / spec["config"]).resolve(), out_dir=Path(spec["out_dir"]),
                 overrides=dict(spec.get("overrides") or {}), grid=grid, runs=list(spec.get("runs") or []),
                 source=str(path))


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(params: dict, varying: list[str]) -> str:
    return "-".join(f"{k.split('.')[-1]}{_fmt(params[k])}" for k in varying) or "run"


def expand(sweep: Sweep) -> list[SweepRun]:
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*sweep.grid.values())] if keys else []
    points += [dict(p) for p in sweep.runs]
    names = [p.pop("name", None) for p in points]  # an explicit run name; not an override
    varying = []
    for p in points:
        varying += [k for k in p if k not in varying]
    varying = [k for k in varying if len({json.dumps(q.get(k)) for q in points}) > 1] or varying[:1]
    out, seen = [], set()
    for p, given in zip(points, names):
        name = str(given) if given is not None else run_name(p, varying)
        if name in seen:
            raise ConfigError(f"{sweep.source}: two runs would be named {name!r}; make the grid points distinct")
        seen.add(name)
        run_dir = str(sweep.out_dir / name)
        tags = [f"sweep:{sweep.name}"] + [f"{k}={_fmt(v)}" for k, v in p.items()]
        overrides = ([f"{k}={json.dumps(v)}" for k, v in sweep.overrides.items()]
                     + [f"{k}={json.dumps(v)}" for k, v in p.items()]
                     + [f"train.run_dir={run_dir}", f"train.wandb.group={sweep.name}",
                        f"train.wandb.tags={json.dumps(tags)}", f"train.wandb.sweep_point={json.dumps(p)}"])
        out.append(SweepRun(name, p, overrides, run_dir))
    return out


def run_configs(sweep: Sweep, extra: list[str] | None = None) -> list[tuple[SweepRun, Config]]:
    """Every run's validated config, with `extra` overrides on top (a bad grid value fails here,
    before anything is submitted)."""
    out = []
    for run in expand(sweep):
        try:
            out.append((run, load_config(sweep.config, run.overrides + list(extra or []))))
        except ConfigError as e:
            raise ConfigError(f"{sweep.source}, run {run.name}: {e}") from e
    return out


def global_batch(cfg: Config) -> int:
    return cfg.train.micro_batch * cfg.train.grad_accum * cfg.launch.nodes * cfg.launch.gpus_per_node


def run_entry(run: SweepRun, cfg: Config) -> dict:
    """What the manifest says of a run: its grid values and its size and compute budget."""
    n_params, n_nonembed = parameter_counts(cfg.model)
    per_sample = expected_train_flops(cfg.model, tuple(cfg.train.mask_beta), cfg.train.reuse_prob)
    batch = global_batch(cfg)
    return {"name": run.name, "run_dir": run.run_dir, "params": run.params, "overrides": run.overrides,
            "model_size": cfg.model.size, "width": cfg.model.width, "n_params": n_params,
            "n_params_nonembed": n_nonembed,
            "train_flops_per_sample": per_sample, "global_batch": batch, "steps": cfg.train.steps,
            "compute_budget": per_sample * batch * cfg.train.steps}
