"""Rank/world/env helpers shared by train, eval and the launchers. The process group comes from
the environment (torchrun, srun through submitit, or none: a single process)."""

from __future__ import annotations

import importlib
import os
import socket
import warnings

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` ("" for every address: one other nodes can reach)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def setup_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; a bare process becomes rank 0 of 1
    with a free local port (DeepSpeed otherwise looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def close() -> None:
    """Leave the process group once every rank is done (gloo threads still alive at interpreter
    exit can abort it: 'terminate called without an active exception')."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without a process group)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def import_deepspeed():
    """deepspeed, imported the quiet way. Every import of it goes through here (it is slow to
    import and only training and ZeRO checkpoints need it, so no module imports it at its top).
    - Its accelerator is named before the import: left to detect it on a machine without a GPU,
      DeepSpeed logs "Setting accelerator to CPU ..." to stdout, into every command's output.
    - torch 2.13 deprecates `all_gather_into_tensor`, which DeepSpeed's ZeRO calls: a
      FutureWarning in every rank's log that says nothing about this project (ours call
      `all_gather_single` where torch has it)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    import deepspeed

    return deepspeed


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """All ranks' `input` concatenated into `output`: torch's current name where it has it
    (2.13 deprecates `all_gather_into_tensor`), the older one on older torch."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


def init_deepspeed_comm() -> None:
    """DeepSpeed's communication layer over the process group from the environment (NCCL on GPUs,
    gloo on CPUs), without DeepSpeed's CPU shared-memory all-reduce extension.

    That extension serves only DeepSpeed's inference all-reduce, which training never calls, and
    loading it runs a JIT build check while holding a lock file under ~/.cache/torch_extensions
    on every start: a process killed in that window leaves the lock behind and every later run
    sharing the home directory waits on it forever (a fresh machine also compiles it for
    minutes). Idempotent; the engine's own init goes through the same hook."""
    deepspeed = import_deepspeed()
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
