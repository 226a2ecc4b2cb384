"""Scaling-law analysis over finished runs: collect, fit, report, plan.

Reads run directories (resolved config, metrics.jsonl, eval.jsonl) and sweep manifests; never
imports the trainer. The analytic FLOPs it needs come from `enat.flops`.
"""
