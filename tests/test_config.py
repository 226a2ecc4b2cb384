"""The config system: bases, overrides, validation messages, dump/reload, the import graph."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from enat.config import ZOO, Config, ConfigError, dump_config, load_config


def write(path, text):
    path.write_text(text)
    return path


def test_bases_merge_in_order_and_overrides_win(tmp_path):
    write(tmp_path / "a.yaml", "model: {size: tiny, grid_size: 4}\ntokenizer: {resolution: 64}\n"
                               "sample: {steps: 4, cfg_scale: 1.0}\n")
    write(tmp_path / "b.yaml", "sample: {steps: 6}\n")
    exp = write(tmp_path / "exp.yaml", "base: [a.yaml, b.yaml]\nsample: {cfg_scale: 2.0}\n")
    cfg = load_config(exp, ["model.width=128", "sample.reuse=false"])
    assert cfg.model.size == "tiny" and cfg.model.grid_size == 4
    assert cfg.model.width == 128 and cfg.model.num_heads == ZOO["tiny"]["num_heads"]
    assert cfg.sample.steps == 6 and cfg.sample.cfg_scale == 2.0 and cfg.sample.reuse is False


def test_unknown_key_names_key_file_and_closest(tmp_path):
    write(tmp_path / "base.yaml", "model: {size: tiny, widht: 32}\n")
    exp = write(tmp_path / "exp.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    msg = str(e.value)
    assert "model.widht" in msg and str(tmp_path / "base.yaml") in msg and "model.width" in msg


def test_unknown_override_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.cfg_scal.*command-line override.*sample\.cfg_scale"):
        load_config(None, ["sample.cfg_scal=2"])
    with pytest.raises(ConfigError, match="'sampel'.*did you mean 'sample'"):
        load_config(None, ["sampel.steps=2"])


def test_wrong_type_names_expected_type(tmp_path):
    exp = write(tmp_path / "exp.yaml", "model: {width: wide}\n")
    with pytest.raises(ConfigError, match=r"'model.width'.*expects int \| None.*'wide'"):
        load_config(exp)
    with pytest.raises(ConfigError, match="'sample.steps'.*expects int"):
        load_config(None, ["sample.steps=2.5"])
    with pytest.raises(ConfigError, match="'sample.reuse'.*expects bool"):
        load_config(None, ["sample.reuse=1"])
    with pytest.raises(ConfigError, match=r"'model.arch'.*one of \['enat', 'nat'\]"):
        load_config(None, ["model.arch=vit"])
    # ints are fine where floats are expected
    assert load_config(None, ["sample.cfg_scale=3"]).sample.cfg_scale == 3.0


def test_dump_and_reload_gives_equal_object(tmp_path):
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", ["sample.seed=7"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert dataclasses.asdict(again)["model"]["width"] == ZOO["tiny"]["width"]


def test_every_shipped_config_loads():
    """Experiments and model sizes are complete configs; tokenizer/data files are fragments that
    experiments combine, checked against the schema alone; sweeps expand into loadable runs, and a
study's every size loads."""
    from enat.config import _load_tree, from_dict

    from enat.sweeps import load_sweep, run_configs

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parent.name == "sweeps":  # sweep specs: every run's config must load
            assert run_configs(load_sweep(path)), path
        elif path.parent.name == "studies":  # study specs: every size's LR-sweep run must load
            from scaling.plan import load_study, study_sizes

            study = load_study(path)
            assert len(study_sizes(study)) == len(study.sizes), path
        elif path.parent.name in ("experiments", "model"):
            assert isinstance(load_config(path), Config), path
        else:
            assert isinstance(from_dict(Config, _load_tree(path, {})), Config), path


def test_tokenizer_and_model_must_agree():
    with pytest.raises(ConfigError, match=r"8x8 grid of 128 codes.*model.grid_size 16"):
        load_config(ROOT / "configs/experiments/demo.yaml", ["model.grid_size=16"])


def test_zoo_and_model_yamls_agree():
    names = {p.stem for p in (ROOT / "configs/model").glob("*.yaml")}
    assert names == set(ZOO)
    for name in ZOO:
        assert load_config(ROOT / f"configs/model/{name}.yaml").model.size == name


def test_cross_field_and_range_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model.size 'XXL'"):
        load_config(None, ["model.size=XXL"])
    with pytest.raises(ConfigError, match="sample.reuse=false"):
        load_config(None, ["model.arch=nat"])
    assert load_config(None, ["model.arch=nat", "sample.reuse=false"]).model.arch == "nat"
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["model.width=100"])
    with pytest.raises(ConfigError, match="unset"):
        load_config(None, ["model.size=null"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["steps"])


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_loading_a_config_imports_no_network_code():
    """Sizes resolve in enat.config itself: a fresh interpreter that loads a config has not
    imported enat.models (nor torch through it)."""
    code = ("import sys\n"
            "import enat.config\n"
            "enat.config.load_config(sys.argv[1])\n"
            "print(sorted(m for m in sys.modules if m == 'enat.models' or m.startswith('enat.models.')))\n")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs/experiments/imagenet256_L.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"enat.config imported {res.stdout.strip()}"


def _enat_modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "enat").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, at_import_time: bool) -> set[str]:
    """The modules a file names in import statements: with `at_import_time`, only those that run
    when the file is imported (module level, class bodies, if/try/with blocks; not function
    bodies, not `if TYPE_CHECKING:`); else every one, lazy imports included."""
    found: set[str] = set()

    def add(node) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`

    def walk(stmts) -> None:
        for node in stmts:
            add(node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                walk(node.orelse)
                continue
            for name in ("body", "orelse", "finalbody", "handlers", "cases"):
                walk(getattr(node, name, []))

    tree = ast.parse(path.read_text())
    if at_import_time:
        walk(tree.body)
    else:
        for node in ast.walk(tree):
            add(node)
    return found


def test_no_import_cycles_config_and_zoo_included():
    """No module of enat imports, at import time, a module that (transitively) imports it back;
    and enat.config, which every component reads, imports nothing of enat.models even lazily
    (the zoo's sizes live in enat.config; enat.models.zoo imports them from there)."""
    modules = _enat_modules()
    graph = {name: sorted(m for m in _imports(path, True) if m in modules and m != name)
             for name, path in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, on_path, done = [(start, iter(graph[start]))], [start], set()
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                done.add(on_path.pop())
            elif nxt in on_path:
                return on_path[on_path.index(nxt):] + [nxt]
            elif nxt not in done:
                stack.append((nxt, iter(graph[nxt])))
                on_path.append(nxt)
        return None

    cycles = {frozenset(c): c for c in (cycle_from(m) for m in graph) if c}  # one per set of modules
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles.values())
    assert "enat.config" in graph["enat.models.zoo"]
    lazy = sorted(m for m in _imports(modules["enat.config"], False) if m.startswith("enat.models"))
    assert not lazy, f"enat.config imports {lazy} (zoo -> config -> zoo)"


def test_released_recipe_configs_drop_labels_as_released():
    """The ImageNet experiments follow the released recipe: labels to the null class in the data
    (0.15) and again in the model (0.1), ~23.5% in all; the demo drops in the data only."""
    for path in sorted((ROOT / "configs/experiments").glob("imagenet*.yaml")):
        cfg = load_config(path)
        assert cfg.model.label_drop == 0.1 and cfg.data.cfg_drop == 0.15, path
        assert 1 - (1 - cfg.data.cfg_drop) * (1 - cfg.model.label_drop) == pytest.approx(0.235), path
    assert load_config(ROOT / "configs/experiments/demo.yaml").model.label_drop == 0.0
