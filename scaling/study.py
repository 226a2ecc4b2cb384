"""Run a scaling study end to end (configs/studies/*.yaml), phase after phase:

    1. the LR sweep (scaling.plan lr, then its runs)
    2. the plan: LR per size, throughput measured here, isoFLOP levels sized to the study's minutes
    3. the fit sweep (isoFLOP levels + seed repeats), with an FID job per run when --eval
    4. the pre-registration: the hold-out's predicted loss and 95 % interval, written before it runs
    5. the hold-out runs
    6. the report: law, three approaches, frontiers, hold-out against its pre-registration

    python -m scaling.study --study configs/studies/digits.yaml [--eval] [--cluster local|slurm ...]

A phase whose output exists is not redone (finished runs are not resubmitted), so a rerun after an
interruption continues where it stopped. The phases' wall times go to OUT_DIR/study.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from launch.submit import add_launch_args, launch_overrides, wait
from launch.sweep import submit_sweep
from scaling.collect import ScalingError
from scaling.holdout import preregister
from scaling.plan import load_study, study_phase
from scaling.report import report


def _sweep(spec: Path, overrides: list[str], evaluate: bool, log) -> None:
    _, jobs = submit_sweep(spec, overrides, evaluate)
    failed = []
    for job in jobs:
        try:
            wait([job])
        except Exception as e:  # a failed run is reported by the report (excluded, with its reason)
            failed.append(f"job {job.job_id}: {str(e).splitlines()[0]}")
    for f in failed:
        log(f"  failed: {f}")


def run_study(study_path: str | Path, overrides: list[str] | None = None, evaluate: bool = False,
              report_out: str | Path | None = None, log=print) -> dict:
    overrides = list(overrides or [])
    study = load_study(study_path)
    plan_dir = study.out_dir / "plan"
    times, t_all = {}, time.perf_counter()

    def phase(name, fn):
        t0 = time.perf_counter()
        log(f"== {name}")
        fn()
        times[name] = round(time.perf_counter() - t0, 1)
        log(f"   {name}: {times[name]:.0f} s")

    lr_spec = plan_dir / f"{study.name}_lr.yaml"
    fit_spec, hold_spec = plan_dir / f"{study.name}_fit.yaml", plan_dir / f"{study.name}_holdout.yaml"
    prereg = study.out_dir / "holdout" / "preregistration.json"
    phase("lr sweep", lambda: (lr_spec.is_file() or study_phase(study_path, "lr", log=log),
                               _sweep(lr_spec, overrides, False, log)))
    # The plan measures throughput with real trainers: in a process of its own, so that this one
    # holds no process group (and port) when the runs start.
    phase("plan", lambda: fit_spec.is_file() or subprocess.run(
        [sys.executable, "-m", "scaling.plan", "--study", str(study_path), "sweep"], check=True))
    phase("fit sweep", lambda: _sweep(fit_spec, overrides, evaluate, log))
    phase("pre-registration", lambda: prereg.is_file() or preregister(
        study.out_dir / "fit", hold_spec, loss_key=study.loss, out=prereg))
    phase("hold-out", lambda: _sweep(hold_spec, overrides, evaluate, log))
    out = Path(report_out or study.out_dir / "report")
    phase("report", lambda: report(study.out_dir / "fit", out, loss=study.loss, holdout_sweep=study.out_dir / "holdout",
                                   preregistration=prereg))
    times["total"] = round(time.perf_counter() - t_all, 1)
    summary = {"study": str(study_path), "phases_s": times, "report": str(out / "report.md")}
    (study.out_dir / "study.json").write_text(json.dumps(summary, indent=1))
    log(f"study {study.name}: {times['total'] / 60:.1f} min; report {out / 'report.md'}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="configs/studies/*.yaml")
    p.add_argument("--eval", action="store_true", help="an FID job per run of the fit and hold-out sweeps")
    p.add_argument("--out", help="the report's folder (default OUT_DIR/report)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    add_launch_args(p, config=False)
    args = p.parse_args(argv)
    try:
        run_study(args.study, list(args.overrides) + launch_overrides(args), args.eval, args.out)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
