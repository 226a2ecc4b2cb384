"""VQGAN parity with the released tokenizer code for every vqgan_*.pt golden file, key layout of
the released full-size tokenizer, loading errors, and the demo tokenizer's own training."""

import json

import pytest
import torch

from conftest import golden_files
from enat.config import TokenizerConfig
from enat.models.weights import WeightsError
from enat.tokenizer import VQGAN, load_tokenizer

TOL = dict(atol=1e-4, rtol=1e-4)


def config_from_golden(c: dict) -> TokenizerConfig:
    dd = c["ddconfig"]
    return TokenizerConfig(ch=dd["ch"], ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                           z_channels=dd["z_channels"], resolution=dd["resolution"], codebook_size=c["n_embed"],
                           in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3))


@pytest.fixture(scope="module", params=golden_files("vqgan_*.pt"), ids=lambda p: p.name)
def golden(request, tmp_path_factory):
    d = torch.load(request.param, weights_only=True)
    path = tmp_path_factory.mktemp("vq") / "vqgan.ckpt"
    torch.save({"state_dict": d["state_dict"], "loss.discriminator.w": torch.zeros(1)}, path)
    return d, load_tokenizer(config_from_golden(d["config"]), path)


def test_parameter_count(golden):
    d, vq = golden
    assert sum(p.numel() for p in vq.parameters()) == d["config"]["num_parameters"]


def test_encoder_latents_ids_and_decode(golden):
    d, vq = golden
    with torch.no_grad():
        z = vq.encoder(d["images"])
        torch.testing.assert_close(z, d["latents_prequant"], **TOL)
        ids = vq.encode(d["images"])
        assert torch.equal(ids, d["token_ids"])
        assert torch.equal(ids.flatten(), d["token_ids_flat"])
        torch.testing.assert_close(vq.quantize.lookup(ids), d["quant"], **TOL)
        torch.testing.assert_close(vq.decode(d["token_ids"]), d["decoded"], **TOL)
        torch.testing.assert_close(vq.decode(d["token_ids"].flatten(1)), d["decoded"], **TOL)


@pytest.mark.parametrize("path", golden_files("vqgan_keys_*.json"), ids=lambda p: p.name)
def test_official_key_layout(path):
    spec = json.loads(path.read_text())
    cfg = config_from_golden(spec["config"])
    with torch.device("meta"):
        vq = VQGAN(cfg)
    ours = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert ours == {k["key"]: tuple(k["shape"]) for k in spec["keys"]}
    assert sum(p.numel() for p in vq.parameters()) == spec["num_parameters"]


def test_load_errors_name_the_problem(tmp_path, golden):
    d, _ = golden
    cfg = config_from_golden(d["config"])
    with pytest.raises(WeightsError, match="not found"):
        load_tokenizer(cfg, tmp_path / "none.ckpt")
    sd = dict(d["state_dict"])
    sd.pop("decoder.conv_out.bias")
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(WeightsError, match=r"missing \['decoder.conv_out.bias'\].*unexpected \['encoder.extra.weight'\]"):
        load_tokenizer(cfg, tmp_path / "bad.ckpt")
    other = TokenizerConfig(**{**cfg.__dict__, "z_channels": cfg.z_channels * 2})
    torch.save(d["state_dict"], tmp_path / "ok.ckpt")
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_tokenizer(other, tmp_path / "ok.ckpt")


def test_demo_tokenizer_trains_and_reloads(tmp_path):
    from enat.config import load_config
    from enat.data.digits import load_digits
    from enat.tokenizer.train import train_tokenizer

    cfg = load_config("configs/experiments/demo.yaml",
                      ["tokenizer.train.steps=24", "tokenizer.train.log_every=8", "tokenizer.train.dead_code_every=8"])
    images, _, _ = load_digits("train", cfg.tokenizer.resolution)
    logs = []
    stats = train_tokenizer(cfg, images[:256], tmp_path / "tok.pt", log=logs.append)
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("tokenizer step")]
    assert losses[-1] < losses[0]
    assert stats["codes_used"] > 10
    vq = load_tokenizer(cfg.tokenizer, tmp_path / "tok.pt")
    ids = vq.encode(images[:8])
    assert ids.shape == (8, 8, 8) and int(ids.max()) < cfg.tokenizer.codebook_size
    assert vq.decode(ids).shape == (8, 3, 32, 32)
