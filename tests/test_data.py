"""Tokenize pipeline and shard loader: partitions and restarts, unreadable images, the exact
loader's split/order/resume, corrupt input, manifest checks, resampled mode."""

import itertools
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from enat.config import load_config
from enat.data.loader import ShardSet, TokenLoader
from enat.data.shards import Manifest, ShardError, index_path
from enat.data.tokenize import DigitsSource, ImageFolderSource, adm_center_crop, merge_parts, tokenize_part
from enat.tokenizer import VQGAN


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs/experiments/demo.yaml")


@pytest.fixture(scope="module")
def vq(cfg):
    torch.manual_seed(0)  # a random-weight tokenizer: the pipeline does not care what ids mean
    return VQGAN(cfg.tokenizer).eval()


@pytest.fixture(scope="module")
def digits(cfg):
    return DigitsSource("train", cfg.tokenizer.resolution)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vq, digits):
    out = tmp_path_factory.mktemp("shards")
    tokenize_part(digits, vq, out, shard_size=128, flip=False, progress=False, log=lambda *_: None)
    merge_parts(out)
    return out


def take(loader, k):
    return list(itertools.islice(iter(loader), k))


def read_all(shard_dir):
    """{key: (tokens, label)} through plain webdataset, as any consumer would read the shards."""
    import webdataset as wds

    m = Manifest.load(shard_dir)
    out = {}
    for sample in wds.WebDataset([str(shard_dir / s["name"]) for s in m.shards], shardshuffle=False).decode():
        out[sample["__key__"]] = (sample["tokens.npy"], int(sample["cls"]))
    return out


# --- tokenize -------------------------------------------------------------------------------


def test_manifest_and_shards_hold_every_image(shards, digits, vq):
    m = Manifest.load(shards)
    assert m.num_samples == len(digits) == 1498 and m.grid_size == 8 and m.codebook_size == 128
    assert m.num_classes == 10 and sum(s["num_samples"] for s in m.shards) == m.num_samples
    samples = read_all(shards)
    assert len(samples) == len(digits)
    tokens, label = samples["000000007_0"]
    assert tokens.dtype == np.uint16 and tokens.shape == (64,) and label == digits.label(7)
    expect = vq.encode(digits.load(7)[None]).flatten().numpy()
    assert np.array_equal(tokens, expect)


def test_parts_merge_to_the_same_set_and_rerun_skips(tmp_path, vq, digits, shards):
    logs = []
    for part in range(3):
        tokenize_part(digits, vq, tmp_path, part=part, num_parts=3, shard_size=128, flip=False, progress=False,
                      log=logs.append)
    m = merge_parts(tmp_path)
    assert m.source["num_parts"] == 3
    a, b = read_all(tmp_path), read_all(shards)
    assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) for k in a)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    tokenize_part(digits, vq, tmp_path, part=1, num_parts=3, shard_size=128, flip=False, progress=False,
                  log=logs.append)
    assert "already done" in logs[-1] and "(4 already done)" in logs[-1]
    assert before == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    # A damaged finished shard is written again on rerun.
    victim = sorted(tmp_path.glob("shard-0001-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    tokenize_part(digits, vq, tmp_path, part=1, num_parts=3, shard_size=128, flip=False, progress=False,
                  log=logs.append)
    assert "(3 already done)" in logs[-1]
    assert len(read_all(tmp_path)) == len(digits)
    # Every shard's CRC-32 is recorded at tokenize time and survives the merge of the parts.
    from enat.files import file_crc32

    merge_parts(tmp_path)  # again: the rerun rewrote a shard
    for d in (tmp_path, shards):
        entries = Manifest.load(d).shards
        assert entries and all(e["crc32"] == file_crc32(d / e["name"]) for e in entries)


def test_merge_refuses_missing_parts(tmp_path, vq, digits):
    tokenize_part(digits, vq, tmp_path, part=0, num_parts=2, shard_size=512, flip=False, progress=False,
                  log=lambda *_: None)
    with pytest.raises(ShardError, match=r"parts \[1\] of 2 have not finished"):
        merge_parts(tmp_path)


def make_image_folder(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")


def test_image_folder_flips_crops_and_reports_unreadable(tmp_path, vq):
    make_image_folder(tmp_path / "imgs", [(40, 32), (100, 70), (32, 64)])
    src = ImageFolderSource(tmp_path / "imgs", 32)
    assert src.num_classes == 2 and len(src) == 7
    logs = []
    record = tokenize_part(src, vq, tmp_path / "out", shard_size=4, flip=True, progress=False, log=logs.append)
    m = merge_parts(tmp_path / "out")
    assert record["num_samples"] == m.num_samples == 12  # 6 readable images, as-is and flipped
    assert [f["path"] for f in m.failed] == [str(tmp_path / "imgs/dog/broken.png")]
    assert any("could not read" in line and "broken.png" in line for line in logs)
    samples = read_all(tmp_path / "out")
    keys = sorted(samples)
    assert keys[:2] == ["000000000_0", "000000000_1"]
    flipped = vq.encode(src.load(0).flip(-1)[None]).flatten().numpy()
    assert np.array_equal(samples["000000000_1"][0], flipped)
    assert samples["000000005_0"][1] == 1  # dog/2.png, class 1
    assert "000000006_0" not in samples  # dog/broken.png


def test_adm_center_crop():
    from PIL import Image

    arr = np.zeros((300, 500, 3), dtype=np.uint8)
    arr[:, 240:260] = 255  # a vertical bar in the middle
    out = adm_center_crop(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 32].mean() > 200 and out[:, 2].mean() < 5


# --- loader ---------------------------------------------------------------------------------


def loader(shards, **kw):
    args = dict(micro_batch=8, world_size=2, grad_accum=2, seed=3, num_workers=2, log=lambda *_: None)
    args.update(kw)
    return TokenLoader(shards, **args)


def test_ranks_split_an_epoch_without_overlap_or_gap(shards):
    per_rank = []
    for rank in range(2):
        ld = loader(shards, rank=rank)
        batches = take(ld, ld.batches_per_epoch * ld.accum)
        assert all(b["epoch"] == 0 for b in batches)
        per_rank.append(torch.cat([b["uid"] for b in batches]))
    uids = torch.cat(per_rank)
    G = ld.global_batch
    assert len(uids) == (1498 // G) * G and uids.unique().numel() == len(uids)
    assert len(per_rank[0]) == len(per_rank[1])
    # Across two epochs every sample appears (the skipped tail differs from epoch to epoch).
    seen = set()
    for rank in range(2):
        ld = loader(shards, rank=rank, num_workers=0)
        seen |= set(torch.cat([b["uid"] for b in take(ld, 2 * ld.batches_per_epoch * ld.accum)]).tolist())
    assert len(seen) == len(ShardSet(shards, log=lambda *_: None))


def test_exact_resume_two_ranks_two_workers(shards):
    for rank in range(2):
        first = loader(shards, rank=rank)
        n = first.batches_per_epoch * first.accum + 8  # 46 steps x 2 micro-batches per epoch, and 8 more
        straight = take(loader(shards, rank=rank), n)
        assert {b["epoch"] for b in straight} == {0, 1}  # it crosses an epoch boundary
        head = take(first, 23)
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint round trip
        assert state["micro_batches"] == 23
        resumed = loader(shards, rank=rank)
        resumed.load_state_dict(state)
        tail = take(resumed, n - 23)
        # Lengths first: zip stops at the shorter stream, so a resume that yields too few batches
        # would compare only what it did yield.
        assert (len(straight), len(head), len(tail)) == (n, 23, n - 23)
        assert resumed.state_dict()["micro_batches"] == n  # it went on from 23, not from 0
        for a, b in zip(straight, head + tail, strict=True):
            assert torch.equal(a["uid"], b["uid"]) and a["epoch"] == b["epoch"]
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_order_depends_on_seed_and_epoch_not_on_workers(shards):
    a = take(loader(shards, num_workers=0), 4)
    b = take(loader(shards, num_workers=2), 4)
    assert len(a) == len(b) == 4
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
    c = take(loader(shards, seed=4), 4)
    assert not torch.equal(a[0]["uid"], c[0]["uid"])
    ld = loader(shards)
    assert not np.array_equal(ld.epoch_order(0), ld.epoch_order(1))


def test_global_batch_is_independent_of_world_size(shards):
    one = loader(shards, micro_batch=32, world_size=1, grad_accum=1, num_workers=0)
    first = next(iter(one))
    parts = []
    for rank in range(4):
        parts += [b for b in take(loader(shards, micro_batch=4, world_size=4, grad_accum=2, rank=rank, num_workers=0), 2)]
    assert set(first["uid"].tolist()) == set(torch.cat([p["uid"] for p in parts]).tolist())


def test_cfg_label_drop_rate_and_rank_independence(shards):
    ld = loader(shards, micro_batch=64, world_size=1, grad_accum=1, cfg_drop=0.3, null_class=10, num_workers=0)
    batches = take(ld, ld.batches_per_epoch)
    labels = torch.cat([b["labels"] for b in batches])
    assert 0.25 < (labels == 10).float().mean() < 0.35
    plain = loader(shards, micro_batch=64, world_size=1, grad_accum=1, num_workers=0)
    truth = torch.cat([b["labels"] for b in take(plain, plain.batches_per_epoch)])
    kept = labels != 10
    assert torch.equal(labels[kept], truth[kept])
    # The same sample read by another rank layout gets the same decision.
    other = [loader(shards, micro_batch=16, world_size=4, grad_accum=1, rank=r, cfg_drop=0.3, null_class=10,
                    num_workers=0) for r in range(4)]
    decided = {}
    for ld2 in other:
        b = next(iter(ld2))
        decided.update(zip(b["uid"].tolist(), b["labels"].tolist()))
    assert all(decided[u] == l for u, l in zip(batches[0]["uid"].tolist(), batches[0]["labels"].tolist()))


def test_resume_with_other_global_batch_is_refused(shards):
    ld = loader(shards)
    take(ld, 3)
    other = loader(shards, micro_batch=4)
    with pytest.raises(ShardError, match="global_batch: checkpoint 32 vs now 16"):
        other.load_state_dict(ld.state_dict())


def test_manifest_checked_against_model(shards, cfg):
    from dataclasses import replace

    TokenLoader(shards, micro_batch=8, model_cfg=cfg.model, log=lambda *_: None)
    with pytest.raises(ShardError, match=r"token grid 8x8 vs model.grid_size 16"):
        TokenLoader(shards, micro_batch=8, model_cfg=replace(cfg.model, grid_size=16), log=lambda *_: None)
    with pytest.raises(ShardError, match=r"codebook size 128 vs model.codebook_size 1024"):
        TokenLoader(shards, micro_batch=8, model_cfg=replace(cfg.model, codebook_size=1024), log=lambda *_: None)


def test_missing_manifest_and_tiny_dataset(tmp_path, shards):
    with pytest.raises(ShardError, match="enat tokenize"):
        TokenLoader(tmp_path, micro_batch=8)
    with pytest.raises(ShardError, match="fewer than one global batch"):
        TokenLoader(shards, micro_batch=1000, world_size=2, log=lambda *_: None)


# --- corrupt input --------------------------------------------------------------------------


def copy_shards(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_shard_is_skipped_and_counted_or_raises(tmp_path, shards):
    d = copy_shards(shards, tmp_path / "s")
    victim = d / Manifest.load(d).shards[2]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    logs = []
    data = ShardSet(d, log=logs.append)
    assert 0 < data.skipped_samples <= 128 and len(data) == 1498 - data.skipped_samples
    assert any(victim.name in line for line in logs)
    ld = TokenLoader(d, micro_batch=64, num_workers=0, log=lambda *_: None)
    assert len(torch.cat([b["uid"] for b in take(ld, ld.batches_per_epoch)]).unique()) == ld.batches_per_epoch * 64
    with pytest.raises(ShardError, match=victim.name):
        TokenLoader(d, micro_batch=64, strict=True)


def test_sample_with_wrong_token_count_is_skipped_or_raises(tmp_path, shards):
    import webdataset as wds

    d = copy_shards(shards, tmp_path / "s")
    m = Manifest.load(d)
    name = m.shards[0]["name"]
    samples = [(k, v) for k, v in read_all(shards).items()][:5]
    os.remove(index_path(d / name))  # a shard without index (e.g. written by other tools) is scanned
    with wds.TarWriter(str(d / name)) as sink:
        for i, (key, (tokens, label)) in enumerate(samples):
            sink.write({"__key__": key, "tokens.npy": tokens[:10] if i == 3 else tokens, "cls": label})
    m.shards[0]["num_samples"], m.shards[0]["bytes"] = 5, (d / name).stat().st_size
    m.num_samples = sum(s["num_samples"] for s in m.shards)
    m.save(d)
    logs = []
    data = ShardSet(d, log=logs.append)
    assert data.skipped_samples == 1 and len(data) == m.num_samples - 1
    assert any(name in line and "wrong token count" in line and samples[3][0] in line for line in logs)
    with pytest.raises(ShardError, match=f"{name}.*wrong token count"):
        ShardSet(d, strict=True)


def test_unreadable_shard_file(tmp_path, shards):
    d = copy_shards(shards, tmp_path / "s")
    victim = d / Manifest.load(d).shards[1]["name"]
    victim.write_bytes(b"\0garbage" * 100)
    os.remove(index_path(victim))
    data = ShardSet(d, log=lambda *_: None)
    assert data.skipped_samples == 128
    os.remove(victim)
    assert ShardSet(d, log=lambda *_: None).skipped_samples == 128
    with pytest.raises(ShardError, match="shard file missing"):
        ShardSet(d, strict=True)


# --- resampled ------------------------------------------------------------------------------


def test_resampled_mode_streams_batches(shards):
    ld = TokenLoader(shards, micro_batch=16, resampled=True, num_workers=0, cfg_drop=0.5, null_class=10,
                     log=lambda *_: None)
    batches = take(ld, 200)  # more than an epoch: draws with replacement never run out
    assert all(b["tokens"].shape == (16, 64) for b in batches)
    labels = torch.cat([b["labels"] for b in batches])
    assert 0.4 < (labels == 10).float().mean() < 0.6
    assert ld.state_dict()["micro_batches"] == 200


def test_check_data_names_what_is_missing_and_the_command(tmp_path, shards):
    """The trainer's check builds nothing: missing shards raise, naming each manifest and the
    command that makes them."""
    from enat.data.prepare import check_data

    over = [f"data.shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}"]
    with pytest.raises(ShardError) as e:
        check_data(load_config(ROOT / "configs/experiments/demo.yaml", over))
    msg = str(e.value)
    assert f"training shards: no {tmp_path / 'train' / 'manifest.json'}" in msg
    assert f"validation shards: no {tmp_path / 'val' / 'manifest.json'}" in msg
    assert "`enat data prepare --config CONFIG [key=value ...]`" in msg and "launch/tokenize.py" in msg
    assert not (tmp_path / "train").exists() and not (tmp_path / "val").exists()
    # Training shards there, no validation split configured: fine; a missing val split alone is named.
    check_data(load_config(ROOT / "configs/experiments/demo.yaml", [f"data.shards={shards}", "data.val_shards=null"]))
    with pytest.raises(ShardError, match=r"validation shards: no .*val.manifest\.json") as e:
        check_data(load_config(ROOT / "configs/experiments/demo.yaml", [f"data.shards={shards}", over[1]]))
    assert "training shards" not in str(e.value)


# --- identity and verify (enat/data/identity.py) --------------------------------------------


def test_verify_reports_each_shard_and_names_each_kind_of_damage(tmp_path, shards, capsys):
    from enat.cli import main
    from enat.data.identity import NO_CHECKSUMS

    names = [e["name"] for e in Manifest.load(shards).shards]
    assert main(["data", "verify", str(shards)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names) + 1 and "1498 samples intact" in lines[-1]
    assert all(line.startswith(f"{n}: ok, ") and "crc32 " in line for n, line in zip(names, lines, strict=False))

    def damaged(how, name, *words):
        d = copy_shards(shards, tmp_path / how)
        victim, m = d / name, Manifest.load(d)
        if how == "truncated":
            victim.write_bytes(victim.read_bytes()[:-1000])
        elif how == "flipped":  # one bit of a token payload: the size and the tar stay valid
            raw = bytearray(victim.read_bytes())
            raw[int(np.load(index_path(victim))["offset"][3])] ^= 1
            victim.write_bytes(bytes(raw))
        elif how == "missing":
            victim.unlink()
        elif how == "count":
            m.shards[names.index(name)]["num_samples"] -= 1
            m.num_samples -= 1
            m.save(d)
        assert main(["data", "verify", str(d)]) == 1, how
        out = capsys.readouterr().out
        bad = [line for line in out.splitlines() if line.startswith(name)]
        assert len(bad) == 1 and all(w in bad[0] for w in words), (how, out)
        assert sum(line.endswith(tuple("0123456789abcdef")) and ": ok, " in line for line in out.splitlines()) \
            == len(names) - 1  # the others still report ok
        assert f"1 of {len(names)} shards damaged or missing ({name})" in out.splitlines()[-1]

    damaged("truncated", names[2], "DAMAGED", "bytes on disk", "truncated")
    damaged("flipped", names[1], "DAMAGED", "crc32", "flipped byte")
    damaged("missing", names[4], "MISSING")
    damaged("count", names[0], "DAMAGED", "128 readable samples, 127 in the manifest")
    # Shards of an older enat (no checksums in the manifest) are not failed for that.
    d = copy_shards(shards, tmp_path / "old")
    m = Manifest.load(d)
    for e in m.shards:
        del e["crc32"]
    m.save(d)
    assert main(["data", "verify", str(d)]) == 0
    out = capsys.readouterr().out
    assert NO_CHECKSUMS in out and "no checksum recorded" in out.splitlines()[0]


def test_resume_state_checks_the_shards_identity(tmp_path, shards):
    """The check a resume makes (the real-process test is in test_run_integrity.py): same shards
    pass, other shards raise naming both hashes and what changed, or (allowed) pass with a warning
    and the new sample count; a checkpoint of an older enat passes with a note."""
    from types import SimpleNamespace

    from enat.data.identity import DataChangedError, resume_data_state

    saved = loader(shards, world_size=1).state_dict()
    logs = []
    assert resume_data_state(saved, loader(shards, world_size=1), False, logs.append) == saved and not logs
    old = {k: v for k, v in saved.items() if k != "identity"}
    assert resume_data_state(old, loader(shards, world_size=1), False, logs.append) == old
    assert "no training-shard identity" in logs[-1] and saved["identity"]["manifest_sha256"] in logs[-1]

    d = copy_shards(shards, tmp_path / "s")
    m = Manifest.load(d)
    m.shards[3]["crc32"], m.shards[3]["num_samples"] = "0badc0de", 100  # as if rewritten
    m.shards.pop()
    m.tokenizer = {"path": "other.pt", "sha256": "f" * 64}
    m.num_samples = sum(e["num_samples"] for e in m.shards)
    m.save(d)
    now = SimpleNamespace(data=ShardSet(d, log=lambda *_: None))
    with pytest.raises(DataChangedError) as e:
        resume_data_state(saved, now, False)
    msg = str(e.value)
    for part in (saved["identity"]["manifest_sha256"], now.data.identity["manifest_sha256"], f"1498 -> {m.num_samples}",
                 f"1 shard(s) gone: {saved_last(saved)}", f"{m.shards[3]['name']} (128 -> 100 samples",
                 "tokenizer sha256 None -> " + "f" * 64, "data.allow_changed_shards=true", "train.run_dir"):
        assert part in msg, (part, msg)
    state = resume_data_state(saved, now, True, logs.append)
    assert "warning: data.allow_changed_shards=true" in logs[-1] and now.data.identity["manifest_sha256"] in logs[-1]
    assert state["num_samples"] == len(now.data) != saved["num_samples"]


def saved_last(state):
    return list(state["identity"]["shards"])[-1]
