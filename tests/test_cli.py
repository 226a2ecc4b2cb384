"""The `enat` command and the README's fresh-machine main job."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, golden_files
from enat.cli import main

BIN = Path(sys.executable).parent


def test_models_lists_L_with_official_count(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^L\s+1024\s+16\s+22\+2\s+565,904,385", out, re.M)
    for size in ("tiny", "S", "B", "XL"):
        assert re.search(rf"^{size}\s", out, re.M)


def test_flops_prints_per_step_and_ratio(capsys):
    assert main(["flops", "--model", "L"]) == 0
    out = capsys.readouterr().out
    assert "with CFG" in out and "without CFG" in out
    totals = re.findall(r"^total TFLOPs\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert len(totals) == 2
    enat, noreuse, nat = map(float, totals[0])
    assert enat < noreuse < nat and nat / enat >= 5


def test_sample_random_init_writes_token_grid(tmp_path, capsys):
    out = tmp_path / "s"
    rc = main(["sample", "--config", str(ROOT / "configs/experiments/demo.yaml"), "--labels", "0,1,2",
               "--per-label", "2", "--out", str(out), "sample.steps=4"])
    assert rc == 0
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (6, 8, 8) and tokens.dtype == np.uint16 and tokens.max() < 1024
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, 1, 2, 2]
    record = json.loads((out / "sample.json").read_text())
    assert record["source"] == "random-init" and record["sample"]["steps"] == 4
    assert "randomly initialised" in capsys.readouterr().err


def test_sample_from_converted_checkpoint_and_mismatch(tmp_path, capsys):
    golden = torch.load(golden_files("enat_*.pt")[0], weights_only=True)
    src = tmp_path / "official.pth"
    torch.save(golden["state_dict"], src)
    weights = tmp_path / "w.pt"
    assert main(["convert", "official-enat", str(src), str(weights)]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(weights), "--labels", "7,388", "--out", str(out)]) == 0
    assert np.load(out / "tokens.npy").shape == (2, 4, 4)
    # A config whose model section describes another network is refused, naming both sides.
    rc = main(["sample", "--config", str(ROOT / "configs/experiments/demo.yaml"), "--checkpoint", str(weights),
               "--labels", "1", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "grid_size: checkpoint 4 vs config 8" in err


def test_sample_takes_a_training_checkpoint_and_says_what_to_pass(tmp_path, capsys):
    """`enat sample --checkpoint` takes a training checkpoint as `enat eval` does (a tag, the run's
    checkpoints/ folder, the run: its latest), where it said "weights file not found" of a path
    that exists (issue 30); a directory that is none, and a class model without --labels, are
    refused saying what to pass."""
    from conftest import write_checkpoint
    from enat.config import load_config
    from enat.models import build_model

    config = str(ROOT / "configs/experiments/demo.yaml")
    cfg = load_config(config)
    torch.manual_seed(3)
    run = tmp_path / "run"
    tag = write_checkpoint(run, cfg, build_model(cfg.model).state_dict(), 950)
    common = ["--config", config, "--labels", "1,2", "--no-images", "sample.steps=2"]
    tokens = []
    for given in (tag, run / "checkpoints", run):
        out = tmp_path / "s" / given.name
        assert main(["sample", "--checkpoint", str(given), "--out", str(out), *common]) == 0, capsys.readouterr().err
        assert json.loads((out / "sample.json").read_text())["source"] == str(tag)
        tokens.append(np.load(out / "tokens.npy"))
    assert all(np.array_equal(t, tokens[0]) for t in tokens)
    random_init = tmp_path / "random"
    assert main(["sample", "--out", str(random_init), *common]) == 0  # the checkpoint's weights were used
    assert not np.array_equal(np.load(random_init / "tokens.npy"), tokens[0])
    capsys.readouterr()

    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["sample", "--checkpoint", str(plain), "--out", str(tmp_path / "x"), *common]) == 2
    assert capsys.readouterr().err == (
        f"error: --checkpoint {plain} is a directory but not a training checkpoint (a run directory, its checkpoints/ "
        f"folder or one of its stepNNNNNNNN tags) nor a weights file: give one of those, or write a weights file "
        f"with `enat export RUN OUT.pt`\n")
    no_labels = ["sample", "--config", config, "--checkpoint", str(tag), "--out", str(tmp_path / "x")]
    assert main(no_labels) == 2
    assert capsys.readouterr().err == ("error: this model is class-conditional: give --labels, class ids in [0, 10) "
                                       "(e.g. --labels 0,1,2)\n")
    assert main([*no_labels, "--prompts", "a thick seven"]) == 2
    assert capsys.readouterr().err == ("error: --prompts need a text-conditioned model; this one is class-conditional: "
                                       "give --labels, class ids in [0, 10) (e.g. --labels 0,1,2)\n")
    assert not (tmp_path / "x").exists()


def test_sample_rejects_bad_labels(tmp_path, capsys):
    rc = main(["sample", "--config", str(ROOT / "configs/experiments/demo.yaml"), "--labels", "3,12",
               "--out", str(tmp_path)])
    assert rc == 2 and "[0, 10)" in capsys.readouterr().err


def readme_commands() -> tuple[str, str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_states_setup_main_job_and_test_commands():
    setup, tests = readme_commands()
    assert "-c constraints.txt" in setup and "pip install" in setup
    assert tests == ".venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci/run").read_text()
    assert tests in ci and "-c constraints.txt" in ci


def test_readme_captioned_demo_command_parses():
    """The README's second main job (run end to end, shortened, by test_text_demo.py): every
    `enat` step parses, and its config and launcher exist."""
    from enat.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    steps = [shlex.split(s.strip()) for s in blocks[2].split("&&")]
    assert steps[0][:2] == [".venv/bin/python", "launch/pipeline.py"] and (ROOT / steps[0][1]).is_file()
    assert (ROOT / steps[0][steps[0].index("--config") + 1]).is_file()
    enat = [s[1:] for s in steps if s[0] == ".venv/bin/enat"]
    assert [s[0] for s in enat] == ["export", "sample", "eval"]
    for argv in enat:
        args, extra = build_parser().parse_known_args(argv)
        assert not extra, extra
    assert "control" in enat[2]


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path):
    """The README's main job (the part after installing) from nothing, with this environment's
    binaries, in a scratch folder that sees the repository's configs."""
    setup, _ = readme_commands()
    steps = [s.strip() for s in setup.split("&&")]
    steps = [s for s in steps if not s.startswith("python3 -m venv") and "pip install" not in s]
    assert steps, "no main-job step in the README command"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    outputs = []
    for step in steps:
        argv = shlex.split(step.replace(".venv/bin/", f"{BIN}/"))
        res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (step, res.stdout[-2000:], res.stderr[-2000:])
        outputs.append(res.stdout)
    pipeline = next(o for o, s in zip(outputs, steps) if "launch/pipeline.py" in s)
    for what in ("train: job", "eval: job", "samples grid:", "FID result:", "runs/demo/train/eval/00001000/"):
        assert what in pipeline, (what, pipeline[-2000:])
    assert (tmp_path / "runs/demo/tokenizer.pt").is_file()
    for split in ("train", "val"):
        assert json.loads((tmp_path / f"runs/demo/shards/{split}/manifest.json").read_text())["num_samples"] > 0
    run = tmp_path / "runs/demo/train"
    assert (run / "checkpoints/latest").read_text().strip() == "step00001000"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["step"] == 1000 and train[-1]["loss"] < train[0]["loss"]
    assert list((run / "samples").glob("step*.png")) and list((run / "wandb").glob("offline-run-*"))
    assert (tmp_path / "runs/demo/enat_tiny.pt").is_file()
    result = json.loads(next((run / "eval/00001000").glob("*.json")).read_text())
    assert result["num_samples"] == 300 and 0 < result["metrics"]["fid"] < 1000
    assert (tmp_path / "runs/demo/digit_classifier.pt").is_file()
    assert (tmp_path / "runs/demo/samples/tokens.npy").is_file()
    assert (tmp_path / "runs/demo/samples/samples.png").is_file()


@pytest.mark.slow
def test_sample_benchmark_json_alone_on_stdout_feeds_enat_cost(tmp_path, capsys):
    """`--json > FILE` holds the JSON alone (the table and DeepSpeed's accelerator warning go to
    stderr), and `enat cost --bench FILE` reads it as written (issue 30)."""
    out = tmp_path / "bench.json"
    with out.open("w") as stdout:
        res = subprocess.run([sys.executable, "-m", "enat.bench", "sample", "--model", "tiny", "--grid-size", "16",
                              "--batch", "2", "--steps", "4", "--repeats", "1", "--json"],
                             cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("NAT / ENAT") for line in res.stderr.splitlines())
    assert len(out.read_text().splitlines()) == 1  # no library warning either
    result = json.loads(out.read_text())
    for key in ("flops_ratio_vanilla_over_enat", "wall_ratio_vanilla_over_enat", "wall_ratio_noreuse_over_enat"):
        assert result[key] > 0
    assert result["flops_ratio_vanilla_over_enat"] > 1
    assert main(["cost", "--model", "tiny", "--grid", "16", "--bench", str(out)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny | 256 |"))
    assert row.endswith(f"| {result['variants']['ENAT']['images_per_s']:.2f} |")


@pytest.mark.slow
def test_data_benchmark_prints_table_and_json():
    res = subprocess.run([sys.executable, "-m", "enat.bench", "data", "--synthetic", "3000", "--shard-size", "1000",
                          "--seconds", "1", "--workers", "1", "--batch", "64", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["samples_per_s"] > 0 and result["seq_len"] == 256 and result["dataset_samples"] == 3000


def test_tokenize_cli_parts_and_merge(tmp_path, capsys):
    """`enat tokenize` over two parts with an explicit merge, on a random-weight tokenizer."""
    from enat.config import load_config
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    cfg = load_config(ROOT / "configs/experiments/demo.yaml")
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})
    common = ["--config", str(ROOT / "configs/experiments/demo.yaml"), "--split", "val", "--out", str(tmp_path / "val"),
              f"tokenizer.checkpoint={tmp_path / 'tok.pt'}"]
    assert main(["tokenize", "--num-parts", "2", "--part", "0", *common]) == 0
    assert main(["tokenize", "--merge", *common]) == 2
    assert "parts [1] of 2" in capsys.readouterr().err
    assert main(["tokenize", "--num-parts", "2", "--part", "1", *common]) == 0
    assert main(["tokenize", "--merge", *common]) == 0
    manifest = json.loads((tmp_path / "val/manifest.json").read_text())
    assert manifest["num_samples"] == 299 and manifest["tokenizer"]["sha256"]


@pytest.mark.slow
def test_eval_benchmark_prints_table_and_json(tmp_path):
    from enat.config import load_config
    from enat.eval.fidelity import train_digit_classifier
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer

    cfg = load_config(ROOT / "configs/experiments/demo.yaml")
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})
    train_digit_classifier(tmp_path / "fx.pt", steps=20, log=lambda *_: None)
    res = subprocess.run([sys.executable, "-m", "enat.bench", "eval", "--num-samples", "20", "--json",
                          f"tokenizer.checkpoint={tmp_path / 'tok.pt'}", f"eval.extractor_weights={tmp_path / 'fx.pt'}",
                          "eval.batch_size=10"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and set(result["fractions"]) == {"conditions", "sampling", "decoding", "features"}


def test_data_prepare_builds_shards_and_the_demo_extractor_train_launcher_checks(tmp_path, monkeypatch, capsys):
    """`enat data prepare` builds what is missing for the data (shards; the tokenizer is given
    here) and for evaluation (the demo's FID extractor, a stand-in here); the train launcher
    refuses to submit while the shards are missing, naming the command."""
    import enat.eval.prepare as extractor_prep
    from enat.config import load_config
    from enat.data.prepare import check_data
    from enat.data.shards import ShardError
    from enat.tokenizer import VQGAN
    from enat.tokenizer.train import save_tokenizer
    from launch.train import submit_train

    config = str(ROOT / "configs/experiments/demo.yaml")
    over = [f"tokenizer.checkpoint={tmp_path / 'tok.pt'}", f"data.shards={tmp_path / 'train'}",
            f"data.val_shards={tmp_path / 'val'}", f"eval.extractor_weights={tmp_path / 'fx.pt'}",
            f"train.run_dir={tmp_path / 'run'}", "launch.cluster=local"]
    cfg = load_config(config, over)
    with pytest.raises(ShardError, match=r"enat data prepare --config CONFIG"):
        submit_train(cfg)
    assert not (tmp_path / "run").exists()
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "tok.pt", VQGAN(cfg.tokenizer), {})
    trained = []
    monkeypatch.setattr(extractor_prep, "train_digit_classifier",
                        lambda out, seed=0, log=print: trained.append(out) or open(out, "wb").close())
    assert main(["data", "prepare", "--config", config, *over]) == 0
    for split in ("train", "val"):
        assert json.loads((tmp_path / split / "manifest.json").read_text())["num_samples"] > 0
    assert trained == [str(tmp_path / "fx.pt")]
    check_data(cfg)
    # Again: nothing to build, and it says so (it printed nothing before, issue 30).
    capsys.readouterr()
    assert main(["data", "prepare", "--config", config, *over]) == 0
    assert trained == [str(tmp_path / "fx.pt")]
    assert capsys.readouterr().out == (
        "everything this config needs is there; nothing was redone (delete a file or folder to rebuild it):\n"
        f"  tokenizer          {tmp_path / 'tok.pt'}\n"
        f"  training shards    {tmp_path / 'train'} (1498 samples)\n"
        f"  validation shards  {tmp_path / 'val'} (299 samples)\n"
        f"  FID extractor      {tmp_path / 'fx.pt'}\n")


@pytest.mark.slow
def test_train_benchmark_reports_syncs_graphs_and_mfu():
    """The command a GPU run uses, on CPU: the table and a JSON line with every number."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run([sys.executable, "-m", "enat.bench", "train", "--model", "tiny", "--grid-size", "8",
                          "--batch", "8", "--steps", "3", "--warmup", "2", "--zero-stage", "2", "--precision", "bf16",
                          "--peak-tflops", "1.0", "--bare", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MFU" in res.stderr and "graphs of forward + loss" in res.stderr  # the table: stderr under --json
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["syncs_per_step"] == 1 and set(r["syncs_by_mode"]) <= {"full", "reuse"}
    assert r["syncs_inside_forward_backward"] == 0 and r["sync_steps_counted"] == 4
    assert r["cuda_syncs_per_step"] is None  # CUDA's own count exists only on a GPU
    assert r["graphs"] == {"full": {"graphs": 1, "breaks": 0}, "reuse": {"graphs": 1, "breaks": 0}}
    assert r["images_per_s"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_s"] / 1.0)
    assert r["overhead_ratio"] > 0 and r["zero_stage"] == 2 and r["precision"] == "bf16"
