"""The augmented digits (data.dataset=digits_aug): determinism under any slicing, seeds, the held-out
split's base digits, transforms that change the image but keep a digit, no flips, and the
tokenize -> manifest -> loader path."""

import numpy as np
import pytest
import torch

from conftest import ROOT
from enat.config import ConfigError, load_config
from enat.data.digits import BLOCK, AugmentedDigits, augmented_digits, load_digits, split_indices
from enat.data.shards import ShardError

QUIET = {"progress": False, "log": lambda *_: None}


def test_same_seed_split_index_same_image_whatever_the_slicing():
    whole, labels, bases = augmented_digits("train", 600, seed=3)
    assert whole.shape == (600, 3, 32, 32) and whole.dtype == torch.float32
    assert 0 <= whole.min() and whole.max() <= 1 and torch.equal(whole[:, 0], whole[:, 2])
    # another start and count (crossing block boundaries), in another order, from a fresh generator
    part, part_labels, part_bases = augmented_digits("train", 300, seed=3, start=250)
    assert torch.equal(part, whole[250:550]) and torch.equal(part_labels, labels[250:550])
    assert np.array_equal(part_bases, bases[250:550])
    gen = AugmentedDigits("train", seed=3)
    assert torch.equal(gen.image(BLOCK + 5), whole[BLOCK + 5, :1])  # block 1 first
    assert torch.equal(gen.images(7, 1)[0], whole[7, :1])
    assert torch.equal(gen.images(590, 10, channels=3), whole[590:600])


def test_seeds_give_other_images_and_other_orders():
    a, _, base_a = augmented_digits("train", 256, seed=0)
    b, _, base_b = augmented_digits("train", 256, seed=1)
    assert (base_a != base_b).mean() > 0.9
    same_base = [k for k in range(256) if base_a[k] == base_b[k]]
    # same base digit, another transform; and over all images clearly not the same set
    for k in same_base:
        assert not torch.equal(a[k], b[k])
    assert (a - b).abs().mean() > 0.05


def test_train_and_val_draw_from_disjoint_base_digits_each_used_equally():
    tr = AugmentedDigits("train", seed=0)
    va = AugmentedDigits("val", seed=0)
    assert (tr.n_base, va.n_base) == (1498, 299)
    n = 3 * va.n_base + 17
    val_bases = va.base_indices[va.bases(np.arange(n))]
    train_bases = tr.base_indices[tr.bases(np.arange(3 * tr.n_base + 17))]
    assert set(val_bases) <= set(split_indices("val")) and set(train_bases) <= set(split_indices("train"))
    assert not set(val_bases) & set(train_bases)
    for gen, bases in ((va, va.bases(np.arange(n))), (tr, tr.bases(np.arange(3 * tr.n_base + 17)))):
        counts = np.bincount(bases, minlength=gen.n_base)
        assert counts.min() == 3 and counts.max() == 4  # every pass is a permutation of all base digits
        # each pass is its own order
        assert not np.array_equal(bases[:gen.n_base], bases[gen.n_base:2 * gen.n_base])
    # labels are the base digits' labels
    _, y, idx = load_digits("val")
    _, labels, base_idx = augmented_digits("val", 100, seed=0)
    lookup = dict(zip(idx.tolist(), y.tolist()))
    assert labels.tolist() == [lookup[int(j)] for j in base_idx]


def test_transforms_change_the_image_but_keep_a_digit():
    x0, _, idx = load_digits("val")
    row = {int(j): k for k, j in enumerate(idx)}
    # strength 0: every range is zero and the one grid_sample gives back the base image exactly
    same, _, bases = augmented_digits("val", 400, seed=5, strength=0.0)
    base = x0[[row[int(j)] for j in bases]]
    assert torch.equal(same, base)
    aug, _, bases2 = augmented_digits("val", 400, seed=5)
    assert np.array_equal(bases, bases2)  # the strength changes the transform, not the base draw
    diff = (aug - base).abs().mean((1, 2, 3))
    assert (diff > 0.02).all() and diff.mean() > 0.08
    # still a digit: about the same amount of ink, mostly where the base digit has it
    mass = aug[:, 0].sum((1, 2)) / base[:, 0].sum((1, 2))
    assert 0.3 < mass.min() and mass.max() < 2.0 and 0.85 < mass.median() < 1.15
    ink = base[:, 0] > 0.5
    assert (aug[:, 0][ink].mean() > 2 * aug[:, 0][~ink].mean())
    # a small strength is a small change
    small, _, _ = augmented_digits("val", 400, seed=5, strength=0.1)
    assert (small - base).abs().mean() < 0.5 * diff.mean()


def test_bad_arguments():
    with pytest.raises(ValueError, match="train or val"):
        AugmentedDigits("all")
    with pytest.raises(ValueError, match="seed"):
        AugmentedDigits("train", seed=-1)
    with pytest.raises(ValueError, match="strength"):
        AugmentedDigits("train", strength=-0.5)


# --- tokenize, manifest, loader -------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight demo tokenizer (the pipeline does not care what ids mean) and the
    scaling_digits config with small counts, pointed at a temp folder."""
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    d = tmp_path_factory.mktemp("aug")
    over = [f"tokenizer.checkpoint={d / 'tok.pt'}", f"data.shards={d / 'train'}", f"data.val_shards={d / 'val'}",
            "data.augmented_train=300", "data.augmented_val=100", "data.augment_seed=7", "data.shard_size=128",
            f"eval.extractor_weights={d / 'fx.pt'}", f"train.run_dir={d / 'run'}"]
    cfg = load_config(ROOT / "configs/experiments/scaling_digits.yaml", over)
    torch.manual_seed(0)
    vq = VQGAN(cfg.tokenizer).eval()
    save_tokenizer(d / "tok.pt", vq, {})
    return d, over, cfg


def test_tokenize_split_writes_manifest_and_loader_reads_it(setup):
    from enat.data.loader import ShardSet, TokenLoader
    from enat.data.prepare import check_data, prepare_data
    from enat.data.shards import Manifest
    from enat.tokenizer import load_tokenizer

    d, over, cfg = setup
    prepare_data(cfg, **QUIET)  # the tokenizer exists: tokenizes both splits
    check_data(cfg)
    for split, n in (("train", 300), ("val", 100)):
        m = Manifest.load(d / split)
        assert m.num_samples == n and m.num_classes == 10 and (m.grid_size, m.codebook_size) == (8, 128)
        src = m.source
        assert (src["dataset"], src["split"], src["count"], src["seed"]) == ("digits_aug", split, n, 7)
        assert src["flip"] is False and src["augment_version"] >= 1
        assert src["base_images"] == (1498 if split == "train" else 299)
        assert src["ranges_at_32px"]["rotation_deg"] == 15.0
    assert [s["num_samples"] for s in Manifest.load(d / "train").shards] == [128, 128, 44]
    # every image once, keyed by its index, with the tokenizer's ids of the generated image
    data = ShardSet(d / "train", log=lambda *_: None)
    keys = _keys(d / "train")
    assert len(data) == 300 and sorted(keys) == list(range(300))
    images, labels, _ = augmented_digits("train", 300, seed=7)
    expect = load_tokenizer(cfg.tokenizer).encode(images).flatten(1).numpy()
    got = data.tokens(np.arange(300))
    assert np.array_equal(got, expect[keys]) and np.array_equal(data.label, labels.numpy()[keys])
    # and the trainer's loader reads them
    loader = TokenLoader(d / "train", micro_batch=32, model_cfg=cfg.model, log=lambda *_: None)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (32, 64) and batch["labels"].shape == (32,) and int(batch["labels"].max()) < 10


def _keys(shard_dir) -> list[int]:
    """The image index of each row of a ShardSet, in its row order (shards in manifest order)."""
    import webdataset as wds

    from enat.data.shards import Manifest

    m = Manifest.load(shard_dir)
    return [int(s["__key__"][:9]) for s in wds.WebDataset([str(shard_dir / e["name"]) for e in m.shards],
                                                         shardshuffle=False)]


def test_parts_give_the_same_shards_and_other_image_sets_are_refused(setup, tmp_path):
    from enat.data.loader import ShardSet
    from enat.data.prepare import check_data, stale_shards, tokenize_split

    d, over, cfg = setup
    whole = ShardSet(d / "val", log=lambda *_: None)
    out = tmp_path / "val"
    for part in (1, 0):
        tokenize_split(cfg, "val", out=str(out), part=part, num_parts=2, merge=part == 0, **QUIET)
    parts = ShardSet(out, log=lambda *_: None)
    ka, kb = _keys(d / "val"), _keys(out)
    ta, tb = whole.tokens(np.arange(len(whole))), parts.tokens(np.arange(len(parts)))
    assert sorted(ka) == sorted(kb) == list(range(100))
    assert np.array_equal(ta[np.argsort(ka)], tb[np.argsort(kb)])
    # a rerun of a part with another seed into the same folder is refused, not mixed in
    other = load_config(ROOT / "configs/experiments/scaling_digits.yaml", over + ["data.augment_seed=8"])
    with pytest.raises(ShardError, match="another image set"):
        tokenize_split(other, "val", out=str(out), part=0, num_parts=2, **QUIET)
    # shards made for another count or seed are not taken for this config's
    assert stale_shards(cfg) == []
    more = load_config(ROOT / "configs/experiments/scaling_digits.yaml", over + ["data.augmented_train=301"])
    assert len(stale_shards(more)) == 1 and "count 300 (config: 301)" in stale_shards(more)[0]
    with pytest.raises(ShardError, match="fresh folder"):
        check_data(more)
    with pytest.raises(ShardError, match="seed 7 \\(config: 8\\)"):
        check_data(other)


def test_flip_is_refused(setup, tmp_path):
    from enat.data.tokenize import AugmentedDigitsSource, make_source, tokenize_part
    from enat.tokenizer import load_tokenizer

    d, over, _ = setup
    with pytest.raises(ConfigError, match="mirrored digit.*data.flip=false"):  # refused when the config loads
        load_config(ROOT / "configs/experiments/scaling_digits.yaml", over + ["data.flip=true"])
    # the source itself refuses a flip, whoever calls tokenize_part
    cfg = load_config(ROOT / "configs/experiments/scaling_digits.yaml", over)
    src = make_source("digits_aug", 32, "val", count=10, seed=0)
    assert isinstance(src, AugmentedDigitsSource) and not src.flip_allowed
    with pytest.raises(ShardError, match="mirrored digit"):
        tokenize_part(src, load_tokenizer(cfg.tokenizer), tmp_path / "f", flip=True, **QUIET)
    # no captions
    with pytest.raises(ShardError, match="no captions"):
        make_source("digits_aug", 32, "val", captioned=True, count=10)
    with pytest.raises(ShardError, match="positive image count"):
        make_source("digits_aug", 32, "val", count=0)
