import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """The reference tensors: ENAT_GOLDEN_DIR, else ../shared/golden beside the checkout."""
    d = Path(os.environ.get("ENAT_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
    if not d.is_dir():
        raise FileNotFoundError(f"golden directory {d} not found: set ENAT_GOLDEN_DIR to the folder "
                                f"holding enat_*.pt / vqgan_*.pt reference files")
    return d


def golden_files(pattern: str) -> list[Path]:
    files = sorted(golden_dir().glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {golden_dir()}")
    return files


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def demo_shards(d: Path) -> list[str]:
    """Demo token shards (train and val) from a random-weight tokenizer in folder `d` -> the config
    overrides pointing at them. The trainer does not care what the ids mean."""
    from enat.config import load_config
    from enat.data.prepare import tokenize_split
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    over = [f"tokenizer.checkpoint={d / 'tok.pt'}", f"data.shards={d / 'train'}", f"data.val_shards={d / 'val'}"]
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", over)
    torch.manual_seed(0)
    save_tokenizer(d / "tok.pt", VQGAN(cfg.tokenizer), {})
    for split in ("train", "val"):
        tokenize_split(cfg, split, progress=False, log=lambda *_: None)
    return over


def train_losses(run_dir: Path) -> dict:
    """{step: loss} of a run's metrics.jsonl, asserting each step was logged once, in order."""
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in train}
