"""launch/gpu/wheelhouse.py: what the GPU machine's offline wheelhouse carries. No network: the
resolution is stood in for by the versions installed in this venv, and pip by fakes."""

from importlib import metadata
from pathlib import Path

import pytest

from launch.gpu import wheelhouse as wh

PYPROJECT = wh.REPO / "pyproject.toml"
# What the 2026-11-17 image lacks of the direct dependencies (wandb aside, which is dropped).
MISSING_FROM_IMAGE = {"deepspeed", "webdataset", "submitit", "torch-fidelity"}


def installed(names) -> dict[str, str]:
    return {wh.normalize(n): metadata.version(n) for n in names}


def installed_closure(roots) -> dict[str, str]:
    """{name: version} of `roots` and everything they require, as installed in this venv."""
    seen, todo = {}, [wh.requirement_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            seen[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # a requirement whose marker excludes this python
            continue
        for r in metadata.requires(name) or []:
            if "extra" not in r.partition(";")[2]:
                todo.append(wh.requirement_name(r))
    return seen


def test_every_dependency_is_in_the_image_dropped_or_carried():
    deps = [wh.requirement_name(r) for r in wh.project_dependencies(PYPROJECT)]
    p = wh.plan(installed(n for n in deps if n not in wh.DROPPED))
    for name in deps:
        assert name in wh.GPU_IMAGE or wh.DROPPED.get(name) or name in p["carry"], (
            f"{name}: the GPU image lacks it and the wheelhouse would not carry it")


def test_carries_exactly_what_the_image_lacks():
    p = wh.plan(installed(wh.requirement_name(r) for r in wh.runtime_requirements(PYPROJECT)))
    assert set(p["carry"]) == MISSING_FROM_IMAGE


def test_carries_the_missing_transitive_dependencies():
    closure = installed_closure(wh.runtime_requirements(PYPROJECT))
    p = wh.plan(closure)
    assert {"pydantic", "pydantic-core", "annotated-types", "hjson", "braceexpand"} <= set(p["carry"])
    assert "torch" in closure and not any(wh.never_carry(n) for n in p["carry"])
    for name in closure:
        assert name in p["carry"] or name in wh.GPU_IMAGE, f"{name} is neither carried nor in the image"


def test_dropped_packages_and_their_own_dependencies_stay_out():
    assert all(isinstance(reason, str) and reason for reason in wh.DROPPED.values())
    assert "MiB" in wh.DROPPED["wandb"]  # the measured size is the reason
    runtime = wh.runtime_requirements(PYPROJECT)
    assert "wandb" not in {wh.requirement_name(r) for r in runtime}
    assert len(runtime) == len(wh.project_dependencies(PYPROJECT)) - len(wh.DROPPED)
    closure = installed_closure(runtime)
    assert not {"wandb", "opentelemetry-sdk", "cwevals"} & closure.keys()  # wandb's, needed by nothing else
    p = wh.plan({"wandb": "0.31.0", "WandB": "0.31.0"}, always=["wandb"])
    assert p["carry"] == {} and set(p["dropped"]) == set(wh.DROPPED)


def test_never_carries_the_accelerator_stack():
    stack = {"torch": "2.11.0", "Triton": "3.5.0", "nvidia-cublas": "13.1.0", "nvidia_nccl_cu13": "2.28",
             "nvidia-made-up": "1.0", "torchvision": "0.26.0", "cuda-toolkit": "13.0", "cupy-cuda13x": "13.6",
             "some-ext": "1.0+cu130"}
    p = wh.plan(stack, always=stack)  # not even as a build requirement
    assert p["carry"] == {} and len(p["never"]) == len(stack)


def test_build_requirements_are_carried_although_the_image_has_them():
    names = {wh.requirement_name(r) for r in wh.build_requirements(PYPROJECT)}
    assert {"setuptools", "wheel"} <= names <= wh.GPU_IMAGE
    resolved = {"setuptools": "84.2.1", "wheel": "0.48.0", "packaging": "26.4", "numpy": "2.4.6"}
    p = wh.plan(resolved, always=["setuptools", "wheel", "packaging"])
    assert p["carry"] == {"setuptools": "84.2.1", "wheel": "0.48.0", "packaging": "26.4"}
    assert wh.plan(resolved)["carry"] == {}


def test_normalization():
    assert wh.normalize("Torch_Fidelity") == wh.normalize("torch.fidelity") == "torch-fidelity"
    assert wh.normalize("A__b-.C") == "a-b-c"
    assert wh.requirement_name("Torch_Fidelity >= 0.3 ; python_version > '3'") == "torch-fidelity"
    assert wh.requirement_name("foo[bar]>=1") == "foo"
    assert all(wh.normalize(n) == n for n in wh.GPU_IMAGE), "GPU_IMAGE entries must be normalized to match"
    p = wh.plan({"Torch_Fidelity": "0.4.0", "PyYAML": "6.0.4"})
    assert p["carry"] == {"torch-fidelity": "0.4.0"} and p["image"] == {"pyyaml": "6.0.4"}


def fake_pip(wheel_name):
    """A `pip wheel ... -w DIR` that leaves `wheel_name` in DIR."""
    def pip(*args):
        (Path(args[args.index("-w") + 1]) / wheel_name).write_bytes(b"wheel")
    return pip


def test_a_built_wheel_must_be_pure_python(monkeypatch, tmp_path):
    monkeypatch.setattr(wh, "pip", fake_pip("deepspeed-0.19.8-py3-none-any.whl"))
    assert wh.build("deepspeed==0.19.8", tmp_path).name == "deepspeed-0.19.8-py3-none-any.whl"
    for bad in ("x-1.0-cp311-cp311-linux_x86_64.whl", "x-1.0-py3-none-linux_x86_64.whl", "x-1.0-py2-none-any.whl"):
        monkeypatch.setattr(wh, "pip", fake_pip(bad))
        (dest := tmp_path / bad).mkdir()
        with pytest.raises(RuntimeError, match="not a pure-Python"):
            wh.build("x==1.0", dest)


def test_fetch_builds_what_has_no_wheel_and_keeps_one_pure_wheel(monkeypatch, tmp_path):
    def download(pin, python, dest):
        name, version = pin.split("==")
        if name == "deepspeed":
            raise wh.NoWheel(pin)
        py = python.replace(".", "")
        tag = f"cp{py}-cp{py}-manylinux2014_x86_64" if name == "pydantic-core" else "py3-none-any"
        (dest / f"{name.replace('-', '_')}-{version}-{tag}.whl").write_bytes(b"wheel")
        return next(dest.iterdir())

    monkeypatch.setattr(wh, "download", download)
    monkeypatch.setattr(wh, "pip", fake_pip("deepspeed-0.19.8-py3-none-any.whl"))
    carry = {"deepspeed": "0.19.8", "pydantic-core": "2.50.5", "hjson": "3.1.0"}
    wheels, errors = wh.fetch(carry, ["3.12", "3.11"], tmp_path)
    assert errors == {}
    assert {n: sorted(w) for n, w in wheels.items()} == {
        "deepspeed": ["deepspeed-0.19.8-py3-none-any.whl"],
        "pydantic-core": ["pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.whl",
                          "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"],
        "hjson": ["hjson-3.1.0-py3-none-any.whl"]}


def test_floors_are_the_bounds_carried_packages_put_on_the_image():
    requires = {"pydantic": ["typing-extensions>=4.16.0", "annotated-types>=0.6.0", "pydantic-core==2.50.5"],
                "submitit": ["cloudpickle>=1.2.1", "typing_extensions (>=3.7.4.2)"],
                "torch-fidelity": ["numpy", "torchvision"],  # no bound: the image's copy is taken as it is
                "webdataset": ["pyyaml<7; python_version >= '3'"]}
    provided = {"typing-extensions": "4.16.0", "cloudpickle": "3.1.3", "numpy": "2.4.6", "pyyaml": "6.0.4"}
    bounds = wh.floors(["pydantic", "submitit", "torch-fidelity", "webdataset"], provided, requires)
    assert bounds == {"cloudpickle": "cloudpickle>=1.2.1", "pyyaml": "pyyaml<7",
                      "typing-extensions": "typing-extensions>=4.16.0,>=3.7.4.2"}
    # only what carried packages need: the image's own packages among themselves are the image's business
    assert wh.floors(["webdataset"], provided, {**requires, "numpy": ["typing-extensions>=9"]}) == {
        "pyyaml": "pyyaml<7"}
