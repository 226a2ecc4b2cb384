"""Plan sweeps. Two ways:

A study (configs/studies/*.yaml), in phases, each after the previous one's runs have finished:

    python -m scaling.plan --study configs/studies/digits.yaml lr      # 1. the LR sweep's spec
    python launch/sweep.py --sweep runs/studies/digits/plan/digits_lr.yaml --wait
    python -m scaling.plan --study configs/studies/digits.yaml sweep   # 2. isoFLOP + seeds + hold-out specs
    python -m scaling.plan --study configs/studies/fashion.yaml sweep2 --family nat   # a second round, from
                                                                       # the first's fit (OUT_DIR/round1)
    python launch/sweep.py --sweep runs/studies/digits/plan/digits_fit.yaml --wait
    python -m scaling.holdout preregister ...                          # 3. the prediction, before the hold-out
    python launch/sweep.py --sweep runs/studies/digits/plan/digits_holdout.yaml --wait

`sweep` picks each size's LR from the LR sweep, measures each size's training throughput here and
sizes the isoFLOP levels so the fit and hold-out sweeps take the study's `minutes`, centres each
level's sizes on the prior (or a fit's) N*, checks no run repeats its data more than max_epochs
times, adds seed repeats, and names a hold-out run >= 2x N and >= 3x C beyond the fitted range.
`python -m scaling.study` runs all phases in order.

One isoFLOP grid (model size x training steps at the experiment's batch)
within a total compute budget, centred on the current fit's optimum, as a sweep YAML that
launch/sweep.py runs.

    python -m scaling.plan --config configs/experiments/demo.yaml --budget 2e14 --runs 12 \
        --size-key model.width --sizes 32 48 64 96 128 [--fit runs/sweeps/mini/report/fit.json] \
        --name iso1 --out configs/sweeps/iso1.yaml

Levels: the isoFLOP levels are spaced 3x apart; with s sizes per level and m = runs/s levels, the
top level is budget / (s (1 + 1/3 + ... )). Sizes per level: the s sizes nearest (in log N) to
N*(C) of the fit; without a fit, a prior N* ~ C^0.5 placed so that the middle level's optimum is
the middle size. Each run's steps = level / (FLOPs per sample x global batch), rounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from enat.bench.data import write_synthetic
from enat.config import load_config
from enat.data.shards import MANIFEST
from enat.flops import expected_train_flops
from enat.models.zoo import parameter_counts
from enat.sweeps import global_batch
from enat.train.trainer import Trainer
from scaling.collect import ScalingError, collect
from scaling.fit import compute_optimal, LawFit


def size_table(config: str | Path, key: str, sizes: list) -> list[dict]:
    out = []
    for v in sizes:
        cfg = load_config(config, [f"{key}={json.dumps(v)}"])
        _, n = parameter_counts(cfg.model)
        out.append({"value": v, "N": n, "flops_per_sample": expected_train_flops(cfg.model, tuple(cfg.train.mask_beta),
                                                                                 cfg.train.reuse_prob),
                    "batch": global_batch(cfg)})
    return sorted(out, key=lambda r: r["N"])


def plan(config: str | Path, budget: float, runs: int, key: str, sizes: list, fit_path: str | Path | None = None,
         per_level: int | None = None, ratio: float = 3.0) -> tuple[list[dict], dict]:
    """-> (runs [{key: size, "train.steps": n}], info)."""
    table = size_table(config, key, sizes)
    if len(table) < 2:
        raise ScalingError("give at least two sizes")
    s = min(per_level or min(len(table), 4), len(table))
    m = max(1, runs // s)
    top = budget / (s * sum(ratio ** -i for i in range(m)))
    levels = [top / ratio ** i for i in reversed(range(m))]
    logn = np.log([r["N"] for r in table])
    if fit_path is not None:
        info = json.loads(Path(fit_path).read_text())
        law = LawFit(**{k: info["law"][k] for k in ("E", "A", "B", "alpha", "beta")})
        k = info["k_flops_per_param_sample"]
        centres = [float(compute_optimal(law, k, c)["N"]) for c in levels]
        source = f"the fit in {fit_path}"
    else:
        mid = levels[len(levels) // 2]
        centres = [float(np.exp(logn.mean())) * (c / mid) ** 0.5 for c in levels]
        source = "a prior N* ~ C^0.5 centred on the sizes"
    out = []
    for c, centre in zip(levels, centres):
        order = np.argsort(np.abs(logn - np.log(centre)), kind="stable")[:s]
        for i in sorted(order):
            r = table[i]
            steps = max(1, round(c / (r["flops_per_sample"] * r["batch"])))
            out.append({key: r["value"], "train.steps": int(steps),
                        "_compute": steps * r["flops_per_sample"] * r["batch"], "_level": c})
    return out, {"levels": levels, "centres": centres, "source": source, "per_level": s, "sizes": table}


def write_sweep(path: str | Path, name: str, config: str | Path, out_dir: str, runs: list[dict],
                overrides: dict | None = None, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(config).resolve(), path.parent.resolve())
    spec = {"name": name, "config": rel, "out_dir": out_dir, "overrides": overrides or {},
            "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    head = ""
    if info:
        head = (f"# isoFLOP plan from {info['source']}: levels "
                + ", ".join(f"{c:.3g}" for c in info["levels"]) + " FLOPs per run, "
                + f"{info['per_level']} sizes per level; total {sum(r['_compute'] for r in runs):.3g} FLOPs.\n")
    path.write_text(head + yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# A scaling study: LR sweep -> isoFLOP sweep with seeds -> pre-registered hold-out
# ---------------------------------------------------------------------------------------------

STUDY_KEYS = {"name", "config", "out_dir", "overrides", "sizes", "lr_sweep", "minutes", "levels", "level_ratio",
              "per_level", "prior_exponent", "warmup_fraction", "min_warmup", "min_steps", "val_points", "max_epochs", "seeds",
              "holdout", "run_overhead_s", "loss", "families", "rounds"}


@dataclass
class Study:
    """configs/studies/*.yaml: what a study measures and how much machine time it may take."""

    name: str
    config: Path  # the experiment every run starts from
    out_dir: Path  # sweeps go to OUT_DIR/{lr,fit,holdout}, their specs to OUT_DIR/plan
    sizes: dict  # name -> overrides, smallest first; depth and width grown together
    lr_sweep: dict  # {sizes: [names], lrs: [...], steps: n}
    minutes: float  # wall time of the fit and hold-out sweeps together, on this machine
    overrides: dict = field(default_factory=dict)  # for every run
    levels: int = 4  # isoFLOP levels
    level_ratio: float = 3.0  # compute ratio between neighbouring levels
    per_level: int = 5  # sizes per level
    prior_exponent: float = 0.5  # N* ~ C^a, to centre the levels before any fit
    warmup_fraction: float = 0.05  # warm-up steps as a fraction of each run's steps
    min_warmup: int = 10
    min_steps: int = 0  # a level leaves out the sizes its compute gives fewer steps (too few to leave warm-up)
    val_points: int = 4  # validation passes per run (the last at the end)
    max_epochs: float = 4.0  # a run may see each training image at most this often
    seeds: dict = field(default_factory=lambda: {"extra": [1, 2], "points": 3})  # seed repeats at `points` runs
    holdout: dict = field(default_factory=lambda: {"size": None, "compute_factor": 3.0, "seeds": [0, 1]})
    run_overhead_s: float = 15.0  # start-up, validation and checkpoint time of a run
    loss: str = "val/loss_r0.7"
    # Model families studied with the same design, each a set of overrides (for example ENAT and
    # the NAT: {enat: {}, nat: {model.arch: nat, sample.reuse: false}}); each gets OUT_DIR/FAMILY.
    families: dict | None = None
    # 2: a second isoFLOP round planned from the first round's fit, at levels between the first's
    # (x sqrt(level_ratio)), so the law is fitted on both and every level of the second has the
    # fitted optimum inside its sizes. `minutes` sizes the first round and the hold-out.
    rounds: int = 1


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"study file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise ScalingError(f"{path}: unknown study keys {sorted(unknown)}; valid: {sorted(STUDY_KEYS)}")
    missing = [k for k in ("name", "config", "out_dir", "sizes", "lr_sweep", "minutes") if k not in spec]
    if missing:
        raise ScalingError(f"{path}: the study needs {', '.join(missing)}")
    spec["config"] = (path.parent / spec["config"]).resolve()
    spec["out_dir"] = Path(spec["out_dir"])
    study = Study(**spec)
    if study.rounds not in (1, 2):
        raise ScalingError(f"{path}: rounds={study.rounds}; a study has 1 or 2 isoFLOP rounds")
    if study.families is not None and (not isinstance(study.families, dict) or not study.families
                                       or not all(isinstance(v, dict) for v in study.families.values())):
        raise ScalingError(f"{path}: families must map each family's name to its overrides, e.g. "
                           f"{{enat: {{}}, nat: {{model.arch: nat, sample.reuse: false}}}}")
    if len(study.sizes) < study.per_level:
        raise ScalingError(f"{path}: {len(study.sizes)} sizes for {study.per_level} per level")
    for key in ("holdout", "seeds"):
        setattr(study, key, {**getattr(Study, "__dataclass_fields__")[key].default_factory(), **getattr(study, key)})
    unknown_lr = [s for s in study.lr_sweep.get("sizes", []) if s not in study.sizes]
    if unknown_lr or not study.lr_sweep.get("lrs") or not study.lr_sweep.get("steps"):
        raise ScalingError(f"{path}: lr_sweep needs sizes (of `sizes`), lrs and steps"
                           + (f"; unknown sizes {unknown_lr}" if unknown_lr else ""))
    return study


def family_studies(study: Study) -> dict[str, Study]:
    """One study per family ({"": study} when it names none): NAME_FAMILY in OUT_DIR/FAMILY, the
    family's overrides on top of the study's."""
    if not study.families:
        return {"": study}
    out = {}
    for fam, over in study.families.items():
        over = dict(over)
        keys = over.pop("study", None) or {}  # study keys of this family (its minutes, its LR grid)
        bad = set(keys) - (STUDY_KEYS - {"name", "config", "out_dir", "overrides", "families", "sizes"})
        if bad:
            raise ScalingError(f"family {fam}: its `study` keys {sorted(bad)} cannot differ between families")
        unknown = [n for n in (keys.get("lr_sweep") or {}).get("sizes", []) if n not in study.sizes]
        if unknown:
            raise ScalingError(f"family {fam}: lr_sweep sizes {unknown} are not among the study's sizes")
        out[fam] = replace(study, name=f"{study.name}_{fam}", out_dir=study.out_dir / fam, families=None,
                           overrides={**study.overrides, **over}, **keys)
    return out


def family_study(study_path: str | Path, family: str | None) -> Study:
    """The study of one family (`--family`), or the study itself when it names no families."""
    studies = family_studies(load_study(study_path))
    if family is None and list(studies) == [""]:
        return studies[""]
    if family not in studies:
        raise ScalingError(f"{study_path}: " + (f"choose a family with --family ({', '.join(studies)})" if family is None
                                                else f"no family {family!r}; it has {', '.join(studies) or 'none'}"))
    return studies[family]


def _size_overrides(study: Study, size: str) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in {**study.overrides, **study.sizes[size]}.items()]


def study_sizes(study: Study) -> dict:
    """name -> {N, flops_per_sample, batch, overrides} for every size of the ladder."""
    out = {}
    for name in study.sizes:
        cfg = load_config(study.config, _size_overrides(study, name))
        out[name] = {"N": parameter_counts(cfg.model)[1], "batch": global_batch(cfg),
                     "flops_per_sample": expected_train_flops(cfg.model, tuple(cfg.train.mask_beta),
                                                              cfg.train.reuse_prob)}
    ns = [v["N"] for v in out.values()]
    if ns != sorted(ns):
        raise ScalingError(f"the study's sizes must grow: non-embedding N = {ns}")
    return out


def measure_seconds_per_sample(study: Study, sizes: list[str], steps: int = 8, warmup: int = 2, log=print) -> dict:
    """Seconds per training sample of each size on this machine: real training steps of the
    study's trainer (synthetic tokens), with the thread count a run gets (launch.cpus_per_task on
    CPU). What turns the study's minutes into FLOPs."""
    out = {}
    # The trainers make this process rank 0 of 1 (enat.dist.setup_env writes RANK, MASTER_PORT...):
    # put the environment back afterwards.
    # An inherited one (a launcher's) may name a port still held: start from none, unless this
    # process is already in a process group (then the trainers join it, and it stays).
    own_group = not dist.is_initialized()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    dist_env = {k: os.environ.pop(k, None) for k in keys} if own_group else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            cfg = load_config(study.config, _size_overrides(study, name))
            shards = Path(tmp) / f"shards-{cfg.model.seq_len}"
            if not shards.is_dir():
                shards.mkdir()
                write_synthetic(shards, 2048, cfg.model.seq_len, 1024, cfg.model.codebook_size, cfg.model.num_classes)
            cfg = load_config(study.config, _size_overrides(study, name) + [
                "data.dataset=imagefolder", f"data.shards={shards}", "data.val_shards=null",
                f"train.run_dir={Path(tmp) / name}",
                "train.val_every=0", "train.sample_every=0", "train.ckpt_every=0", "train.log_every=1000000",
                "train.wandb.mode=disabled", "launch.gpus_per_node=1", "launch.nodes=1"])
            threads = torch.get_num_threads()
            if not torch.cuda.is_available():
                torch.set_num_threads(cfg.launch.cpus_per_task)
            try:
                trainer = Trainer(cfg, log=lambda *_: None)
                it = iter(trainer.loader)
                for _ in range(warmup):
                    trainer.train_step(it)
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step(it)
                out[name] = (time.perf_counter() - t0) / (steps * cfg.train.micro_batch * cfg.train.grad_accum)
                trainer.close()
            finally:
                torch.set_num_threads(threads)
            log(f"measured {name}: {1 / out[name]:.0f} samples/s")
    # The single-rank group the trainers made stays (DeepSpeed caches it: destroying it breaks
    # any later trainer in this process); its variables go, so nothing launched from here
    # inherits its port.
    for k, v in dist_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return out


def _schedule(study: Study, steps: int) -> dict:
    """Each run decays its own schedule to its length (train.schedule from the study's config or
    overrides), with a warm-up scaled to that length and validation passes spread over it."""
    every = max(1, steps // study.val_points)
    return {"train.steps": int(steps), "train.warmup_steps": max(study.min_warmup, round(study.warmup_fraction * steps)),
            "train.val_every": every}


def _spec(study: Study, kind: str, runs: list[dict], head: str, out: str | None = None) -> Path:
    path = study.out_dir / "plan" / f"{study.name}_{kind}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"name": f"{study.name}_{kind}", "config": os.path.relpath(study.config, path.parent.resolve()),
            "out_dir": str(study.out_dir / (out or kind)), "overrides": dict(study.overrides),
            "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    path.write_text(head + yaml.safe_dump(spec, sort_keys=False))
    return path


def plan_lr_sweep(study: Study) -> Path:
    """Phase 1: a short LR sweep at a few sizes (each LR at the same steps, schedule and warm-up)."""
    runs = []
    for size in study.lr_sweep["sizes"]:
        for lr in study.lr_sweep["lrs"]:
            runs.append({"name": f"{size}-lr{lr:g}", **study.sizes[size], "train.lr": float(lr),
                         **_schedule(study, int(study.lr_sweep["steps"]))})
    return _spec(study, "lr", runs, f"# The LR sweep of study {study.name}: {len(runs)} runs. Written by scaling.plan.\n")


def choose_lrs(study: Study, sizes: dict, lr_dir: str | Path | None = None) -> tuple[dict, dict]:
    """LR per size from the finished LR sweep: each swept size's best final loss (a parabola in
    log LR through the best three, so the optimum need not sit on the grid), then log LR linear in
    log N across sizes (constant with one swept size). -> ({size: lr}, notes)."""
    lr_dir = Path(lr_dir or study.out_dir / "lr")
    col = collect(lr_dir)
    key = study.loss.replace("/", "_")
    best, notes = {}, {"lr_sweep": str(lr_dir), "per_size": {}}
    for size in study.lr_sweep["sizes"]:
        got = sorted((float(r["run"].split("-lr")[1]), r[key]) for r in col.rows
                     if r["final"] and r["run"].startswith(f"{size}-lr") and key in r)
        if len(got) < len(study.lr_sweep["lrs"]):
            missing = sorted(set(map(float, study.lr_sweep["lrs"])) - {g[0] for g in got})
            raise ScalingError(f"the LR sweep in {lr_dir} has no finished run of {size} at lr {missing}: run it "
                               f"first (launch/sweep.py --sweep {study.out_dir}/plan/{study.name}_lr.yaml --wait)")
        lrs, losses = np.array(got).T
        i = int(np.argmin(losses))
        edge = i in (0, len(lrs) - 1)
        lr = lrs[i]
        if not edge:  # vertex of the parabola in log LR through the best and its neighbours
            x, y = np.log(lrs[i - 1:i + 2]), losses[i - 1:i + 2]
            c2, c1, _ = np.polyfit(x, y, 2)
            if c2 > 0:
                lr = float(np.exp(np.clip(-c1 / (2 * c2), x[0], x[-1])))
        best[size] = float(lr)
        notes["per_size"][size] = {"lrs": lrs.tolist(), "losses": losses.tolist(), "best": float(lr),
                                   "at_grid_edge": bool(edge)}
    logn = np.log([sizes[s]["N"] for s in best])
    loglr = np.log(list(best.values()))
    slope, icpt = np.polyfit(logn, loglr, 1) if len(best) > 1 else (0.0, loglr[0])
    notes["rule"] = f"lr = {np.exp(icpt):.4g} * N^{slope:.3f}" if len(best) > 1 else f"lr = {np.exp(icpt):.4g}"
    lo, hi = min(study.lr_sweep["lrs"]), max(study.lr_sweep["lrs"])
    out = {s: float(np.clip(np.exp(icpt + slope * np.log(v["N"])), lo, hi)) for s, v in sizes.items()}
    return out, notes


def train_images(study: Study) -> int | None:
    """Training images in the study's shards (their manifest), or None before they exist."""
    cfg = load_config(study.config, _size_overrides(study, next(iter(study.sizes))))
    path = Path(cfg.data.shards) / MANIFEST
    return json.loads(path.read_text())["num_samples"] if path.is_file() else None


def plan_study(study: Study, lrs: dict, seconds: dict, sizes: dict, fit: dict | None = None,
               images: int | None = None, parallel: int = 1, first: dict | None = None) -> dict:
    """Phase 2: the isoFLOP levels (sized so the fit and hold-out sweeps take study.minutes of
    wall time on this machine, `seconds` per sample per size, `parallel` runs at once), the sizes
    of each level centred on the prior (or fitted) N*, seed repeats, and the hold-out run beyond
    the fitted range. -> {"fit": [runs], "holdout": [runs], "levels", "centres", ...}.

    Two rounds (study.rounds=2): the first round's plan has no hold-out runs (its minutes still
    count them, so the study's total stays what `minutes` says). The second (`first`: the first
    round's plan, `fit`: the law fitted to its runs) puts its levels between the first's (x
    sqrt(level_ratio), the same count) with the sizes around the fitted N*, no seed repeats, and
    the hold-out beyond both rounds."""
    h = study.holdout
    hsize = h.get("size") or list(sizes)[-1]
    if hsize not in sizes:
        raise ScalingError(f"holdout.size {hsize!r} is not one of the study's sizes {list(sizes)}")
    names = [n for n in sizes if 2 * sizes[n]["N"] <= sizes[hsize]["N"]]  # the fit stays >= 2x below the hold-out
    s = study.per_level
    if len(names) < s:
        raise ScalingError(f"{len(names)} sizes are <= half the hold-out's N ({hsize}, N={sizes[hsize]['N']:,}); "
                           f"{s} per level need more sizes below it")
    logn = np.log([sizes[n]["N"] for n in names])
    ratios = [study.level_ratio ** -(study.levels - 1 - j) for j in range(study.levels)]  # level / top level

    def steps_of(name, compute):
        return max(1, round(compute / (sizes[name]["flops_per_sample"] * sizes[name]["batch"])))

    def pick(centre, compute):
        """s neighbouring sizes around the centre among those that get >= min_steps at this
        compute, shifted to stay on the ladder."""
        ok = [n for n in names if steps_of(n, compute) >= study.min_steps] or names[:s]
        ok = ok if len(ok) >= s else names[:s]
        logs = np.log([sizes[n]["N"] for n in ok])
        i = int(np.argmin(np.abs(logs - np.log(centre))))
        lo = min(max(0, i - s // 2), len(ok) - s)
        return ok[lo:lo + s]

    if fit is not None:
        law = LawFit(**{k: fit["law"][k] for k in ("E", "A", "B", "alpha", "beta")})
        k = fit["k_flops_per_param_sample"]

        def centres_at(top):
            return [float(compute_optimal(law, k, top * r)["N"]) for r in ratios]
        source = "the fitted law"
    else:  # a prior N* ~ C^a, the middle level's optimum at the ladder's middle size
        mid = float(np.exp(np.median(logn)))

        def centres_at(top):
            return [mid * (r / ratios[len(ratios) // 2]) ** study.prior_exponent for r in ratios]
        source = f"a prior N* ~ C^{study.prior_exponent}, centred on the ladder"

    def sec(name, compute):
        return compute * seconds[name] / sizes[name]["flops_per_sample"]

    second = first is not None
    if second and fit is None:
        raise ScalingError("the second round is planned from the first round's fit: give its fit.json")
    levels_seed = [] if second else list(np.linspace(0, study.levels - 1, study.seeds["points"]).round().astype(int))
    hold_runs = len(h["seeds"])
    # Wall time is linear in the top level's compute for fixed sizes per level: solve for the top
    # that fits study.minutes, choose the sizes again at that compute, until the choice settles.
    top, chosen = (first["top"] * study.level_ratio ** 0.5, None) if second else (None, None)
    for _ in range(1 if second else 20):
        prev = chosen
        chosen = [pick(c, (top or 0) * r) for c, r in zip(centres_at(top or 1.0), ratios)]
        seed_at = [chosen[j][s // 2] for j in levels_seed]
        fixed = study.run_overhead_s * (sum(len(c) for c in chosen) + len(seed_at) * len(study.seeds["extra"])) / parallel
        per_top = (sum(sec(n, r) for r, level in zip(ratios, chosen) for n in level)
                   + sum(sec(n, ratios[j]) for n, j in zip(seed_at, levels_seed)) * len(study.seeds["extra"])) / parallel
        hold_per_top = sec(hsize, h["compute_factor"]) * -(-hold_runs // parallel)
        if second:
            break
        top = (study.minutes * 60 - fixed - study.run_overhead_s * -(-hold_runs // parallel)) / (per_top + hold_per_top)
        if top <= 0:
            raise ScalingError(f"study.minutes={study.minutes} does not even cover the runs' start-up time")
        if chosen == prev:
            break
    seed_lv = levels_seed
    centres = centres_at(top)
    tag = "r2c" if second else "c"

    def run(name, compute, level, seed=None, label=None):
        steps = steps_of(name, compute)
        r = {"name": label or f"{name}-{tag}{level}", **study.sizes[name], "train.lr": lrs[name], **_schedule(study, steps)}
        if seed is not None:
            r["seed"] = seed
        exact = steps * sizes[name]["batch"] * sizes[name]["flops_per_sample"]
        r.update(_size=name, _N=sizes[name]["N"], _compute=exact, _level=level,
                 _epochs=steps * sizes[name]["batch"] / images if images else None,
                 _minutes=(sec(name, exact) + study.run_overhead_s) / 60)
        return r

    fit_runs = [run(n, top * r, j + 1) for j, (r, level) in enumerate(zip(ratios, chosen)) for n in level]
    short = [r for r in fit_runs if r["train.steps"] < study.min_steps]
    if short:  # a level had fewer than per_level sizes with min_steps at its compute
        raise ScalingError(f"{len(short)} runs would take fewer than min_steps={study.min_steps} steps (shortest: "
                           f"{min(short, key=lambda r: r['train.steps'])['name']}, "
                           f"{min(r['train.steps'] for r in short)} steps): give the study more minutes, fewer levels "
                           f"or sizes per level, or a lower min_steps")
    for n, j in zip(seed_at, seed_lv):
        fit_runs += [run(n, top * ratios[j], j + 1, seed=sd, label=f"{n}-c{j + 1}-seed{sd}") for sd in study.seeds["extra"]]
    hold = [run(hsize, top * h["compute_factor"], "H", seed=sd, label=f"{hsize}-holdout-seed{sd}") for sd in h["seeds"]]
    # Where each level's centre sits among its sizes: strictly inside (a neighbour on each side)
    # or at an edge of the ladder (the fit's optimum is beyond the sizes the level may use).
    logn_of = {n: np.log(sizes[n]["N"]) for n in names}
    placement = [{"level": j + 1, "compute": top * r, "centre_N": float(c), "sizes": list(level),
                  "inside": bool(logn_of[level[0]] < np.log(c) < logn_of[level[-1]])}
                 for j, (r, c, level) in enumerate(zip(ratios, centres, chosen))]
    over = [r for r in fit_runs + hold if r["_epochs"] is not None and r["_epochs"] > study.max_epochs]
    if over:
        worst = max(over, key=lambda r: r["_epochs"])
        raise ScalingError(f"{len(over)} runs would see the training images more than {study.max_epochs} times "
                           f"(worst: {worst['name']}, {worst['_epochs']:.1f} epochs of {images} images): make more "
                           f"training data, or lower study.minutes")
    final = second or study.rounds == 1  # the hold-out runs after the last round
    return {"fit": fit_runs, "holdout": hold if final else [], "levels": [top * r for r in ratios],
            "centres": centres_at(top), "placement": placement, "round": 2 if second else 1,
            "source": source, "holdout_size": hsize, "top": top, "images": images, "parallel": parallel,
            "predicted_minutes": (sum(r["_minutes"] for r in fit_runs) / parallel
                                  + (max(r["_minutes"] for r in hold) * -(-len(hold) // parallel) if final else 0))}


def study_markdown(study: Study, planned: dict, sizes: dict, lrs: dict, notes: dict, seconds: dict) -> str:
    lines = [f"# Plan of scaling study `{study.name}`" + (f", round {planned['round']} of {study.rounds}"
                                                        if study.rounds > 1 else ""), "",
             f"Levels ({study.levels}, {study.level_ratio:g}x apart, {study.per_level} sizes each, centred on "
             f"{planned['source']}): " + ", ".join(f"{c:.3g}" for c in planned["levels"]) + " FLOPs per run.",
             f"LR per size: {notes.get('rule', 'given')} (from {notes.get('lr_sweep', 'the study')}).",
             f"Predicted wall time of the fit and hold-out sweeps: {planned['predicted_minutes']:.1f} min at "
             f"{planned['parallel']} runs at once (throughput measured here).", "",
             "| size | N (non-embedding) | FLOPs/sample | samples/s here | lr |", "|---|---|---|---|---|"]
    for n, v in sizes.items():
        sps = f"{1 / seconds[n]:.0f}" if n in seconds else "-"
        lines.append(f"| {n} | {v['N']:,} | {v['flops_per_sample']:.3g} | {sps} | {lrs[n]:.3g} |")
    lines += ["", "Where each level's centre (N*) sits among its sizes:", "",
              "| level | compute | centre N* | sizes | centre inside |", "|---|---|---|---|---|"]
    for p in planned["placement"]:
        lines.append(f"| {p['level']} | {p['compute']:.3g} | {p['centre_N']:.3g} | {', '.join(p['sizes'])} | "
                     f"{'yes' if p['inside'] else 'no: at the edge of the sizes it may use'} |")
    lines += ["", "| run | level | N | steps | warm-up | compute | epochs | minutes |", "|---|---|---|---|---|---|---|---|"]
    for r in planned["fit"] + planned["holdout"]:
        ep = f"{r['_epochs']:.2f}" if r["_epochs"] is not None else "?"
        lines.append(f"| {r['name']} | {r['_level']} | {r['_N']:,} | {r['train.steps']} | {r['train.warmup_steps']} | "
                     f"{r['_compute']:.3g} | {ep} | {r['_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def write_study(study: Study, planned: dict, sizes: dict, lrs: dict, notes: dict, seconds: dict) -> dict:
    """The round's sweep spec (round 2's runs go to the same OUT_DIR/fit as round 1's, so that
    every reader of the fit sweep sees both), the hold-out's after the last round, plan.md/json."""
    second = planned.get("round", 1) == 2
    suffix = "2" if second else ""
    fit = _spec(study, f"fit{suffix}", planned["fit"],
                f"# The isoFLOP sweep of study {study.name}" + (", round 2 (planned from round 1's fit)" if second
                                                                  else ", with seed repeats")
                + f". Written by scaling.plan; see plan{suffix}.md.\n", out="fit")
    paths = {"fit": fit}
    if planned["holdout"]:
        paths["holdout"] = _spec(study, "holdout", planned["holdout"],
                                 f"# The hold-out of study {study.name}: >= 2x N and >= {study.holdout['compute_factor']:g}x C "
                                 f"beyond the fit. Pre-register its prediction (python -m scaling.holdout preregister) "
                                 f"BEFORE running it.\n")
    plan_dir = study.out_dir / "plan"
    (plan_dir / f"plan{suffix}.md").write_text(study_markdown(study, planned, sizes, lrs, notes, seconds))
    (plan_dir / f"plan{suffix}.json").write_text(json.dumps({"sizes": sizes, "lrs": lrs, "lr_notes": notes,
                                                               "seconds_per_sample": seconds,
                                                               **{k: v for k, v in planned.items()}}, indent=1, default=float))
    return {**paths, "plan": plan_dir / f"plan{suffix}.md"}


def study_phase(study_path: str | Path, phase: str, lr_sweep: str | None = None, fit: str | None = None,
                parallel: int | None = None, log=print, family: str | None = None) -> dict:
    """Run one planning phase of a study (of one of its families) -> the paths written.
    lr: the LR sweep's spec; sweep: the first (or only) isoFLOP round, with the hold-out when it
    is the only round; sweep2: the second round, from the first round's plan and `fit` (default
    OUT_DIR/round1/fit.json), with the hold-out."""
    study = family_study(study_path, family)
    if phase == "lr":
        path = plan_lr_sweep(study)
        log(f"wrote {path}: {len(study.lr_sweep['sizes']) * len(study.lr_sweep['lrs'])} runs")
        return {"lr": path}
    if phase == "sweep2" and study.rounds != 2:
        raise ScalingError(f"{study_path}: rounds={study.rounds}, so there is no second round to plan")
    sizes = study_sizes(study)
    lrs, notes = choose_lrs(study, sizes, lr_sweep)
    cfg = load_config(study.config, _size_overrides(study, next(iter(study.sizes))))
    parallel = parallel or cfg.launch.array_parallelism
    first = None
    if phase == "sweep2":
        first_path = study.out_dir / "plan" / "plan.json"
        fit = fit or study.out_dir / "round1" / "fit.json"
        for what, path in (("the first round's plan", first_path), ("the first round's fit", Path(fit))):
            if not Path(path).is_file():
                raise ScalingError(f"{what} ({path}) not found: plan and run round 1 and report on it first "
                                   f"(python -m scaling.study runs the phases in order)")
        first = json.loads(first_path.read_text())
        seconds = first["seconds_per_sample"]  # the first round's measurement: both rounds on one clock
    else:
        seconds = measure_seconds_per_sample(study, list(sizes), log=log)
    planned = plan_study(study, lrs, seconds, sizes, json.loads(Path(fit).read_text()) if fit else None,
                         train_images(study), parallel, first=first)
    paths = write_study(study, planned, sizes, lrs, notes, seconds)
    hold = f", {paths['holdout']} ({len(planned['holdout'])} runs)" if "holdout" in paths else ""
    log(f"wrote {paths['fit']} ({len(planned['fit'])} runs){hold} and "
        f"{paths['plan']}: levels " + ", ".join(f"{c:.3g}" for c in planned["levels"])
        + f" FLOPs; predicted {planned['predicted_minutes']:.1f} min")
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--study" in argv or any(a.startswith("--study=") for a in argv):
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--study", required=True, help="configs/studies/*.yaml")
        p.add_argument("phase", choices=["lr", "sweep", "sweep2"],
                       help="lr: the LR sweep; sweep: isoFLOP + seeds (+ hold-out with one round); "
                            "sweep2: the second round from the first's fit, + hold-out")
        p.add_argument("--family", help="the family to plan, for a study with `families`")
        p.add_argument("--lr-sweep", help="the finished LR sweep's folder (default OUT_DIR/lr)")
        p.add_argument("--fit", help="fit.json of an earlier report: centre the levels on its N* (default: the prior)")
        p.add_argument("--parallel", type=int, help="runs at once (default: launch.array_parallelism)")
        args = p.parse_args(argv)
        try:
            study_phase(args.study, args.phase, args.lr_sweep, args.fit, args.parallel, family=args.family)
        except ScalingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment every run starts from")
    p.add_argument("--budget", type=float, required=True, help="total training FLOPs for the sweep")
    p.add_argument("--runs", type=int, required=True, help="target number of runs")
    p.add_argument("--size-key", default="model.size", help="the config key that sets the size")
    p.add_argument("--sizes", nargs="+", required=True, help="values of --size-key (zoo names or widths)")
    p.add_argument("--per-level", type=int, help="sizes per isoFLOP level (default: min(4, sizes))")
    p.add_argument("--fit", help="fit.json of a previous report (default: a prior)")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, help="the sweep YAML to write")
    p.add_argument("--out-dir", help="where the runs go (default runs/sweeps/NAME)")
    args = p.parse_args(argv)
    sizes = [int(s) if s.isdigit() else s for s in args.sizes]
    try:
        runs, info = plan(args.config, args.budget, args.runs, args.size_key, sizes, args.fit, args.per_level)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_sweep(args.out, args.name, args.config, args.out_dir or f"runs/sweeps/{args.name}", runs, info=info)
    for r in runs:
        print(f"level {r['_level']:.3g}: {args.size_key}={r[args.size_key]} steps {r['train.steps']} "
              f"({r['_compute']:.3g} FLOPs)")
    print(f"wrote {path}: {len(runs)} runs, {sum(r['_compute'] for r in runs):.3g} of {args.budget:.3g} FLOPs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
