"""Text-to-image data: the text encoder (offline by path, the demo encoder, CLIP score), the
digits captions and their measurable attributes, caption shards (format, manifest, corrupt
contexts, model checks), the loader's caption choice and drop (world size, resume, rate, ids-only
storage), the COCO source and the prepare step."""

import itertools
import json
import os
import socket
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_clip, tiny_clip_tokenizer
from test_data import cfg, vq  # noqa: F401  (module fixtures: the demo config, a random tokenizer)
from enat.config import ConfigError, load_config
from enat.data.captions import (DEMO_WORDS, AttributeModel, attribute_agreement, caption_attributes, digit_attributes,
                                digit_captions)
from enat.data.digits import load_digits
from enat.data.loader import ShardSet, TokenLoader
from enat.data.shards import NULL_CONTEXT, Manifest, ShardError, index_path
from enat.data.tokenize import (CaptionedDigitsSource, CocoSource, DigitsSource, merge_parts, tokenize_part,
                                uvit_center_crop)
from enat.files import file_sha256
from enat.text import (TextEncoderError, build_demo_text_encoder, clip_score, load_text_encoder, words_of)

L, C = 16, 32  # a tiny demo encoder: hidden 32, 2 layers
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(directory, the encoder as built in memory)."""
    d = tmp_path_factory.mktemp("enc") / "demo_text"
    return d, build_demo_text_encoder(d, list(DEMO_WORDS), L, C, seed=0)


@pytest.fixture(scope="module")
def enc(built):
    return load_text_encoder(built[0])


@pytest.fixture(scope="module")
def source():
    return CaptionedDigitsSource("train", 32)


@pytest.fixture(scope="module")
def val_source():
    return CaptionedDigitsSource("val", 32)  # 299 images: the shard tests' data (small, fast)


def make_shards(out, source, vq, enc, storage="embeddings", **kw):
    args = dict(shard_size=256, flip=False, progress=False, text_encoder=enc, text_storage=storage, **QUIET)
    args.update(kw)
    tokenize_part(source, vq, out, **args)
    merge_parts(out)
    return out


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory, val_source, vq, enc):
    return make_shards(tmp_path_factory.mktemp("text"), val_source, vq, enc)


@pytest.fixture(scope="module")
def ids_shards(tmp_path_factory, val_source, vq, enc):
    return make_shards(tmp_path_factory.mktemp("ids"), val_source, vq, enc, storage="ids")


def take(loader, k):
    return list(itertools.islice(iter(loader), k))


def loader(shards, **kw):
    args = dict(micro_batch=16, world_size=1, grad_accum=1, seed=3, num_workers=0, **QUIET)
    args.update(kw)
    return TokenLoader(shards, **args)


# --- text encoder ---------------------------------------------------------------------------


def test_hub_name_fails_at_once_without_network(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(TextEncoderError, match=r"hub name.*local path only.*save_pretrained.*text.encoder=DIR"):
        load_text_encoder("openai/clip-vit-large-patch14")
    with pytest.raises(TextEncoderError, match="is not a directory"):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(TextEncoderError, match="text.encoder is not set"):
        load_text_encoder(None)
    with pytest.raises(TextEncoderError, match="no config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(TextEncoderError, match="hub name"):
        clip_score(np.zeros((1, 8, 8, 3), np.uint8), ["a"], "openai/clip-vit-base-patch32")


def test_demo_encoder_round_trips_and_separates_captions(built, enc):
    d, mem = built
    caps = ["a thick handwritten seven", "a thin handwritten seven", "the digit 7", ""]
    assert (enc.length, enc.dim, enc.kind) == (L, C, "words") and (d / "enat_text_encoder.json").is_file()
    assert torch.equal(enc.tokenize(caps), mem.tokenize(caps))
    out = enc.encode(caps)
    assert out.dtype == torch.float32 and out.shape == (4, L, C)
    assert torch.equal(out, mem.encode(caps))  # the saved weights are the built ones
    for i, j in itertools.combinations(range(4), 2):
        assert (out[i] - out[j]).abs().max() > 0.1, (caps[i], caps[j])
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    info = enc.describe()
    assert info["sha256"] == file_sha256(d / "model.safetensors") and info["path"] == str(d)
    assert info["config"]["hidden_size"] == C and info["config"]["num_hidden_layers"] == 2
    assert (info["length"], info["dim"], info["kind"]) == (L, C, "words")


def test_demo_encoder_is_seeded_and_leaves_the_global_rng_alone(tmp_path, enc):
    state = torch.random.get_rng_state()
    again = build_demo_text_encoder(tmp_path / "a", list(DEMO_WORDS), L, C, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.sha256() == enc.sha256()
    other = build_demo_text_encoder(tmp_path / "b", list(DEMO_WORDS), L, C, seed=1)
    assert other.sha256() != enc.sha256()


def test_word_tokenizer(enc):
    vocab = json.loads((enc.path / "vocab.json").read_text())
    ids = enc.tokenize(["A Thick, SEVEN!", "zebra seven", "seven " * 40])
    assert ids[0, :5].tolist() == [2, vocab["a"], vocab["thick"], vocab["seven"], 3] and ids[0, 5:].eq(0).all()
    assert ids[1, :4].tolist() == [2, 1, vocab["seven"], 3]  # unknown word -> <unk>
    assert ids[2, 0] == 2 and ids[2, -1] == 3 and ids[2, 1:-1].eq(vocab["seven"]).all()  # cut, <eos> kept
    assert enc.tokenize([""])[0, :3].tolist() == [2, 3, 0]
    with pytest.raises(TypeError):
        enc.tokenize("one string")


def test_a_saved_clip_text_encoder_loads_offline(tmp_path, monkeypatch):
    from enat.text import _transformers

    tf = _transformers()
    tok, vocab = tiny_clip_tokenizer(tf)
    eos = vocab["<|endoftext|>"]
    config = tf.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                               bos_token_id=eos - 1, pad_token_id=eos)
    torch.manual_seed(0)
    model = tf.CLIPTextModel(config)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    e = load_text_encoder(tmp_path)
    assert (e.kind, e.length, e.dim) == ("clip", 77, 32)
    ids = e.tokenize(["a cat", ""])
    assert ids.shape == (2, 77) and ids[0, 0] == eos - 1 and ids[0, -1] == eos  # padded to 77 (with eos)
    with torch.no_grad():
        want = model.eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(e.encode(["a cat", ""]), want)


def test_clip_score_with_a_local_tiny_clip(tmp_path):
    tiny_clip(tmp_path, layers=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 56, 3), dtype=np.uint8)  # not square: resized and cropped
    caps = ["a cat", "a dog", "the sea", "red", "blue sky", "x"]
    whole = clip_score(images, caps, tmp_path)
    single = [clip_score(images[i:i + 1], caps[i:i + 1], tmp_path) for i in range(6)]
    assert 0 <= whole <= 100 and all(0 <= s <= 100 for s in single)
    assert whole == pytest.approx(np.mean(single), abs=1e-4)  # a mean of per-pair scores, any batch size
    assert clip_score(images, caps, tmp_path, batch_size=4) == pytest.approx(whole, abs=1e-4)
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert clip_score(floats, caps, tmp_path) == pytest.approx(whole, abs=1e-3)
    with pytest.raises(ValueError, match="6 images but 5 captions"):
        clip_score(images, caps[:5], tmp_path)


# --- digits captions ------------------------------------------------------------------------


def test_captions_are_fixed_templates_over_the_demo_words(source):
    caps = source._captions
    assert len(caps) == len(source) and all(len(c) == 5 for c in caps)
    words = {w for cs in caps for c in cs for w in words_of(c)}
    assert words <= set(DEMO_WORDS)
    again = digit_captions(source.images, source.labels.numpy())
    assert again == caps  # deterministic
    assert caption_attributes("a thick handwritten seven") == {"digit": 7, "thickness": "thick"}
    assert caption_attributes("the digit 3") == {"digit": 3}
    assert caption_attributes("a wide zero drawn with thin strokes") == {"digit": 0, "thickness": "thin",
                                                                         "width": "wide"}
    assert caption_attributes("nothing here") == {"digit": None}


def test_captions_are_true_of_the_pixels_and_balanced(source):
    labels = source.labels.numpy()
    caps = source._captions
    for c, lab in zip(caps, labels):
        assert all(caption_attributes(x)["digit"] == lab for x in c)
    # Every caption agrees with what the attribute model measures on its own image.
    flat_images = source.images.repeat_interleave(5, 0)
    agree = attribute_agreement(flat_images, [x for c in caps for x in c])
    assert agree["thickness"] == 1.0 and agree["width"] == 1.0 and agree["thickness_n"] > 1000
    # Per class about a third thin, a third thick (the thresholds are the class's tertiles).
    judged = AttributeModel.default().judge(source.images, labels)
    for cls in range(10):
        share = np.mean(judged["thickness"][labels == cls] == "thick")
        assert 0.25 < share < 0.42


def test_attributes_measure_generated_looking_images(source):
    model = AttributeModel.default()
    labels = source.labels.numpy()
    thin = model.judge(source.images, labels)["thickness"] == "thin"
    x = source.images[thin]
    fat = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)  # strokes thickened
    assert np.mean(model.judge(fat, labels[thin])["thickness"] == "thick") > 0.9
    squeezed = torch.zeros_like(x)  # the same digits at 60% of the width, centred
    squeezed[..., 6:26] = torch.nn.functional.interpolate(x, size=(32, 20), mode="bilinear", align_corners=False)
    assert np.mean(model.judge(squeezed, labels[thin])["width"] == "narrow") > 0.9
    # uint8 (n, H, W, 3), the layout of saved samples, measures the same.
    u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    a, b = digit_attributes(x), digit_attributes(u8)
    np.testing.assert_allclose(a["ink"], b["ink"], atol=3e-3)
    np.testing.assert_allclose(a["width"], b["width"], atol=3e-3)
    # And a prompt that asks for "thick" is judged against the image it made.
    caps = [f"a thick handwritten {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][d]}"
            for d in labels[thin]]
    assert attribute_agreement(fat, caps, model)["thickness"] > 0.9
    assert attribute_agreement(x, caps, model)["thickness"] == 0.0


def test_attribute_model_save_load_and_default(tmp_path):
    images, labels, _ = load_digits("train")
    fitted = AttributeModel.fit(images, labels.numpy())
    assert fitted == AttributeModel.default()
    path = fitted.save(tmp_path / "attributes.json")
    assert AttributeModel.load(path) == fitted
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a digit attribute model"):
        AttributeModel.load(tmp_path / "other.json")


# --- caption shards -------------------------------------------------------------------------


def test_caption_shards_manifest_and_payloads(text_shards, enc, val_source):
    source = val_source
    raw = json.loads((text_shards / "manifest.json").read_text())
    assert raw["version"] == 2
    m = Manifest.load(text_shards)
    t = m.text
    assert (t["length"], t["dim"], t["dtype"], t["storage"]) == (L, C, "float16", "embeddings")
    assert t["encoder"]["sha256"] == enc.sha256() and t["encoder"]["path"] == str(enc.path)
    assert t["num_captions"] == 5 * len(source) and m.num_samples == len(source) and m.num_classes == 10
    assert t["null_context_sha256"] == file_sha256(text_shards / NULL_CONTEXT)
    data = ShardSet(text_shards, **QUIET)
    null = enc.encode([""])[0].half().numpy()
    assert np.array_equal(data.null_context(), null)  # '' -> the recorded null context
    assert data.null_ids().tolist() == enc.tokenize([""])[0].tolist()
    assert (data.num_captions == 5).all()
    row = 100
    caps = data.captions(row)  # rows follow the input order here (one part, no flips)
    assert caps == source.captions(row) and data.label[row] == source.label(row)
    want = enc.encode(caps)
    got = data.contexts(np.full(5, row), np.arange(5))
    assert got.dtype == np.float16 and got.shape == (5, L, C)
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=2e-3)
    assert np.array_equal(data.caption_ids(np.full(5, row), np.arange(5)), enc.tokenize(caps).numpy())
    with pytest.raises(IndexError):
        data.contexts(np.array([row]), np.array([5]))
    # Any webdataset pipeline reads the same fields.
    import webdataset as wds

    name = m.shards[0]["name"]
    sample = next(iter(wds.WebDataset(str(text_shards / name), shardshuffle=False).decode()))
    assert sample["captions.json"] == source.captions(0)
    assert sample["context.npy"].dtype == np.float16 and sample["context.npy"].shape == (5, L, C)
    assert sample["ids.npy"].dtype == np.int32 and sample["ids.npy"].shape == (5, L)


def test_class_manifest_v1_still_loads(tmp_path, vq):
    src = DigitsSource("val", 32)
    tokenize_part(src, vq, tmp_path, shard_size=512, flip=False, progress=False, **QUIET)
    merge_parts(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["version"] == 1 and "text" not in raw  # what the class format always wrote
    m = Manifest.load(tmp_path)
    assert m.text == {} and m.text_layout is None
    data = ShardSet(tmp_path, **QUIET)
    assert len(data) == len(src) and data.text is None
    with pytest.raises(ShardError, match="class shards"):
        data.contexts(np.array([0]), 0)
    batch = next(iter(loader(tmp_path, cfg_drop=0.5, null_class=10)))
    assert set(batch) == {"tokens", "labels", "uid", "epoch"}
    raw["version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match="version 1 or 2"):
        Manifest.load(tmp_path)


def test_model_config_checks_name_both_sides(text_shards, tmp_path, vq, cfg):
    text_model = replace(cfg.model, condition="text", text_len=L, text_dim=C)
    loader(text_shards, model_cfg=text_model)
    with pytest.raises(ShardError, match=r"caption shards .*L=16, C=32.* vs model.condition=class.*"
                                         r"model.condition=text model.text_len=16 model.text_dim=32"):
        loader(text_shards, model_cfg=cfg.model)
    with pytest.raises(ShardError, match=r"text length L=16 vs model.text_len 77"):
        loader(text_shards, model_cfg=replace(text_model, text_len=77))
    with pytest.raises(ShardError, match=r"text width C=32 vs model.text_dim 768.*re-tokenize"):
        loader(text_shards, model_cfg=replace(text_model, text_dim=768))
    tokenize_part(DigitsSource("val", 32), vq, tmp_path, shard_size=512, flip=False, progress=False, **QUIET)
    merge_parts(tmp_path)
    with pytest.raises(ShardError, match=r"class shards \(no captions\) vs model.condition=text"):
        loader(tmp_path, model_cfg=text_model)


def rewrite_sample(shards, dst, victim: int, **change):
    """Copy a caption shard set, rewriting the first shard with sample `victim` changed (field ->
    new value) and no index (as other tools write shards)."""
    import webdataset as wds

    dst.mkdir()
    for p in shards.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    m = Manifest.load(dst)
    name = m.shards[0]["name"]
    samples = list(wds.WebDataset(str(shards / name), shardshuffle=False).decode())[:6]
    os.remove(index_path(dst / name))
    with wds.TarWriter(str(dst / name)) as sink:
        for i, s in enumerate(samples):
            out = {k: s[k] for k in ("__key__", "tokens.npy", "cls", "captions.json", "ids.npy", "context.npy")}
            if i == victim:
                out.update({k: f(out[k]) for k, f in change.items()})
            sink.write(out)
    m.shards[0]["num_samples"], m.shards[0]["bytes"] = len(samples), (dst / name).stat().st_size
    m.num_samples = sum(s["num_samples"] for s in m.shards)
    m.save(dst)
    return dst, name, samples[victim]["__key__"], m


@pytest.mark.parametrize("what,change,message", [
    ("dtype", lambda c: c.astype(np.float32), r"context float32\[5, 16, 32\], expected float16\[K, 16, 32\]"),
    ("length", lambda c: c[:, :-1], r"context float16\[5, 15, 32\], expected float16\[K, 16, 32\]"),
    ("dim", lambda c: c[..., :8], r"context float16\[5, 16, 8\], expected"),
    ("count", lambda c: c[:3], r"5 captions, 5 rows of ids, 3 contexts"),
])
def test_bad_context_is_rejected_by_name_or_skipped_and_counted(tmp_path, text_shards, what, change, message):
    d, name, key, m = rewrite_sample(text_shards, tmp_path / "s", victim=3, **{"context.npy": change})
    with pytest.raises(ShardError, match=f"{name}: sample {key}: {message}"):
        ShardSet(d, strict=True)
    logs = []
    data = ShardSet(d, log=logs.append)
    assert data.skipped_samples == 1 and len(data) == m.num_samples - 1
    assert any(key in line and name in line for line in logs)
    assert all_rows_readable(data)


def all_rows_readable(data):
    ctx = data.contexts(np.arange(len(data)), 0)
    return ctx.shape == (len(data), L, C) and np.isfinite(ctx.astype(np.float32)).all()


def test_missing_or_bad_ids_and_captions(tmp_path, text_shards):
    d, name, key, _ = rewrite_sample(text_shards, tmp_path / "a", victim=1, **{"ids.npy": lambda x: x.astype(np.int64)})
    with pytest.raises(ShardError, match=f"sample {key}: ids int64"):
        ShardSet(d, strict=True)
    d, name, key, _ = rewrite_sample(text_shards, tmp_path / "b", victim=2, **{"captions.json": lambda c: c[:4]})
    with pytest.raises(ShardError, match=f"sample {key}: 4 captions, 5 rows of ids"):
        ShardSet(d, strict=True)


def test_null_context_file_is_checked(tmp_path, text_shards):
    d = tmp_path / "s"
    d.mkdir()
    for p in text_shards.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    np.save(d / NULL_CONTEXT, np.zeros((L, C), np.float16))
    with pytest.raises(ShardError, match="does not match the sha256"):
        loader(d)


# --- loader ---------------------------------------------------------------------------------


def test_caption_choice_and_drop_same_for_one_and_two_ranks(text_shards):
    one = take(loader(text_shards, micro_batch=32, cfg_drop=0.3), 6)
    two = [take(loader(text_shards, micro_batch=16, world_size=2, rank=r, cfg_drop=0.3, num_workers=2), 6)
           for r in range(2)]
    for step, whole in enumerate(one):
        parts = [two[0][step], two[1][step]]
        union = {u: (k, c) for p in parts for u, k, c in zip(p["uid"].tolist(), p["caption"].tolist(), p["context"])}
        assert sorted(union) == sorted(whole["uid"].tolist())
        for u, k, c in zip(whole["uid"].tolist(), whole["caption"].tolist(), whole["context"]):
            assert union[u][0] == k and torch.equal(union[u][1], c)
    assert any((b["caption"] == -1).any() for b in one) and any((b["caption"] >= 0).any() for b in one)


def test_caption_choice_exact_on_resume(text_shards):
    kw = dict(micro_batch=8, world_size=2, grad_accum=2, rank=1, cfg_drop=0.2, num_workers=2)
    n = 2 * 2 * (299 // 32) + 4  # crosses two epoch boundaries (2 micro-batches per step)
    straight = take(loader(text_shards, **kw), n)
    assert [b["epoch"] for b in straight[::18]] == [0, 1, 2]  # 9 steps x 2 micro-batches per epoch
    first = loader(text_shards, **kw)
    head = take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["micro_batches"] == 13
    resumed = loader(text_shards, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, n - 13)
    # Lengths first: zip stops at the shorter stream, so a resume that yields too few batches
    # would compare only what it did yield.
    assert (len(straight), len(head), len(tail)) == (n, 13, n - 13)
    assert resumed.state_dict()["micro_batches"] == n  # it went on from 13, not from 0
    for a, b in zip(straight, head + tail, strict=True):
        assert torch.equal(a["uid"], b["uid"]) and torch.equal(a["caption"], b["caption"])
        assert torch.equal(a["context"], b["context"]) and torch.equal(a["tokens"], b["tokens"])


def test_drop_rate_null_context_and_choice_spread(text_shards):
    ld = loader(text_shards, micro_batch=64, cfg_drop=0.3)
    data = ld.data
    batches = take(ld, 24 * ld.batches_per_epoch)  # 24 epochs: ~6,000 draws
    k = torch.cat([b["caption"] for b in batches])
    assert 0.27 < (k == -1).float().mean() < 0.33
    null = torch.from_numpy(data.null_context())
    for b in batches[:ld.batches_per_epoch + 2]:
        assert b["context"].dtype == torch.float16 and b["labels"].max() < 10  # labels: the digits, kept
        dropped = b["caption"] == -1
        assert all(torch.equal(c, null) for c in b["context"][dropped])
        rows = np.searchsorted(np.sort(data.uid), b["uid"][~dropped].numpy())
        rows = np.argsort(data.uid)[rows]
        want = data.contexts(rows, b["caption"][~dropped].numpy())
        assert torch.equal(b["context"][~dropped], torch.from_numpy(want))
    counts = np.bincount(k[k >= 0].numpy(), minlength=5)
    assert counts.min() > 0.8 * counts.mean()  # every caption gets its share
    # Another epoch picks other captions for the same images.
    first = {u: c for b in batches[:ld.batches_per_epoch] for u, c in zip(b["uid"].tolist(), b["caption"].tolist())}
    second = {u: c for b in batches[ld.batches_per_epoch:2 * ld.batches_per_epoch]
              for u, c in zip(b["uid"].tolist(), b["caption"].tolist())}
    both = [u for u in first if u in second and first[u] >= 0 and second[u] >= 0]
    assert 0.6 < np.mean([first[u] != second[u] for u in both]) < 0.95
    no_drop = take(loader(text_shards, micro_batch=64), 3)
    assert all((b["caption"] >= 0).all() for b in no_drop)


def test_ids_only_storage(ids_shards, enc):
    m = Manifest.load(ids_shards)
    assert m.text["storage"] == "ids" and m.text["num_captions"] == 5 * 299
    with tarfile.open(ids_shards / m.shards[0]["name"]) as tar:
        members = {x.name.partition(".")[2]: x.size for x in tar.getmembers()}
    assert "context.npy" not in members and members["ids.npy"] == 128 + 5 * L * 4  # npy header + K x L int32
    data = ShardSet(ids_shards, **QUIET)
    assert (data.ctx_offset == -1).all()
    with pytest.raises(ShardError, match="ids only"):
        data.contexts(np.array([0]), 0)
    b = next(iter(loader(ids_shards, micro_batch=64, cfg_drop=0.3)))
    assert "context" not in b and b["caption_ids"].dtype == torch.int64 and b["caption_ids"].shape == (64, L)
    order = np.argsort(data.uid)
    for u, k, ids in zip(b["uid"].numpy(), b["caption"].tolist(), b["caption_ids"]):
        row = order[np.searchsorted(data.uid[order], u)]
        want = enc.tokenize([""] if k < 0 else [data.captions(row)[k]])[0]
        assert torch.equal(ids, want)
    assert (b["caption"] == -1).any() and (b["caption"] >= 0).any()


def test_resampled_mode_refuses_caption_shards(text_shards):
    with pytest.raises(ShardError, match="resampled mode.*class shards only"):
        loader(text_shards, resampled=True)


# --- COCO -----------------------------------------------------------------------------------


def make_coco(root):
    """Four images of non-square sizes (the middle square green, the sides red and blue), one
    without captions; ids out of order in the file."""
    from PIL import Image

    (root / "imgs").mkdir(parents=True)
    sizes = {7: (60, 36), 3: (40, 64), 12: (50, 50), 5: (70, 30)}  # id: (width, height)
    images = []
    for image_id, (w, h) in sizes.items():
        arr = np.zeros((h, w, 3), np.uint8)
        s = min(w, h)
        arr[..., 0] = 255  # red everywhere ...
        top, left = (h - s) // 2, (w - s) // 2
        arr[top:top + s, left:left + s] = (0, 255, 0)  # ... but the central square
        name = f"COCO_{image_id:012d}.png"
        Image.fromarray(arr).save(root / "imgs" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    anns = [(7, "A green square."), (3, "a tall one"), (7, "Another caption"), (3, "two"), (3, "three"),
            (12, "square")]
    data = {"images": images,
            "annotations": [{"id": 100 + i, "image_id": i_, "caption": c} for i, (i_, c) in enumerate(anns)]}
    (root / "captions.json").write_text(json.dumps(data))
    return root / "imgs", root / "captions.json"


def test_coco_source_order_captions_and_centre_crop(tmp_path):
    imgs, caps = make_coco(tmp_path)
    src = CocoSource(imgs, caps, 32)
    assert len(src) == 3 and src.uncaptioned == 1 and src.num_classes == 1  # id 5 has no caption
    assert [os.path.basename(src.name(i)) for i in range(3)] == [f"COCO_{i:012d}.png" for i in (3, 7, 12)]
    assert src.captions(0) == ["a tall one", "two", "three"] and src.captions(1) == ["A green square.",
                                                                                       "Another caption"]
    assert all(src.label(i) == 0 for i in range(3))
    for i in range(3):
        x = src.load(i)
        assert x.shape == (3, 32, 32)
        # Only the central square is kept: green, no red sides.
        assert x[1].mean() > 0.97 and x[0].max() < 0.1, src.name(i)
    from PIL import Image

    out = uvit_center_crop(Image.fromarray(np.zeros((30, 70), np.uint8)), 16)  # grey in, RGB out
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_coco_tokenize_split_and_loader(tmp_path, vq, built, cfg):
    from enat.data.prepare import tokenize_split

    imgs, caps = make_coco(tmp_path / "coco")
    tok = tmp_path / "tok.pt"
    from enat.tokenizer.train import save_tokenizer

    save_tokenizer(tok, vq, {})
    over = ["data.dataset=coco", f"data.image_dir={imgs}", f"data.captions={caps}", f"data.shards={tmp_path / 'tr'}",
            f"tokenizer.checkpoint={tok}", f"text.encoder={built[0]}", "model.condition=text", f"model.text_len={L}",
            f"model.text_dim={C}", "data.shard_size=2"]
    with pytest.raises(ConfigError, match="data.flip=true with data.dataset=coco"):
        load_config(ROOT / "configs/experiments/demo.yaml", over + ["data.flip=true"])
    with pytest.raises(ShardError, match="set data.val_captions"):
        tokenize_split(load_config(ROOT / "configs/experiments/demo.yaml",
                                   over + ["data.flip=false", f"data.val_image_dir={imgs}",
                                           f"data.val_shards={tmp_path / 'va'}"]), "val", progress=False, **QUIET)
    logs = []
    c = load_config(ROOT / "configs/experiments/demo.yaml", over + ["data.flip=false"])
    m = tokenize_split(c, "train", progress=False, log=logs.append)
    assert m.num_samples == 3 and m.num_classes == 1 and m.text["num_captions"] == 6 and len(m.shards) == 2
    assert m.source["dataset"] == "coco" and m.source["crop"] == "uvit-center"
    assert any("GB at float16" in line for line in logs)  # the disk cost is stated
    data = ShardSet(tmp_path / "tr", **QUIET)
    assert data.num_captions.tolist() == [3, 2, 1] and data.captions(1) == ["A green square.", "Another caption"]
    b = take(loader(tmp_path / "tr", micro_batch=3, cfg_drop=0.0, model_cfg=c.model), 20)
    ks = {}
    for x in b:
        for u, k in zip(x["uid"].tolist(), x["caption"].tolist()):
            ks.setdefault(u, set()).add(k)
    assert sorted(len(v) for v in ks.values()) == [1, 2, 3]  # every caption of every image drawn, none beyond K
    # A text encoder whose L x C disagrees with the model is named before anything is written.
    bad = load_config(ROOT / "configs/experiments/demo.yaml", over + ["data.flip=false", "model.text_len=77",
                                                                      f"data.shards={tmp_path / 'x'}"])
    with pytest.raises(ShardError, match="gives 16 x 32 contexts but the model expects model.text_len 77"):
        tokenize_split(bad, "train", progress=False, **QUIET)


def test_a_rerun_with_other_text_settings_is_refused(tmp_path, vq, enc, val_source):
    tokenize_part(DigitsSource("val", 32), vq, tmp_path, shard_size=512, flip=False, progress=False, **QUIET)
    with pytest.raises(ShardError, match="other captions settings"):  # class shards there, captions asked
        tokenize_part(val_source, vq, tmp_path, shard_size=512, flip=False, progress=False, text_encoder=enc, **QUIET)


# --- prepare --------------------------------------------------------------------------------


def test_prepare_builds_the_demo_text_encoder_and_caption_shards(tmp_path, vq):
    from enat.data.prepare import (prepare_text_encoder, prepare_tokenizer, text_encoder_missing, tokenize_split,
                                   tokenizer_missing)
    from enat.tokenizer.train import save_tokenizer

    tok = tmp_path / "tok.pt"
    save_tokenizer(tok, vq, {})  # the image tokenizer is there; only the text encoder is missing
    over = [f"tokenizer.checkpoint={tok}", "text.encoder=demo", f"text.demo_dir={tmp_path / 'enc'}",
            "model.condition=text",
            f"model.text_len={L}", f"model.text_dim={C}", f"data.shards={tmp_path / 'train'}",
            f"data.val_shards={tmp_path / 'val'}", "data.flip=false"]
    c = load_config(ROOT / "configs/experiments/demo.yaml", over)
    assert text_encoder_missing(c) and tokenizer_missing(c)  # so launch/tokenize.py runs the prepare job
    prepare_tokenizer(c, **QUIET)  # what `enat data prepare` and launch's prepare job run first
    assert not text_encoder_missing(c) and not tokenizer_missing(c)
    tokenize_split(c, "val", progress=False, **QUIET)
    e = load_text_encoder(tmp_path / "enc")
    assert (e.length, e.dim) == (L, C) and set(json.loads((tmp_path / "enc/vocab.json").read_text())) >= set(DEMO_WORDS)
    for split, n in (("val", 299),):
        data = ShardSet(tmp_path / split, **QUIET)
        assert len(data) == n and data.manifest.text["encoder"]["sha256"] == e.sha256()
        assert (data.num_captions == 5).all() and set(data.label.tolist()) == set(range(10))
        assert caption_attributes(data.captions(0)[0])["digit"] == data.label[0]
    loader(tmp_path / "val", model_cfg=c.model)
    # Class models want none; COCO never builds one: a hub name is refused by name.
    prepare_text_encoder(load_config(ROOT / "configs/experiments/demo.yaml", [f"tokenizer.checkpoint={tok}"]))
    coco = load_config(ROOT / "configs/experiments/demo.yaml",
                       over[:1] + ["data.dataset=coco", "text.encoder=openai/clip-vit-large-patch14",
                                   "model.condition=text"])
    assert not text_encoder_missing(coco)
    with pytest.raises(ShardError, match="hub name"):  # the data commands' error type, printed by the CLI
        prepare_text_encoder(coco)


def test_flipped_views_share_their_image_captions(tmp_path, vq, enc, val_source):
    src = val_source
    tokenize_part(src, vq, tmp_path, shard_size=200, flip=True, progress=False, text_encoder=enc, **QUIET)
    m = merge_parts(tmp_path)
    assert m.num_samples == 2 * len(src) and m.text["num_captions"] == 10 * len(src)
    data = ShardSet(tmp_path, **QUIET)
    assert data.captions(0) == data.captions(1) == src.captions(0)  # keys 000000000_0, 000000000_1
    assert np.array_equal(data.contexts(np.array([0, 1]), 2)[0], data.contexts(np.array([0, 1]), 2)[1])
    assert not np.array_equal(data.tokens(np.array([0]))[0], data.tokens(np.array([1]))[0])


HUB_REFUSAL = ("text encoder 'openai/clip-vit-large-patch14' looks like a Hugging Face hub name, not a local "
               "directory; this project loads models by local path only: download it once where the hub is "
               "reachable (`CLIPTextModel.from_pretrained(NAME).save_pretrained(DIR)`, and the tokenizer likewise), "
               "copy DIR here and set text.encoder=DIR")


def test_a_hub_name_is_refused_by_every_command_and_builds_nothing(tmp_path, monkeypatch, capsys):
    """The captioned demo's config with text.encoder set to a hub name (issue 30): `enat data
    prepare`, `enat tokenize` and `enat train` refuse it with the loader's message before anything
    is made: no ./openai/... directory, no tokenizer, no shards, no run."""
    from enat.cli import main

    monkeypatch.chdir(tmp_path)
    over = ["text.encoder=openai/clip-vit-large-patch14", f"tokenizer.checkpoint={tmp_path / 'tok.pt'}",
            f"data.shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}",
            f"eval.extractor_weights={tmp_path / 'fx.pt'}", f"train.run_dir={tmp_path / 'run'}"]
    config = str(ROOT / "configs/experiments/demo_text.yaml")
    for command in (["data", "prepare"], ["tokenize", "--split", "val"], ["train"]):
        assert main([*command, "--config", config, *over]) == 2, command
        assert capsys.readouterr().err == f"error: {HUB_REFUSAL}\n", command
        assert list(tmp_path.iterdir()) == [], command
    from launch.tokenize import submit_tokenize  # the pipeline's first submission: refused before any job

    with pytest.raises(ShardError) as e:
        submit_tokenize(load_config(config, over), ["train", "val"], 1)
    assert str(e.value) == HUB_REFUSAL and list(tmp_path.iterdir()) == []


def test_the_demo_encoder_is_asked_for_by_name(tmp_path, capsys):
    """`text.encoder: demo` is the only value that builds an encoder: for the digits only, with a
    folder to build it in; until `enat data prepare` has built it, the other commands say so."""
    from enat.cli import main

    config = ROOT / "configs/experiments/demo_text.yaml"
    with pytest.raises(ConfigError, match=r"^text.encoder: demo is the captioned digits demo's word encoder .* "
                                          r"data.dataset=coco needs a CLIP text encoder: text.encoder=/local/dir$"):
        load_config(config, ["data.dataset=coco", "data.flip=false"])
    with pytest.raises(ConfigError, match=r"^text.encoder: demo needs text.demo_dir, the folder `enat data prepare` "):
        load_config(config, ["text.demo_dir=null"])
    over = [f"text.demo_dir={tmp_path / 'enc'}", f"data.shards={tmp_path / 'train'}",
            f"data.val_shards={tmp_path / 'val'}", f"train.run_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", str(config), *over]) == 2
    assert capsys.readouterr().err == (f"error: the demo text encoder (text.encoder: demo) is not built in "
                                       f"{tmp_path / 'enc'}: `enat data prepare --config CONFIG` builds it\n")
    assert list(tmp_path.iterdir()) == []
