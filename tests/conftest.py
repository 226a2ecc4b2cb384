import os
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """The reference tensors: ENAT_GOLDEN_DIR, else ../shared/golden beside the checkout."""
    d = Path(os.environ.get("ENAT_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
    if not d.is_dir():
        raise FileNotFoundError(f"golden directory {d} not found: set ENAT_GOLDEN_DIR to the folder "
                                f"holding enat_*.pt / vqgan_*.pt reference files")
    return d


def golden_files(pattern: str) -> list[Path]:
    files = sorted(golden_dir().glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {golden_dir()}")
    return files


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def demo_shards(d: Path, text: bool = False, storage: str = "embeddings") -> list[str]:
    """Demo token shards (train and val) from a random-weight tokenizer in folder `d` -> the config
    overrides pointing at them. The trainer does not care what the ids mean. `text`: caption shards
    of the captioned demo (configs/experiments/demo_text.yaml), with its demo text encoder built in
    `d` (text.encoder: demo) and `storage` (embeddings or ids) per caption."""
    from enat.config import load_config
    from enat.data.prepare import prepare_text_encoder, tokenize_split
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    over = [f"tokenizer.checkpoint={d / 'tok.pt'}", f"data.shards={d / 'train'}", f"data.val_shards={d / 'val'}"]
    if text:
        over += [f"text.demo_dir={d / 'text_encoder'}", f"text.storage={storage}"]
    cfg = load_config(ROOT / f"configs/experiments/{'demo_text' if text else 'demo'}.yaml", over)
    torch.manual_seed(0)
    save_tokenizer(d / "tok.pt", VQGAN(cfg.tokenizer), {})
    if text:
        prepare_text_encoder(cfg, log=lambda *_: None)
    for split in ("train", "val"):
        tokenize_split(cfg, split, progress=False, log=lambda *_: None)
    return over


def train_losses(run_dir: Path) -> dict:
    """{step: loss} of a run's metrics.jsonl, asserting each step was logged once, in order."""
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in train}


def write_checkpoint(run_dir: Path, cfg, weights: dict, step: int) -> Path:
    """A run's training checkpoint of `step` as the trainer leaves it at ZeRO-0 (the model-states
    file with the module and the enat client state holding `weights` as its EMA, the manifest with
    every file's size and CRC-32, `latest`), without an engine -> the tag directory."""
    import json

    from enat.config import to_dict
    from enat.train.checkpoint import CLIENT_KEY, LATEST, META, checkpoint_dir, file_checksum, tag_for

    tag = checkpoint_dir(run_dir) / tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"module": weights, CLIENT_KEY: {"step": step, "config": to_dict(cfg), "ema": {"model": weights}}},
               tag / "mp_rank_00_model_states.pt")
    files = {p.name: file_checksum(p) for p in tag.iterdir()}
    (tag / META).write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 0, "files": files}))
    (tag.parent / LATEST).write_text(tag.name)
    return tag


def tiny_clip_tokenizer(tf):
    """A real (BPE) CLIP tokenizer over single letters, built without a download -> (tokenizer, vocab)."""
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return tf.CLIPTokenizer(vocab=vocab, merges=[]), vocab


def tiny_clip(path, layers: int = 1):
    """A tiny random CLIPModel (text and vision towers of `layers` blocks) with the letter-level
    tokenizer, saved to `path` (no download) -> path."""
    from enat.text import _transformers

    tf = _transformers()
    tok, vocab = tiny_clip_tokenizer(tf)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def wandb_records(run_dir: Path, timeout_s: float = 30.0) -> list:
    """Every record (wandb's protobuf Record) of the offline runs under run_dir/wandb, oldest run
    first: wandb 0.31 has no Python reader for its transaction log, a LevelDB-style log of 32 KiB
    blocks (7-byte header: ':W&B', magic, version; per chunk: crc32c, length, type). wandb's
    service process may still be writing a log when finish() has returned: each is read until it
    holds its exit record (or timeout_s passes)."""
    import time

    out = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + timeout_s
        records = _wandb_log(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
            time.sleep(0.2)
            records = _wandb_log(path)
        out += records
    return out


def _wandb_log(path: Path) -> list:
    """The records of one transaction log, as far as it is written (a partial last record: none)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    out, block, pos, chunk = [], 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too little room for a chunk header: the block's padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def wandb_summary(records: list) -> dict:
    """The run's summary after every update the records hold, as nested dicts."""
    import json

    summary: dict = {}
    for rec in records:
        if rec.WhichOneof("record_type") != "summary":
            continue
        for item in rec.summary.update:
            keys = list(item.nested_key) or [item.key]
            node = summary
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
    return summary


def wandb_history(records: list) -> list[dict]:
    """The logged rows ({key: value}, top-level keys only) in order."""
    import json

    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            rows.append({(list(i.nested_key) or [i.key])[0]: json.loads(i.value_json) for i in rec.history.item
                         if len(i.nested_key) <= 1})
    return rows


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """predicate()'s first truthy value within `timeout` seconds, polled every `poll`; else an
    AssertionError naming what was awaited."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
