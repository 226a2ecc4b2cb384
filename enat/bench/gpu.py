"""The GPU check: the framework's numbers on one lent GPU, in one command of about 8 minutes.

    launch/gpu/check.sh                                   # on the GPU machine (installs, then this)
    python -m enat.bench gpu --out DIR [--budget-s 450]   # this alone, packages already installed
    python -m enat.bench gpu --out DIR --smoke            # the same runs at tiny sizes, on a CPU (the test)

Each measurement is one of the project's own benchmarks or jobs, run in a process of its own (a
crash, an out-of-memory or a hang costs that run only; each starts with a clean device):
  - train: `enat.bench train` on the ImageNet recipes of ENAT-B and ENAT-L (256 px, bf16, ZeRO-2
    on one rank over NCCL, EMA and reuse-mode steps), eager and compiled: s/step, img/s, TFLOP/s
    from the analytic FLOPs, MFU, peak memory; and the largest micro-batch that fits at L;
  - syncs: host syncs per optimizer step and inside forward + loss + backward, from those runs, at
    the dispatcher and by CUDA's own count (sync debug mode) with the call sites;
  - sample: `enat.bench sample`, ENAT-L with and without reuse and the NAT-L, 256 px, batch 64,
    8 steps, CFG, bf16, eager and compiled: img/s, wall-clock vs FLOPs ratios, syncs per generate();
  - fid: the FID job (`enat eval`) end to end over 2,000 samples of a random ENAT-B, decoded by a
    random f16 VQGAN, features from torch-fidelity's InceptionV3 with random weights from a file,
    against ADM-style reference statistics from a file: samples/s of each phase;
  - tokenizer: `enat.bench tokenizer`, VQGAN f16 encode and decode img/s at 256 px.
Runs go in order of what they tell (eager before compiled); a run starts only while the budget
left covers its expected time (else it is skipped and says so), and is killed at its timeout. Nothing is downloaded; every weight is random.

Writes under --out (the device tool brings back at most 8 files): env.json, train.json,
syncs.json, sample.json, fid.json, tokenizer.json and check.md (the tables); check.sh adds check.log.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from enat.config import load_config
from enat.eval.fidelity import import_torch_fidelity
from enat.models import build_model
from enat.models.weights import save_weights
from enat.tokenizer import build_tokenizer

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/gpu_check", help="where the JSON files and check.md go")
    p.add_argument("--smoke", action="store_true",
                   help="the same runs at tiny sizes and a few steps (CPU; what the test runs)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of all runs; a run that cannot finish inside it is skipped")
    p.add_argument("--only", nargs="+", help="run only these runs (names as in the table, e.g. 'train B')")


@dataclasses.dataclass
class Run:
    """One measurement: a benchmark or job in a process of its own."""

    part: str
    name: str
    argv: list[str] | None  # None: made when it runs (fid, max micro-batch), or not run (`skip` says why)
    timeout_s: float  # killed after this
    expect_s: float = 0  # started only if the budget left covers this (on one H100, compile caches cold)
    skip: str | None = None


def bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "enat.bench", *args, "--json"]


def plan(smoke: bool) -> list[Run]:
    """What runs, in order. --smoke: the same runs at tiny sizes, except those only a GPU can
    give (compiled runs: inductor needs minutes of a CPU; the micro-batch search: device memory)."""
    B, L = "configs/experiments/imagenet256_B.yaml", "configs/experiments/imagenet256_L.yaml"
    if smoke:
        tiny = ["--model", "tiny", "--grid-size", "8", "--batch", "4", "--steps", "2", "--warmup", "1", "--no-bare"]
        train_b, train_l = ["train", "--config", B, *tiny], ["train", "--config", L, *tiny]
        sampling = ["sample", "--model", "tiny", "--grid-size", "8", "--batch", "4", "--steps", "4", "--repeats", "1",
                    "--dtype", "bfloat16"]
        tok = ["tokenizer", "--batch", "2", "--repeats", "1", "tokenizer.resolution=64", "model.grid_size=4"]
    else:
        train_b, train_l = ["train", "--config", B, "--steps", "10"], ["train", "--config", L, "--steps", "10"]
        sampling = ["sample", "--model", "L", "--grid-size", "16", "--batch", "64", "--steps", "8",
                    "--cfg-scale", "2.5", "--repeats", "3", "--dtype", "bfloat16"]
        tok = ["tokenizer", "--batch", "64"]
    no_compile = "--smoke: inductor compiles for minutes on a CPU" if smoke else None
    # Eager first (each number the check exists for), then the compiled runs, cheapest first.
    return [
        Run("train", "train B", bench(*train_b), 120, 45),
        Run("train", "train L", bench(*train_l), 150, 60),
        Run("sample", "sample L", bench(*sampling), 150, 50),
        Run("fid", "fid B", None, 200, 80),  # its command needs the random weights it makes first (fid_run)
        Run("tokenizer", "tokenizer f16", bench(*tok), 60, 20),
        Run("train", "train B compiled", None if smoke else bench(*train_b, "--compile"), 240, 120, skip=no_compile),
        Run("sample", "sample L compiled", None if smoke else bench(*sampling, "--compile", "--variants", "ENAT", "NAT"),
            240, 120, skip=no_compile),
        Run("train", "train L max micro-batch", None, 150, 90, skip="--smoke: needs a GPU's memory" if smoke else None),
        Run("train", "train L compiled", None if smoke else bench(*train_l, "--compile"), 300, 150, skip=no_compile),
    ]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def execute(argv: list[str], timeout_s: float, log=print, json_result: bool = True) -> dict:
    """Run a benchmark process (json_result: its last stdout line is its JSON result; a bench's
    --json prints it alone there, its table on stderr). -> a record
    with status ok | failed | timeout, the seconds it took, and the result or the error (stderr's tail)."""
    log(f"$ {' '.join(argv[1:])}")
    t0 = time.perf_counter()
    # Each run is a process group of its own: none inherited from a caller that ran one (a taken port).
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    # A session of its own: a timeout ends the run with its loader workers and compile workers.
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    status = None
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - t0
    lines = stdout.strip().splitlines()
    log("\n".join(lines[:-1] if json_result else lines))
    if json_result:  # the table (and the libraries' warnings): shown whatever the outcome, so not again below
        log(stderr.strip())
    record = {"seconds": seconds, "argv": argv[1:], "rc": proc.returncode}
    result = None
    if json_result and lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            pass
    tail = stderr.strip()[-3000:]
    if status == "timeout":
        if not json_result:
            log(tail[-2000:])
        note = f"no exit within {timeout_s:.0f} s" + (" (after its result)" if result is not None else "")
        return {**record, "status": "ok" if result is not None else "timeout", "result": result,
                "error": f"{note}; stderr tail: {tail[-1500:]}"}
    if result is not None:  # a number printed is a number measured, whatever the exit
        return {**record, "status": "ok", "result": result,
                **({"error": f"exit status {proc.returncode} after its result: {tail[-500:]}"} if proc.returncode
                   else {})}
    if proc.returncode == 0 and not json_result:
        return {**record, "status": "ok"}
    if not json_result:
        log(tail)
    return {**record, "status": "failed", "error": tail or (lines[-1] if lines else "no output")}


def environment() -> dict:
    """The machine: device, driver, memory, and the versions of what ran. Called in a process of
    its own by the check (a CUDA context in the parent would take memory from the runs)."""
    versions = {}
    for name in ("torch", "deepspeed", "torch-fidelity", "webdataset", "submitit", "numpy", "scipy", "triton", "enat"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env = {"python": platform.python_version(), "host": platform.node(), "versions": versions,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(),
           "device": "cpu", "device_name": platform.processor() or "cpu", "gpu_memory_gb": None, "driver": None,
           "capability": None, "multiprocessors": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device="cuda", device_name=p.name, gpu_memory_gb=p.total_memory / 1e9,
                   capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    try:  # the device tool copies the working tree without .git: no commit there
        git = ["git", "-C", str(ROOT)]
        env["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        if env["commit"] and subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                            capture_output=True, text=True, timeout=10).stdout.strip():
            env["commit"] += "+changes"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def fid_run(tmp: Path, smoke: bool) -> list[str]:
    """The FID job's command, after writing what it needs with random weights: an ENAT-B
    enat-weights file, an f16 VQGAN state dict, torch-fidelity's InceptionV3 state dict, and
    ADM-style reference statistics (mu, sigma of 2048-d features, resolution)."""
    config = "configs/experiments/imagenet256_B.yaml"
    if smoke:  # tiny model, a small f8 VQGAN at 64 px (8x8 tokens), 10 classes, 20 samples
        over = ["model.size=tiny", "model.grid_size=8", "model.num_classes=10", "tokenizer.ch=32",
                "tokenizer.ch_mult=[1,1,2,2]", "tokenizer.num_res_blocks=1", "tokenizer.z_channels=16",
                "tokenizer.resolution=64", "eval.batch_size=10"]
        num_samples = 20
    else:
        over, num_samples = [], 2000
    cfg = load_config(config, over)
    torch.manual_seed(0)
    weights = tmp / "enat_B_random.pt"
    save_weights(weights, cfg.model, {"ema": build_model(cfg.model).state_dict()}, {"step": 0})
    vqgan = tmp / "vqgan_random.pt"
    torch.save(build_tokenizer(cfg.tokenizer).state_dict(), vqgan)
    inception = tmp / "inception_random.pth"
    save_random_inception(inception)
    reference = tmp / "reference.npz"
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4096, 2048))
    np.savez(reference, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), resolution=cfg.tokenizer.resolution)
    over += [f"tokenizer.checkpoint={vqgan}", "eval.extractor=inception-v3-compat",
             f"eval.extractor_weights={inception}", f"eval.reference_npz={reference}",
             f"eval.cache_dir={tmp / 'cache'}", "eval.save_npz=false", "train.wandb.mode=disabled"]
    return [sys.executable, "-m", "enat.cli", "eval", "--config", config, "--checkpoint", str(weights),
            "--num-samples", str(num_samples), *over]


def save_random_inception(path: Path) -> None:
    """torch-fidelity's InceptionV3 (the TF-FID network) with its random initialisation, saved as
    the state dict its constructor loads: the real architecture and feature layer, no download."""
    import_torch_fidelity()  # through the project's torchvision guard
    # torch-fidelity: only after the guard above has imported it (the torchvision workaround)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    placeholder = path.with_suffix(".empty")
    torch.save({}, placeholder)
    torch.manual_seed(0)
    net = RandomInit("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(placeholder))
    torch.save(net.state_dict(), path)
    placeholder.unlink()


def fid_result(weights_dir: Path, record: dict, num_samples: int) -> dict:
    """The FID job's result file -> samples/s of each phase."""
    files = [p for p in (weights_dir / "eval").glob("*/*.json") if not p.name.endswith(".captions.json")]
    if not files:
        raise RuntimeError(f"the FID job wrote no result under {weights_dir / 'eval'}")
    result = json.loads(files[0].read_text())
    t = result["timings_s_rank0"]
    phases = {k: t[k] for k in ("sampling", "decoding", "features") if k in t}
    return {"num_samples": num_samples, "metrics": result["metrics"], "wall_time_s": result["wall_time_s"],
            "process_s": record["seconds"], "seconds": phases,
            "samples_per_s": {k: num_samples / v for k, v in phases.items() if v > 0},
            "other_s": result["wall_time_s"] - sum(t.values()),  # loading, reference, metrics, writing
            "settings": result["settings"], "reference": result["reference"]["id"]}


def max_micro_batch(deadline: float, log=print) -> dict:
    """The largest micro-batch of the L recipe that trains on this device: peak memory of the
    same steps at half the recipe's micro-batch and at the recipe's gives a line (memory = fixed +
    per image x batch); its prediction for 90 % of the device is then trained for real, stepped
    down by 10 % until a run passes (at most 3 tries). Lean runs: no graph count, no sync count."""
    recipe = "configs/experiments/imagenet256_L.yaml"
    base = ["train", "--config", recipe, "--steps", "2", "--warmup", "1", "--grad-accum", "1", "--no-graphs",
            "--sync-steps", "0"]
    tries = []

    def attempt(b):
        left = deadline - time.time()
        if left < 40:
            return None
        rec = execute(bench(*base, "--batch", str(b)), left, log)
        r = rec.get("result") or {}
        tries.append({"batch": b, "status": rec["status"], "seconds": rec["seconds"],
                      "peak_memory_gb": r.get("peak_memory_gb"), "error": (rec.get("error") or "")[-300:] or None})
        return rec

    b1 = load_config(recipe, []).train.micro_batch
    points = []
    for b in (b1 // 2, b1):
        rec = attempt(b)
        if rec is None or rec["status"] != "ok" or rec["result"].get("peak_memory_gb") is None:
            return {"status": "failed" if rec else "skipped", "tries": tries,
                    "error": f"no memory reading at micro-batch {b}" if rec else "budget"}
        points.append((b, rec["result"]["peak_memory_gb"], rec["result"]["device_memory_gb"]))
    (b0, m0, total), (b1, m1, _) = points
    per_image = (m1 - m0) / (b1 - b0)
    if per_image <= 0:
        return {"status": "failed", "tries": tries, "error": f"peak memory did not grow with the batch "
                                                              f"({m0:.2f} GB at {b0}, {m1:.2f} GB at {b1})"}
    fixed = m0 - per_image * b0
    predicted = int((0.90 * total - fixed) / per_image) // 8 * 8
    verified, b = b1, predicted
    for _ in range(3):
        if b <= verified:
            break
        rec = attempt(b)
        if rec is None:
            break
        if rec["status"] == "ok":
            verified = b
            break
        b = int(b * 0.9) // 8 * 8
    return {"status": "ok", "recipe_batch": b1, "gb_per_image": per_image, "fixed_gb": fixed,
            "device_memory_gb": total, "predicted": predicted, "largest_verified": verified, "tries": tries}


def main_runs(args, log=print, after_each=lambda records: None) -> dict[str, dict]:
    """Every run of the plan in order, within the budget; after_each(records) after each one (the
    check writes its files then: a check killed at the device's time limit still leaves them)."""
    t_start = time.time()
    deadline = t_start + args.budget_s
    records: dict[str, dict] = {}
    runs = plan(args.smoke)
    tmp = tempfile.TemporaryDirectory(prefix="enat_gpu_check_")
    for run in runs:
        if args.only and run.name not in args.only:
            continue
        if run.skip:
            records[run.name] = {"part": run.part, "status": "skipped", "error": run.skip}
            continue
        left = deadline - time.time()
        if left < max(run.expect_s, 10):
            records[run.name] = {"part": run.part, "status": "skipped",
                                 "error": f"budget: {left:.0f} s of {args.budget_s:.0f} left, it takes about "
                                          f"{run.expect_s:.0f} s"}
            continue
        log(f"\n== {run.name} ({left:.0f} s of the budget left)")
        try:
            if run.name == "train L max micro-batch":
                rec = max_micro_batch(min(deadline, time.time() + run.timeout_s), log)
            elif run.part == "fid":
                workdir = Path(tmp.name)
                argv = fid_run(workdir, args.smoke)
                rec = execute(argv, min(run.timeout_s, deadline - time.time()), log, json_result=False)
                if rec["status"] == "ok":
                    rec["result"] = fid_result(workdir, rec, int(argv[argv.index("--num-samples") + 1]))
            else:
                rec = execute(run.argv, min(run.timeout_s, deadline - time.time()), log)
        except Exception as e:  # a run that cannot even start is reported; the others go on
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        records[run.name] = {"part": run.part, **rec}
        log(f"-- {run.name}: {rec['status']} ({rec.get('seconds', 0):.0f} s)")
        after_each(records)
    tmp.cleanup()
    return records


# ---------------------------------------------------------------------------------------------
# Results: one JSON per part and the tables
# ---------------------------------------------------------------------------------------------


SYNC_TARGET = {"per_step": 1, "inside_forward_backward": 0}  # what the CPU counts (tests/test_train_step.py)


def sync_summary(records: dict[str, dict]) -> dict:
    """Syncs per optimizer step and inside forward + loss + backward of each training run, and
    per generate() of each sampler variant, at the dispatcher and by CUDA's count, with the target."""
    out = {"target": SYNC_TARGET, "train": {}, "sample": {}}
    for name, rec in records.items():
        r = rec.get("result")
        if rec.get("status") != "ok" or not r:
            continue
        if rec["part"] == "train":
            row = {k: r.get(k) for k in ("syncs_per_step", "syncs_by_mode", "syncs_inside_forward_backward",
                                         "cuda_syncs_per_step", "cuda_syncs_by_mode",
                                         "cuda_syncs_inside_forward_backward", "cuda_sync_sites",
                                         "sync_steps_counted")}
            counts = [(r.get("cuda_syncs_per_step"), r.get("cuda_syncs_inside_forward_backward")),
                      (r.get("syncs_per_step"), r.get("syncs_inside_forward_backward"))]
            per_step, inside = next((c for c in counts if c[0] is not None), (None, None))
            row["meets_target"] = (per_step == SYNC_TARGET["per_step"]
                                   and inside == SYNC_TARGET["inside_forward_backward"])
            out["train"][name] = row
        elif rec["part"] == "sample":
            out["sample"][name] = {v: {k: x.get(k) for k in ("syncs_per_generate", "cuda_syncs_per_generate",
                                                              "cuda_sync_sites")}
                                   for v, x in r["variants"].items()}
    return out


def _f(x, fmt=".2f", none="-") -> str:
    return none if x is None else format(x, fmt)


def _short(commit: str | None) -> str:
    return "?" if not commit else commit[:10] + ("+changes" if commit.endswith("+changes") else "")


def _header(env: dict, records: dict, ok: dict, smoke: bool, wall_s: float) -> list[str]:
    v = env.get("versions", {})
    memory = (f", {env['gpu_memory_gb']:.0f} GB, driver {env.get('driver')}, compute capability "
              f"{env.get('capability')}" if env.get("gpu_memory_gb") else "")
    return [f"# GPU check{' (smoke run: tiny sizes on a CPU, not GPU numbers)' if smoke else ''}", "",
            f"Device: {env.get('device_name', '?')}{memory}; torch {v.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}, deepspeed {v.get('deepspeed')}, python {env.get('python')}; "
            f"commit {_short(env.get('commit'))}; all runs {wall_s:.0f} s."]


def _training(env, records, ok, smoke, wall_s) -> list[str]:
    train = [(n, r) for n, r in ok.items() if records[n]["part"] == "train"]
    if not train:
        return []
    lines = ["## Training (the ImageNet recipes' step: ZeRO-2, one rank, EMA, reuse-mode steps, synthetic tokens)", "",
             "| run | params | micro-batch x accum | precision | s/step | img/s | TFLOP/s | MFU | peak GB "
             "| syncs/step (dispatcher / CUDA) | syncs in fwd+loss+bwd (dispatcher / CUDA) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in train:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        lines.append(f"| {n} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['grad_accum']} | {r['precision']} "
                     f"| {r['step_s']:.4f} | {r['images_per_s']:.1f} | {r['tflops_per_s']:.1f} | {mfu} "
                     f"| {_f(r.get('peak_memory_gb'), '.1f')} | {r['syncs_per_step']} / "
                     f"{_f(r.get('cuda_syncs_per_step'), 'd')} | {r['syncs_inside_forward_backward']} / "
                     f"{_f(r.get('cuda_syncs_inside_forward_backward'), 'd')} |")
    mb = records.get("train L max micro-batch", {})
    if mb.get("status") == "ok":
        lines += ["", f"Largest micro-batch at L: {mb['largest_verified']} trained (the memory line "
                      f"{mb['fixed_gb']:.1f} GB + {mb['gb_per_image']:.3f} GB/image predicted {mb['predicted']} "
                      f"for 95 % of {mb['device_memory_gb']:.0f} GB)."]
    sites = {n: r["cuda_sync_sites"] for n, r in train if r.get("cuda_sync_sites")}
    if sites:
        lines += ["", "CUDA syncs by call site (over the counted steps):", ""]
        lines += [f"- {n}: " + "; ".join(f"{c} x `{s}`" for s, c in by_site.items()) for n, by_site in sites.items()]
    return lines


def _sampling(env, records, ok, smoke, wall_s) -> list[str]:
    samples = [(n, r) for n, r in ok.items() if records[n]["part"] == "sample"]
    if not samples:
        return []
    lines = ["## Sampling", "", "| run | variant | img/s | s/batch | TFLOPs/img | TFLOP/s "
             "| syncs per generate() (dispatcher / CUDA) |", "|---|---|---|---|---|---|---|"]
    for n, r in samples:
        for v, x in r["variants"].items():
            lines.append(f"| {n} | {v} | {x['images_per_s']:.1f} | {x['seconds']:.3f} | {x['tflops_per_image']:.4f} "
                         f"| {x['achieved_tflops']:.1f} | {x['syncs_per_generate']} / "
                         f"{_f(x.get('cuda_syncs_per_generate'), 'd')} |")
    lines.append("")
    for n, r in samples:
        parts = [f"{label} wall-clock {r[f'wall_ratio_{key}_over_enat']:.2f}x against FLOPs "
                 f"{r[f'flops_ratio_{key}_over_enat']:.2f}x"
                 for key, label in (("vanilla", "NAT / ENAT"), ("noreuse", "no reuse / reuse"))
                 if f"wall_ratio_{key}_over_enat" in r]
        lines.append(f"- {n} (batch {r['batch']}, {r['steps']} steps, {r['dtype']}): " + "; ".join(parts))
    return lines


def _fid(env, records, ok, smoke, wall_s) -> list[str]:
    fid = [(n, r) for n, r in ok.items() if records[n]["part"] == "fid"]
    if not fid:
        return []
    lines = ["## FID job (random ENAT-B, random f16 VQGAN, torch-fidelity InceptionV3 with random weights)", "",
             "| run | samples | sampling img/s | decoding img/s | features img/s | other s | job wall s |",
             "|---|---|---|---|---|---|---|"]
    for n, r in fid:
        sp = r["samples_per_s"]
        lines.append(f"| {n} | {r['num_samples']} | {_f(sp.get('sampling'), '.1f')} | {_f(sp.get('decoding'), '.1f')} "
                     f"| {_f(sp.get('features'), '.1f')} | {r['other_s']:.1f} | {r['wall_time_s']:.1f} |")
    return lines


def _tokenizer(env, records, ok, smoke, wall_s) -> list[str]:
    tok = [(n, r) for n, r in ok.items() if records[n]["part"] == "tokenizer"]
    if not tok:
        return []
    lines = ["## Tokenizer (random weights)", "", "| run | resolution | batch | encode img/s | decode img/s |",
             "|---|---|---|---|---|"]
    for n, r in tok:
        lines.append(f"| {n} | {r['resolution']} | {r['batch']} | {r['images_per_s']['encode']:.1f} "
                     f"| {r['images_per_s']['decode']:.1f} |")
    return lines


def _runs(env, records, ok, smoke, wall_s) -> list[str]:
    lines = ["## Runs", "", "| run | status | seconds | note |", "|---|---|---|---|"]
    for n, r in records.items():
        note = (r.get("error") or "").strip().splitlines()
        note = note[-1][:160].replace("|", "/") if note else ""
        lines.append(f"| {n} | {r['status']} | {_f(r.get('seconds'), '.0f')} | {note} |")
    return lines


def tables(env: dict, records: dict[str, dict], smoke: bool, wall_s: float) -> str:
    """check.md. A section that cannot be drawn (a result without a field it shows) says so; the
    JSON files hold every number either way."""
    ok = {n: r["result"] for n, r in records.items() if r.get("status") == "ok" and r.get("result")}
    out = []
    for section in (_header, _training, _sampling, _fid, _tokenizer, _runs):
        try:
            lines = section(env, records, ok, smoke, wall_s)
        except (KeyError, TypeError, ValueError) as e:
            lines = [f"({section.__name__.strip('_')}: no table, {type(e).__name__}: {e}; see the JSON files)"]
        if lines:
            out += lines + [""]
    return "\n".join(out)


def write_outputs(out: Path, env: dict, records: dict[str, dict], smoke: bool, wall_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def dump(name, obj):
        (out / name).write_text(json.dumps(obj, indent=1, default=str) + "\n")

    dump("env.json", {**env, "smoke": smoke, "wall_s": wall_s,
                      "runs": {n: {"part": r["part"], "status": r["status"]} for n, r in records.items()}})
    for part in ("train", "sample", "fid", "tokenizer"):
        dump(f"{part}.json", {n: r for n, r in records.items() if r["part"] == part})
    dump("syncs.json", sync_summary(records))
    (out / "check.md").write_text(tables(env, records, smoke, wall_s))


def run(args) -> dict:
    t0 = time.time()
    out = Path(args.out)
    env_rec = execute([sys.executable, "-c", "import json; from enat.bench.gpu import environment; "
                                             "print(json.dumps(environment()))"], 120)
    env = env_rec.get("result") or {"versions": {}, "error": env_rec.get("error")}
    print(f"GPU check ({'smoke' if args.smoke else 'full'}): {env.get('device_name')}, torch "
          f"{env['versions'].get('torch')}, CUDA {env.get('cuda')}, budget {args.budget_s:.0f} s")
    records = main_runs(args, after_each=lambda recs: write_outputs(out, env, recs, args.smoke, time.time() - t0))
    wall = time.time() - t0
    write_outputs(out, env, records, args.smoke, wall)
    print("\n" + (out / "check.md").read_text())
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    failed = [n for n, r in records.items() if r["status"] in ("failed", "timeout")]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return {"out": str(out), "statuses": {n: r["status"] for n, r in records.items()}}
