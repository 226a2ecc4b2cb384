"""The measured numbers of README.md and SLURM.md that are not a run's own record, re-measured:

    python tests/readme_measurements.py [--ranks 1|2] [--wandb offline|disabled] [--repeats 3]
    python tests/readme_measurements.py --lease-refusal [--repeats 3]
    python tests/readme_measurements.py --graphs [--steps 1000]

- seconds from the command to the demo's first training step (README, "Training");
- seconds until a second `enat train` on a run directory that a training run holds exits
  (SLURM.md, the lease table);
- the graphs torch.compile makes over a demo run with `train.compile=true` (README, "Other
  training options"), counted by dynamo in the training process.

Runs `enat train --config configs/experiments/demo.yaml` (under `torchrun --nproc_per_node 2`
with --ranks 2) for one step in a fresh run directory, and reads the first step's time from its
metrics.jsonl record (written when the step is done, before anything waits for wandb). The token
shards come from a random tokenizer, built once into --data (the trainer does not care what the
ids mean). Prints each repeat and the median."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shards(data: Path) -> list[str]:
    over = [f"tokenizer.checkpoint={data / 'tok.pt'}", f"data.shards={data / 'train'}",
            f"data.val_shards={data / 'val'}"]
    if not (data / "val" / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import demo_shards

        demo_shards(data)
    return over


def first_step_s(ranks: int, wandb: str, over: list[str]) -> float:
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        cmd = [sys.executable, "-m", "enat.cli", "train", "--config", str(ROOT / "configs/experiments/demo.yaml"),
               *over, f"train.run_dir={run}", "train.steps=1", "train.log_every=1", "train.val_every=0",
               "train.sample_every=0", f"train.wandb.mode={wandb}"]
        if ranks > 1:
            from enat.dist import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port())] + cmd[1:]
        env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
        t0 = time.time()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        return first["time"] - t0


def lease_refusal_s(over: list[str], repeats: int) -> list[float]:
    """A demo run trains (one process) while `enat train` on its run directory is refused, `repeats` times."""
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        cmd = [sys.executable, "-m", "enat.cli", "train", "--config", str(ROOT / "configs/experiments/demo.yaml"),
               *over, f"train.run_dir={run}", "train.steps=100000", "train.val_every=0", "train.sample_every=0",
               "train.ckpt_every=0", "train.wandb.mode=disabled"]
        env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
        holder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            while not (run / "metrics.jsonl").is_file():  # the holder trains
                time.sleep(0.2)
            out = []
            for _ in range(repeats):
                t0 = time.time()
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                out.append(time.time() - t0)
                assert res.returncode == 2 and "in use by another training run" in res.stderr, res.stderr[-2000:]
                print(f"{out[-1]:.2f} s", flush=True)
            return out
        finally:
            holder.terminate()
            holder.wait()


def compiled_graphs(over: list[str], steps: int) -> int:
    """Graphs dynamo compiled over a demo run of `steps` steps with train.compile=true (this process)."""
    import torch._dynamo.utils

    from enat.config import load_config
    from enat.train.trainer import train

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(ROOT / "configs/experiments/demo.yaml", over + [
            f"train.run_dir={d}/run", f"train.steps={steps}", "train.compile=true", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0", "train.wandb.mode=disabled"])
        train(cfg, log=lambda *_: None)
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--wandb", default="offline", choices=["offline", "disabled"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=Path(tempfile.gettempdir()) / "enat-startup-data", type=Path)
    p.add_argument("--lease-refusal", action="store_true")
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--steps", type=int, default=1000, help="--graphs: steps of the demo run (the demo's own: 1000)")
    args = p.parse_args()
    over = shards(args.data)
    if args.graphs:
        print(f"{compiled_graphs(over, args.steps)} graphs compiled over {args.steps} steps of the demo")
        return
    if args.lease_refusal:
        times = lease_refusal_s(over, args.repeats)
        print(f"refused {statistics.median(times):.1f} s after the command (median of {len(times)}; "
              f"the holder training)")
        return
    times = []
    for _ in range(args.repeats):
        times.append(first_step_s(args.ranks, args.wandb, over))
        print(f"{times[-1]:.2f} s", flush=True)
    print(f"first step {statistics.median(times):.1f} s after the command (median of {len(times)}; "
          f"{args.ranks} rank(s), wandb {args.wandb})")


if __name__ == "__main__":
    main()
