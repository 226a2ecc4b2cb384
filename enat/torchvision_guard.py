"""Import a library that imports torchvision (torch-fidelity, transformers' CLIP) on a CPU-only torch.

torchvision's PyPI build is a CUDA build: on a CPU-only torch its import fails with `operator
torchvision::nms does not exist`. `import_guarded` defines the two missing operator schemas (no
kernels; neither user calls torchvision's compiled ops) only when that happens, and retries.
It lives on the ground floor because both the FID module and the text encoder need it.
"""

from __future__ import annotations

import importlib
import sys

import torch

_LIBRARY = None  # the schema-only torchvision library, kept alive for the process


def _define_missing_ops() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")  # schemas only, for the import to succeed
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib


def import_guarded(name: str):
    """`importlib.import_module(name)`, defining torchvision's missing op schemas if the import
    fails on them (and dropping the half-imported modules first)."""
    try:
        return importlib.import_module(name)
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    root = name.split(".")[0]
    for mod in [m for m in sys.modules if m.startswith(("torchvision", root))]:
        del sys.modules[mod]
    _define_missing_ops()
    return importlib.import_module(name)
