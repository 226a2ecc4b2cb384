"""The config system: bases, overrides, validation messages, dump/reload."""

import dataclasses

import pytest

from conftest import ROOT
from enat.config import Config, ConfigError, dump_config, load_config
from enat.models.zoo import ZOO


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
    experiments combine, checked against the schema alone; sweeps expand into loadable runs."""
    from enat.config import _load_tree, from_dict

    from enat.sweeps import load_sweep, run_configs

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parent.name == "sweeps":  # sweep specs: every run's config must load
            assert run_configs(load_sweep(path)), path
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
