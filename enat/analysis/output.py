"""What an analysis writes: NAME.json (the record), NAME.md (the table), NAME.png (the figure),
and the table and figure in the training run's wandb run."""

from __future__ import annotations

from pathlib import Path

from enat.config import Config
from enat.eval.job import training_wandb_run
from enat.files import write_json


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def write_analysis(what: str, result: dict, folder: Path, table, figure,
                   log=print) -> tuple[list[str], list[list], Path]:
    """FOLDER/NAME.json (the record), .md (the table: table(result) -> (header, rows)) and .png
    (figure(result, path))."""
    name = what.replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table(result)
    md = markdown(header, rows)
    files = {"json": folder / f"{name}.json", "md": folder / f"{name}.md", "png": folder / f"{name}.png"}
    figure(result, files["png"])
    files["md"].write_text(md)
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["json"], result)
    log(md + f"wrote {files['json']}, {files['md'].name}, {files['png'].name} "
             f"({result['wall_time_s']:.0f} s)")
    return header, rows, files["png"]


def log_to_wandb(cfg: Config, run_dir: Path | None, name: str, header: list[str], rows: list[list], png: Path,
                 step: int) -> None:
    """The table and the figure into the training run's wandb run, under analysis/NAME."""
    with training_wandb_run(cfg, run_dir) as run:
        if run is None:
            return
        import wandb  # seconds of start-up: only when the run has a wandb run

        run.log({f"analysis/{name}": wandb.Table(columns=header, data=[[str(c) for c in r] for r in rows]),
                 f"analysis/{name}_figure": wandb.Image(str(png)), "analysis/checkpoint_step": step})
