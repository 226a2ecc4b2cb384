"""Benchmarks: `python -m enat.bench NAME ...` prints a table (and with --json one JSON line last).
Speed goals live here, never in timed tests."""
