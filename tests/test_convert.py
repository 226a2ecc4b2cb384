"""Official checkpoint import: round trip, CLI, notices and clear errors."""

import pytest
import torch

from conftest import golden_files
from enat.cli import main
from enat.models.convert import clean_official, config_from_official_args, from_official, to_official
from enat.models.weights import WeightsError, load_model, load_weights

GOLDEN = golden_files("enat_*.pt")[0]


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def official_file(tmp_path, golden, prefix="module.", extra=True):
    """The golden weights as a released checkpoint looks: a plain state dict, maybe with a
    DDP `module.` prefix, the unused prev_embedder and position_ids buffers."""
    sd = {prefix + k: v for k, v in golden["state_dict"].items()}
    if extra:
        sd[prefix + "x_embedder.position_ids"] = torch.arange(golden["config"]["seq_len"])[None]
    path = tmp_path / "nnet_ema.pth"
    torch.save(sd, path)
    return path


def test_round_trip_is_exact(golden):
    cfg = config_from_official_args(golden["config"])
    sd, notices = clean_official(golden["state_dict"])
    back = to_official(from_official(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert any("prev_embedder" in n for n in notices)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_cli_convert_then_load_reproduces_golden_logits(tmp_path, golden, prefix, capsys):
    src = official_file(tmp_path, golden, prefix)
    dst = tmp_path / "enat_tiny.pt"
    c = golden["config"]
    rc = main(["convert", "official-enat", str(src), str(dst),
               "--num-heads", str(c["num_heads"]), "--enc-depth", str(c["enc_dec"][0])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "prev_embedder" in out and "position_ids" in out
    model = load_model(dst)
    with torch.no_grad():
        logits = model(golden["a_ids"], golden["a_labels"]).logits
    torch.testing.assert_close(logits, golden["a_logits"], atol=1e-4, rtol=1e-4)
    cfg, sd, meta = load_weights(dst)
    assert cfg.enc_depth == c["enc_dec"][0] and cfg.dec_depth == c["enc_dec"][1]
    assert meta["source"] == str(src)
    # The written file is a plain tensor container.
    torch.load(dst, weights_only=True)


def test_heads_and_split_inferred_from_zoo_when_shape_matches(tmp_path, golden):
    # The golden shape (width 64, 4 blocks) is the zoo's `tiny` (4 heads, 3+1).
    dst = tmp_path / "w.pt"
    assert main(["convert", "official-enat", str(official_file(tmp_path, golden)), str(dst)]) == 0
    cfg, _, _ = load_weights(dst)
    assert (cfg.size, cfg.num_heads, cfg.enc_depth) == ("tiny", 4, 3)


def test_unknown_shape_asks_for_heads(tmp_path, golden, capsys):
    sd = dict(golden["state_dict"])
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}  # 3 blocks: no zoo entry
    src = tmp_path / "odd.pth"
    torch.save(sd, src)
    assert main(["convert", "official-enat", str(src), str(tmp_path / "o.pt")]) == 2
    assert "--num-heads" in capsys.readouterr().err


def test_truncated_file_is_a_clear_error(tmp_path, golden, capsys):
    src = official_file(tmp_path, golden)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    assert main(["convert", "official-enat", str(src), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and str(src) in err


def test_missing_and_foreign_files(tmp_path, capsys):
    assert main(["convert", "official-enat", str(tmp_path / "nope.pth"), str(tmp_path / "o.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    assert main(["convert", "official-enat", str(other), str(tmp_path / "o.pt")]) == 2
    assert "not an official ENAT state dict" in capsys.readouterr().err


def test_official_file_given_where_enat_weights_expected(tmp_path, golden):
    src = official_file(tmp_path, golden, prefix="")
    with pytest.raises(WeightsError, match="enat convert official-enat"):
        load_weights(src)


def test_shape_mismatch_names_the_tensor(tmp_path, golden):
    cfg = config_from_official_args(golden["config"])
    sd, _ = clean_official(golden["state_dict"])
    ours = from_official(sd, cfg)
    ours["head.fc.weight"] = torch.zeros(3, 3)
    from enat.models.enat import ENAT
    from enat.models.weights import load_state

    with pytest.raises(WeightsError, match=r"head\.fc\.weight: file \(3, 3\)"):
        load_state(ENAT(cfg), ours, "x")
