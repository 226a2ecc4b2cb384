#!/usr/bin/env bash
# The GPU check: on a machine with one GPU and no network, install what its image lacks from the
# wheelhouse (.whl, built beforehand by launch/gpu/wheelhouse.py on a machine that reaches PyPI),
# install the project, print the machine, then measure (python -m enat.bench gpu; about 8 minutes
# on one H100). Results go to $OUT (env.json, train.json, syncs.json, sample.json, fid.json,
# tokenizer.json, check.md, check.log): the device tool brings back at most 8 files.
#
#   OUT=DIR launch/gpu/check.sh [--smoke] [--no-install] [--budget-s S] [--only RUN ...]
#
# PYTHON picks the interpreter (default python3: the image's, with its CUDA torch). --no-install
# skips the installs (packages already there). --smoke runs the same code at tiny sizes on a CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
install=1
args=()
for a in "$@"; do
    case "$a" in
        --no-install) install=0 ;;
        *) args+=("$a") ;;
    esac
done
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_DEBUG=${NCCL_DEBUG:-WARN}

if [ "$install" = 1 ]; then
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        echo "no wheelhouse at $WHEELS: build it where PyPI answers (python launch/gpu/wheelhouse.py) and carry it"
        exit 2
    fi
    t0=$(date +%s)
    # Exactly the pinned versions, nothing from an index, nothing replaced that the image holds (its torch).
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$WHEELS" -r "$WHEELS/requirements.txt" \
        || { echo "installing the wheelhouse failed"; exit 2; }
    # What they need of the image's packages at a minimum version (typing-extensions>=4.16 for
    # pydantic): no --upgrade, so the image's copy stays wherever it is recent enough.
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$WHEELS" -r "$WHEELS/floors.txt" \
        || echo "warning: a minimum version above is not met by the image nor carried (pip check below)"
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$WHEELS" . \
        || { echo "installing the project failed"; exit 2; }
    echo "installed the wheelhouse and the project in $(( $(date +%s) - t0 )) s"
    # The image's own versions of what the carried packages need were not chosen here: say if one clashes.
    "$PY" -m pip check 2>&1 | grep -v -i "^no broken" | head -20 || true
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: none (no GPU)"
"$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPUs {torch.cuda.device_count()}"
      + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
from enat.eval.fidelity import import_torch_fidelity  # torch-fidelity through the project's guard
for name in ("deepspeed", "pydantic", "webdataset", "submitit", "torch_fidelity"):  # what the runs import
    try:
        module = import_torch_fidelity() if name == "torch_fidelity" else importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', getattr(module, 'VERSION', '?'))}")
    except Exception as e:
        print(f"  {name}: cannot import: {type(e).__name__}: {e}")
EOF

"$PY" -m enat.bench gpu --out "$OUT" "${args[@]}"
