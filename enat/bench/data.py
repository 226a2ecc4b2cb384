"""Loader throughput: samples/s and MB/s of token payload for one process with N DataLoader
workers, reading a shard folder (or synthetic shards of random tokens written through the
project's shard writer); --json puts the result alone on stdout as one JSON object
(`samples_per_s`; the table to stderr)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from enat.data.loader import TokenLoader
from enat.data.shards import Manifest
from enat.data.tokenize import _write_shard


def add_arguments(p) -> None:
    p.add_argument("--shards", help="shard folder with manifest.json")
    p.add_argument("--synthetic", type=int, default=0, help="write this many random samples instead")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per synthetic sample (256 = 16x16)")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="the result as one JSON object alone on stdout "
                   "(the table to stderr)")


def write_synthetic(out: Path, n: int, seq_len: int, shard_size: int, codebook_size: int = 1024,
                    num_classes: int = 1000) -> None:
    rng = np.random.default_rng(0)
    shards = []
    for j, start in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - start)
        tokens = rng.integers(0, codebook_size, (count, seq_len), dtype=np.uint16)
        samples = [(f"{start + i:09d}_0", tokens[i], int(rng.integers(0, num_classes))) for i in range(count)]
        name = f"shard-0000-{j:05d}.tar"
        shards.append({"name": name, "num_samples": count, "bytes": _write_shard(out / name, samples, seq_len)})
    grid = int(round(seq_len ** 0.5))
    Manifest(num_samples=n, grid_size=grid, codebook_size=codebook_size, num_classes=num_classes, shards=shards,
             source={"dataset": "synthetic"}).save(out)


def run(args) -> dict:
    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory()
        shard_dir = Path(tmp.name)
        t0 = time.perf_counter()
        write_synthetic(shard_dir, args.synthetic, args.seq_len, args.shard_size)
        print(f"wrote {args.synthetic} synthetic samples in {time.perf_counter() - t0:.1f}s")
    elif args.shards:
        shard_dir = Path(args.shards)
    else:
        raise SystemExit("give --shards DIR or --synthetic N")
    t0 = time.perf_counter()
    loader = TokenLoader(shard_dir, micro_batch=args.batch, num_workers=args.workers, cfg_drop=0.15,
                         null_class=1000, log=lambda *_: None)
    setup = time.perf_counter() - t0
    it = iter(loader)
    next(it)  # workers started, first batch out
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        n += next(it)["tokens"].shape[0]
    elapsed = time.perf_counter() - t0
    seq_len = loader.data.seq_len
    result = {"samples_per_s": n / elapsed, "mb_per_s": n * seq_len * 2 / elapsed / 1e6, "seq_len": seq_len,
              "workers": args.workers, "batch": args.batch, "samples": n, "seconds": elapsed,
              "setup_s": setup, "dataset_samples": len(loader.data)}
    print(f"data benchmark: {len(loader.data)} samples of {seq_len} tokens, batch {args.batch}, "
          f"{args.workers} workers (index load {setup:.2f}s)")
    print(f"{'samples/s':>12}{'MB/s':>10}{'batches/s':>11}")
    print(f"{result['samples_per_s']:>12,.0f}{result['mb_per_s']:>10.1f}{result['samples_per_s'] / args.batch:>11.1f}")
    if tmp is not None:
        tmp.cleanup()
    return result
