"""The `enat` command: thin subcommands over the library.

    enat models                                   sizes, parameters, sampling FLOPs
    enat flops --model L                          per-step FLOPs with/without reuse and CFG, vs NAT
    enat sample --config C [--checkpoint W] --labels 1,2,3 --out DIR [key=value ...]
    enat sample --config C --checkpoint W --prompts "a thick seven" [--prompts-file F] --out DIR
    enat convert official-enat IN OUT [--num-heads H --enc-depth E]
    enat tokenizer train --config C               the project's own tokenizer (digits, Fashion-MNIST)
    enat tokenizer eval --config C [--out F.json]  its held-out PSNR and reconstruction FID
    enat tokenize --config C [--split val] [--num-parts K --part I | --merge]
    enat data prepare --config C                  build the tokenizer/shards (+ demo FID extractor) if missing
    enat data verify DIR                          check every shard's size, samples, checksum; exit 1 if damaged
    enat train --config C [key=value ...]         under torchrun/srun/submitit or as one process
    enat export RUN OUT [--checkpoint STEP]       consolidated fp32 EMA + online weights
    enat ckpt universal RUN                       for resuming on another world size
    enat ckpt list RUN [--checksums]              tags, steps, sizes, state, `latest`, the writer lease
    enat ckpt verify RUN [--tag T]                read every byte; non-zero exit if `latest` is damaged
    enat eval --run RUN --checkpoint latest       FID & co. of a checkpoint (idempotent)
    enat eval reference --config C [--out F.npz]  reference statistics of the real held-out images
    enat eval control --config C --checkpoint W [--cfg-scales 0,1,2,4] [--num-samples N] [--no-reuse] [--out DIR]
    enat extractor train --config C               the classifier FID extractor (digits, Fashion-MNIST)
    enat analyze attention|temporal|one-step|pareto --run RUN --checkpoint W [--baseline W2]
                                                  the paper's analyses -> RUN/analysis/NAME.{json,md,png}
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from enat.config import ConfigError, load_config

# Each subcommand imports the module it hands over to when it runs, not here: `enat --help` and
# argument errors answer at once instead of after the seconds torch and its users take to import.


def named_errors() -> tuple[type[Exception], ...]:
    """The errors whose message names the problem and its fix: printed without a traceback, exit 2.
    Imported when a command failed (their modules bring torch; see above)."""
    from enat.data.fashion import FashionError
    from enat.data.shards import ShardError
    from enat.eval.fidelity import EvalError
    from enat.models.weights import WeightsError
    from enat.text import TextEncoderError
    from enat.train.checkpoint import CheckpointError
    from enat.train.lease import LeaseError, LeaseLost
    from enat.train.trainer import NonFiniteError

    return (ConfigError, WeightsError, ShardError, CheckpointError, NonFiniteError, EvalError, LeaseError, LeaseLost,
            TextEncoderError, FashionError)


# ---------------------------------------------------------------------------------------------


def cmd_models(args) -> None:
    from enat.cost import zoo_table

    print(zoo_table(args.grid_size, args.steps))


def cmd_flops(args) -> None:
    from enat.cost import flops_report

    print(flops_report(args.model, args.grid_size, args.steps, args.decoder_attention,
                       (args.text_len, args.text_dim) if args.text else None))


OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def cmd_cost(args) -> None:
    from enat.cost import main_cost

    main_cost(args)


def cmd_sample(args) -> None:
    from enat.eval.samples import sample_to_folder

    cfg = load_config(args.config, args.overrides)
    prompts = _read_prompts(args)
    if any(OVERRIDE.fullmatch(p) for p in prompts):  # argparse gave the overrides to --prompts
        raise ConfigError(f"{[p for p in prompts if OVERRIDE.fullmatch(p)]} look like config overrides, not prompts: "
                          "put overrides before --prompts (or use --prompts-file)")
    sample_to_folder(cfg, args.checkpoint, args.weights, args.out, labels=args.labels, prompts=prompts,
                     per_label=args.per_label, images=not args.no_images, steps_grid=args.save_steps,
                     check_config=bool(args.config))


def cmd_tokenizer_train(args) -> None:
    from enat.data.prepare import EMBEDDED, tokenizer_images
    from enat.tokenizer.train import train_tokenizer

    cfg = load_config(args.config, args.overrides)
    if cfg.data.dataset not in EMBEDDED:
        raise ConfigError(f"`enat tokenizer train` trains the project's own tokenizers (data.dataset: "
                          f"{', '.join(EMBEDDED)}); for ImageNet use the released VQGAN (tokenizer.checkpoint)")
    out = args.out or cfg.tokenizer.checkpoint
    if out is None:
        raise ConfigError("give --out or set tokenizer.checkpoint")
    train_tokenizer(cfg, tokenizer_images(cfg, "train"), out, val_images=tokenizer_images(cfg, "val"))


def cmd_tokenizer_eval(args) -> None:
    from enat.eval.reconstruction import tokenizer_report

    tokenizer_report(load_config(args.config, args.overrides), args.checkpoint, args.out)


def cmd_tokenize(args) -> None:
    import torch

    from enat.data.prepare import merge_split, tokenize_split

    cfg = load_config(args.config, args.overrides)
    if args.merge:
        merge_split(cfg, args.split, args.out)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenize_split(cfg, args.split, input_=args.input, out=args.out, part=args.part, num_parts=args.num_parts,
                   device=device)


def cmd_data_verify(args) -> int:
    from enat.data.identity import verify_shards

    return 1 if verify_shards(args.dir) else 0


def cmd_data_prepare(args) -> None:
    from enat.data.prepare import prepare_data, prepared
    from enat.eval.prepare import extractor_missing, prepare_extractor

    cfg = load_config(args.config, args.overrides)
    there = None if extractor_missing(cfg) else prepared(cfg)  # None: something gets built (and says so)
    weights = cfg.eval.extractor_weights
    if there is not None and weights and Path(weights).is_file():
        there.append(("FID extractor", str(weights)))
    prepare_data(cfg)  # checks what is there (stale shards, another tokenizer) even when it builds nothing
    prepare_extractor(cfg)  # the demo's FID extractor, so the eval job after training finds it
    if there is not None:
        width = max((len(what) for what, _ in there), default=0)
        print("everything this config needs is there; nothing was redone (delete a file or folder to rebuild it):\n"
              + "\n".join(f"  {what:<{width}}  {where}" for what, where in there))


def cmd_train(args) -> int:
    """SIGTERM (a scheduler's preemption or time limit, `scancel`, torchrun passing one on) and
    SIGINT (Ctrl-C) end the run after the current step with a checkpoint of it, on every rank
    together; exit 128 + the signal's number (143, 130), as a killed process would, but with
    nothing lost. A second Ctrl-C stops at once (since the last checkpoint, lost)."""
    import signal
    import threading

    from enat.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    got: list[int] = []
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
        stop.set()
        # os.write, not print: the signal may have interrupted a print to stderr (a re-entrant call)
        os.write(2, f"{signal.Signals(signum).name}: checkpointing after this step, then exiting "
                    f"(Ctrl-C again to stop at once)\n".encode())

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = train(cfg, stop_at=args.stop_at, should_stop=stop.is_set, takeover=args.takeover)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if not result.get("interrupted"):
        return 0
    # (a rank that saw no signal stops with the others: the ranks OR their flags)
    sig = got[0] if got else signal.SIGTERM
    print(f"{signal.Signals(sig).name}: stopped at step {result['step']} with a checkpoint of it; run the same "
          f"command to continue", file=sys.stderr, flush=True)
    return 128 + sig


def cmd_export(args) -> None:
    from enat.train.checkpoint import export_weights

    export_weights(args.run, args.out, which=args.checkpoint)


def cmd_ckpt_universal(args) -> None:
    """Writes into the run's checkpoints, so it takes the run's writer lease like a trainer (and
    is refused while one runs: the trainer converts by itself when it resumes on another world
    size)."""
    from enat.train.checkpoint import CheckpointError, checkpoint_dir, pinned, to_universal
    from enat.train.lease import Lease, LeaseError, describe_holder, read_lease

    ckpt = checkpoint_dir(args.run)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints folder at {ckpt}: is {args.run} a run directory?")
    lease = Lease(Path(args.run))
    try:
        lease.acquire()
    except LeaseError:
        holder = read_lease(Path(args.run))
        raise LeaseError(f"{args.run} is being written by a training run ({describe_holder(holder) if holder else '?'}"
                         f"): convert after it stops. A run resumed on another world size converts its checkpoint "
                         f"itself") from None
    try:
        with pinned(ckpt, args.checkpoint, "universal") as tag:
            print(f"wrote {ckpt / to_universal(ckpt, tag)}")
    finally:
        lease.release()


def _ckpt_statuses(args, checksums: bool):
    from enat.train.checkpoint import (META, CheckpointError, ckpt_dir_of, latest_pointer, pinned, resolve_tag,
                                       tag_dirs, verify_tag)

    ckpt = ckpt_dir_of(args.run)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints folder at {ckpt}")
    tags = [resolve_tag(ckpt, args.tag)] if getattr(args, "tag", None) else tag_dirs(ckpt)
    if not checksums:  # sizes only: quick, and a tag pruned meanwhile just shows as missing
        return ckpt, latest_pointer(ckpt), [verify_tag(ckpt, t, checksums=False) for t in tags]
    statuses = []
    for t in tags:  # reading every byte takes a while: each tag pinned against retention meanwhile
        if not (ckpt / t / META).is_file():
            statuses.append(verify_tag(ckpt, t))  # a partial: nothing to pin or read
            continue
        try:
            with pinned(ckpt, t, "verify") as tag:
                statuses.append(verify_tag(ckpt, tag))
        except CheckpointError:
            if not getattr(args, "tag", None) and not (ckpt / t).is_dir():
                continue  # pruned by a live run before we got to it
            raise
    return ckpt, latest_pointer(ckpt), statuses


def cmd_ckpt_list(args) -> None:
    from enat.train.checkpoint import DAMAGED, step_of
    from enat.cost import text_table
    from enat.train.lease import describe_holder, read_lease
    from enat.train.pins import pinned_tags

    ckpt, latest, statuses = _ckpt_statuses(args, args.checksums)
    holder = read_lease(ckpt.parent)
    print(f"{ckpt}: " + (f"writer lease held by {describe_holder(holder)}" if holder else "no writer lease held"))
    pins = pinned_tags(ckpt)  # tags a reader (eval, export, ...) is reading: retention keeps them
    rows = [[s.tag, step_of(s.tag), s.files or "-", f"{s.size / 1e6:.1f} MB" if s.size else "-",
             {"unchecked": "sizes ok"}.get(s.state, s.state),
             " ".join(x for x in ("<- latest" if s.tag == latest else "", "pinned" if s.tag in pins else "") if x)]
            for s in statuses]
    if rows:
        print(text_table(rows, ["tag", "step", "files", "size", "state", ""]))
    if latest is not None and latest not in {s.tag for s in statuses}:
        print(f"latest names {latest}, which is missing")
    for s in statuses:
        for p in s.problems if s.state in ("damaged", "partial") else []:
            print(f"  {s.tag}: {p}")
    set_aside = sorted((ckpt / DAMAGED).iterdir()) if (ckpt / DAMAGED).is_dir() else []
    if set_aside:
        print(f"{len(set_aside)} damaged checkpoint(s) set aside in {ckpt / DAMAGED}")
    if not args.checksums:
        print("(sizes checked against each manifest; --checksums or `enat ckpt verify` reads every byte)")


def cmd_ckpt_verify(args) -> int:
    from enat.train.checkpoint import CheckpointError

    ckpt, latest, statuses = _ckpt_statuses(args, True)
    if not statuses:
        raise CheckpointError(f"no checkpoints in {ckpt}")
    for s in statuses:
        detail = f"{s.files} files, {s.size / 1e6:.1f} MB" if s.state == "ok" else "; ".join(s.problems)
        print(f"{s.tag}  {s.state:<10}  {detail}{'  <- latest' if s.tag == latest else ''}")
    by_tag = {s.tag: s for s in statuses}
    if args.tag:
        target = statuses[0]
    elif latest is None:
        print(f"no {ckpt / 'latest'} pointer")
        return 1
    else:
        target = by_tag.get(latest)
        if target is None:
            print(f"latest names {latest}, which is missing")
            return 1
    if not target.usable:
        intact = [s.tag for s in statuses if s.usable and s.tag < target.tag]
        hint = ""
        if target.tag == latest:
            hint = (f" The next `enat train` on this run sets it aside and resumes from {intact[-1]}, the newest "
                    f"intact checkpoint before it." if intact else
                    " No intact checkpoint precedes it: restore the files, or start afresh in another run directory.")
        print(f"{target.tag} is {target.state}.{hint}")
        return 1
    if target.state == "unverified":
        print(f"{target.tag} has no checksums (written by an older enat): not verified")
    return 0


def cmd_eval(args) -> None:
    from enat.eval.job import evaluate
    from enat.eval.reference import compute_reference

    # `enat eval reference|control ...`: the action is the first positional word (then overrides).
    action = args.overrides[0] if args.overrides and args.overrides[0] in ("reference", "control") else None
    overrides = args.overrides[1:] if action else args.overrides
    config = args.config or (Path(args.run) / "config.yaml" if args.run else None)
    if config is None or not Path(config).is_file():
        raise ConfigError(f"no config: give --config (or --run with a config.yaml inside); looked at {config}")
    cfg = load_config(config, overrides)
    if action == "reference":
        compute_reference(cfg, args.out)
    elif action == "control":
        from enat.eval.text import evaluate_control, parse_scales

        reuse = (False,) if args.no_reuse else (True,) if args.reuse_only else None
        evaluate_control(cfg, args.run, args.checkpoint, parse_scales(args.cfg_scales), args.num_samples, reuse,
                         args.out, args.weights, fid=not args.no_fid)
    else:
        if args.out or args.cfg_scales or args.no_reuse or args.reuse_only or args.no_fid:
            raise ConfigError("--out, --cfg-scales, --no-reuse, --reuse-only, --no-fid belong to `enat eval control` "
                              "(and --out to `enat eval reference`)")
        evaluate(cfg, args.run, args.checkpoint, args.num_samples, args.weights)


def cmd_analyze(args) -> None:
    from enat.analysis.pareto import merge_pareto
    from enat.analysis.run import run_analysis

    if args.merge:
        if args.what != "pareto" or not args.out:
            raise ConfigError("--merge belongs to `enat analyze pareto --merge A.json B.json --out DIR`")
        ignored = [f"--{k.replace('_', '-')}" for k in ("run", "config", "baseline", "weights", "ratios", "steps",
                                                        "cfg_scales", "num_samples") if getattr(args, k, None)]
        if ignored or args.overrides:
            raise ConfigError(f"--merge joins measured records and takes only --out; drop "
                              f"{' '.join(ignored + list(args.overrides))}")
        merge_pareto(args.merge, args.out)
        return
    config = args.config or (Path(args.run) / "config.yaml" if args.run else None)
    if config is None or not Path(config).is_file():
        raise ConfigError(f"no config: give --config (or --run with a config.yaml inside); looked at {config}")
    run_analysis(args.what, load_config(config, args.overrides), args.run, args.checkpoint, baseline=args.baseline,
                 weights=args.weights, ratios=args.ratios, steps=args.steps, cfg_scales=args.cfg_scales,
                 num_samples=args.num_samples, out=args.out)


def cmd_extractor_train(args) -> None:
    from enat.eval.prepare import train_extractor

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.eval.extractor_weights
    if out is None:
        raise ConfigError("give --out or set eval.extractor_weights")
    train_extractor(cfg, out)


def cmd_convert(args) -> None:
    from enat.models.convert import convert_official

    convert_official(args.src, args.dst, num_heads=args.num_heads, enc_depth=args.enc_depth, which=args.kind)


# ---------------------------------------------------------------------------------------------


def _config_args(p, required: bool = True, help: str = "YAML config") -> None:
    p.add_argument("--config", required=required, help=help)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sample.steps=12 train.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enat", description="ENAT: train, sample, evaluate, scale.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="zoo sizes with parameter counts and sampling FLOPs")
    s.add_argument("--grid-size", type=int, default=16)
    s.add_argument("--steps", type=int, default=8)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("flops", help="analytic FLOPs of one zoo size")
    s.add_argument("--model", default="L")
    s.add_argument("--grid-size", type=int, default=16)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--text", action="store_true", help="text-conditioned (context tokens of a text encoder)")
    s.add_argument("--decoder-attention", default="sc", choices=["sc", "self", "cross"],
                   help="ENAT's decoder: SC-attention (released), MAE-style self-attention, CrossMAE-style cross")
    s.add_argument("--text-len", type=int, default=77, help="context tokens (CLIP: 77)")
    s.add_argument("--text-dim", type=int, default=768, help="text encoder width (CLIP ViT-L/14: 768)")
    s.set_defaults(func=cmd_flops)

    s = sub.add_parser("cost", help="parameters, train/sampling FLOPs, GPU-hours and days of the zoo's recipes")
    s.add_argument("--model", default="all", help="a zoo size, a comma-separated list, or all")
    s.add_argument("--grid", type=int, choices=[16, 32], help="16 (256 px) or 32 (512 px); default both")
    s.add_argument("--config", nargs="+", help="cost these experiment configs instead of the zoo's ImageNet recipes "
                                               "(e.g. configs/experiments/coco256_B.yaml)")
    s.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100/H200: 989)")
    s.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the GPU-hours")
    s.add_argument("--gpus", type=int, help="accelerators for the days column (default: the recipe's)")
    s.add_argument("--bench", help="img/s from a `python -m enat.bench sample --json` result (one or a list)")
    s.add_argument("--measure", action="store_true", help="measure img/s here (short CPU/GPU sampling run)")
    s.add_argument("--json", help="also write the rows to this JSON file")
    s.set_defaults(func=cmd_cost)

    s = sub.add_parser("sample", help="sample token ids for given labels (or prompts, text-conditioned models)")
    _config_args(s, False, "YAML config (sample section; model section without --checkpoint)")
    s.add_argument("--checkpoint", help="enat-weights file, or a training checkpoint: a run directory (its latest) or "
                                        "RUN/checkpoints/stepNNNNNNNN; without it, a random-init model")
    s.add_argument("--weights", default="ema", choices=["ema", "online"])
    s.add_argument("--labels", help="comma-separated class ids, e.g. 1,2,3 (class-conditional models)")
    s.add_argument("--prompts", nargs="+", metavar="PROMPT", help="captions (text-conditioned models)")
    s.add_argument("--prompts-file", help="a file of captions, one per line")
    s.add_argument("--per-label", type=int, default=1, help="samples per label or prompt")
    s.add_argument("--out", required=True)
    s.add_argument("--no-images", action="store_true", help="token ids only, no decoding")
    s.add_argument("--save-steps", action="store_true",
                   help="also steps.png: the first 8 samples after every step, undecided tokens grey")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("tokenizer", help="the VQ tokenizer")
    tsub = s.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train the project's own tokenizer (digits, Fashion-MNIST)")
    _config_args(t)
    t.add_argument("--out", help="output file (default: tokenizer.checkpoint)")
    t.set_defaults(func=cmd_tokenizer_train)
    t = tsub.add_parser("eval", help="held-out PSNR and reconstruction FID (the floor under a generator's FID)")
    _config_args(t)
    t.add_argument("--checkpoint", help="tokenizer file (default: tokenizer.checkpoint)")
    t.add_argument("--out", help="also write the record to this JSON file")
    t.set_defaults(func=cmd_tokenizer_eval)

    s = sub.add_parser("tokenize", help="images -> webdataset token shards (one part of K, or the merge)")
    _config_args(s)
    s.add_argument("--input", help="'digits' or an ImageFolder root (default: from data.*)")
    s.add_argument("--split", default="train", choices=["train", "val"])
    s.add_argument("--out", help="shard folder (default: data.shards / data.val_shards)")
    s.add_argument("--num-parts", type=int, default=1)
    s.add_argument("--part", type=int, default=0)
    s.add_argument("--merge", action="store_true", help="check all parts finished and write manifest.json")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="action", required=True)
    t = dsub.add_parser("prepare", help="build what is missing of the tokenizer (demo), the shards and the "
                                        "demo's FID extractor")
    _config_args(t)
    t.set_defaults(func=cmd_data_prepare)
    t = dsub.add_parser("verify", help="check every shard against its manifest (size, sample count, checksum); "
                                       "exit 1 naming the damaged ones")
    t.add_argument("dir", help="a token shard folder (manifest.json inside)")
    t.set_defaults(func=cmd_data_verify)

    s = sub.add_parser("train", help="train (single process, or under torchrun/srun/submitit)")
    _config_args(s)
    s.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step instead of train.steps")
    s.add_argument("--takeover", action="store_true",
                   help="take the run directory's writer lease from a live holder (it stops at its next heartbeat)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="training checkpoint -> one enat-weights file (EMA + online, fp32)")
    s.add_argument("run", help="run directory (or its checkpoints/ folder)")
    s.add_argument("out")
    s.add_argument("--checkpoint", default="latest", help="latest, a step number or a tag")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("ckpt", help="checkpoint tools")
    csub = s.add_subparsers(dest="action", required=True)
    c = csub.add_parser("universal", help="convert to DeepSpeed's universal format (resume on another world size)")
    c.add_argument("run")
    c.add_argument("--checkpoint", default="latest")
    c.set_defaults(func=cmd_ckpt_universal)
    c = csub.add_parser("list", help="tags, steps, sizes, state and `latest`; the writer lease")
    c.add_argument("run", help="run directory (or its checkpoints/ folder)")
    c.add_argument("--checksums", action="store_true", help="read every byte (default: sizes only)")
    c.set_defaults(func=cmd_ckpt_list)
    c = csub.add_parser("verify", help="check every file's size and checksum; exit 1 if `latest` (or --tag) is damaged")
    c.add_argument("run", help="run directory (or its checkpoints/ folder)")
    c.add_argument("--tag", help="only this tag (or step number)")
    c.set_defaults(func=cmd_ckpt_verify)

    s = sub.add_parser("eval", help="FID/IS/KID/precision-recall of a checkpoint (under torchrun: distributed)")
    s.add_argument("--run", "--run-dir", dest="run",
                   help="training run directory (results go to RUN/eval/); under torchrun spell it --run-dir")
    _config_args(s, False, "default: RUN/config.yaml")
    s.add_argument("--checkpoint", default="latest", help="latest, a step, a tag, or an enat-weights file")
    s.add_argument("--num-samples", type=int, help="default: eval.num_samples")
    s.add_argument("--weights", choices=["ema", "online"], help="default: eval.weights")
    # `enat eval reference --config C [--out FILE.npz] [key=value ...]`: reference statistics of the real
    # held-out images; `enat eval control --config C --checkpoint W ... [key=value ...]`: text control of
    # the captioned demo by CFG scale
    s.add_argument("--out", help="reference: FILE.npz (default: the cache in eval.cache_dir); control: DIR "
                                 "(default RUN/eval/control/STEP, or next to the checkpoint)")
    s.add_argument("--cfg-scales", help="control: comma-separated CFG scales (default 0,1,2,4)")
    s.add_argument("--no-reuse", action="store_true", help="control: only without reuse (default: with and without)")
    s.add_argument("--reuse-only", action="store_true", help="control: only with reuse")
    s.add_argument("--no-fid", action="store_true", help="control: skip the FID against the held-out digits")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("analyze", help="the paper's analyses: attention, temporal, one-step, pareto")
    s.add_argument("what", choices=["attention", "temporal", "one-step", "pareto"],
                   help="attention: where [MASK] and visible queries attend; temporal: feature similarity "
                        "between sampling steps; one-step: FID of one-step decoding by mask ratio; pareto: FID "
                        "against sampling TFLOPs and img/s over steps, CFG and reuse")
    s.add_argument("--run", "--run-dir", dest="run", help="training run directory (output: RUN/analysis/)")
    _config_args(s, False, "default: RUN/config.yaml")
    s.add_argument("--checkpoint", default="latest", help="latest, a step, a tag, or an enat-weights file")
    s.add_argument("--baseline", help="a second model on the same tokens (e.g. the vanilla NAT): an enat-weights "
                                      "file or a run directory (its latest checkpoint)")
    s.add_argument("--weights", choices=["ema", "online"], help="default: eval.weights")
    s.add_argument("--ratios", help="attention (default 0.25,0.5,0.75), one-step (default 0.2,0.4,0.6,0.8)")
    s.add_argument("--steps", help="pareto: sampling steps (default 4,8,12,16)")
    s.add_argument("--cfg-scales", help="pareto: CFG scales (default 0 and sample.cfg_scale), or one per model: "
                                            "ENAT=2.5,NAT=1")
    s.add_argument("--num-samples", type=int, help="held-out maps or samples (default: eval.num_samples; "
                                                    "temporal: at most 100)")
    s.add_argument("--out", help="output folder (default RUN/analysis, or next to the checkpoint file)")
    s.add_argument("--merge", nargs="+", metavar="PARETO_JSON",
                   help="pareto: merge the records of one sweep split over jobs (same samples and reference) "
                        "into one table and front under --out")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("extractor", help="the demo's FID feature extractor")
    esub = s.add_subparsers(dest="action", required=True)
    t = esub.add_parser("train", help="train the digit classifier on the demo training split")
    _config_args(t)
    t.add_argument("--out", help="default: eval.extractor_weights")
    t.set_defaults(func=cmd_extractor_train)

    s = sub.add_parser("convert", help="import checkpoints from other formats")
    conv = s.add_subparsers(dest="format", required=True)
    c = conv.add_parser("official-enat", help="official ENAT state dict -> enat-weights file")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--num-heads", type=int, help="needed unless the shape matches a zoo size")
    c.add_argument("--enc-depth", type=int, help="needed unless the shape matches a zoo size")
    c.add_argument("--kind", default="ema", choices=["ema", "online"],
                   help="which weights the file holds (the released nnet_ema.pth: ema)")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after options (argparse gives a positional list one run only)
        if not hasattr(args, "overrides") or not all(OVERRIDE.fullmatch(x) for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from enat.dist import close, is_initialized  # torch: after parsing (see the note at the top)

    joined_before = is_initialized()  # a caller's process group (main() called from Python) is left alone
    try:
        rc = args.func(args)
    except Exception as e:
        if not isinstance(e, named_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_initialized() and not joined_before:  # a rank of a multi-process run: leave without interpreter teardown
        close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
