"""Evaluation of text-conditioned models: the captions of the FID job (world-size invariant,
deterministic, by the recorded rule), the protocol in the result, reference statistics from
images (ImageFolder and COCO crops), the CLIP score, and the text-control evaluation on a case
whose answer is known by construction."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_clip
from enat.config import load_config
from enat.eval.fidelity import DigitNet, EvalError, build_extractor, extract, statistics
from enat.rng import hash_uniform

CONFIG = ROOT / "configs/experiments/demo.yaml"
L, C = 8, 32  # a tiny demo text encoder
QUIET = dict(log=lambda *_: None)


def save_classifier(path, net=None):
    from enat.models.weights import torch_save_atomic

    torch.manual_seed(0)
    net = net or DigitNet()
    torch_save_atomic({"format": "enat-digit-classifier", "num_classes": 10, "state_dict": net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A text demo config: a random tokenizer, the demo text encoder, held-out caption shards
    (embeddings and ids-only), a fresh digit classifier, and a random-init tiny text ENAT whose
    null context is the encoder's ''."""
    from enat.data.captions import DEMO_WORDS
    from enat.data.tokenize import CaptionedDigitsSource, merge_parts, tokenize_part
    from enat.models import build_model
    from enat.models.weights import save_weights
    from enat.text import build_demo_text_encoder, load_text_encoder
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    d = tmp_path_factory.mktemp("texteval")
    over = ["model.condition=text", f"model.text_len={L}", f"model.text_dim={C}", f"text.encoder={d / 'enc'}",
            f"tokenizer.checkpoint={d / 'tok.pt'}", f"data.val_shards={d / 'val'}", f"data.shards={d / 'val'}",
            f"eval.extractor=digits-cnn", f"eval.extractor_weights={d / 'fx.pt'}", f"eval.cache_dir={d / 'cache'}",
            "eval.batch_size=16", "eval.prc=false", "sample.steps=3", "train.wandb.mode=disabled", "data.flip=false"]
    cfg = load_config(CONFIG, over)
    save_classifier(d / "fx.pt")
    torch.manual_seed(0)
    vq = VQGAN(cfg.tokenizer).eval()
    save_tokenizer(d / "tok.pt", vq, {})
    build_demo_text_encoder(d / "enc", list(DEMO_WORDS), L, C, seed=0)
    enc = load_text_encoder(d / "enc")
    source = CaptionedDigitsSource("val", 32)
    for name, storage in (("val", "embeddings"), ("val_ids", "ids")):
        tokenize_part(source, vq, d / name, shard_size=128, flip=False, progress=False, text_encoder=enc,
                      text_storage=storage, **QUIET)
        merge_parts(d / name)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_null_context(enc.encode([""])[0])
    save_weights(d / "w.pt", cfg.model, {"ema": model.state_dict()}, meta={"step": 5})
    return d, cfg


# --- which caption each sample gets -----------------------------------------------------------


def test_caption_selection_is_world_size_invariant_deterministic_and_follows_the_rule():
    from enat.eval.captions import CAPTION_TAG, caption_order, select_captions

    R, N, seed = 37, 100, 3  # N > R: the rows are cycled
    K = np.random.default_rng(0).integers(4, 8, R)
    rows, ks = select_captions(seed, K, np.arange(N))
    for world in (2, 3):  # each "rank" takes i = rank, rank + world, ...
        got_rows, got_ks = np.empty(N, np.int64), np.empty(N, np.int64)
        for rank in range(world):
            got_rows[rank::world], got_ks[rank::world] = select_captions(seed, K, np.arange(N)[rank::world])
        assert np.array_equal(got_rows, rows) and np.array_equal(got_ks, ks)
    chunks = [select_captions(seed, K, np.arange(s, min(s + 7, N))) for s in range(0, N, 7)]  # any batching
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), rows)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), ks)
    again = select_captions(seed, K, np.arange(N))
    assert np.array_equal(again[0], rows) and np.array_equal(again[1], ks)
    # The recorded rule: row = perm[i mod R], k = floor(hash_uniform(seed, 0xE7C1, i) * K_row).
    perm = caption_order(seed, R)
    assert sorted(perm) == list(range(R)) and len(set(rows[:R])) == R  # first pass: R distinct images
    assert np.array_equal(rows, perm[np.arange(N) % R])
    assert np.array_equal(ks, np.floor(hash_uniform(seed, CAPTION_TAG, np.arange(N)) * K[rows]).astype(int))
    assert ((0 <= ks) & (ks < K[rows])).all() and len(set(ks.tolist())) > 3
    other = select_captions(seed + 1, K, np.arange(N))
    assert not np.array_equal(other[0], rows)
    with pytest.raises(EvalError, match="no held-out captions"):
        select_captions(seed, np.array([], np.int64), np.arange(3))


def test_held_out_contexts_from_embeddings_and_ids_agree(setup):
    from enat.data.loader import ShardSet
    from enat.eval.captions import HeldOutCaptions

    d, cfg = setup
    emb = HeldOutCaptions(cfg, **QUIET)
    ids = HeldOutCaptions(replace(cfg, data=replace(cfg.data, val_shards=str(d / "val_ids"))), **QUIET)
    assert emb.storage == "embeddings" and ids.storage == "ids" and len(emb) == 299
    rows, ks = emb.select(np.arange(40))
    data = ShardSet(d / "val", log=lambda *_: None)
    want = torch.from_numpy(np.stack([data.contexts([r], int(k))[0] for r, k in zip(rows, ks)])).float()
    assert torch.equal(emb.contexts(rows, ks).float(), want)  # the shard's caption k of row r, in sample order
    # Encoded now and rounded to fp16 as the stored ones were: equal up to the rounding of a last
    # bit (the tokenize job encoded them in other batches).
    torch.testing.assert_close(ids.contexts(rows, ks).float(), want, atol=2e-3, rtol=2e-3)
    assert emb.captions(rows[:3], ks[:3]) == [data.captions(int(r))[int(k)] for r, k in zip(rows[:3], ks[:3])]


def test_text_fid_job_records_the_protocol_and_the_captions(setup, tmp_path):
    from enat.data.loader import ShardSet
    from enat.eval.job import evaluate
    from enat.eval.captions import SELECTION_RULE, select_captions

    d, cfg = setup
    r = evaluate(cfg, tmp_path, str(d / "w.pt"), num_samples=24, **QUIET)  # not a multiple of 10: fine for text
    assert not r["cached"] and r["num_samples"] == 24 and r["condition"] == "text"
    cap = r["captions"]
    assert cap["path"] == str(d / "val") and cap["rule"] == SELECTION_RULE and cap["seed"] == cfg.eval.seed
    assert cap["manifest_sha256"] and cap["num_rows"] == 299 and cap["storage"] == "embeddings"
    assert r["settings"]["captions"] == cap["id"] and r["reference"]["kind"] == "digits-val"
    assert r["extractor"]["name"] == "digits-cnn" and math.isfinite(r["metrics"]["fid"])
    assert "class_fid" in r["metrics"]  # the digits' labels ride along with their captions
    data = ShardSet(d / "val", log=lambda *_: None)
    rows, ks = select_captions(cfg.eval.seed, data.num_captions, np.arange(24))
    used = json.loads(open(r["files"]["captions"]).read())
    assert [s["row"] for s in used["samples"]] == rows.tolist() and [s["k"] for s in used["samples"]] == ks.tolist()
    assert used["samples"][5]["caption"] == data.captions(int(rows[5]))[int(ks[5])]
    z = np.load(r["files"]["npz"])
    assert z["arr_0"].shape == (24, 32, 32, 3) and np.array_equal(z["caption_rows"], rows)
    assert np.array_equal(z["caption_k"], ks) and np.array_equal(z["labels"], data.label[rows])
    again = evaluate(cfg, tmp_path, str(d / "w.pt"), num_samples=24, **QUIET)
    assert again["cached"] and again["metrics"] == r["metrics"]
    # Another caption seed: another result (the captions key the settings).
    other = evaluate(replace(cfg, eval=replace(cfg.eval, seed=1)), tmp_path, str(d / "w.pt"), num_samples=24, **QUIET)
    assert other["captions"]["id"] != cap["id"] and other["path"] != r["path"]


def test_shards_of_another_encoder_are_refused(setup, tmp_path):
    from enat.eval.job import evaluate
    from enat.models import build_model
    from enat.models.weights import save_weights

    d, cfg = setup
    model = build_model(cfg.model)
    model.set_null_context(torch.randn(L, C))
    save_weights(tmp_path / "w.pt", cfg.model, {"ema": model.state_dict()}, meta={"step": 1})
    with pytest.raises(EvalError, match="another text encoder"):
        evaluate(cfg, tmp_path, str(tmp_path / "w.pt"), num_samples=4, **QUIET)


# --- CLIP score -------------------------------------------------------------------------------


def test_clip_score_in_the_job_and_a_hub_name_fails_cleanly(setup, tmp_path, monkeypatch):
    import enat.eval.job
    from enat.eval.job import evaluate
    from enat.eval.captions import clip_score

    d, cfg = setup
    clip_dir = tiny_clip(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    caps = ["the digit 3", "a thick seven", "a wide two", "a handwritten one", "the number nine"]
    s1, n1 = clip_score(images, caps, str(clip_dir))
    s2, _ = clip_score(images, caps, str(clip_dir))
    assert s1 == s2 and n1 == 5 and 0 <= s1 <= 100

    with_clip = replace(cfg, eval=replace(cfg.eval, clip_model=str(clip_dir)))
    r = evaluate(with_clip, tmp_path / "run", str(d / "w.pt"), num_samples=12, **QUIET)
    assert 0 <= r["metrics"]["clip_score"] <= 100 and r["clip_model"] == str(clip_dir)
    assert r["settings"]["clip_model"] == str(clip_dir)

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking eval.clip_model")

    monkeypatch.setattr(enat.eval.job, "generate", no_sampling)
    hub = replace(cfg, eval=replace(cfg.eval, clip_model="openai/clip-vit-large-patch14"))
    with pytest.raises(EvalError, match="hub name.*local path only"):
        evaluate(hub, tmp_path / "hub", str(d / "w.pt"), num_samples=4, **QUIET)
    with pytest.raises(EvalError, match="hub name"):
        clip_score(images, caps, "openai/clip-vit-large-patch14")
    classy = load_config(CONFIG, [f"eval.clip_model={clip_dir}"])
    with pytest.raises(EvalError, match="needs captions"):
        evaluate(classy, tmp_path / "cls", str(d / "w.pt"), num_samples=10, **QUIET)


# --- reference statistics from images -----------------------------------------------------------


def write_images(root, sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = root / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def by_hand(paths, crop, extractor):
    from PIL import Image

    arr = []
    for p in paths:
        with Image.open(p) as im:
            arr.append(crop(im, 32))
    feats = extract(extractor, torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous())
    return statistics(feats["pool"])


SIZES = [(40, 32), (32, 50), (64, 64), (90, 70), (33, 33), (48, 80), (100, 40), (36, 36), (70, 95), (32, 32)]


def test_reference_from_imagefolder_and_coco_images_equals_by_hand(setup, tmp_path):
    from enat.data.tokenize import adm_center_crop, uvit_center_crop
    from enat.eval.reference import compute_reference, reference_spec, reference_stats

    d, cfg = setup
    extractor = build_extractor("digits-cnn", str(d / "fx.pt"))
    # ImageFolder: root/<class>/<image>, the ADM crop.
    paths = write_images(tmp_path / "folder/a", SIZES[:5]) + write_images(tmp_path / "folder/b", SIZES[5:], seed=1)
    folder = load_config(CONFIG, [f"eval.extractor_weights={d / 'fx.pt'}", "eval.extractor=digits-cnn",
                                  f"eval.cache_dir={tmp_path / 'cache'}", f"data.val_image_dir={tmp_path / 'folder'}",
                                  "data.dataset=imagefolder", "data.num_workers=0"])
    out, record = compute_reference(folder, tmp_path / "ref_folder.npz", **QUIET)
    mu, sigma = by_hand(paths, adm_center_crop, extractor)
    z = np.load(out)
    np.testing.assert_allclose(z["mu"], mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert int(z["resolution"]) == 32
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["count"] == 10 and side["crop"] == "adm" and side["images"] == str(tmp_path / "folder")
    assert side["extractor"]["name"] == "digits-cnn" and side["extractor"]["weights_sha256"]

    # COCO: the images the captions JSON lists (sorted by id; one without a caption left out), U-ViT's crop.
    paths = write_images(tmp_path / "val2014", SIZES, seed=2)
    ann = {"images": [{"id": 100 - i, "file_name": p.name} for i, p in enumerate(paths)],
           "annotations": [{"image_id": 100 - i, "caption": f"picture {i}"} for i in range(len(paths)) if i != 4]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(ann))
    coco = load_config(CONFIG, [f"eval.extractor_weights={d / 'fx.pt'}", "eval.extractor=digits-cnn",
                                f"eval.cache_dir={tmp_path / 'cache'}", f"data.val_image_dir={tmp_path / 'val2014'}",
                                f"data.val_captions={tmp_path / 'captions_val2014.json'}", "data.dataset=coco",
                                "data.flip=false", "data.num_workers=0", "model.condition=text"])
    spec = reference_spec(coco)  # the FID job's default for COCO: the real images
    assert spec["kind"] == "images" and spec["crop"] == "uvit-center"
    out, record = compute_reference(coco, None, **QUIET)  # into the cache the FID job reads
    assert out == tmp_path / "cache" / f"{spec['id']}.npz"
    mu, sigma = by_hand([p for i, p in enumerate(paths) if i != 4][::-1], uvit_center_crop, extractor)
    ref = reference_stats(coco, spec, extractor, None, **QUIET)  # cached now
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert record["count"] == 9 and record["captions"] == str(tmp_path / "captions_val2014.json")

    # Given by path: accepted, its sidecar recorded; an extractor mismatch is refused.
    by_path = replace(coco, eval=replace(coco.eval, reference_npz=str(tmp_path / "ref_folder.npz")))
    spec = reference_spec(by_path)
    assert spec["kind"] == "npz" and spec["recorded"]["crop"] == "adm"
    given = reference_stats(by_path, spec, extractor, None)
    assert np.array_equal(given["mu"], np.load(tmp_path / "ref_folder.npz")["mu"])
    other = replace(by_path, eval=replace(by_path.eval, extractor="inception-v3-compat"))
    with pytest.raises(EvalError, match="digits-cnn features"):
        reference_spec(other)
    with pytest.raises(EvalError, match="data.val_image_dir and data.val_captions"):
        reference_spec(replace(coco, data=replace(coco.data, val_captions=None)))


# --- text control -------------------------------------------------------------------------------


def test_control_prompts_are_balanced_and_state_what_they_say():
    from enat.data.captions import caption_attributes
    from enat.eval.text import control_prompts

    prompts = control_prompts(180)
    assert all(caption_attributes(p["caption"]) == {k: v for k, v in p.items() if k != "caption"} for p in prompts)
    digits = [p["digit"] for p in prompts]
    assert all(digits.count(k) == 18 for k in range(10))
    assert sum(p.get("thickness") == "thick" for p in prompts) == 60 == sum("thickness" not in p for p in prompts)
    assert len({p["caption"] for p in prompts}) > 90  # the second round takes other templates


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A digit classifier made in a second: random conv features, the last layer fitted by least
    squares on all the digits (most are classified right; the test uses only those)."""
    from enat.data.digits import load_digits

    torch.manual_seed(0)
    net = DigitNet().eval()
    x, y, _ = load_digits("all")
    with torch.no_grad():
        pool = net(x)[0].double()
    a = torch.cat([pool, torch.ones(len(pool), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(a, torch.nn.functional.one_hot(y, 10).double()).solution  # (129, 10)
    with torch.no_grad():
        net.fc.weight.copy_(w[:-1].T.float())
        net.fc.bias.copy_(w[-1].float())
    return save_classifier(tmp_path_factory.mktemp("clf") / "digits.pt", net)


def test_control_evaluation_measures_a_constructed_case_exactly(setup, classifier, tmp_path, monkeypatch):
    """A stand-in sampler returns real digit images picked to have, per CFG scale, a planned
    digit (right or wrong) and planned attributes (as asked or not): the table must say exactly
    the planned fractions, and every setting must get the same sample indices and conditions."""
    import enat.eval.text as text_eval
    from enat.data.captions import AttributeModel
    from enat.data.digits import load_digits
    from enat.images import to_uint8

    d, cfg = setup
    cfg = replace(cfg, eval=replace(cfg.eval, extractor_weights=str(classifier)))
    n, scales = 180, [0.0, 2.0]
    prompts = text_eval.control_prompts(n)
    # The pool: real digits the classifier gets right with a margin, with what they measure against each class.
    x, y, _ = load_digits("all")
    pool = to_uint8(x)
    net = build_extractor("digits-cnn", str(classifier))
    logits = extract(net, torch.from_numpy(pool).permute(0, 3, 1, 2))["logits"]
    top2 = np.sort(logits, 1)[:, -2:]
    sure = (logits.argmax(1) == y.numpy()) & (top2[:, 1] - top2[:, 0] > 0.05)
    judge = AttributeModel.default()
    words = {c: judge.judge(pool, np.full(len(pool), c)) for c in range(10)}

    def pick(right, prompt_digit, agree_plan, p):
        """An image of the prompt's digit (right) or of another one whose measured attributes,
        against the prompt digit's thresholds, are (agree) or are not the ones the prompt asks;
        where no image fits a wrong-digit plan, the nearest plan that has one (returned)."""
        asked = [a for a in ("thickness", "width") if a in p]
        plans = [agree_plan] + [{**agree_plan, a: not agree_plan[a]} for a in asked] + \
            [{a: not agree_plan[a] for a in agree_plan}]
        for plan in plans:
            ok = sure & ((y.numpy() == prompt_digit) if right else (y.numpy() != prompt_digit))
            for a in asked:
                ok &= (words[prompt_digit][a] == p[a]) == plan[a]
            found = np.nonzero(ok)[0]
            if len(found):
                return found[0], plan
        raise AssertionError(f"no image for {p} (right digit: {right})")

    plans, images_of = {}, {}
    for j, s in enumerate(scales):
        rng = np.random.default_rng(j)
        right = rng.random(n) < (0.3, 0.8)[j]
        planned = {a: rng.random(n) < (0.4, 0.9)[j] for a in ("thickness", "width")}
        chosen, agree = [], {a: np.zeros(n, bool) for a in planned}
        for i, p in enumerate(prompts):
            k, plan = pick(right[i], p["digit"], {a: bool(planned[a][i]) for a in planned}, p)
            chosen.append(k)
            for a in plan:
                agree[a][i] = plan[a]
        images_of[s] = pool[np.array(chosen)]
        asked = {a: np.array([a in p for p in prompts]) for a in ("thickness", "width")}
        plans[s] = {"digit_accuracy": right.mean(), **{a: agree[a][asked[a]].mean() for a in asked},
                    **{f"{a}_n": int(asked[a].sum()) for a in asked}}
        assert 0.2 < plans[s]["thickness"] < 1 and 0.2 < plans[s]["width"] < 1

    calls = []

    def fake_sample(model, tokenizer, cond, sample_cfg, indices, batch_size):
        calls.append((sample_cfg.cfg_scale, sample_cfg.reuse, indices.copy(), cond.clone()))
        return images_of[sample_cfg.cfg_scale]

    monkeypatch.setattr(text_eval, "sample_images", fake_sample)
    printed = []
    rec = text_eval.evaluate_control(cfg, None, str(d / "w.pt"), scales, n, out_dir=tmp_path / "ctl",
                                     log=printed.append)
    assert [(c[0], c[1]) for c in calls] == [(0.0, True), (2.0, True), (0.0, False), (2.0, False)]
    assert all(np.array_equal(c[2], np.arange(n)) and torch.equal(c[3], calls[0][3]) for c in calls)  # paired
    for row in rec["results"]:
        want = plans[row["cfg_scale"]]
        assert row["digit_accuracy"] == pytest.approx(want["digit_accuracy"], abs=1e-12)
        for a in ("thickness", "width"):
            assert row[a] == pytest.approx(want[a], abs=1e-12) and row[f"{a}_n"] == want[f"{a}_n"]
        assert math.isfinite(row["fid"]) and 0 <= row["thickness_tok"] <= 1 and 0 <= row["width_tok"] <= 1
    ceiling = rec["ceiling"]  # the held-out digits through the tokenizer, against their own captions
    assert ceiling["cfg_scale"] is None and 0 <= ceiling["digit_accuracy"] <= 1 and ceiling["thickness_n"] > 150
    stored = json.loads((tmp_path / "ctl/control.json").read_text())
    assert stored["results"][0]["digit_accuracy"] == rec["results"][0]["digit_accuracy"]
    md = (tmp_path / "ctl/control.md").read_text()
    assert "| CFG | reuse | digit accuracy |" in md and f"| 2 | no | {plans[2.0]['digit_accuracy']:.3f} |" in md
    assert "| recon. | - |" in md
    assert any("| CFG |" in str(p) for p in printed)
    assert (tmp_path / "ctl/samples_cfg2_reuse.png").is_file()

    with pytest.raises(EvalError, match="captioned digits demo"):
        text_eval.evaluate_control(load_config(CONFIG), None, str(d / "w.pt"), scales, 10)


def test_control_evaluation_runs_the_real_sampler(setup, tmp_path):
    """Unpatched, tiny: the model, the encoder check, the sampler and decoding run through."""
    import enat.eval.text as text_eval

    d, cfg = setup
    rec = text_eval.evaluate_control(cfg, None, str(d / "w.pt"), [0.0, 2.0], 20, reuse=(True,), out_dir=tmp_path,
                                     fid=False, **QUIET)
    assert [(r["cfg_scale"], r["reuse"]) for r in rec["results"]] == [(0.0, True), (2.0, True)]
    assert all(0 <= r["digit_accuracy"] <= 1 and r["fid"] is None for r in rec["results"])


def test_cli_eval_reference_and_control(setup, tmp_path, monkeypatch):
    from enat.cli import main

    d, cfg = setup
    from enat.config import dump_config

    dump_config(cfg, tmp_path / "c.yaml")
    assert main(["eval", "reference", f"eval.cache_dir={tmp_path / 'cache'}", "--config", str(tmp_path / "c.yaml"),
                 "--out", str(tmp_path / "ref.npz")]) == 0
    assert (tmp_path / "ref.npz").is_file() and json.loads((tmp_path / "ref.json").read_text())["count"] == 299
    assert main(["eval", "control", "--config", str(tmp_path / "c.yaml"), "--checkpoint", str(d / "w.pt"),
                 "--cfg-scales", "0,1", "--num-samples", "10", "--no-reuse", "--no-fid", "--out",
                 str(tmp_path / "ctl")]) == 0
    rows = json.loads((tmp_path / "ctl/control.json").read_text())["results"]
    assert [(r["cfg_scale"], r["reuse"]) for r in rows] == [(0.0, False), (1.0, False)]
    assert main(["eval", "--config", str(tmp_path / "c.yaml"), "--checkpoint", str(d / "w.pt"), "--cfg-scales",
                 "1"]) == 2  # control's options are refused on the FID job


# --- the FID job on 1 and 2 ranks: the same captions, the same numbers ----------------------------


def run_eval(cfg_path, weights, nproc, num_samples, tmp_path):
    """`enat eval --config C --checkpoint W` as its own process (nproc > 1: under torch.distributed.run,
    gloo on CPU) -> the result record (results go next to W)."""
    import os
    import subprocess
    import sys

    from enat.dist import free_port

    # This checkout first (a scratch copy's `enat` wins over the installed one), then tests/; none of
    # the rank/rendezvous variables an in-process job earlier in the session left (enat.dist.setup_env).
    path = [str(ROOT), str(ROOT / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(path))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                                      "127.0.0.1", "--master_port", str(free_port())]
    cmd = [sys.executable, *launcher, "-m", "enat.cli", "eval", "--config", str(cfg_path), "--checkpoint",
           str(weights), "--num-samples", str(num_samples)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    found = [p for p in (weights.parent / "eval").rglob("*.json") if not p.name.endswith(".captions.json")]
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


@pytest.mark.slow
def test_text_fid_job_is_the_same_on_one_and_two_ranks(setup, tmp_path):
    """The README's claim for the job itself (not only the pure selection rule): `enat eval` of a
    text model on 1 rank and on 2 ranks (torch.distributed.run, gloo) writes the same captions per
    sample index and the same metrics."""
    import shutil

    from enat.config import dump_config

    d, cfg = setup
    dump_config(cfg, tmp_path / "c.yaml")
    n = 20  # two ranks: 10 samples each, interleaved (rank r takes i = r, r + 2, ...)
    got = {}
    for nproc in (1, 2):
        w = tmp_path / f"ranks{nproc}" / "w.pt"
        w.parent.mkdir()
        shutil.copy(d / "w.pt", w)
        got[nproc] = run_eval(tmp_path / "c.yaml", w, nproc, n, tmp_path)
    one, two = got[1], got[2]
    assert one["num_samples"] == two["num_samples"] == n and one["condition"] == two["condition"] == "text"
    assert one["captions"] == two["captions"] and one["settings"] == two["settings"]
    caps = [json.loads(open(r["files"]["captions"]).read()) for r in (one, two)]
    assert caps[0]["samples"] == caps[1]["samples"]  # row, k and caption of every sample index
    assert [s["index"] for s in caps[0]["samples"]] == list(range(n))
    assert {k: v for k, v in caps[0].items() if k != "samples"} == {k: v for k, v in caps[1].items() if k != "samples"}
    assert len({s["row"] for s in caps[0]["samples"]}) == n and len({s["k"] for s in caps[0]["samples"]}) > 1
    z1, z2 = np.load(one["files"]["npz"]), np.load(two["files"]["npz"])
    for key in ("caption_rows", "caption_k", "labels"):
        assert np.array_equal(z1[key], z2[key]), key
    assert set(one["metrics"]) == set(two["metrics"]) and "fid" in one["metrics"]
    for key, v in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(v, rel=1e-6, abs=1e-6), key


def test_control_scores_near_chance_without_the_caption_and_high_on_the_ceiling(setup, classifier, tmp_path,
                                                                                 monkeypatch):
    """Known answers. A stand-in sampler returns held-out digits: at CFG 0 drawn without looking at
    the caption (a caption-blind generator: digit accuracy is chance, 0.1, the prompts being
    balanced), at CFG 2 drawn from the prompt's digit but blind to its attribute words (digit
    accuracy that of the classifier, attribute agreement chance, 1/3: the thresholds are the
    training digits' terciles). A lossless tokenizer makes the ceiling row the held-out digits
    themselves against their own captions: agreement 1, digit accuracy that of the classifier."""
    import enat.eval.text as text_eval
    from enat.data.digits import load_digits
    from enat.images import to_uint8

    class Lossless(torch.nn.Module):  # encode and decode are the identity: reconstructions are the images
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return x

        def decode(self, z):
            return z

    monkeypatch.setattr(text_eval, "load_tokenizer", lambda *a, **k: Lossless())
    monkeypatch.setattr(text_eval, "_RECONSTRUCTIONS", {})  # not the random tokenizer's, cached by its file
    d, cfg = setup
    cfg = replace(cfg, eval=replace(cfg.eval, extractor_weights=str(classifier)))
    x, y, _ = load_digits("val")
    held, y = to_uint8(x), y.numpy()
    pred = extract(build_extractor("digits-cnn", str(classifier)),
                   torch.from_numpy(held).permute(0, 3, 1, 2))["logits"].argmax(1)
    clf_acc = float((pred == y).mean())
    assert clf_acc > 0.6  # (the fixture's least-squares fit varies run to run: 0.8-0.9 on these)
    n = 900
    digits = np.array([p["digit"] for p in text_eval.control_prompts(n)])
    rng = np.random.default_rng(0)
    blind_i = rng.integers(0, len(held), n)  # independent of the caption
    only_i = np.array([rng.choice(np.nonzero(y == k)[0]) for k in digits])  # the prompt's digit, any strokes
    blind, digit_only = held[blind_i], held[only_i]

    def fake_sample(model, tokenizer, cond, sample_cfg, indices, batch_size):
        return {0.0: blind, 2.0: digit_only}[sample_cfg.cfg_scale]

    monkeypatch.setattr(text_eval, "sample_images", fake_sample)
    rec = text_eval.evaluate_control(cfg, None, str(d / "w.pt"), [0.0, 2.0], n, reuse=(False,), fid=False,
                                     out_dir=tmp_path, **QUIET)
    by = {r["cfg_scale"]: r for r in rec["results"]}
    assert abs(by[0.0]["digit_accuracy"] - 0.1) < 0.04, by[0.0]  # chance
    assert by[0.0]["digit_accuracy"] == pytest.approx(float((pred[blind_i] == digits).mean()), abs=0.01)
    assert by[2.0]["digit_accuracy"] == pytest.approx(float((pred[only_i] == digits).mean()), abs=0.01)
    assert by[2.0]["digit_accuracy"] > 0.5
    for a in ("thickness", "width"):
        assert by[2.0][f"{a}_n"] == 600  # two of the three words state it
        assert abs(by[2.0][a] - 1 / 3) < 0.08, (a, by[2.0])
    ceiling = rec["ceiling"]
    assert ceiling["digit_accuracy"] == pytest.approx(clf_acc, abs=0.005)
    for a in ("thickness", "width"):
        assert ceiling[a] >= 0.99 and ceiling[f"{a}_tok"] >= 0.95, (a, ceiling)
        assert ceiling[f"{a}_n"] > 150
