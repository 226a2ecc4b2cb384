"""Sweep specs: grid expansion, run names and overrides, clear errors, and the local executor's
array parallelism."""

import os
from pathlib import Path

import pytest

from conftest import ROOT
from enat.config import ConfigError, load_config
from enat.sweeps import expand, load_sweep, run_configs, run_entry


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(f"config: {ROOT}/configs/experiments/demo.yaml\n" + text)
    return path


def test_grid_expands_to_named_runs_with_tags(tmp_path):
    sweep = load_sweep(write(tmp_path, "name: g\nout_dir: out\noverrides: {train.log_every: 7}\n"
                                       "grid: {model.width: [32, 64], train.steps: [10, 20], seed: [3]}\n"
                                       "runs: [{model.width: 48, train.steps: 15, seed: 3}]\n"))
    runs = expand(sweep)
    assert [r.name for r in runs] == ["width32-steps10", "width32-steps20", "width64-steps10", "width64-steps20",
                                      "width48-steps15"]
    configs = run_configs(sweep, ["launch.nodes=2"])
    run, cfg = configs[2]
    assert (cfg.model.width, cfg.train.steps, cfg.seed, cfg.train.log_every) == (64, 10, 3, 7)
    assert cfg.train.run_dir == "out/width64-steps10" and cfg.train.wandb.group == "g"
    assert "sweep:g" in cfg.train.wandb.tags and "model.width=64" in cfg.train.wandb.tags
    assert cfg.train.wandb.sweep_point == {"model.width": 64, "train.steps": 10, "seed": 3}  # the run's wandb config
    entry = run_entry(run, cfg)
    assert entry["global_batch"] == 32 * 2 * 2 and entry["compute_budget"] == pytest.approx(
        entry["train_flops_per_sample"] * 128 * 10)


def test_runs_can_name_themselves(tmp_path):
    runs = expand(load_sweep(write(tmp_path, "name: g\nout_dir: out\nruns: [{name: small, model.width: 32}, "
                                             "{model.width: 64, train.steps: 5}]\n")))
    assert [r.name for r in runs] == ["small", "width64-steps5"]
    assert runs[0].run_dir == "out/small" and runs[0].params == {"model.width": 32}
    assert not any(o.startswith("name=") for o in runs[0].overrides)


def test_bad_specs_fail_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep keys"):
        load_sweep(write(tmp_path, "name: g\nout_dir: o\ngrid: {seed: [1]}\nmax_jobs: 3\n"))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(write(tmp_path, "name: g\nout_dir: o\ngrid: {seed: 1}\n"))
    with pytest.raises(ConfigError, match="run width33.*model.width 33 is not divisible"):
        run_configs(load_sweep(write(tmp_path, "name: g\nout_dir: o\ngrid: {model.width: [32, 33]}\n")))
    with pytest.raises(ConfigError, match="two runs would be named"):
        expand(load_sweep(write(tmp_path, "name: g\nout_dir: o\nruns: [{seed: 1}, {seed: 1}]\n")))


def record_interval(path: str, seconds: float) -> None:
    """A task of the local-array test: its start and end time, written to `path`."""
    import time

    start = time.time()
    time.sleep(seconds)
    Path(path).write_text(f"{start} {time.time()}")


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_local_arrays_honour_array_parallelism(tmp_path, monkeypatch):
    """Without SLURM the launcher itself keeps at most launch.array_parallelism tasks running."""
    from launch.submit import executor, submit_array, wait

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", ["launch.cluster=local", "launch.array_parallelism=2"])
    ex = executor(cfg, tmp_path / "logs", "par", gpus=False)
    outs = [str(tmp_path / f"t{i}") for i in range(5)]
    jobs = submit_array(ex, record_interval, outs, [1.5] * 5, poll_s=0.2)
    wait(jobs)
    spans = [tuple(map(float, Path(o).read_text().split())) for o in outs]
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most == 2 and len(jobs) == 5


def job_threads(config: dict) -> int:
    """A task of the thread test: the torch threads a launched job runs with."""
    import torch

    from launch.jobs import _config, _distributed_env

    _distributed_env(_config(config))
    return torch.get_num_threads()


def test_local_tasks_use_the_cpus_they_are_given(tmp_path, monkeypatch):
    """Local array tasks take launch.cpus_per_task threads each, not a share of the whole machine:
    two tasks of 2 threads on 2 cores ran 3x slower each than two of one thread."""
    from enat.config import to_dict
    from launch.submit import executor, submit_array, wait

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cfgs = [load_config(ROOT / "configs/experiments/demo.yaml", ["launch.cluster=local", "launch.array_parallelism=2",
                                                                  "launch.gpus_per_node=1", f"launch.cpus_per_task={n}"])
            for n in (1, 3)]
    ex = executor(cfgs[0], tmp_path / "logs", "threads", gpus=False)
    jobs = submit_array(ex, job_threads, [to_dict(c) for c in cfgs], poll_s=0.2)
    assert [j.result() for j in jobs] == [1, 3]


def job_port_of(_: int) -> str | None:
    """A task of the port test: the MASTER_PORT a job starts with."""
    return os.environ.get("MASTER_PORT")


def test_jobs_do_not_inherit_the_launchers_process_group(tmp_path, monkeypatch):
    """A launcher that is itself rank 0 of a process group (the study's planner ran trainers)
    must not hand its MASTER_PORT to the jobs: submitit would use it, a port still held."""
    from launch.submit import executor, submit_array

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    monkeypatch.setenv("MASTER_PORT", "45249")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", ["launch.cluster=local", "launch.array_parallelism=1"])
    ex = executor(cfg, tmp_path / "logs", "port", gpus=False)
    jobs = submit_array(ex, job_port_of, [0, 1], poll_s=0.2)
    assert [j.result() for j in jobs] == [None, None]
    assert os.environ["MASTER_PORT"] == "45249"  # the launcher's own environment is left as it was


def test_a_held_default_master_port_is_replaced_and_every_rank_agrees(tmp_path, monkeypatch):
    """CI failed a resubmitted job with EADDRINUSE: submitit's MASTER_PORT comes from the job id,
    and another process on the node held it. Rank 0 now takes a free port and publishes it in the
    job's folder; the other ranks use the published one, and a process group forms on it."""
    import datetime
    import socket

    import submitit
    import torch
    import torch.distributed as dist

    from enat.config import to_dict
    from launch.jobs import _config, _distributed_env

    cfg = _config(to_dict(load_config(ROOT / "configs/experiments/demo.yaml", ["launch.cluster=local"])))
    # setenv first, so that monkeypatch restores (or removes) what _distributed_env sets: a RANK=1
    # left in this process would make a later in-process run wait for its rank 0
    for k in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "DS_ACCELERATOR"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's threads
    env = dict(SUBMITIT_EXECUTOR="slurm", SUBMITIT_FOLDER=str(tmp_path / "%j"), SLURM_JOB_ID="95", SLURM_NTASKS="2",
               SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_LOCALID="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "95").mkdir()
    default = submitit.helpers.TorchDistributedEnvironment().master_port
    chosen = {}
    with socket.socket() as held:
        held.bind(("", default))
        held.listen()
        for rank in (0, 1):  # rank 1 reads what rank 0 published
            monkeypatch.setenv("SLURM_PROCID", str(rank))
            monkeypatch.delenv("MASTER_PORT", raising=False)  # each task starts without one
            _distributed_env(cfg)
            chosen[rank] = int(os.environ["MASTER_PORT"])
    assert chosen[0] == chosen[1] != default
    store = dist.TCPStore("127.0.0.1", chosen[0], 1, True, timeout=datetime.timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    del store
    # A requeued job (same id, next restart) chooses again: the default, now free.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for rank in (0, 1):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.delenv("MASTER_PORT", raising=False)
        _distributed_env(cfg)
        assert int(os.environ["MASTER_PORT"]) == default
    # Once every rank has joined, rank 0 removes the note: a restart under the same id and count
    # (the local executor's requeue) waits for the new start's rank 0 instead of reading it.
    from launch.jobs import _forget_master_port, _master_port

    monkeypatch.setenv("SLURM_PROCID", "0")
    _forget_master_port(submitit.JobEnvironment())
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(RuntimeError, match="did not publish its MASTER_PORT"):
        _master_port(submitit.JobEnvironment(), default, wait_s=0.5)
