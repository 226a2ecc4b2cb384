"""Benchmarks: `python -m enat.bench NAME ...` prints a table; with --json the result
alone on stdout as one JSON object and the table on stderr (`--json > FILE` holds JSON).
Speed goals live here, never in timed tests."""

import statistics
import time

import torch


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn after one untimed call (warm-up: compilation,
    cuDNN's algorithm choice), waiting for the device before and after each."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
