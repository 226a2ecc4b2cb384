"""`enat analyze`: each analysis against cases whose answer is known (forced attention logits,
identity blocks, ratio 0 = the tokenizer's reconstruction, the FID job's own number), at 8x8
and 32x32 (512 px) token grids, plus the command's files and errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from enat.analysis.attention import attention_shares
from enat.analysis.pareto import pareto_front
from enat.analysis.run import run_analysis
from enat.analysis.subjects import mask_positions
from enat.analysis.temporal import temporal_similarity
from enat.config import SampleConfig, dump_config, load_config
from enat.eval.fidelity import EvalError
from enat.models import build_model
from enat.models.zoo import model_config

CONFIG = ROOT / "configs/experiments/demo.yaml"


def tiny(arch="enat", grid=8, **kw):
    torch.manual_seed(0)
    cfg = model_config("tiny", arch=arch, grid_size=grid, codebook_size=128, num_classes=10, **kw)
    return build_model(cfg).eval()


def uniform_attention(model):
    """Zero queries: every score is 0, every query spreads its mass evenly over its keys."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn.q." in name:
                p.zero_()
    return model


def random_maps(n, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, N), generator=g)


# --- spatial ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [16, 32])
@pytest.mark.parametrize("variant", ["nat", "sc", "self", "cross"])
def test_uniform_attention_splits_mass_by_key_counts(variant, grid):
    """With every logit equal, the share on a kind is that kind's fraction of the keys: the
    NAT's queries see all N tokens, ENAT's encoder only visible ones, its decoder's [MASK]
    queries [visible ; [MASK]] (sc, self) or the visible ones alone (cross)."""
    model = uniform_attention(tiny("nat", grid) if variant == "nat" else tiny(grid=grid, decoder_attention=variant))
    N = grid * grid
    ratio = 0.25
    M = round(N * ratio)
    ids, labels = random_maps(6, N), torch.arange(6)
    shares = attention_shares(model, ids, labels, np.arange(6), ratio, seed=3, batch_size=4)
    mask_share = {"nat": M / N, "sc": M / N, "self": M / N, "cross": 0.0}[variant]
    for layer, s in shares.items():
        att = s["attention"]
        if layer.startswith("encoder"):
            assert set(att) == {"visible"} and att["visible"]["mask"] == 0
            assert att["visible"]["visible"] == pytest.approx(1.0)
            continue
        assert att["mask"]["mask"] == pytest.approx(mask_share, abs=1e-6), layer
        assert att["mask"]["visible"] == pytest.approx(1 - mask_share, abs=1e-6), layer
        assert att["mask"] == pytest.approx(s["uniform"]["mask"], abs=1e-6)
        assert s["queries"]["mask"] == 6 * M
        if variant in ("nat", "self"):  # visible queries exist in these layers too
            assert att["visible"]["mask"] == pytest.approx(M / N, abs=1e-6)


def test_forced_logits_give_the_logistic_split():
    """SC decoder: queries a*1, [MASK] keys b*1, visible (context) keys 0 -> every [MASK] key
    scores z = a b sqrt(d_head), every visible key 0, so the [MASK] share is M e^z / (M e^z + V)."""
    model = tiny()
    D, H = model.cfg.width, model.cfg.num_heads
    a, b = 0.5, 0.75
    with torch.no_grad():
        for blk in model.decoder:
            blk.attn.q.weight.zero_()
            blk.attn.q.bias.fill_(a)
            blk.attn.kv.weight[:D].zero_()
            blk.attn.kv.bias[:D].fill_(b)
            blk.attn.kv_ctx.weight[:D].zero_()
            blk.attn.kv_ctx.bias[:D].zero_()
    z = a * b * math.sqrt(D // H)
    N = model.cfg.seq_len
    for ratio in (0.25, 0.5, 0.75):
        M = round(N * ratio)
        shares = attention_shares(model, random_maps(5, N), torch.arange(5), np.arange(5), ratio, 1, 8)
        expected = M * math.exp(z) / (M * math.exp(z) + N - M)
        got = shares["decoder.0"]["attention"]["mask"]
        assert got["mask"] == pytest.approx(expected, abs=1e-6)
        assert got["visible"] == pytest.approx(1 - expected, abs=1e-6)
        assert shares["decoder.0"]["uniform"]["mask"]["mask"] == pytest.approx(M / N)


def test_caption_tokens_are_a_key_kind_of_their_own():
    L = 4
    model = uniform_attention(tiny(condition="text", text_len=L, text_dim=8))
    N = model.cfg.seq_len
    M = N // 2
    shares = attention_shares(model, random_maps(3, N), torch.randn(3, L, 8), np.arange(3), 0.5, 0, 8)
    dec = shares["decoder.0"]["attention"]["mask"]
    assert dec["text"] == pytest.approx(L / (L + N), abs=1e-6)
    assert dec["mask"] == pytest.approx(M / (L + N), abs=1e-6)
    enc = shares["encoder.0"]["attention"]
    assert enc["visible"]["text"] == pytest.approx(L / (L + N - M), abs=1e-6)
    assert enc["text"]["visible"] == pytest.approx((N - M) / (L + N - M), abs=1e-6)


def test_masks_are_nested_and_shared_across_models():
    a = mask_positions(np.arange(4), 64, 16, seed=5)
    b = mask_positions(np.arange(4), 64, 32, seed=5)
    assert torch.equal(a, b[:, :16])
    assert all(len(set(r.tolist())) == 32 for r in b)


# --- temporal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [16, 32])
@pytest.mark.parametrize("arch", ["nat", "enat"])
def test_identity_blocks_give_similarity_one_and_the_embedding_cosine(arch, grid):
    """At init adaLN-Zero makes every block the identity: a visible token's features are its
    embedding at every layer, identical from step to step (similarity 1), and a newly decoded
    token's are the [MASK] embedding before and its own after, a cosine computable here."""
    model = tiny(arch, grid)
    sc = SampleConfig(steps=6, cfg_scale=2.0, reuse=arch == "enat", seed=1)
    sims, traj = temporal_similarity(model, torch.arange(4), sc, batch_size=4)
    mask_id = model.cfg.mask_id
    emb = model.embed(traj.flatten(0, 1)).view(*traj.shape, -1).detach()  # (T, B, N, D)
    assert len(sims["steps"]) == sc.steps - 1
    for st in sims["steps"]:
        s = st["step"]
        for layer, (c, n) in st["visible"].items():
            if n:  # every layer that sees visible tokens sees identical features
                assert c == pytest.approx(1.0, abs=1e-6), (layer, s)
        new = (traj[s - 1] == mask_id) & (traj[s] != mask_id)
        expected = F.cosine_similarity(emb[s - 1][new].double(), emb[s][new].double(), dim=-1).mean().item()
        assert st["new"]["output"][0] == pytest.approx(expected, abs=1e-5)
        assert st["new"]["output"][1] == int(new.sum())
        if arch == "enat":  # the encoder never sees a [MASK] token: no new-token similarity there
            assert st["new"]["encoder.0"][1] == 0
        else:
            assert st["new"]["block.0"][0] == pytest.approx(expected, abs=1e-5)
    assert any(st["visible"]["output"][1] for st in sims["steps"])


def test_trained_features_move_less_for_visible_tokens():
    """Not an identity: random blocks still keep a visible token's features closer from step to
    step than a newly decoded token's (the property reuse relies on)."""
    model = tiny("nat")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(0, 0.05)
    sims, _ = temporal_similarity(model, torch.arange(8), SampleConfig(steps=6, reuse=False, seed=0), 8)
    vis = [st["visible"]["output"][0] for st in sims["steps"] if st["visible"]["output"][1]]
    new = [st["new"]["output"][0] for st in sims["steps"]]
    assert min(vis) < 1 and np.mean(vis) > np.mean(new)


def test_pareto_front():
    pts = [{"tflops": t, "fid": f} for t, f in [(1, 5), (2, 3), (3, 4), (4, 1), (0.5, 6), (2, 3.5)]]
    assert pareto_front(pts) == [0, 1, 3, 4]


# --- the commands: one-step, pareto, files, errors --------------------------------------------


@pytest.fixture(scope="module", params=[8, 32], ids=["256-like", "512-like"])
def demo(request, tmp_path_factory):
    """A demo config (grid 8, or 32 with 128 px images: the 512 px shape) with a random
    tokenizer, held-out token shards, the digit classifier, and ENAT and NAT weights files."""
    from enat.data.prepare import tokenize_split
    from enat.eval.fidelity import train_digit_classifier
    from enat.models.weights import save_weights
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    grid = request.param
    d = tmp_path_factory.mktemp(f"analysis{grid}")
    train_digit_classifier(d / "fx.pt", steps=200, log=lambda *_: None)
    over = [f"tokenizer.checkpoint={d / 'tok.pt'}", f"data.val_shards={d / 'val'}", f"eval.extractor_weights={d / 'fx.pt'}",
            f"eval.cache_dir={d / 'cache'}", "eval.batch_size=10", "eval.num_samples=20", "sample.steps=4",
            f"model.grid_size={grid}", f"tokenizer.resolution={grid * 4}"]
    cfg = load_config(CONFIG, over)
    torch.manual_seed(0)
    save_tokenizer(d / "tok.pt", VQGAN(cfg.tokenizer), {})
    tokenize_split(cfg, "val", progress=False, log=lambda *_: None)
    for arch in ("enat", "nat"):
        torch.manual_seed(1)
        m = build_model(load_config(CONFIG, over + [f"model.arch={arch}", f"sample.reuse={arch == 'enat'}"]).model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_weights(d / f"{arch}.pt", m.cfg, {"ema": m.state_dict()}, meta={"step": 3})
    dump_config(cfg, d / "config.yaml")
    return d, cfg


def test_one_step_at_ratio_zero_is_the_tokenizers_reconstruction(demo):
    from enat.data.loader import ShardSet
    from enat.eval.fidelity import build_extractor, extract, metrics
    from enat.eval.reference import reference_spec, reference_stats
    from enat.images import to_uint8
    from enat.tokenizer import load_tokenizer

    d, cfg = demo
    res = run_analysis("one-step", cfg, None, str(d / "enat.pt"), ratios="0,0.5", num_samples=30,
                       out=str(d / "out"), log=lambda *_: None)
    # the reconstruction score, computed here without the analysis: every held-out map decoded
    data = ShardSet(cfg.data.val_shards)
    rows = np.random.default_rng(cfg.eval.seed).permutation(len(data))[:30]
    tok = load_tokenizer(cfg.tokenizer)
    images = to_uint8(tok.decode(torch.from_numpy(data.tokens(rows).astype(np.int64))))
    assert images.shape[1] == 4 * cfg.model.grid_size
    ex = build_extractor(cfg.eval.extractor, cfg.eval.extractor_weights)
    ref = reference_stats(cfg, reference_spec(cfg), ex, tok, log=lambda *_: None)
    expected = metrics(extract(ex, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()), ref,
                       cfg.eval.kid_subset_size, cfg.eval.prc, cfg.eval.seed)["fid"]
    zero, half = res["models"][0]["points"]
    assert zero["masked"] == 0 and zero["token_accuracy"] is None
    assert zero["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    assert res["reconstruction"]["fid"] == pytest.approx(expected, rel=1e-9)
    assert half["masked"] == cfg.model.seq_len // 2 and 0 <= half["token_accuracy"] <= 1
    assert half["metrics"]["fid"] != pytest.approx(expected)  # random predictions change the images
    saved = json.loads((d / "out" / "one_step.json").read_text())
    assert saved["reference"] == res["reference"] and (d / "out" / "one_step.png").stat().st_size > 0
    assert "tokenizer reconstruction" in (d / "out" / "one_step.md").read_text()


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_pareto_points_are_the_fid_jobs_numbers(demo):
    from enat.eval.job import evaluate
    from enat.flops import sampling_flops
    from enat.models.weights import load_weights

    d, cfg = demo
    steps = [2, 4] if cfg.model.grid_size == 8 else [4]  # 512-like: one step count keeps it short
    res = run_analysis("pareto", cfg, None, str(d / "enat.pt"), baseline=str(d / "nat.pt"), steps=",".join(map(str, steps)),
                       cfg_scales="0,2", num_samples=20, out=str(d / "out"), log=lambda *_: None)
    pts = res["points"]
    assert len(pts) == (2 + 1) * len(steps) * 2  # ENAT with/without reuse, NAT without; steps x 2 scales
    assert {(p["model"], p["reuse"]) for p in pts} == {("ENAT", True), ("ENAT", False), ("NAT", False)}
    for p in pts:
        arch_cfg = load_weights(d / ("enat.pt" if p["model"] == "ENAT" else "nat.pt"))[0]
        assert p["tflops"] == sampling_flops(arch_cfg, p["steps"], reuse=p["reuse"], guided=p["cfg_scale"] != 0).total / 1e12
        assert p["img_per_s"] > 0
    front = [i for i, p in enumerate(pts) if p.get("pareto")]
    assert front == pareto_front(pts) and front
    # one point through the FID job itself: the same number
    point = next(p for p in pts if p["model"] == "ENAT" and p["reuse"] and p["steps"] == 4 and p["cfg_scale"] == 2)
    job = evaluate(load_config(d / "config.yaml", ["sample.steps=4", "sample.cfg_scale=2", "sample.reuse=true"]),
                   None, str(d / "enat.pt"), num_samples=20, out_dir=d / "job", log=lambda *_: None)
    assert job["metrics"]["fid"] == pytest.approx(point["fid"], rel=1e-9)


def test_pareto_compares_each_model_at_its_own_cfg_scale(demo):
    """The main table compares models each at the CFG scale its held-out sweep chose."""
    d, cfg = demo
    if cfg.model.grid_size != 8:
        pytest.skip("bookkeeping of points, the same at any grid: the 256-like models are enough")
    kw = dict(baseline=str(d / "nat.pt"), steps="2", num_samples=10, out=str(d / "own"), log=lambda *_: None)
    res = run_analysis("pareto", cfg, None, str(d / "enat.pt"), cfg_scales="ENAT=2.5,NAT=0", **kw)
    assert sorted((p["model"], p["reuse"], p["cfg_scale"]) for p in res["points"]) == \
        [("ENAT", False, 2.5), ("ENAT", True, 2.5), ("NAT", False, 0.0)]
    for bad, match in (("ENAT=2", r"lacks \['NAT'\]"), ("ENAT=2,NAT=1,DiT=3", r"names \['DiT'\]"),
                       ("ENAT=x", "is not NAME=SCALE")):
        with pytest.raises(EvalError, match=match):
            run_analysis("pareto", cfg, None, str(d / "enat.pt"), cfg_scales=bad, **kw)


@pytest.mark.slow
def test_a_pareto_sweep_split_over_jobs_merges_into_one_front(demo, capsys):
    """Models (or steps) measured by separate jobs: one table, the front over every point, and
    records that do not compare (other samples, another reference) refused."""
    from enat.analysis.pareto import merge_pareto, pareto_front

    d, cfg = demo
    if cfg.model.grid_size != 8:
        pytest.skip("bookkeeping of points, the same at any grid: the 256-like models are enough")
    kw = dict(baseline=str(d / "nat.pt"), num_samples=10, log=lambda *_: None)
    run_analysis("pareto", cfg, None, str(d / "enat.pt"), steps="2", cfg_scales="2", out=str(d / "m1"), **kw)
    run_analysis("pareto", cfg, None, str(d / "enat.pt"), steps="3", cfg_scales="0,2", out=str(d / "m2"), **kw)
    parts = [json.loads((d / f"m{i}/pareto.json").read_text()) for i in (1, 2)]
    merged = merge_pareto([d / "m1/pareto.json", d / "m2/pareto.json"], d / "merged", log=lambda *_: None)
    assert [(p["model"], p["fid"]) for p in merged["points"]] == \
        [(p["model"], p["fid"]) for r in parts for p in r["points"]]
    front = [i for i, p in enumerate(merged["points"]) if p.get("pareto")]
    assert front == pareto_front(merged["points"]) and {m["name"] for m in merged["models"]} == {"ENAT", "NAT"}
    assert json.loads((d / "merged/pareto.json").read_text())["points"] == merged["points"]
    with pytest.raises(EvalError, match="is in both"):
        merge_pareto([d / "m1/pareto.json", d / "m1/pareto.json"], d / "x", log=lambda *_: None)
    run_analysis("pareto", cfg, None, str(d / "enat.pt"), steps="4", cfg_scales="1", out=str(d / "m3"),
                 **{**kw, "num_samples": 12})
    with pytest.raises(EvalError, match="differ in num_samples"):
        merge_pareto([d / "m1/pareto.json", d / "m3/pareto.json"], d / "x", log=lambda *_: None)
    (d / "other.json").write_text(json.dumps({"analysis": "one-step"}))
    with pytest.raises(EvalError, match="not a pareto record"):
        merge_pareto([d / "m1/pareto.json", d / "other.json"], d / "x", log=lambda *_: None)
    (d / "bad.json").write_text(json.dumps({**parts[1], "points": [{"model": "NAT"}]}))
    with pytest.raises(EvalError, match="damaged pareto record"):
        merge_pareto([d / "m1/pareto.json", d / "bad.json"], d / "x", log=lambda *_: None)
    from enat.cli import main

    rc = main(["analyze", "pareto", "--merge", str(d / "m1/pareto.json"), str(d / "m2/pareto.json"), "--out",
               str(d / "x"), "--steps", "4", "sample.steps=4"])
    assert rc == 2 and "takes only --out; drop --steps sample.steps=4" in capsys.readouterr().err


def test_command_writes_files_and_refuses_mismatches(demo, capsys):
    from enat.cli import main

    d, cfg = demo
    out = d / "cli"
    rc = main(["analyze", "attention", "--config", str(d / "config.yaml"), "--checkpoint", str(d / "enat.pt"),
               "--baseline", str(d / "nat.pt"), "--num-samples", "12", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "attention.json").read_text())
    assert [m["name"] for m in res["models"]] == ["ENAT", "NAT"] and res["num_maps"] == 12
    assert (out / "attention.png").stat().st_size > 0 and "[MASK]→visible" in (out / "attention.md").read_text()
    rc = main(["analyze", "temporal", "--config", str(d / "config.yaml"), "--checkpoint", str(d / "enat.pt"),
               "--num-samples", "4", "--out", str(out)])
    assert rc == 0 and json.loads((out / "temporal.json").read_text())["models"][0]["steps"]

    # in a run directory: RUN/analysis/, and the table and figure into the run's (offline) wandb run
    run = d / "run"
    run.mkdir(exist_ok=True)
    dump_config(load_config(d / "config.yaml", ["train.wandb.mode=offline"]), run / "config.yaml")
    (run / "wandb_run_id").write_text("analysis0001")
    assert main(["analyze", "temporal", "--run", str(run), "--checkpoint", str(d / "enat.pt"), "--num-samples", "4"]) == 0
    assert (run / "analysis" / "temporal.json").is_file()
    tables = list(run.glob("wandb/offline-run-*analysis0001/files/media/table/analysis/temporal_*.table.json"))
    assert len(tables) == 1 and json.loads(tables[0].read_text())["columns"][:2] == ["model", "layer"]
    assert list(run.glob("wandb/offline-run-*analysis0001/files/media/images/analysis/temporal_figure_*.png"))

    capsys.readouterr()
    rc = main(["analyze", "attention", "--config", str(d / "config.yaml"), "--checkpoint", str(d / "enat.pt"),
               "model.width=32", "--out", str(out)])
    assert rc == 2 and "width: checkpoint 64 vs config 32" in capsys.readouterr().err
    other = model_config("tiny", arch="nat", grid_size=cfg.model.grid_size // 2, codebook_size=128, num_classes=10)
    with pytest.raises(EvalError, match="baseline .* grid_size"):
        from enat.models.weights import save_weights

        save_weights(d / "small.pt", other, {"ema": build_model(other).state_dict()})
        run_analysis("attention", cfg, None, str(d / "enat.pt"), baseline=str(d / "small.pt"), out=str(out))
    rc = main(["analyze", "pareto", "--config", str(d / "config.yaml"), "--checkpoint", str(d / "enat.pt"),
               "--ratios", "0.5", "--out", str(out)])
    assert rc == 2 and "--ratios belongs to" in capsys.readouterr().err
