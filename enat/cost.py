"""What a project costs before it asks for GPUs: `enat cost`.

Per zoo size at a token grid (16: ImageNet 256, 32: ImageNet 512), from the size's recipe
(configs/experiments/imagenet{256,512}_<size>.yaml; a size without one takes ENAT-L's recipe of that
resolution, said so in the row):
  - parameters (total and non-embedding);
  - training FLOPs per image: the mean over the recipe's mask-ratio distribution, reuse-mode steps
    (the no-grad z_prev forward included) at their probability (enat.flops.expected_train_flops);
  - sampling TFLOPs per image at the recipe's steps and CFG, with and without reuse;
  - images/s of sampling: measured here by a short run (--measure), or read from a result file
    of `python -m enat.bench sample --json` recorded elsewhere (--bench, e.g. on a GPU);
  - the recipe's training compute (steps x global batch x FLOPs per image) as GPU-hours at a
    stated dense peak and MFU, and days on the recipe's number of GPUs (or --gpus).
Every number is analytic except the measured images/s; the peak and MFU are the user's
assumptions and are printed with the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from enat.config import ZOO, Config, ConfigError, load_config
from enat.flops import expected_train_flops, sampling_flops
from enat.models import build_model
from enat.models.zoo import model_config, parameter_counts
from enat.sampling import generate
from enat.sweeps import global_batch

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = {16: 256, 32: 512}


def recipe(size: str, grid: int) -> tuple[Config, str]:
    """(config, its source): the size's own ImageNet recipe, else ENAT-L's at that resolution."""
    if grid not in RESOLUTION:
        raise ConfigError(f"--grid must be 16 (256 px) or 32 (512 px), got {grid}")
    own = ROOT / f"configs/experiments/imagenet{RESOLUTION[grid]}_{size}.yaml"
    if own.is_file():
        return load_config(own), own.name
    base = ROOT / f"configs/experiments/imagenet{RESOLUTION[grid]}_L.yaml"
    return load_config(base, [f"model.size={size}"]), f"{base.name} with model.size={size}"


def measure_images_per_s(cfg: Config, batch: int = 4, device: str = "cpu") -> float:
    """Sampling images/s of a randomly initialised model of this config (one warm-up, one timed run)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    if cfg.model.condition == "text":  # random contexts: the cost does not depend on what they say
        labels = torch.randn(batch, cfg.model.text_len, cfg.model.text_dim)
    else:
        labels = torch.arange(batch) % cfg.model.num_classes
    sc = dataclasses.replace(cfg.sample, batch_size=batch)
    generate(model, labels, dataclasses.replace(sc, steps=1))
    t0 = time.perf_counter()
    generate(model, labels, sc)
    return batch / (time.perf_counter() - t0)


def read_bench(path: str | Path) -> list[dict]:
    """The results of a `python -m enat.bench sample --json` file (one object or a list), or a
    ConfigError naming what is wrong with the file and what writes a good one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--bench {path}: no such file")
    text = path.read_text()
    try:
        bench = json.loads(text)
    except ValueError as e:
        line = text.splitlines()[e.lineno - 1] if text.strip() else ""
        raise ConfigError(f"--bench {path} is not JSON (line {e.lineno}: {line[:60]!r}): give it what "
                          "`python -m enat.bench sample ... --json > FILE` writes (the JSON alone on stdout; of a "
                          "file saved with the table before its JSON line, keep the last line: `tail -1`)") from None
    results = bench if isinstance(bench, list) else [bench]
    if not results or not all(isinstance(r, dict) and {"model", "grid_size", "variants"} <= set(r) for r in results):
        raise ConfigError(f"--bench {path} holds no sampling bench result: it takes one JSON object of "
                          "`python -m enat.bench sample --json` (model, grid_size, variants.ENAT.images_per_s) "
                          "or a list of them")
    return results


def bench_images_per_s(bench: dict, size: str, grid: int) -> float | None:
    """ENAT's images/s from `python -m enat.bench sample --json` results (one object or a list)."""
    for r in bench if isinstance(bench, list) else [bench]:
        if r.get("model") == size and r.get("grid_size") == grid:
            return float(r["variants"]["ENAT"]["images_per_s"])
    return None


def cost_row(size: str, grid: int, peak_tflops: float, mfu: float, gpus: int | None = None,
             bench: dict | list | None = None, measure: bool = False) -> dict:
    cfg, source = recipe(size, grid)
    return config_cost(cfg, source, peak_tflops, mfu, gpus, bench, measure)


def config_cost(cfg: Config, source: str, peak_tflops: float, mfu: float, gpus: int | None = None,
                bench: dict | list | None = None, measure: bool = False) -> dict:
    """The cost row of one experiment config (a text-conditioned one counts its context tokens)."""
    m, t, s = cfg.model, cfg.train, cfg.sample
    size, grid = m.size or "custom", m.grid_size
    total, nonembed = parameter_counts(m)
    per_image = expected_train_flops(m, tuple(t.mask_beta), t.reuse_prob)
    batch = global_batch(cfg)
    train_flops = t.steps * batch * per_image
    gpu_hours = train_flops / (peak_tflops * 1e12 * mfu) / 3600
    n = gpus or cfg.launch.nodes * cfg.launch.gpus_per_node
    guided = s.cfg_scale != 0
    images_per_s, measured = None, None
    if bench is not None:
        images_per_s, measured = bench_images_per_s(bench, size, grid), "bench file"
    if images_per_s is None and measure:
        images_per_s, measured = measure_images_per_s(cfg), "measured here (CPU, fp32, batch 4)"
    return {"size": size, "grid": grid, "resolution": cfg.tokenizer.resolution, "recipe": source,
            "condition": m.condition + (f" ({m.text_len} x {m.text_dim} context)" if m.condition == "text" else ""),
            "params": total, "params_nonembed": nonembed, "train_gflops_per_image": per_image / 1e9,
            "sampling_tflops_per_image": sampling_flops(m, s.steps, reuse=s.reuse, guided=guided).total / 1e12,
            "sampling_tflops_per_image_no_reuse": sampling_flops(m, s.steps, reuse=False, guided=guided).total / 1e12,
            "sampling_steps": s.steps, "cfg": guided, "steps": t.steps, "global_batch": batch,
            "train_exaflops": train_flops / 1e18, "gpu_hours": gpu_hours, "gpus": n, "days": gpu_hours / n / 24,
            "images_per_s": images_per_s, "images_per_s_source": measured}


def cost_table(sizes: list[str], grids: list[int], peak_tflops: float, mfu: float, gpus: int | None = None,
               bench=None, measure: bool = False) -> list[dict]:
    unknown = [s for s in sizes if s not in ZOO]
    if unknown:
        raise ConfigError(f"unknown model size(s) {unknown}; the zoo has {', '.join(ZOO)}")
    return [cost_row(size, grid, peak_tflops, mfu, gpus, bench, measure) for grid in grids for size in sizes]


def markdown(rows: list[dict], peak_tflops: float, mfu: float) -> str:
    head = ("| size | px | params | train GFLOPs/img | sample TFLOPs/img (no reuse) | steps x batch | "
            "train EFLOPs | GPU-hours | days on GPUs | img/s |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        ips = f"{r['images_per_s']:.2f}" if r["images_per_s"] is not None else "-"
        text = " text" if r["condition"].startswith("text") else ""
        lines.append(f"| {r['size']}{text} | {r['resolution']} | {r['params'] / 1e6:.1f}M | {r['train_gflops_per_image']:.1f} "
                     f"| {r['sampling_tflops_per_image']:.3f} ({r['sampling_tflops_per_image_no_reuse']:.3f}) | "
                     f"{r['steps'] // 1000}k x {r['global_batch']} | {r['train_exaflops']:.3g} | "
                     f"{r['gpu_hours']:,.3g} | {r['days']:.2g} on {r['gpus']} | {ips} |")
    notes = sorted({f"{r['size']}@{r['resolution']}: {r['recipe']}" for r in rows if "with model.size" in r["recipe"]})
    texts = sorted({f"{r['recipe']}: {r['condition']}" for r in rows if r["condition"].startswith("text")})
    lines.append("")
    lines.append(f"GPU-hours at {peak_tflops:g} dense TFLOP/s per GPU and {mfu:.0%} MFU; sampling at each recipe's "
                 f"steps with CFG.")
    if notes:
        lines.append("No recipe of their own (ENAT-L's is used): " + "; ".join(notes) + ".")
    if texts:
        lines.append("Text-conditioned (FLOPs count the caption tokens; the frozen text encoder is not counted): "
                     + "; ".join(texts) + ".")
    return "\n".join(lines)


def text_table(rows: list[list], header: list[str]) -> str:
    """Rows as aligned text columns (first left-aligned, the rest right-aligned) under a rule."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def zoo_table(grid_size: int, steps: int) -> str:
    """`enat models`: per zoo size its widths, parameters and sampling TFLOPs, ENAT against NAT."""
    rows = []
    for size in ZOO:
        cfg = model_config(size, grid_size=grid_size)
        nat = dataclasses.replace(cfg, arch="nat")
        n_enat = parameter_counts(cfg)[0]
        n_nat = parameter_counts(nat)[0]
        f_enat = sampling_flops(cfg, steps).total / 1e12
        f_nat = sampling_flops(nat, steps, reuse=False).total / 1e12
        rows.append([size, cfg.width, cfg.num_heads, f"{cfg.enc_depth}+{cfg.dec_depth}", f"{n_enat:,}",
                     f"{n_nat:,}", f"{f_enat:.3f}", f"{f_nat:.3f}", f"{f_nat / f_enat:.2f}x"])
    return "\n".join([
        f"grid {grid_size}x{grid_size} ({grid_size * 16} px with an f16 tokenizer), "
        f"{steps} sampling steps with CFG, TFLOPs per image",
        text_table(rows, ["size", "width", "heads", "enc+dec", "ENAT params", "NAT params",
                          "ENAT TFLOPs", "NAT TFLOPs", "NAT/ENAT"]),
        "S and B are not published sizes (DiT widths with ENAT-L's two-block decoder)."])


def flops_report(size: str, grid_size: int, steps: int, decoder_attention: str = "sc",
                 text: tuple[int, int] | None = None) -> str:
    """`enat flops`: per-step sampling GFLOPs of ENAT (with and without reuse) and NAT, with and
    without CFG, and the training FLOPs per sample. text: (context tokens, encoder width)."""
    extra = dict(condition="text", text_len=text[0], text_dim=text[1]) if text else {}
    cfg = model_config(size, grid_size=grid_size, decoder_attention=decoder_attention, **extra)
    nat = dataclasses.replace(cfg, arch="nat", decoder_attention="sc")
    variants = {"ENAT": (cfg, True), "ENAT no reuse": (cfg, False), "NAT": (nat, False)}
    what = f", text-conditioned ({cfg.text_len} x {cfg.text_dim} context tokens)" if text else ""
    if decoder_attention != "sc":
        what += f", decoder attention {decoder_attention}"
    out = [f"ENAT-{size}: grid {cfg.grid_size}x{cfg.grid_size}, {steps} steps, logits at [MASK] positions{what}"]
    for guided in (True, False):
        res = {k: sampling_flops(c, steps, reuse=r, guided=guided) for k, (c, r) in variants.items()}
        rows = [[s] + [f"{res[k].per_step[s] / 1e9:.2f}" for k in variants] for s in range(steps)]
        rows.append(["total TFLOPs"] + [f"{res[k].total / 1e12:.4f}" for k in variants])
        rows.append(["NAT / this"] + [f"{res['NAT'].total / res[k].total:.2f}x" for k in variants])
        out.append(f"\n{'with' if guided else 'without'} CFG (GFLOPs per image per step)")
        out.append(text_table(rows, ["step"] + list(variants)))
    tr = expected_train_flops(cfg)
    tr_plain = expected_train_flops(cfg, reuse_prob=0.0)
    tr_nat = expected_train_flops(nat)
    out.append(f"\ntraining, per sample (mask ratio ~ Beta(12,3)): ENAT {tr / 1e9:.2f} GFLOPs "
               f"(reuse-mode steps p=0.5), {tr_plain / 1e9:.2f} without reuse steps; NAT {tr_nat / 1e9:.2f}")
    return "\n".join(out)


def main_cost(args) -> None:
    bench = read_bench(args.bench) if args.bench else None
    if args.config:  # any experiment config (COCO text-to-image, a custom recipe), in place of the zoo
        if args.model != "all" or args.grid:
            raise ConfigError("--config costs that experiment: drop --model/--grid (set model.* in the config)")
        rows = [config_cost(load_config(c), Path(c).name, args.peak_tflops, args.mfu, args.gpus, bench, args.measure)
                for c in args.config]
    else:
        sizes = list(ZOO) if args.model == "all" else args.model.split(",")
        grids = [args.grid] if args.grid else [16, 32]
        rows = cost_table(sizes, grids, args.peak_tflops, args.mfu, args.gpus, bench, args.measure)
    print(markdown(rows, args.peak_tflops, args.mfu))
    if any(r["images_per_s"] is None for r in rows) and (args.bench or args.measure):
        print("img/s: '-' where the bench file has no result for that size and grid")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_tflops": args.peak_tflops, "mfu": args.mfu, "rows": rows},
                                              indent=1))
        print(f"wrote {args.json}")
