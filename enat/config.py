"""One config tree, from YAML to every component.

A YAML file may name base files (`base: [relative/path.yaml, ...]`, resolved against the file's
own folder); bases merge in order, then the file itself, then dotted command-line overrides
(`model.width=512 sample.cfg_scale=3.0`, values parsed as YAML). The merged tree is validated
into the dataclasses below: an unknown key fails with the key, the file that set it and the
closest valid key; a value of the wrong type names the expected type.

Components take the section they need (`cfg.model`, `cfg.sample`, ...). `dump_config` writes
the resolved tree, which `load_config` reads back to an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The network. `size` names a zoo entry (ZOO, below) that fills every architecture field
    left unset; fields set explicitly win over the zoo."""

    size: str | None = "L"
    arch: Literal["enat", "nat"] = "enat"  # nat: vanilla MaskGIT-style baseline, all tokens in all blocks
    width: int | None = None
    num_heads: int | None = None
    enc_depth: int | None = None  # nat: enc_depth + dec_depth blocks, all over every token
    dec_depth: int | None = None
    mlp_ratio: float = 4.0
    grid_size: int = 16  # token grid side: 16 for 256 px, 32 for 512 px with an f16 tokenizer
    codebook_size: int = 1024  # ids 0..codebook_size-1; codebook_size is [MASK]
    num_classes: int = 1000  # labels 0..num_classes-1; num_classes is the null class
    # What the network is conditioned on. class: a label table, through adaLN (the released ENAT).
    # text: a frozen text encoder's hidden states (text_len x text_dim, e.g. CLIP ViT-L/14's
    # 77 x 768), prepended as always-visible context tokens, and their mean through adaLN.
    condition: Literal["class", "text"] = "class"
    # ENAT's decoder ([MASK] queries): "sc" SC-attention over [visible ; own] with two-way K/V (the
    # released model); "self" plain self-attention over visible features and [MASK] tokens together
    # (an MAE-style decoder); "cross" [MASK] tokens attend to the visible features only (CrossMAE).
    decoder_attention: Literal["sc", "self", "cross"] = "sc"
    text_len: int = 77  # context tokens per caption (condition=text)
    text_dim: int = 768  # the text encoder's hidden width (condition=text)
    dropout: float = 0.1  # after the token embedding
    label_drop: float = 0.0  # in-model CFG label drop (the released model: 0.1 on top of the data's)

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def context_len(self) -> int:
        """Context tokens per sample: the caption's L for condition=text, none for a class."""
        return self.text_len if self.condition == "text" else 0

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def depth(self) -> int:
        return self.enc_depth + self.dec_depth


# The named sizes (`model.size`). Only ENAT-L (22 encoder + 2 decoder blocks, width 1024, 16 heads)
# is published. XL follows the paper's review thread (28 blocks, width 1280, about 1B parameters);
# its 26+2 split keeps L's two-block decoder. S and B are NOT published sizes: they take DiT's
# widths and head counts (S 384/6, B 768/12, 12 blocks) with the same two-block decoder. `tiny` is
# for tests and the CPU demo (the shape of the golden file `enat_tiny_a.pt`).
# Plain numbers, here next to ModelConfig, so that loading a config imports no network code;
# enat/models/zoo.py builds the networks (and re-exports ZOO).
ZOO: dict[str, dict] = {
    "tiny": dict(width=64, num_heads=4, enc_depth=3, dec_depth=1),
    "S": dict(width=384, num_heads=6, enc_depth=10, dec_depth=2),  # not published (DiT-S width)
    "B": dict(width=768, num_heads=12, enc_depth=10, dec_depth=2),  # not published (DiT-B width)
    "L": dict(width=1024, num_heads=16, enc_depth=22, dec_depth=2),  # the released ENAT-L
    "XL": dict(width=1280, num_heads=20, enc_depth=26, dec_depth=2),  # 28 blocks, 1280, 20 heads
}
ARCH_FIELDS = ("width", "num_heads", "enc_depth", "dec_depth")


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill architecture fields left unset from the zoo entry named by `cfg.size`, then check."""
    if cfg.size is not None:
        if cfg.size not in ZOO:
            raise ConfigError(f"unknown model.size {cfg.size!r}; the zoo has {', '.join(ZOO)}")
        fill = {k: v for k, v in ZOO[cfg.size].items() if getattr(cfg, k) is None}
        cfg = dataclasses.replace(cfg, **fill)
    missing = [f"model.{k}" for k in ARCH_FIELDS if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} unset: name a zoo size (model.size=, one of "
                          f"{', '.join(ZOO)}) or set them explicitly")
    if cfg.width % cfg.num_heads:
        raise ConfigError(f"model.width {cfg.width} is not divisible by model.num_heads {cfg.num_heads}")
    if cfg.arch == "enat" and (cfg.enc_depth < 1 or cfg.dec_depth < 1):
        raise ConfigError("ENAT needs model.enc_depth >= 1 and model.dec_depth >= 1")
    if cfg.arch == "nat" and cfg.decoder_attention != "sc":
        raise ConfigError("model.decoder_attention is ENAT's decoder; the NAT baseline has none: leave it at sc")
    if cfg.condition == "text" and (cfg.text_len < 1 or cfg.text_dim < 1):
        raise ConfigError(f"model.text_len and model.text_dim must be >= 1, got {cfg.text_len}, {cfg.text_dim}")
    if cfg.depth < 1 or cfg.grid_size < 1 or cfg.codebook_size < 2 or cfg.num_classes < 1:
        raise ConfigError(f"model config out of range: {cfg}")
    return cfg


@dataclass
class SampleConfig:
    """The iterative decoder (defaults: ENAT-L at 256 px, as released)."""

    steps: int = 8
    cfg_scale: float = 2.5  # guidance ramps linearly from 0 at step 0 to cfg_scale*(T-1)/T
    samp_temp: float = 6.0  # token sampling temperature t0; annealed as max(t0*(1-r), 1e-3)
    mask_temp: float = 1.5  # Gumbel noise on the confidence, annealed as mask_temp*(1-r)
    reuse: bool = True  # ENAT computation reuse in steps 1..T-1 (off: full mode at every step)
    greedy: bool = False  # argmax instead of sampling tokens (parity with recorded traces)
    seed: int = 0  # every sample's noise derives from (seed, sample index)
    batch_size: int = 64
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the network under autocast; logits upcast
    compile: bool = False  # torch.compile the network forward (dynamic shapes: about 3 graphs for 8 steps)


@dataclass
class TokenizerTrainConfig:
    """Training of a small tokenizer by the project itself (the embedded demo needs no download):
    reconstruction (L1 + L2) plus codebook and commitment losses, no perceptual/GAN terms."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    commitment: float = 0.25
    dead_code_every: int = 100  # re-seed codes unused over this many steps from encoder outputs
    log_every: int = 100


@dataclass
class TokenizerConfig:
    """MAGE/MaskGIT VQGAN (f = 2^(len(ch_mult)-1)); defaults: the released f16 tokenizer."""

    checkpoint: str | None = None  # official-format VQGAN state dict (or an enat tokenizer file)
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    resolution: int = 256  # image side the tokenizer is used at
    in_channels: int = 3
    out_channels: int = 3
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample


@dataclass
class DataConfig:
    """Images -> token shards -> the loader."""

    # imagefolder: root/<class>/<image> (ADM crop); digits: the embedded demo, no download (captioned
    # when model.condition=text); digits_aug: the digits through random affine + elastic transforms,
    # fresh images without limit (enat/data/digits.py; never flipped: data.flip must be false; no
    # captions); coco: image_dir + captions (COCO captions JSON, centre crop); fashion_mnist: the IDX
    # files of Debian's dataset-fashion-mnist at fashion_dir (28 px padded to 32, bilinear to 64 px;
    # enat/data/fashion.py).
    dataset: Literal["imagefolder", "digits", "digits_aug", "coco", "fashion_mnist"] = "imagefolder"
    image_dir: str | None = None  # imagefolder: root/<class>/<image> of the training images; coco: train2014/
    val_image_dir: str | None = None  # imagefolder: the same for held-out images; coco: val2014/
    captions: str | None = None  # coco: captions_train2014.json
    val_captions: str | None = None  # coco: captions_val2014.json
    fashion_dir: str = "/usr/share/datasets/fashion-mnist"  # fashion_mnist: `apt-get install dataset-fashion-mnist`
    # fashion_mnist: only the first N images of each split (smoke tests), everywhere the data is read
    # (tokenizer, shards, classifier, FID reference); the manifests and reference ids record it.
    subset: int | None = None
    shards: str = "runs/shards/train"  # token shards of the training split (manifest.json inside)
    val_shards: str | None = None  # token shards of the held-out split (validation loss, FID reference)
    flip: bool = True  # tokenize each image as-is and horizontally flipped (2 samples per image)
    shard_size: int = 10000  # samples per shard file
    tokenize_batch_size: int = 64
    cfg_drop: float = 0.15  # label -> null class (caption -> null context) probability, for CFG
    shuffle: bool = True
    resampled: bool = False  # infinite draws with replacement (statistical, not exact, resume)
    strict: bool = False  # corrupt shard or sample: raise (true) or skip, count and log (false)
    # A resume whose training shards differ from the checkpoint's (another manifest sha256) stops with
    # an error; true resumes on them anyway (a warning; not an exact resume) and records the new ones.
    allow_changed_shards: bool = False
    num_workers: int = 2  # DataLoader workers per rank (loading images when tokenizing, reading shards)
    # digits_aug: images per split (train: drawn from the 1,498 training digits, val: from the 299
    # held-out ones; every base digit used equally) and the transforms' seed; image i of a split is
    # a pure function of (augment_seed, split, i), so any count or part regenerates the same images.
    augmented_train: int = 50000
    augmented_val: int = 2000
    augment_seed: int = 0


@dataclass
class TextConfig:
    """The frozen text encoder of text-conditioned models (model.condition=text), loaded by local
    path only: a directory with a transformers CLIPTextModel and its tokenizer
    (`save_pretrained` output), or `demo`, the captioned digits demo's word encoder, which
    `enat data prepare` builds in demo_dir. Nothing else is ever built: a path that does not
    exist (a hub name) is refused by every command."""

    encoder: str | None = None
    demo_dir: str | None = None  # encoder: demo only: where it is built and loaded from
    # What caption shards hold per caption: the encoder's hidden states (fp16, L x C; read as they
    # are) or only the token ids (L int32; the trainer encodes them on the fly, ~1/380 the disk).
    storage: Literal["embeddings", "ids"] = "embeddings"
    batch_size: int = 256  # captions per encoder call when tokenizing


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: local files, `wandb sync` later
    project: str = "enat"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    sweep_point: dict[str, Any] = field(default_factory=dict)  # set by the sweep launcher: this run's grid values


@dataclass
class TrainConfig:
    """The trainer (defaults: the released ENAT-L recipe where one exists)."""

    run_dir: str = "runs/train"
    steps: int = 500000
    micro_batch: int = 32  # per rank
    grad_accum: int = 1
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99])
    weight_decay: float = 0.03
    # "matrices": weight matrices only (names in no_decay and 1-D parameters get none);
    # "all": every parameter in one group, as the released ENAT code does.
    weight_decay_scope: Literal["matrices", "all"] = "matrices"
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "embed", "positions", "table"])
    warmup_steps: int = 5000
    # constant after warm-up; cosine to min_lr_ratio over train.steps; wsd: warm-up, stable, then a
    # linear cool-down to min_lr_ratio over the last cooldown_fraction of train.steps (one stable
    # phase can be branched into several budgets, each with its own cool-down).
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    min_lr_ratio: float = 0.0  # the floor the decaying schedules end at, as a fraction of lr
    cooldown_fraction: float = 0.2  # wsd only
    clip: float = 0.0  # gradient clipping max norm; 0 = off
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # fp16 uses dynamic loss scaling
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the forward + loss (one graph per mode, the masked count dynamic)
    ema_decay: float = 0.9999
    mask_beta: list[float] = field(default_factory=lambda: [12.0, 3.0])  # mask ratio ~ Beta(a, b) per batch
    label_smoothing: float = 0.1
    reuse_prob: float = 0.5  # probability of a reuse-mode step (ENAT only)
    # Mask ratio and re-mask fraction: one draw per global step ("global"), or one per rank and step
    # ("per_rank", as the released code; lower gradient variance). The reuse coin is global either
    # way: every rank must run the same modules, or ZeRO-3's parameter gathers deadlock.
    plan_draws: Literal["global", "per_rank"] = "global"
    log_every: int = 50
    val_every: int = 1000
    val_samples: int = 512  # held-out sequences for the validation loss
    val_mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    sample_every: int = 5000
    sample_labels: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    ckpt_every: int = 5000
    keep_last: int = 3  # checkpoints kept besides every keep_every-th
    keep_every: int = 0  # 0: none kept permanently
    # A save that fails (a full disk, a quota, an I/O error) leaves `latest` on the last intact
    # checkpoint and removes its partial files; then "stop" ends the run with a named error (exit
    # 2), "retry" trains on and tries again at the next ckpt_every (the run's last save, or one for
    # a preemption, still stops it when it fails).
    on_save_error: Literal["stop", "retry"] = "stop"
    # The run directory's writer lease (enat/train/lease.py): its heartbeat is touched every
    # lease_heartbeat_s; a holder on another host whose heartbeat is older than lease_timeout_s
    # is presumed dead and taken over (a dead pid on the same host, or a requeue of the same
    # SLURM job, at once).
    lease_heartbeat_s: float = 30.0
    lease_timeout_s: float = 600.0
    max_consecutive_skips: int = 10  # non-finite loss/gradient steps in a row before the run stops
    peak_tflops: float | None = None  # MFU denominator; default from the GPU name (A100/H100/H200)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    inject_nan_steps: list[int] = field(default_factory=list)  # fault injection for tests: NaN loss at these steps
    inject_step_delay_s: float = 0.0  # for tests: a pause after each step (a job still running at its time limit)


@dataclass
class EvalConfig:
    """FID evaluation jobs (see enat/eval/)."""

    extractor: Literal["inception-v3-compat", "digits-cnn", "fashion-cnn"] = "inception-v3-compat"
    extractor_weights: str | None = None  # Inception (pt_inception-2015-12-05) or the digit classifier, by path
    reference_npz: str | None = None  # ADM-style statistics (mu, sigma); else data.val_shards decoded once
    # fashion_mnist: the real images FID compares with. "test" (10,000) for results; "train" (60,000)
    # for choosing a setting (CFG scale, steps) without looking at the images the results use.
    reference_split: Literal["test", "train"] = "test"
    cache_dir: str = "runs/fid_cache"  # reference statistics, keyed by dataset, resolution and extractor
    num_samples: int = 50000  # class-balanced: num_samples / num_classes per class
    batch_size: int = 64
    seed: int = 0  # sample i's noise derives from (seed, i)
    weights: Literal["ema", "online"] = "ema"
    save_png: bool = False
    save_npz: bool = True  # uint8 samples in the ADM layout (arr_0: N x H x W x 3)
    kid_subset_size: int = 1000
    prc: bool = True  # precision/recall (k-NN in the extractor's feature space)
    # Text-conditioned models: a local CLIPModel directory (save_pretrained output; never a hub name)
    # adds "clip_score" (100 x max(cos, 0), mean over samples and their captions) to the metrics.
    clip_model: str | None = None


@dataclass
class LaunchConfig:
    """How launch/*.py runs a job: on SLURM through submitit, or as local processes."""

    cluster: Literal["auto", "slurm", "local", "debug"] = "auto"  # auto: slurm when sinfo answers, else local
    nodes: int = 1
    gpus_per_node: int = 8  # one task (process) per GPU
    cpu: bool = False  # CPU cluster: gpus_per_node processes per node and no GPU request
    partition: str | None = None
    time_min: int = 24 * 60  # per job; a timeout checkpoints and requeues
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: int | None = None  # per node
    cpus_per_task: int | None = None
    exclude: str | None = None  # nodes to avoid
    additional: dict[str, str] = field(default_factory=dict)  # any other sbatch option
    signal_delay_s: int = 120  # SLURM signals this long before the time limit (checkpoint + requeue)
    max_requeues: int = 20  # preemptions and timeouts after which the job gives up (it stays resumable)
    array_parallelism: int = 16  # tasks of a job array (sweeps, eval) running at once
    log_dir: str | None = None  # submitit logs; default RUN/slurm (next to the run)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

BASE_KEY = "base"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: dict, source: str | None, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`, recording in `origin` which source set each dotted key
    (`source=None`: keep what the source's own load recorded, as for a base file)."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = _copy(value)
            if source is not None:
                origin[dotted] = source
                if isinstance(value, dict):
                    for sub in _leaves(value, dotted + "."):
                        origin[sub] = source


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _leaves(tree: dict, prefix: str):
    for k, v in tree.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")


def _load_tree(path: Path, origin: dict, stack: tuple = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"config bases form a cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, []) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file path or a list of file paths")
    tree: dict = {}
    for base in bases:
        _merge(tree, _load_tree(path.parent / base, origin, (*stack, path)), origin, None)
    _merge(tree, data, origin, str(path))
    return tree


def parse_overrides(overrides: list[str]) -> dict:
    """['model.width=512', 'sample.reuse=false'] -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the validated config from a YAML file (or the defaults) plus dotted overrides."""
    origin: dict[str, str] = {}
    tree = _load_tree(Path(path), origin) if path is not None else {}
    _merge(tree, parse_overrides(overrides or []), origin, "command-line override")
    cfg = from_dict(Config, tree, origin=origin)
    return resolve(cfg)


def resolve(cfg: Config) -> Config:
    """Fill zoo defaults and check cross-field rules."""
    cfg.model = resolve_model_config(cfg.model)
    if cfg.model.arch == "nat" and cfg.sample.reuse:
        raise ConfigError("sample.reuse=true needs model.arch=enat; the NAT baseline has no reuse "
                          "path. Set sample.reuse=false.")
    if cfg.sample.steps < 1:
        raise ConfigError(f"sample.steps must be >= 1, got {cfg.sample.steps}")
    if cfg.sample.batch_size < 1:
        raise ConfigError(f"sample.batch_size must be >= 1, got {cfg.sample.batch_size}")
    if cfg.data.dataset == "digits_aug" and cfg.data.flip:
        raise ConfigError("data.flip=true with data.dataset=digits_aug: a mirrored digit is not a digit; set "
                          "data.flip=false")
    if cfg.data.dataset == "digits_aug" and cfg.model.condition == "text":
        raise ConfigError("data.dataset=digits_aug has no captions (the captioned demo is data.dataset=digits "
                          "with model.condition=text): use model.condition=class")
    if cfg.data.subset is not None and (cfg.data.dataset != "fashion_mnist" or cfg.data.subset < 1):
        raise ConfigError(f"data.subset={cfg.data.subset}: the first N images of each split, N >= 1, for "
                          f"data.dataset=fashion_mnist only")
    if cfg.eval.reference_split != "test" and cfg.data.dataset != "fashion_mnist":
        raise ConfigError(f"eval.reference_split={cfg.eval.reference_split} is for data.dataset=fashion_mnist; "
                          f"other data give their reference by eval.reference_npz or data.val_shards")
    if cfg.data.dataset == "fashion_mnist" and cfg.model.condition == "text":
        raise ConfigError("data.dataset=fashion_mnist has class labels, no captions: use model.condition=class")
    if cfg.data.dataset == "coco" and cfg.data.flip:
        raise ConfigError("data.flip=true with data.dataset=coco: a flipped image can contradict its caption "
                          "('on the left'); set data.flip=false (U-ViT's COCO protocol has no flips)")
    if cfg.data.dataset == "coco" and cfg.model.condition != "text":
        raise ConfigError("data.dataset=coco is captioned data: set model.condition=text (with model.text_len and "
                          "model.text_dim of the text encoder, text.encoder)")
    if cfg.model.condition == "text" and cfg.text.encoder == "demo":
        if cfg.data.dataset != "digits":
            raise ConfigError(f"text.encoder: demo is the captioned digits demo's word encoder (its vocabulary is "
                              f"those captions' words); data.dataset={cfg.data.dataset} needs a CLIP text encoder: "
                              f"text.encoder=/local/dir")
        if not cfg.text.demo_dir:
            raise ConfigError("text.encoder: demo needs text.demo_dir, the folder `enat data prepare` builds the demo "
                              "encoder in (and every command loads it from)")
    if cfg.model.condition == "text" and cfg.model.label_drop:
        raise ConfigError("model.label_drop is the class model's in-model label drop; a text-conditioned model "
                          "drops captions in the loader: set model.label_drop=0 and use data.cfg_drop")
    if cfg.model.condition == "text" and cfg.data.resampled:
        raise ConfigError("data.resampled=true reads class shards only; text-conditioned training "
                          "(model.condition=text) reads caption shards exactly: set data.resampled=false")
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.zero_stage == 0 and t.precision == "bf16":
        raise ConfigError("DeepSpeed has no bf16 at ZeRO stage 0 (fp32 gradient accumulation is not implemented "
                          "there): use train.zero_stage>=1 or train.precision=fp32")
    if t.compile and t.zero_stage == 3:
        raise ConfigError("train.compile=true is not supported with ZeRO-3 (its parameter gathers run in hooks "
                          "between the blocks): use train.zero_stage<=2, or train.compile=false")
    if not 0 < 2 * t.lease_heartbeat_s <= t.lease_timeout_s:
        raise ConfigError(f"train.lease_heartbeat_s ({t.lease_heartbeat_s}) must be > 0 and at most half of "
                          f"train.lease_timeout_s ({t.lease_timeout_s}), or a live holder looks stale")
    if not 0.0 < t.cooldown_fraction <= 1.0 or not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.cooldown_fraction must be in (0, 1] and train.min_lr_ratio in [0, 1], got "
                          f"{t.cooldown_fraction} and {t.min_lr_ratio}")
    if len(t.betas) != 2 or len(t.mask_beta) != 2:
        raise ConfigError("train.betas and train.mask_beta take two numbers each")
    ln = cfg.launch
    if min(ln.nodes, ln.gpus_per_node, ln.time_min) < 1 or ln.max_requeues < 0:
        raise ConfigError("launch.nodes, launch.gpus_per_node and launch.time_min must be >= 1 and "
                          "launch.max_requeues >= 0")
    tok, m = cfg.tokenizer, cfg.model
    if tok.resolution % tok.downsample:
        raise ConfigError(f"tokenizer.resolution {tok.resolution} is not divisible by its downsampling "
                          f"factor {tok.downsample} (2^(len(ch_mult)-1))")
    if (tok.grid_size, tok.codebook_size) != (m.grid_size, m.codebook_size):
        raise ConfigError(f"the tokenizer gives a {tok.grid_size}x{tok.grid_size} grid of {tok.codebook_size} codes "
                          f"(tokenizer.resolution {tok.resolution}, ch_mult {tok.ch_mult}) but the model expects "
                          f"model.grid_size {m.grid_size} and model.codebook_size {m.codebook_size}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Typed validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _where(key: str, origin: dict) -> str:
    src = origin.get(key)
    return f" (set in {src})" if src else ""


def _coerce(value, tp, key: str, origin: dict):
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    o = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}'{_where(key, origin)} must be a mapping (section {tp.__name__}), "
                              f"got {type(value).__name__}")
        return from_dict(tp, value, origin=origin, prefix=key + ".")
    if o in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"'{key}'{_where(key, origin)} expects {_type_name(tp)}, got {value!r}")
    if o is Literal:
        if value not in args:
            raise ConfigError(f"'{key}'{_where(key, origin)} must be one of {list(args)}, got {value!r}")
        return value
    if o in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}'{_where(key, origin)} expects a list ({_type_name(tp)}), got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", origin) for i, v in enumerate(value)]
        return items if o is list else tuple(items)
    if o is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}'{_where(key, origin)} expects a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", origin) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}'{_where(key, origin)} expects float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}'{_where(key, origin)} expects int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"'{key}'{_where(key, origin)} expects {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls, data: dict, origin: dict | None = None, prefix: str = ""):
    """Validate a nested dict into dataclass `cls`."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{dotted}'{_where(dotted, origin)}{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, origin)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:  # replaced whole: a reader (an eval job) never sees half a file
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return text
