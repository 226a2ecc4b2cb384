"""Build the offline wheelhouse (`.whl/`) that a lent GPU machine installs the project from.

The GPU machine has no network. Its image has CPython 3.12.3 (x86_64 manylinux), a CUDA torch 2.11
and the distributions in GPU_IMAGE. Run this on a machine that reaches PyPI: it resolves
`[project].dependencies` (minus DROPPED) with `constraints.txt`, keeps what the image lacks
(deepspeed, webdataset, submitit, torch-fidelity and their missing dependencies) plus the
`[build-system].requires` closure, and puts one wheel per package and target python in the folder,
with `requirements.txt` (the exact pins) and `manifest.json`:

    python launch/gpu/wheelhouse.py [--out .whl] [--python 3.12 --python 3.11 ...] [--keep-going]

Default pythons: 3.12 (the image's) and this interpreter's, so a CPU test venv installs the same
folder; pip picks the wheel that matches the installing python. Measured on 2026-12-07 for
3.12 + 3.11: 16 packages, 8.6 MiB (pydantic-core's two binary wheels 4.3, deepspeed 2.1), 17 s
with an empty pip cache (deepspeed built from its sdist), 10 s warm. The device carry limit is
64 MiB for the whole tree, so the run fails above 60 MiB. On the GPU machine, from the repo root
(launch/gpu/check.sh runs these, then `pip check`):

    python3 -m pip install --no-index --no-deps --find-links .whl -r .whl/requirements.txt
    python3 -m pip install --no-index --no-deps --find-links .whl -r .whl/floors.txt
    python3 -m pip install --no-index --no-deps --find-links .whl .   # the project, built offline

requirements.txt: the runtime packages the image lacks, pinned. floors.txt: the minimum versions
they need of the image's own packages (see floors()), whose pure-Python wheels are carried too and
installed only where the image's copy is older. The build requirements stay in the folder for
pip's isolated build of the project and are never installed into the image. `--no-deps` because
everything else comes from the image. wandb is dropped (see DROPPED: its wheel alone is 19.4 MiB).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 60  # the device carries at most 64 MiB of the whole tree; leave room for the code

# `pip list` on the lent GPU machine's image, read on IMAGE_DATE (normalized names).
IMAGE_DATE = "2026-11-17"
GPU_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspection urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Left out of the resolution, so their dependencies that nothing else needs stay out too.
DROPPED = {
    "wandb": "the GPU check runs with wandb disabled, and wandb-0.31.0-py3-none-manylinux_2_28_x86_64"
             ".whl alone is 19.4 MiB (20,337,507 bytes; 55.9 MB unpacked), a third of the carry limit",
}

# The image's accelerator stack: a PyPI or CPU build of any of these would replace its CUDA build
# (torchvision/torchaudio are compiled against one torch release).
NEVER_CARRY = ("torch", "torchvision", "torchaudio", "triton", "nvidia-*", "*cuda*")

# Capped at manylinux_2_34 so both sides run them: glibc 2.36 here (Debian 12); the image's is not
# in the reading, but its CPython 3.12.3 is Ubuntu 24.04's (glibc 2.39). pip does not expand
# perennial tags, so list them, preferred first; manylinux2014 brings manylinux2010 and manylinux1.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in (34, 31, 28, 27, 24, 17, 12, 5)] + ["manylinux2014_x86_64"]


def normalize(name: str) -> str:
    """PEP 503 name: `Torch_Fidelity` and `torch.fidelity` are `torch-fidelity`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """`scikit-learn>=1.3 ; python_version > '3'` -> `scikit-learn`."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return normalize(m.group(1))


def never_carry(name: str, version: str = "") -> bool:
    # A local version label (2.13.0+cpu, +cu130) marks a build from an accelerator-specific index.
    return "+" in version or any(fnmatch.fnmatch(normalize(name), p) for p in NEVER_CARRY)


def _pyproject(path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def project_dependencies(pyproject_path) -> list[str]:
    """`[project].dependencies` as written (requirement strings)."""
    return list(_pyproject(pyproject_path)["project"]["dependencies"])


def runtime_requirements(pyproject_path) -> list[str]:
    """What is resolved: the project's dependencies minus DROPPED, not the project itself, so a
    dropped package's own dependencies are not pulled in."""
    return [r for r in project_dependencies(pyproject_path) if requirement_name(r) not in DROPPED]


def build_requirements(pyproject_path) -> list[str]:
    """`[build-system].requires`: what `pip install .` puts in its isolated build environment."""
    return list(_pyproject(pyproject_path)["build-system"]["requires"])


def plan(resolved: dict[str, str], always=()) -> dict:
    """Sort a resolution {name: version} into what the wheelhouse carries and what it does not.

    `always`: names carried even though the image has them (the build requirements: pip's isolated
    build environment does not see the image's site-packages, and the image's setuptools version is
    unknown). DROPPED and NEVER_CARRY win over everything.
    -> {"carry": {name: version}, "image": {name: version}, "never": {name: version},
        "dropped": {name: reason}}
    """
    always = {normalize(n) for n in always}
    out = {"carry": {}, "image": {}, "never": {}, "dropped": dict(DROPPED)}
    for name, version in sorted(resolved.items()):
        name = normalize(name)
        if name in DROPPED:
            continue
        elif never_carry(name, version):
            out["never"][name] = version
        elif name in GPU_IMAGE and name not in always:
            out["image"][name] = version
        else:
            out["carry"][name] = version
    return out


class PipError(RuntimeError):
    def __init__(self, cmd: list[str], proc: subprocess.CompletedProcess):
        self.stderr = proc.stderr
        # This machine's pip config names local index folders that lack most projects; pip warns
        # about each one, which would bury the real error.
        lines = [ln for ln in proc.stderr.splitlines() if "it is neither a file nor a directory" not in ln]
        tail = "\n".join("    " + ln for ln in lines[-15:])
        super().__init__(f"pip failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")


class NoWheel(Exception):
    pass


def pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise PipError(cmd, proc)
    return proc


def resolve(requirements: list[str], constraints: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What pip would install for `requirements` into an empty environment: ({name: version},
    {name: its own requirements, extras left out})."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "-c", str(constraints), *requirements)
        entries = json.loads(report.read_text())["install"]
    # Markers are evaluated for this interpreter, not for each target python: say so when it matters.
    for e in entries:
        for r in e["metadata"].get("requires_dist") or []:
            if "python_" in r and "extra" not in r:
                print(f"warning: {e['metadata']['name']} requires {r!r}: resolved for python "
                      f"{sys.version_info.major}.{sys.version_info.minor}, check the other targets", file=sys.stderr)
    requires = {normalize(e["metadata"]["name"]): [r for r in e["metadata"].get("requires_dist") or []
                                                   if "extra" not in r.partition(";")[2]] for e in entries}
    return {normalize(e["metadata"]["name"]): e["metadata"]["version"] for e in entries}, requires


def floors(carried, provided: dict[str, str], requires: dict[str, list[str]]) -> dict[str, str]:
    """What the carried packages require of the image's packages with a version bound, as
    {name: "name>=x,..."}: pydantic needs typing-extensions>=4.16.0, and the image's version was
    never read. check.sh installs these with --no-deps and no --upgrade: pip keeps the image's
    copy where it satisfies the bound and takes the carried wheel only where it does not."""
    bounds: dict[str, list[str]] = {}
    for name in carried:
        for r in requires.get(name, []):
            dep, spec = requirement_name(r), r.partition(";")[0].strip()
            spec = spec[len(re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*", spec).group(0)):].strip(" ()")
            if dep in provided and any(op in spec for op in "<>=!~"):
                bounds.setdefault(dep, []).append(spec)
    return {dep: dep + ",".join(dict.fromkeys(specs)) for dep, specs in sorted(bounds.items())}


def download(pin: str, python: str, dest: Path) -> Path:
    """The wheel of `pin` for CPython `python` on x86_64 manylinux, into an empty `dest`."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    try:
        pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
            python, "--abi", "cp" + python.replace(".", ""), *platforms, "-d", str(dest), pin)
    except PipError as e:
        if "No matching distribution found" in e.stderr:
            raise NoWheel(pin) from None
        raise
    (wheel,) = dest.iterdir()
    return wheel


def build(pin: str, dest: Path) -> Path:
    """Build an sdist-only `pin` here; only a pure-Python wheel also runs on the GPU machine."""
    pip("wheel", "--no-deps", "--no-binary", requirement_name(pin), "-w", str(dest), pin)
    (wheel,) = dest.iterdir()
    python_tag, abi, platform = wheel.name[:-len(".whl")].split("-")[-3:]
    if (abi, platform) != ("none", "any") or "py3" not in python_tag.split("."):
        raise RuntimeError(f"{pin} has no wheel on the index and builds to {wheel.name}, not a pure-Python "
                           f"(py3-none-any) wheel: it would only run on this machine's python and platform")
    return wheel


def fetch(carry: dict[str, str], pythons: list[str], staging: Path) -> tuple[dict, dict]:
    """Download every carried pin for every target python; build the ones that have no wheel.
    -> ({name: {wheel file name: path}}, {name: error}); a pure wheel comes once per python, kept once."""
    wheels = {name: {} for name in carry}
    errors, unbuilt = {}, set()

    def one(name: str, python: str):
        dest = Path(tempfile.mkdtemp(dir=staging))  # empty: what lands in it belongs to this pin
        try:
            wheel = download(f"{name}=={carry[name]}", python, dest)
            wheels[name][wheel.name] = wheel
        except NoWheel:
            unbuilt.add(name)
        except Exception as e:  # noqa: BLE001 - reported per package below
            errors[name] = str(e)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda job: one(*job), [(n, py) for n in carry for py in pythons]))
    for name in sorted(unbuilt - errors.keys()):
        print(f"{name}=={carry[name]}: no wheel on the index, building it", flush=True)
        try:
            wheel = build(f"{name}=={carry[name]}", Path(tempfile.mkdtemp(dir=staging)))
            wheels[name] = {wheel.name: wheel}
        except Exception as e:  # noqa: BLE001
            errors[name] = str(e)
    return wheels, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".whl",
                    help="wheelhouse folder (default: .whl at the repo root)")
    ap.add_argument("--python", action="append", metavar="X.Y",
                    help="target CPython, repeatable (default: 3.12, the GPU image's, and this interpreter's)")
    ap.add_argument("--keep-going", action="store_true",
                    help="write what could be fetched even if some packages failed (still exits 1); "
                         "without it a failure leaves the folder as it was")
    args = ap.parse_args(argv)
    pythons = list(dict.fromkeys(args.python or ["3.12", f"{sys.version_info.major}.{sys.version_info.minor}"]))
    out, t0 = args.out, time.monotonic()

    pyproject, constraints = REPO / "pyproject.toml", REPO / "constraints.txt"
    runtime, requires = resolve(runtime_requirements(pyproject), constraints)
    # Its own resolution: the isolated build environment installs the whole closure (wheel needs
    # packaging), none of which it may take from the image.
    build_env, _ = resolve(build_requirements(pyproject), constraints)
    clash = {n: (runtime[n], v) for n, v in build_env.items() if runtime.get(n, v) != v}
    if clash:
        sys.exit(f"the build requirements and the dependencies resolve to different versions: {clash}")
    if set(DROPPED) & runtime.keys():
        sys.exit(f"dropped {sorted(set(DROPPED) & runtime.keys())}, but another dependency still requires it")
    p = plan({**runtime, **build_env}, always=build_env)
    lacking = [f"{n}=={v}" for n, v in p["never"].items() if n not in GPU_IMAGE]
    if lacking:
        print(f"warning: never carried and not in the image, so missing on the GPU machine: {lacking}",
              file=sys.stderr)
    carry = p["carry"]
    provided = {n: v for n, v in runtime.items() if n in GPU_IMAGE and not never_carry(n, v)}
    bounds = floors([n for n in carry if n in runtime], provided, requires)
    floor_pins = {n: provided[n] for n in bounds if n not in carry}

    with tempfile.TemporaryDirectory() as staging:
        # The floors' wheels, where pure Python (a binary one for each python would be large; if the
        # image's copy of such a package were too old, pip check on the GPU says so).
        floor_wheels, _ = fetch(floor_pins, pythons, Path(staging))
        floor_wheels = {n: w for n, w in floor_wheels.items() if w and all(f.endswith("-none-any.whl") for f in w)}
        wheels, errors = fetch(carry, pythons, Path(staging))
        wheels, errors = fetch(carry, pythons, Path(staging))
        for name, err in sorted(errors.items()):
            print(f"\n{name}=={carry[name]}: {err}", file=sys.stderr)
        if errors and not args.keep_going:
            print(f"\n{len(errors)} package(s) failed; {out} left as it was", file=sys.stderr)
            return 1
        done = {n: v for n, v in carry.items() if n not in errors}
        wheels.update(floor_wheels)
        done.update({n: floor_pins[n] for n in floor_wheels})
        out.mkdir(parents=True, exist_ok=True)
        for name in done:
            for fname, path in wheels[name].items():
                shutil.move(path, out / fname)
    kept = {fname for name in done for fname in wheels[name]}
    for f in out.iterdir():  # an earlier build's other versions: one version per package
        if f.is_file() and f.name not in kept and f.name.endswith((".whl", ".tar.gz", ".zip")):
            print(f"removing stale {f.name}")
            f.unlink()

    packages = {n: {"version": v, "why": "floor" if n in floor_wheels else "build" if n in build_env else "runtime",
                    "files": sorted(wheels[n]),
                    "bytes": sum((out / f).stat().st_size for f in wheels[n])} for n, v in done.items()}
    where = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out.resolve()
    # requirements.txt: what is installed into the image. The build requirements stay in the folder
    # only, for pip's isolated build of the project: the image keeps its own setuptools and wheel.
    pins = "".join(f"{n}=={v}\n" for n, v in done.items() if packages[n]["why"] == "runtime")
    if errors:
        pins = f"# INCOMPLETE, failed: {' '.join(sorted(errors))}\n" + pins
    (out / "requirements.txt").write_text(pins)
    (out / "floors.txt").write_text("".join(f"{spec}\n" for spec in bounds.values()))
    (out / "manifest.json").write_text(json.dumps({
        "packages": packages, "total_bytes": sum(i["bytes"] for i in packages.values()),
        "pythons": pythons, "platforms": PLATFORMS,
        "dropped": p["dropped"], "failed": errors, "gpu_image_date": IMAGE_DATE,
        # what the runs take from the image (packaging too, though its wheel is here for the build)
        "provided_by_image": provided,
        "floors": {"bounds": bounds, "carried": sorted(floor_wheels)},
        "never_carried": p["never"],
        "install": f"python3 -m pip install --no-index --no-deps --find-links {where} -r {where}/requirements.txt",
    }, indent=2) + "\n")

    print(f"\n{'package':<20} {'version':<12} {'why':<8} {'KiB':>7}  files")
    for n, info in packages.items():
        kib, files = info["bytes"] / 1024, " ".join(info["files"])
        print(f"{n:<20} {info['version']:<12} {info['why']:<8} {kib:>7.0f}  {files}")
    for n, reason in p["dropped"].items():
        print(f"dropped {n}: {reason}")
    mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20  # the whole folder travels
    print(f"\n{out}: {len(packages)} packages for python {', '.join(pythons)}, {mib:.1f} MiB, "
          f"{time.monotonic() - t0:.0f} s")
    if mib > LIMIT_MIB:
        print(f"{out} is {mib:.1f} MiB, over {LIMIT_MIB} MiB: the device carries at most 64 MiB of the "
              f"whole tree", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PipError as e:
        sys.exit(str(e))
