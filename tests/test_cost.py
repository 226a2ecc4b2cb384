"""`enat cost`: the table users ask for before a project, checked against hand computation."""

import json

import pytest

from enat.cli import main
from enat.cost import cost_row, cost_table
from enat.flops import expected_train_flops, sampling_flops
from enat.models import model_config


def test_L_256_row_is_the_recipe_computed_by_hand():
    row = cost_row("L", 16, peak_tflops=989.0, mfu=0.4)
    per_image = expected_train_flops(model_config("L"), (12.0, 3.0), 0.5)
    assert row["global_batch"] == 2048 and row["steps"] == 500_000 and row["gpus"] == 16  # the released run
    assert row["train_gflops_per_image"] == pytest.approx(per_image / 1e9)
    hours = 500_000 * 2048 * per_image / (989e12 * 0.4) / 3600
    assert row["gpu_hours"] == pytest.approx(hours) and row["days"] == pytest.approx(hours / 16 / 24)
    assert row["sampling_tflops_per_image"] == pytest.approx(sampling_flops(model_config("L"), 8).total / 1e12)
    assert row["params"] == 565_904_385 and row["recipe"] == "imagenet256_L.yaml"
    # Twice the MFU, half the hours; a size without a 512 recipe says whose it takes.
    assert cost_row("L", 16, 989.0, 0.8)["gpu_hours"] == pytest.approx(hours / 2)
    assert cost_row("B", 32, 989.0, 0.4)["recipe"] == "imagenet512_L.yaml with model.size=B"


def test_images_per_s_from_a_bench_file_or_measured(tmp_path):
    bench = [{"model": "S", "grid_size": 16, "variants": {"ENAT": {"images_per_s": 12.5}}}]
    rows = cost_table(["S", "B"], [16], 989.0, 0.4, bench=bench)
    assert rows[0]["images_per_s"] == 12.5 and rows[0]["images_per_s_source"] == "bench file"
    assert rows[1]["images_per_s"] is None  # no result for B in the file
    assert cost_row("tiny", 16, 989.0, 0.4, measure=True)["images_per_s"] > 0


def test_cli_prints_markdown_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["cost", "--model", "L,XL", "--grid", "16", "--gpus", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| L | 256 | 565.9M |" in text and "| XL | 256 |" in text and "on 64" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["size"] for r in rows] == ["L", "XL"] and all(r["gpus"] == 64 for r in rows)
    assert main(["cost", "--model", "M"]) == 2


def test_a_text_to_image_config_counts_its_caption_tokens(tmp_path, capsys):
    from enat.config import load_config
    from enat.cost import config_cost

    from conftest import ROOT

    cfg = load_config(ROOT / "configs/experiments/coco256_B.yaml")
    row = config_cost(cfg, "coco256_B.yaml", 989.0, 0.4, measure=True)
    text_model = model_config("B", condition="text", text_len=77, text_dim=768)
    class_model = model_config("B")
    per_image = expected_train_flops(text_model, tuple(cfg.train.mask_beta), cfg.train.reuse_prob)
    assert row["train_gflops_per_image"] == pytest.approx(per_image / 1e9)
    assert per_image > expected_train_flops(class_model) * 1.3  # 77 caption tokens on 256 image tokens
    assert row["sampling_tflops_per_image"] == pytest.approx(sampling_flops(text_model, 8).total / 1e12)
    assert row["condition"] == "text (77 x 768 context)" and row["images_per_s"] > 0
    assert main(["cost", "--config", str(ROOT / "configs/experiments/coco256_B.yaml")]) == 0
    assert "| B text | 256 | 163.4M |" in capsys.readouterr().out
    assert main(["cost", "--config", str(ROOT / "configs/experiments/coco256_B.yaml"), "--model", "L"]) == 2


def test_a_bench_file_that_is_not_a_bench_result_is_named(tmp_path, capsys):
    """`enat cost --bench` on what it cannot read: exit 2 and a message naming the file, what is
    wrong and what writes a good one, never a JSONDecodeError's traceback."""
    result = {"model": "tiny", "grid_size": 16, "variants": {"ENAT": {"images_per_s": 3.25}}}
    argv = ["cost", "--model", "tiny", "--grid", "16", "--bench"]
    mixed = tmp_path / "mixed.json"  # what the bench's stdout held before: a warning and the table first
    mixed.write_text("[WARNING] Setting accelerator to CPU.\nvariant  images/s\n" + json.dumps(result) + "\n")
    assert main([*argv, str(mixed)]) == 2
    assert capsys.readouterr().err == (
        f"error: --bench {mixed} is not JSON (line 1: '[WARNING] Setting accelerator to CPU.'): give it what "
        "`python -m enat.bench sample ... --json > FILE` writes (the JSON alone on stdout; of a file saved "
        "with the table before its JSON line, keep the last line: `tail -1`)\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    assert main([*argv, str(other)]) == 2
    assert capsys.readouterr().err == (
        f"error: --bench {other} holds no sampling bench result: it takes one JSON object of "
        "`python -m enat.bench sample --json` (model, grid_size, variants.ENAT.images_per_s) or a list of them\n")
    assert main([*argv, str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err == f"error: --bench {tmp_path / 'missing.json'}: no such file\n"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(result) + "\n")
    assert main([*argv, str(good)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny | 256 |"))
    assert row.endswith("| 3.25 |")
