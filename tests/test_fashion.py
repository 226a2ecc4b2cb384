"""Fashion-MNIST, the real-image benchmark: the IDX files of Debian's dataset-fashion-mnist (read
for real: headers, counts, classes), every damaged or foreign file a named error, the 28 -> 64 px
geometry, and the tokenizer and classifier refusing data they do not belong to.

Needs `apt-get install dataset-fashion-mnist`; skipped without it unless ENAT_REQUIRE_FASHION=1
(CI sets it, so there a missing package fails)."""

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from enat.config import ConfigError, load_config
from enat.data.fashion import (DEFAULT_DIR, IMAGES_MAGIC, LABELS_MAGIC, FashionError, load_fashion, read_idx,
                               read_split, to_resolution)
from enat.data.shards import ShardError

CONFIG = ROOT / "configs/experiments/fashion_enat.yaml"


@pytest.fixture(scope="module")
def fashion_dir():
    if not (Path(DEFAULT_DIR) / "t10k-labels-idx1-ubyte.gz").is_file():
        if os.environ.get("ENAT_REQUIRE_FASHION") == "1":
            pytest.fail(f"Fashion-MNIST not at {DEFAULT_DIR}: `apt-get install dataset-fashion-mnist`")
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return Path(DEFAULT_DIR)


def test_the_real_files_parse_with_their_counts_and_balanced_classes(fashion_dir):
    images, labels = read_split("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = read_split("val")  # the project's held-out split is the test set
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert images.max() == 255 and images[:, [0, -1]][:, :, [0, -1]].mean() < 5  # dark corners, full range
    assert read_split("test")[0] is test_images  # cached


def _copy(fashion_dir, tmp_path) -> Path:
    d = tmp_path / "fmnist"
    shutil.copytree(fashion_dir, d)
    return d


def test_damaged_and_foreign_files_are_named_errors(fashion_dir, tmp_path):
    d = _copy(fashion_dir, tmp_path)
    labels = d / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    # truncated: the gzip stream cut short, and a complete stream of too few bytes
    labels.write_bytes((fashion_dir / labels.name).read_bytes()[:3000])
    with pytest.raises(FashionError, match="damaged or truncated.*apt-get install dataset-fashion-mnist"):
        read_idx(labels, LABELS_MAGIC, 10000)
    labels.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(FashionError, match=r"9990 bytes of data after the header.*needs 10000"):
        read_idx(labels, LABELS_MAGIC, 10000)
    # wrong magic: a labels file where images belong
    with pytest.raises(FashionError, match="magic 0x00000801, expected 0x00000803.*it is labels"):
        read_idx(fashion_dir / labels.name, IMAGES_MAGIC)
    labels.write_bytes(b"PK\x03\x04 not idx at all")
    with pytest.raises(FashionError, match="magic 0x504b0304.*not a Fashion-MNIST IDX file"):
        read_idx(labels, LABELS_MAGIC)
    # a count that disagrees with the dataset, header and data consistent
    labels.write_bytes(struct.pack(">II", LABELS_MAGIC, 9999) + raw[8:-1])
    with pytest.raises(FashionError, match="header says 9999 items, Fashion-MNIST has 10000"):
        read_idx(labels, LABELS_MAGIC, 10000)
    # an unpacked copy reads the same as the .gz
    labels.write_bytes(raw)
    assert (read_idx(labels, LABELS_MAGIC, 10000) == read_idx(fashion_dir / labels.name, LABELS_MAGIC)).all()
    # 27x28 images
    img = d / "t10k-images-idx3-ubyte.gz"
    img.write_bytes(gzip.compress(struct.pack(">IIII", IMAGES_MAGIC, 2, 27, 28) + bytes(2 * 27 * 28)))
    with pytest.raises(FashionError, match="images are 27x28, Fashion-MNIST's are 28x28"):
        read_idx(img, IMAGES_MAGIC)


def test_a_missing_folder_or_file_names_the_package_and_the_option(fashion_dir, tmp_path):
    with pytest.raises(FashionError, match=r"no Fashion-MNIST at .*nowhere.*apt-get install dataset-fashion-mnist"
                                           r".*data.fashion_dir"):
        read_split("train", str(tmp_path / "nowhere"))
    d = _copy(fashion_dir, tmp_path)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FashionError, match="train-labels-idx1-ubyte.gz not found"):
        read_split("train", str(d))
    # through the data commands: the tokenizer's training images, the tokenize source
    from enat.data.prepare import tokenizer_images
    from enat.data.tokenize import make_source

    cfg = load_config(CONFIG, [f"data.fashion_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ShardError, match="apt-get install dataset-fashion-mnist"):
        tokenizer_images(cfg, "train")
    with pytest.raises(ShardError, match="apt-get install dataset-fashion-mnist"):
        make_source("fashion_mnist", 64, "val", root=str(tmp_path / "nowhere"))


def test_28_px_become_64_px_by_padding_2_and_bilinear_2x(fashion_dir):
    x = np.zeros((2, 28, 28), np.uint8)
    x[0] = 255
    x[1, 10, 5] = 255  # one pixel: row 10 + 2 of the padded 32 -> rows 24, 25 of 64 carry most of it
    y = to_resolution(x)
    assert y.shape == (2, 1, 64, 64) and y.dtype == torch.float32
    full = y[0, 0]
    # output pixel i samples the padded 32 px at (i + 0.5) / 2 - 0.5: the 28 px occupy 2..29 there
    assert (full[5:59, 5:59] == 1).all() and (full[:3] == 0).all() and (full[:, 61:] == 0).all()
    assert full[3, 30] == 0.25 and full[4, 30] == 0.75 and full[59, 30] == 0.75
    spot = y[1, 0]
    r, c = divmod(int(spot.argmax()), 64)
    assert (r, c) in {(24, 14), (24, 15), (25, 14), (25, 15)} and spot.sum() == pytest.approx(4.0, rel=1e-5)
    # flipping commutes with the resize: a flipped shirt is the same shirt, flipped
    img = read_split("val")[0][:8]
    torch.testing.assert_close(to_resolution(img[:, :, ::-1].copy()), to_resolution(img).flip(-1), atol=1e-6, rtol=0)
    images, labels, idx = load_fashion("val", limit=5)
    assert images.shape == (5, 3, 64, 64) and torch.equal(images[:, 0], images[:, 2])
    assert labels.tolist() == read_split("val")[1][:5].tolist() and idx.tolist() == [0, 1, 2, 3, 4]


def test_the_classifier_refuses_another_datasets_weights_and_data(fashion_dir, tmp_path):
    from enat.eval.fidelity import DigitNet, EvalError, FashionNet, build_extractor
    from enat.eval.prepare import train_extractor
    from enat.models.weights import torch_save_atomic

    digits = tmp_path / "digits.pt"
    torch_save_atomic({"format": "enat-digit-classifier", "num_classes": 10, "state_dict": DigitNet().state_dict()},
                      digits)
    with pytest.raises(EvalError, match="not the fashion-cnn classifier.*trained on fashion_mnist"):
        build_extractor("fashion-cnn", str(digits))
    fashion = tmp_path / "fashion.pt"
    torch_save_atomic({"format": "enat-fashion-classifier", "num_classes": 10,
                       "state_dict": FashionNet().state_dict()}, fashion)
    with pytest.raises(EvalError, match="not the digits-cnn classifier"):
        build_extractor("digits-cnn", str(fashion))
    ex = build_extractor("fashion-cnn", str(fashion))
    pool, logits = ex((torch.rand(3, 3, 64, 64) * 255).to(torch.uint8))
    assert pool.shape == (3, 256) and logits.shape == (3, 10)
    demo = load_config(ROOT / "configs/experiments/demo.yaml", ["eval.extractor=fashion-cnn"])
    with pytest.raises(ConfigError, match="fashion_mnist classifier but data.dataset=digits"):
        train_extractor(demo, tmp_path / "x.pt")


def test_a_setting_can_be_chosen_against_the_training_images_not_the_test_ones(fashion_dir, tmp_path):
    """eval.reference_split=train: FID against training images, for sweeps whose choice the test
    images (the results' reference) must not see. Another id, so another cache entry."""
    from enat.eval.fidelity import FashionNet, build_extractor
    from enat.eval.reference import reference_spec, reference_stats
    from enat.models.weights import torch_save_atomic

    torch_save_atomic({"format": "enat-fashion-classifier", "num_classes": 10, "state_dict": FashionNet().state_dict()},
                      tmp_path / "fx.pt")
    common = ["data.subset=16", f"eval.extractor_weights={tmp_path / 'fx.pt'}", f"eval.cache_dir={tmp_path / 'c'}"]
    test, train = (load_config(CONFIG, [*common, f"eval.reference_split={s}"]) for s in ("test", "train"))
    specs = reference_spec(test), reference_spec(train)
    assert [s["kind"] for s in specs] == ["fashion-test", "fashion-train"] and specs[0]["id"] != specs[1]["id"]
    ex = build_extractor("fashion-cnn", str(tmp_path / "fx.pt"))
    stats = [reference_stats(c, s, ex, None, log=lambda *_: None) for c, s in zip((test, train), specs)]
    for split, st in zip(("test", "train"), stats):
        assert st["labels"].tolist() == read_split(split)[1][:16].tolist()
    assert not np.allclose(stats[0]["mu"], stats[1]["mu"])
    with pytest.raises(ConfigError, match="eval.reference_split=train is for data.dataset=fashion_mnist"):
        load_config(ROOT / "configs/experiments/demo.yaml", ["eval.reference_split=train"])


@pytest.mark.slow
def test_a_slice_of_the_real_data_through_the_launchers(fashion_dir, tmp_path):
    """The recipe end to end on the first 512 images of each split: the prepare job trains the
    tokenizer and the classifier, the tokenize jobs write the shards, 2 ranks train 200 steps, the
    FID job scores 100 samples against the (first 512) real test images."""
    import json
    import subprocess
    import sys

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    over = ["data.subset=512", "tokenizer.train.steps=30", "train.steps=200", "train.val_every=100",
            "train.val_samples=64", "train.sample_every=200", "train.ckpt_every=100", "train.warmup_steps=20",
            "train.micro_batch=16", "eval.num_samples=100", "eval.kid_subset_size=50", "train.wandb.mode=disabled"]
    res = subprocess.run([sys.executable, str(ROOT / "launch/pipeline.py"), "--config",
                          "configs/experiments/fashion_enat.yaml", *over, "--wait"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "runs/fashion"
    tok = torch.load(out / "tokenizer.pt", weights_only=True)
    assert tok["tokenizer_config"]["resolution"] == 64 and tok["meta"]["num_images"] == 512
    assert tok["meta"]["stats"]["val"]["images"] == 512 and tok["meta"]["stats"]["val"]["psnr_db"] > 10
    clf = torch.load(out / "classifier.pt", weights_only=True)
    assert clf["format"] == "enat-fashion-classifier" and clf["trained_on"]["images"] == 512
    for split, n in (("train", 1024), ("val", 1024)):  # as-is and flipped
        manifest = json.loads((out / "shards" / split / "manifest.json").read_text())
        assert manifest["num_samples"] == n and manifest["source"]["dataset"] == "fashion_mnist"
        assert manifest["source"]["subset"] == 512 and manifest["grid_size"] == 16
    run = out / "enat"
    assert (run / "checkpoints/latest").read_text().strip() == "step00000200"
    result = json.loads(next((run / "eval/00000200").glob("*.json")).read_text())
    assert result["num_samples"] == 100 and result["reference"]["kind"] == "fashion-test"
    assert result["reference"]["id"].startswith("fashion-test-first512-")
    assert "-64px-fashion-cnn-" in result["reference"]["id"]
    assert 0 < result["metrics"]["fid"] < 1e4 and 0 <= result["metrics"]["precision"] <= 1
    # the tokenizer's report: the held-out PSNR its training recorded, and the reconstruction FID
    # against the same cached reference the FID job used
    res = subprocess.run([sys.executable, "-m", "enat.cli", "tokenizer", "eval", "--config",
                          "configs/experiments/fashion_enat.yaml", *over, "--out", "tok.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "tok.json").read_text())
    assert report["images"] == 512 and report["psnr_db"] == pytest.approx(tok["meta"]["stats"]["val"]["psnr_db"])
    assert report["reference"]["id"] == result["reference"]["id"]
    assert 0 <= report["reconstruction"]["fid"] < result["metrics"]["fid"]  # the floor under the generator's


def test_shards_refuse_a_tokenizer_they_were_not_made_with(fashion_dir, tmp_path):
    """Retraining the tokenizer at the same path leaves shards whose ids the new codebook decodes
    into noise: preparing, training and the FID job all refuse, naming both tokenizers."""
    from enat.data.prepare import check_data, prepare_data
    from enat.eval.fidelity import EvalError
    from enat.eval.job import evaluate
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    cfg = load_config(CONFIG, ["data.subset=8", f"tokenizer.checkpoint={tmp_path / 'tok.pt'}",
                               f"data.shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}",
                               f"eval.extractor_weights={tmp_path / 'fx.pt'}"])
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})
    prepare_data(cfg, progress=False, log=lambda *_: None)
    check_data(cfg)  # the tokenizer the shards were made with: fine
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})  # another random codebook, same path
    for call in (lambda: prepare_data(cfg, log=lambda *_: None), lambda: check_data(cfg)):
        with pytest.raises(ShardError, match=r"tokenized with .*tok.pt \(sha256 \w{12}\), but tokenizer.checkpoint"
                                             r".* is another tokenizer"):
            call()
    with pytest.raises(EvalError, match="is another tokenizer"):
        evaluate(cfg, None, str(tmp_path / "no-weights.pt"), num_samples=10, log=lambda *_: None)


def test_a_smoke_tests_leftovers_are_refused_by_a_run_of_other_images(fashion_dir, tmp_path):
    """Shards, tokenizer and classifier of a data.subset run left at the paths a full run reads:
    each refused with what differs, never taken as the benchmark's."""
    from enat.data.prepare import check_data, prepare_data
    from enat.eval.fidelity import EvalError, FashionNet
    from enat.eval.reference import extractor_mismatch
    from enat.models.weights import torch_save_atomic
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    paths = [f"tokenizer.checkpoint={tmp_path / 'tok.pt'}", f"data.shards={tmp_path / 'train'}",
             f"data.val_shards={tmp_path / 'val'}", f"eval.extractor_weights={tmp_path / 'fx.pt'}"]
    smoke = load_config(CONFIG, ["data.subset=8", *paths])
    save_tokenizer(tmp_path / "tok.pt", VQGAN(smoke.tokenizer), {"num_images": 8})
    prepare_data(smoke, progress=False, log=lambda *_: None)
    bigger = load_config(CONFIG, ["data.subset=16", *paths])
    with pytest.raises(ShardError, match=r"holds other Fashion-MNIST images: subset 8 \(config: 16\), images 8 "
                                         r"\(config: 16\)"):
        check_data(bigger)
    with pytest.raises(ShardError, match=r"tokenizer .*tok.pt was trained on 8 images, this config reads 16"):
        prepare_data(bigger, log=lambda *_: None)
    torch_save_atomic({"format": "enat-fashion-classifier", "num_classes": 10, "state_dict": FashionNet().state_dict(),
                       "trained_on": {"images": 8}}, tmp_path / "fx.pt")
    assert extractor_mismatch(smoke) is None
    assert "trained on 8 Fashion-MNIST images, this config reads 60000" in extractor_mismatch(load_config(CONFIG, paths))
    digits = load_config(ROOT / "configs/experiments/demo.yaml", ["eval.extractor=fashion-cnn"])
    assert "use the extractor of this data (digits-cnn)" in extractor_mismatch(digits)
    # a file that is not Fashion-MNIST's (MNIST has the same names and shapes) is another reference
    from enat.eval.reference import reference_spec

    other = tmp_path / "other"
    shutil.copytree(fashion_dir, other)
    labels = gzip.decompress((other / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (other / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:8] + labels[8:][::-1]))
    assert reference_spec(smoke)["id"] != reference_spec(load_config(CONFIG, ["data.subset=8", *paths,
                                                                               f"data.fashion_dir={other}"]))["id"]


def test_the_readme_commands_name_the_package_and_existing_recipes():
    import re
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "dataset-fashion-mnist" in b)
    lines = [shlex.split(line) for line in block.strip().splitlines()]
    assert lines[0] == ["apt-get", "install", "dataset-fashion-mnist"]
    for argv in lines[1:]:
        assert argv[1] == "launch/pipeline.py" and argv[2] == "--config" and "--wait" in argv
        cfg = load_config(ROOT / argv[3])
        assert cfg.data.dataset == "fashion_mnist" and cfg.model.seq_len == 256
    archs = {load_config(ROOT / argv[3]).model.arch for argv in lines[1:]}
    assert archs == {"enat", "nat"}


def test_the_readme_result_commands_parse_and_name_existing_configs():
    """Every `enat` command of the README's Fashion-MNIST section parses, and its config
    overrides are real keys: the section's tables come from these commands."""
    import re
    import shlex

    from enat.cli import OVERRIDE, build_parser

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Real images: Fashion-MNIST"):]
    section = section[:section.index("\n## ", 1)]
    commands = [c for b in re.findall(r"```bash\n(.*?)```", section, re.S)
                for c in b.replace("\\\n", " ").splitlines() if c.startswith(".venv/bin/enat ")]
    assert len(commands) >= 5, commands
    for command in commands:
        argv = shlex.split(command.replace("$E", "runs/sweeps/fashion_size/enat-w64-4+1"))[1:]
        args, extra = build_parser().parse_known_args(argv)
        assert all(OVERRIDE.fullmatch(x) for x in extra), (command, extra)  # as enat.cli.main takes them
        load_config(CONFIG, [*(getattr(args, "overrides", None) or []), *extra])  # unknown keys raise
