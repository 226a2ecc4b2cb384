"""Run a scaling study end to end (configs/studies/*.yaml), phase after phase:

    1. the LR sweep (scaling.plan lr, then its runs)
    2. the plan: LR per size, throughput measured here, isoFLOP levels sized to the study's minutes
    3. the fit sweep (isoFLOP levels + seed repeats), with an FID job per run when --eval
       with `rounds: 2`: the first round's law (OUT_DIR/round1), then a second round planned from
       it (scaling.plan sweep2) at levels between the first's, into the same fit sweep
    4. the pre-registration: the hold-out's predicted loss and 95 % interval, written before it runs
    5. the hold-out runs
    6. the report: law, three approaches, frontiers, hold-out against its pre-registration

A study with `families` (ENAT and the NAT) runs these phases for each family in turn (OUT_DIR/FAMILY),
then compares them (scaling/compare.py: OUT_DIR/comparison).

    python -m scaling.study --study configs/studies/digits.yaml [--eval] [--cluster local|slurm ...]
    python -m scaling.study --study configs/studies/fashion.yaml [--wandb]

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
from scaling.compare import compare_families
from scaling.plan import family_studies, load_study, study_phase
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


def _plan(study_path, family_args: list[str]) -> None:
    """The first (or only) round's plan, in a process of its own: it measures throughput with real
    trainers, so that this one holds no process group (and port) when the runs start. Its error
    (already printed by it) ends the study with a named error, not a traceback."""
    done = subprocess.run([sys.executable, "-m", "scaling.plan", "--study", str(study_path), "sweep", *family_args])
    if done.returncode != 0:
        raise ScalingError(f"the plan failed (its error is above): fix the study spec {study_path}, then run the "
                           f"study again; it continues from the finished phases")


def _round1_report(fit_dir: Path, out: Path, loss: str, log) -> None:
    """The law of the first round alone, which places the second round's sizes (a lighter
    bootstrap: only the point estimate is used). Fitted past a failed regime gate: placing runs
    needs a law even then, and the final report still applies the gate."""
    report(fit_dir, out, loss=loss, bootstrap=100, approach_bootstrap=100, ignore_gate=True)
    done = json.loads((out / "fit.json").read_text())
    if not done.get("law"):
        raise ScalingError(f"round 1 gives no law ({out / 'report.md'}), so it cannot plan round 2")
    if not done.get("gate", {}).get("passed", True):
        log(f"   round 1 fails the regime gate ({out / 'report.md'}): its law places round 2's sizes all the same")


def run_family(study_path: str | Path, study, family: str | None, overrides: list[str], evaluate: bool,
               report_out: str | Path | None, phase, log) -> Path:
    """Every phase of one family's study -> its report folder."""
    plan_dir = study.out_dir / "plan"
    lr_spec = plan_dir / f"{study.name}_lr.yaml"
    fit_spec, hold_spec = plan_dir / f"{study.name}_fit.yaml", plan_dir / f"{study.name}_holdout.yaml"
    fit2_spec, round1 = plan_dir / f"{study.name}_fit2.yaml", study.out_dir / "round1"
    prereg = study.out_dir / "holdout" / "preregistration.json"
    fam = ["--family", family] if family else []
    phase("lr sweep", lambda: (lr_spec.is_file() or study_phase(study_path, "lr", log=log, family=family),
                               _sweep(lr_spec, overrides, False, log)))
    phase("plan", lambda: fit_spec.is_file() or _plan(study_path, fam))
    phase("fit sweep" if study.rounds == 1 else "round 1", lambda: _sweep(fit_spec, overrides, evaluate, log))
    if study.rounds == 2:
        phase("round 1 fit", lambda: (round1 / "fit.json").is_file() or _round1_report(study.out_dir / "fit", round1,
                                                                                       study.loss, log))
        phase("plan round 2", lambda: fit2_spec.is_file() or study_phase(study_path, "sweep2", log=log, family=family))
        phase("round 2", lambda: _sweep(fit2_spec, overrides, evaluate, log))
    phase("pre-registration", lambda: prereg.is_file() or preregister(
        study.out_dir / "fit", hold_spec, loss_key=study.loss, out=prereg))
    phase("hold-out", lambda: _sweep(hold_spec, overrides, evaluate, log))
    out = Path(report_out or study.out_dir / "report")
    phase("report", lambda: report(study.out_dir / "fit", out, loss=study.loss, holdout_sweep=study.out_dir / "holdout",
                                   preregistration=prereg))
    return out


def run_study(study_path: str | Path, overrides: list[str] | None = None, evaluate: bool = False,
              report_out: str | Path | None = None, log=print, wandb_mode: str | None = None) -> dict:
    """All phases of a study; for each of its families in turn, then their comparison."""
    overrides = list(overrides or [])
    study = load_study(study_path)
    times, t_all = {}, time.perf_counter()
    families = family_studies(study)

    def timed(prefix):
        def phase(name, fn):
            label = f"{prefix}: {name}" if prefix else name
            t0 = time.perf_counter()
            log(f"== {label}")
            fn()
            times[label] = round(time.perf_counter() - t0, 1)
            log(f"   {label}: {times[label]:.0f} s")
        return phase

    reports = {}
    for fam, fs in families.items():
        out = None if fam == "" else (Path(report_out) / fam if report_out else None)
        reports[fam] = run_family(study_path, fs, fam or None, overrides, evaluate, out if fam else report_out,
                                  timed(fam), log)
    summary = {"study": str(study_path), "phases_s": times}
    if list(families) != [""]:
        out = Path(report_out or study.out_dir / "comparison")
        timed("")("comparison", lambda: compare_families(
            {fam: (fs.out_dir / "fit", reports[fam], fs.out_dir / "round1") for fam, fs in families.items()}, out,
            loss=study.loss,
            wandb_mode=wandb_mode, name=study.name))
        summary["report"] = str(out / "comparison.md")
        summary["reports"] = {fam: str(r / "report.md") for fam, r in reports.items()}
    else:
        summary["report"] = str(reports[""] / "report.md")
    times["total"] = round(time.perf_counter() - t_all, 1)
    study.out_dir.mkdir(parents=True, exist_ok=True)
    (study.out_dir / "study.json").write_text(json.dumps(summary, indent=1))
    log(f"study {study.name}: {times['total'] / 60:.1f} min; report {summary['report']}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="configs/studies/*.yaml")
    p.add_argument("--eval", action="store_true", help="an FID job per run of the fit and hold-out sweeps")
    p.add_argument("--out", help="the report's folder (default OUT_DIR/report; with families, the comparison's, "
                                 "default OUT_DIR/comparison)")
    p.add_argument("--wandb", nargs="?", const="offline", choices=["offline", "online"],
                   help="publish the families' comparison as a wandb run (default mode offline)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    add_launch_args(p, config=False)
    args = p.parse_args(argv)
    try:
        run_study(args.study, list(args.overrides) + launch_overrides(args), args.eval, args.out,
                  wandb_mode=args.wandb)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
