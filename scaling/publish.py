"""The scaling report as a wandb run of its own in the sweep's group (job type scaling-report):
fit.json as the summary, the points as a table, the plots as images. Its id is derived from the
sweep, so a re-run updates that run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from enat.config import load_config
from scaling.collect import ScalingError


def report_run_id(project: str, entity: str | None, sweep_name: str) -> str:
    """The report's wandb run id: one per (entity, project, sweep), so re-running the report
    updates that run instead of adding another."""
    key = f"{entity or ''}/{project}/{sweep_name}"
    return "scaling-report-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def publish_wandb(result: dict, col, points: list[dict], key: str, plots: list[Path], out: Path,
                  mode: str | None = None) -> str:
    """The report as a wandb run in the sweep's group -> its id. The summary is fit.json's
    content (law with CIs, optimal allocation, hold-out, FID fits); the points go in a Table and
    the plots in images."""
    if not col.runs:
        raise ScalingError("--wandb: no runs to take the wandb project from")
    w = load_config(Path(col.runs[0]["run_dir"]) / "config.yaml").train.wandb
    mode = mode or w.mode
    if mode == "disabled":
        raise ScalingError("--wandb: the sweep's runs have train.wandb.mode=disabled; give --wandb-mode offline "
                           "(or online)")
    import wandb  # here, not at the top: seconds of start-up, only for a report published with --wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name = col.name or Path(result["sweep"]).name
    rid = report_run_id(w.project, w.entity, name)
    run = wandb.init(project=w.project, entity=w.entity, group=w.group or name, job_type="scaling-report",
                     id=rid, resume="allow", name=f"{name}: scaling report", dir=str(out), mode=mode,
                     tags=[f"sweep:{name}", "scaling-report"],
                     config={"sweep": result["sweep"], "loss": result["loss"], "points_used": result["points_used"],
                             "runs": result["runs"], "points": result["points"]})
    try:
        columns = ["run", "n_params_nonembed", "step", "samples", "compute", key]
        table = wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])
        run.log({"points": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        parts = ("law", "optimal", "approaches", "frontier", "holdout", "leave_one_out", "preregistered", "fid",
                 "k_flops_per_param_sample", "gate", "runs_table", "sensitivity", "fid_protocol")
        run.summary.update(json.loads(json.dumps({k: result[k] for k in parts if k in result}, default=float)))
    finally:
        run.finish()
    return rid
