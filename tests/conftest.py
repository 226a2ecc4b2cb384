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
