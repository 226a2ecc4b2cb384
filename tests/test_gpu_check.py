"""The GPU check (launch/gpu/check.sh -> python -m enat.bench gpu) cannot rot: its runner reports a
failing run and goes on, kills a run at its timeout, and writes its JSON and tables; CUDA's sync
count is recorded by call site; and, end to end (slow), the wheelhouse built here installs offline
into a fresh venv that holds only a CPU torch and the GPU image's packages, and check.sh runs the
same code there in its smoke mode."""

import json
import os
import subprocess
import sys
import time
import venv
import warnings
from pathlib import Path

import pytest

from enat.bench import gpu
from enat.profiling import CudaSyncCounter

ROOT = Path(__file__).resolve().parents[1]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    runs = [
        gpu.Run("train", "train B", py("import json; print('table'); print(json.dumps({'step_s': 1}))"), 30),
        gpu.Run("sample", "sample L", py("import sys; sys.exit('CUDA out of memory at batch 64')"), 30),
        gpu.Run("tokenizer", "tokenizer f16", py("print('not json')"), 30),
        gpu.Run("train", "train L compiled", None, 30, skip="--smoke: inductor"),
    ]
    monkeypatch.setattr(gpu, "plan", lambda smoke: runs)
    args = type("A", (), {"smoke": True, "budget_s": 60.0, "only": None})()
    written = []
    records = gpu.main_runs(args, log=lambda *_: None, after_each=lambda r: written.append(dict(r)))
    assert records["train B"]["status"] == "ok" and records["train B"]["result"] == {"step_s": 1}
    assert records["sample L"]["status"] == "failed"
    assert "CUDA out of memory at batch 64" in records["sample L"]["error"]
    assert records["tokenizer f16"]["status"] == "failed"  # rc 0 but no JSON result: not a number
    assert records["train L compiled"] == {"part": "train", "status": "skipped", "error": "--smoke: inductor"}
    assert [len(w) for w in written] == [1, 2, 3]  # the files are rewritten after every run
    env = {"versions": {"torch": "x"}, "device_name": "cpu"}
    gpu.write_outputs(tmp_path, env, records, True, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.md", "env.json", "fid.json", "sample.json",
                                                          "syncs.json", "tokenizer.json", "train.json"]
    md = (tmp_path / "check.md").read_text()
    assert "| sample L | failed |" in md and "CUDA out of memory at batch 64" in md
    assert "| train L compiled | skipped |" in md
    assert "(training: no table, KeyError" in md  # a result short of a field costs its table, not the file
    assert json.loads((tmp_path / "env.json").read_text())["runs"]["sample L"]["status"] == "failed"


def test_budget_skips_what_cannot_finish(monkeypatch):
    runs = [gpu.Run("train", "train B", py("import time; time.sleep(0.6); print('{}')"), 30, expect_s=5),
            gpu.Run("train", "train L", py("print('{}')"), 30, expect_s=30),  # 29.4 s left: not started
            gpu.Run("train", "train S", py("print('{}')"), 30, expect_s=5)]
    monkeypatch.setattr(gpu, "plan", lambda smoke: runs)
    args = type("A", (), {"smoke": True, "budget_s": 30.0, "only": None})()
    records = gpu.main_runs(args, log=lambda *_: None)
    assert records["train B"]["status"] == "ok"
    assert records["train L"]["status"] == "skipped" and records["train L"]["error"].startswith("budget")
    assert "about 30 s" in records["train L"]["error"]
    assert records["train S"]["status"] == "ok"  # a shorter run after it still fits


def test_a_result_printed_before_a_crash_or_a_hang_at_exit_is_kept():
    crash = gpu.execute(py("import json, os; print(json.dumps({'step_s': 2})); os.abort()"), 30, log=lambda *_: None)
    assert crash["status"] == "ok" and crash["result"] == {"step_s": 2} and crash["rc"] != 0
    assert "after its result" in crash["error"]
    hang = gpu.execute(py("import json, time; print(json.dumps({'step_s': 3}), flush=True); time.sleep(60)"), 1.5,
                       log=lambda *_: None)
    assert hang["status"] == "ok" and hang["result"] == {"step_s": 3} and "no exit within 2 s" in hang["error"]


def test_runs_start_without_the_callers_process_group(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1")  # what an in-process trainer leaves behind, its port still taken
    monkeypatch.setenv("RANK", "0")
    rec = gpu.execute(py("import json, os; print(json.dumps({k: os.environ.get(k) for k in ('RANK', 'MASTER_PORT')}))"),
                      30, log=lambda *_: None)
    assert rec["result"] == {"RANK": None, "MASTER_PORT": None}


def test_a_run_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.time()
    rec = gpu.execute(py(code), 1.5, log=lambda *_: None)
    assert rec["status"] == "timeout" and time.time() - t0 < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (a loader or compile worker) is gone too
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the timeout")


def alive(pid: int) -> bool:
    """Running (a zombie left for a container's init that never reaps it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def fake_training(memory_gb, device_gb=80.0):
    """execute() of a train bench whose peak memory is memory_gb(batch); over the device: OOM."""
    runs = []

    def execute(argv, timeout_s, log=print, json_result=True):
        batch = int(argv[argv.index("--batch") + 1])
        runs.append(batch)
        if memory_gb(batch) > device_gb:
            return {"status": "failed", "seconds": 1.0, "error": "torch.OutOfMemoryError: CUDA out of memory"}
        return {"status": "ok", "seconds": 1.0, "result": {"peak_memory_gb": memory_gb(batch),
                                                           "device_memory_gb": device_gb}}
    return execute, runs


def test_largest_micro_batch_from_the_memory_line_then_trained(monkeypatch):
    execute, runs = fake_training(lambda b: 16.0 + 0.2 * b)
    monkeypatch.setattr(gpu, "execute", execute)
    r = gpu.max_micro_batch(time.time() + 600, log=lambda *_: None)
    assert runs[:2] == [64, 128]  # half the recipe's 128 and the recipe's, same steps
    assert r["gb_per_image"] == pytest.approx(0.2) and r["fixed_gb"] == pytest.approx(16.0)
    assert r["predicted"] == 280 and r["largest_verified"] == 280 and runs == [64, 128, 280]  # (72 - 16) / 0.2

    # memory grows faster than the line past some batch: the prediction fails, 10 % less trains
    execute, runs = fake_training(lambda b: 16.0 + 0.2 * b + (0.35 * (b - 200) if b > 200 else 0))
    monkeypatch.setattr(gpu, "execute", execute)
    r = gpu.max_micro_batch(time.time() + 600, log=lambda *_: None)
    assert runs == [64, 128, 280, 248, 216] and r["largest_verified"] == 216
    assert [t["status"] for t in r["tries"]] == ["ok", "ok", "failed", "failed", "ok"]

    execute, runs = fake_training(lambda b: 30.0)  # a reading that does not grow: no line, no division by 0
    monkeypatch.setattr(gpu, "execute", execute)
    r = gpu.max_micro_batch(time.time() + 600, log=lambda *_: None)
    assert r["status"] == "failed" and "did not grow" in r["error"]


def test_sync_summary_holds_runs_to_the_cpu_target():
    def train(per_step, inside, cuda=None):
        return {"part": "train", "status": "ok", "result": {
            "syncs_per_step": per_step, "syncs_inside_forward_backward": inside,
            "cuda_syncs_per_step": cuda[0] if cuda else None,
            "cuda_syncs_inside_forward_backward": cuda[1] if cuda else None}}

    s = gpu.sync_summary({"a": train(1, 0), "b": train(1, 0, cuda=(3, 0)), "c": train(1, 2), "d": train(0, 0)})
    assert {k: v["meets_target"] for k, v in s["train"].items()} == {"a": True, "b": False, "c": False, "d": False}


def test_a_sync_that_calls_another_counts_once():
    """DeepSpeed's accelerator synchronize calls torch.cuda.synchronize, and tolist on a GPU tensor
    copies to the host through an aten op: one sync each, not two."""
    from enat.profiling import _count_calls, _restore

    class Counter:
        _inside = 0

    class Device:
        def synchronize(self):
            return "synced"

    class Accelerator:
        def synchronize(self):
            return device.synchronize()

    device, accelerator, calls = Device(), Accelerator(), []
    patched = _count_calls(Counter, [(device, "synchronize"), (accelerator, "synchronize")], calls.append)
    assert accelerator.synchronize() == "synced" and calls == ["synchronize"]
    device.synchronize()
    assert len(calls) == 2
    _restore(patched)
    accelerator.synchronize()
    assert len(calls) == 2  # no longer counted


def test_cuda_sync_counter_records_call_sites_and_nests():
    def deepspeed_like_step():
        warnings.warn(CudaSyncCounter.MESSAGE)  # what torch raises for each sync in sync debug mode

    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        with CudaSyncCounter() as outer:
            deepspeed_like_step()
            with CudaSyncCounter() as inner:
                deepspeed_like_step()
                deepspeed_like_step()
            warnings.warn("an unrelated warning")
    assert inner.total == 2 and outer.total == 3
    site = next(iter(outer.by_site))
    warn_line = deepspeed_like_step.__code__.co_firstlineno + 1
    assert site.split(" <- ")[0] == f"test_gpu_check.py:{warn_line}", site  # the frame that synced, then its callers
    assert site.split(" <- ")[1].startswith("test_gpu_check.py:"), site
    assert [str(w.message) for w in other] == ["an unrelated warning"]  # passed on, not swallowed


# ---------------------------------------------------------------------------------------------
# End to end: wheelhouse -> fresh venv (CPU torch + the GPU image's packages) -> check.sh --smoke
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_check_runs_from_the_wheelhouse_in_a_fresh_venv(tmp_path):
    from launch.gpu import wheelhouse

    wheels = tmp_path / "whl"
    subprocess.run([sys.executable, "launch/gpu/wheelhouse.py", "--out", str(wheels), "--python",
                    f"{sys.version_info.major}.{sys.version_info.minor}"], cwd=ROOT, check=True)
    manifest = json.loads((wheels / "manifest.json").read_text())
    assert manifest["total_bytes"] <= 60 * 2 ** 20
    carried = {wheelhouse.normalize(n) for n in manifest["packages"]}
    assert {"deepspeed", "webdataset", "submitit", "torch-fidelity"} <= carried
    assert not carried & {"torch", "wandb", "triton"}
    assert "typing-extensions>=4.16.0" in (wheels / "floors.txt").read_text()  # pydantic's, of the image

    # The GPU image, emulated: a CPU torch and the image's packages that the project resolves to
    # (torchvision among them, which the wheelhouse never carries).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    provided = {**manifest["provided_by_image"],
                **{n: v for n, v in manifest["never_carried"].items() if n in wheelhouse.GPU_IMAGE}}
    image = [f"{n}=={v}" for n, v in sorted(provided.items()) if n != "torch"]
    subprocess.run([python, "-m", "pip", "install", "-q", "-c", "constraints.txt", "torch==2.13.0", *image],
                   cwd=ROOT, check=True)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": python, "WHEELS": str(wheels), "DS_ACCELERATOR": "cpu"}
    for name in ("PYTHONPATH", *gpu.DIST_ENV):  # an in-process trainer of an earlier test left its port here
        env.pop(name, None)
    proc = subprocess.run(["launch/gpu/check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed the wheelhouse and the project" in proc.stdout
    no_wandb = subprocess.run([python, "-c", "import wandb"], capture_output=True)
    assert no_wandb.returncode != 0  # the runs above worked without it

    assert sorted(p.name for p in out.iterdir()) == ["check.log", "check.md", "env.json", "fid.json",
                                                     "sample.json", "syncs.json", "tokenizer.json", "train.json"]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["smoke"] and env_json["versions"]["deepspeed"] == "0.19.8"
    statuses = {n: r["status"] for n, r in env_json["runs"].items()}
    assert statuses == {"train B": "ok", "train L": "ok", "sample L": "ok", "fid B": "ok", "tokenizer f16": "ok",
                        "train L max micro-batch": "skipped", "train B compiled": "skipped",
                        "sample L compiled": "skipped", "train L compiled": "skipped"}

    train = json.loads((out / "train.json").read_text())
    for name, config in (("train B", "imagenet256_B.yaml"), ("train L", "imagenet256_L.yaml")):
        r = train[name]["result"]
        assert r["config"].endswith(config) and r["zero_stage"] == 2 and r["precision"] == "bf16"
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["tflops_per_s"] > 0
        assert set(r["syncs_by_mode"]) == {"full", "reuse"}
    syncs = json.loads((out / "syncs.json").read_text())
    assert all(row["meets_target"] for row in syncs["train"].values()), syncs["train"]
    sample = json.loads((out / "sample.json").read_text())["sample L"]["result"]
    assert set(sample["variants"]) == {"ENAT", "ENAT no reuse", "NAT"}
    assert sample["flops_ratio_vanilla_over_enat"] > 1 and sample["syncs_per_generate"] == 0
    fid = json.loads((out / "fid.json").read_text())["fid B"]["result"]
    assert fid["num_samples"] == 20 and set(fid["samples_per_s"]) == {"sampling", "decoding", "features"}
    assert fid["reference"].startswith("npz:") and fid["settings"]["extractor"] == "inception-v3-compat"
    assert fid["metrics"]["fid"] > 0
    tok = json.loads((out / "tokenizer.json").read_text())["tokenizer f16"]["result"]
    assert tok["downsample"] == 16 and tok["images_per_s"]["encode"] > 0
    md = (out / "check.md").read_text()
    for heading in ("## Training", "## Sampling", "## FID job", "## Tokenizer", "## Runs"):
        assert heading in md
