"""What the CPU can count of GPU behaviour: host syncs, collectives and compiled graphs.

A GPU runs ahead of Python only while nothing asks it for a value. `SyncCounter` records the aten
ops that make the host wait for the device (a scalar read, a data-dependent output shape) and
every explicit device synchronize; `CollectiveCounter` records each collective (c10d op) with
its bytes. Both work the same on CPU, so tests and `enat.bench train` prove the training step's
shape without a GPU. `CudaSyncCounter` is the device's own count on a GPU (CUDA's sync debug mode:
every call that blocks the host on the device, DeepSpeed's streams and events included), by call
site. `count_graphs` asks dynamo how many graphs (and breaks) a function compiles to.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for: a scalar copied out, or an output whose shape depends
# on the values (the allocation needs them first).
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), .tolist()
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    aten.allclose.default,
}
BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()) if i is not None)


COPY_OPS = {aten._to_copy.default, aten.copy_.default}


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator to the host (invisible on a CPU-only machine, where `tolist`
    is counted instead)."""
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


class SyncCounter(TorchDispatchMode):
    """Counts host-sync-forcing ops (and device synchronize calls) while active.

        with SyncCounter() as syncs:
            step()
        syncs.total, syncs.by_op, syncs.where[:3]

    `where` keeps a short stack of the first calls, to find the culprit."""

    def __init__(self, keep_stacks: int = 20):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.where: list[str] = []
        self.keep_stacks = keep_stacks
        self._patched: list = []
        self._inside = 0  # > 0 inside a call already counted (tolist's copy to the host is not a second sync)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _record(self, name: str) -> None:
        self.by_op[name] += 1
        if len(self.where) < self.keep_stacks:
            self.where.append(f"{name} at {_call_site(4)}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside:
            pass
        elif func in SYNC_OPS:
            self._record(func.name())
        elif func in BOOL_INDEX_OPS and _has_bool_index(args):
            self._record(func.name() + "[bool]")
        elif func in COPY_OPS and _device_to_host(func, args, kwargs):
            self._record(func.name() + "[to host]")
        return func(*args, **kwargs)

    def __enter__(self):
        # Tensor.tolist reads the data without an aten op on CPU: count it at the Python level.
        self._patched += _count_calls(self, [(torch.Tensor, "tolist")], lambda name: self._record(f"{name}()"))
        self._patched += _count_calls(self, _synchronize_functions(), lambda name: self._record(f"{name}()"))
        return super().__enter__()

    def __exit__(self, *exc):
        _restore(self._patched)
        return super().__exit__(*exc)


def _call_site(depth: int) -> str:
    """The innermost `depth` frames outside torch and this module, innermost first."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
              and "profiling.py" not in f.filename and "warnings.py" not in f.filename][-depth:]
    return " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(frames))


def _count_calls(counter, targets, record) -> list:
    """Replace each (owner, name) by a wrapper that calls record(name) once per outermost call
    (a synchronize that calls another synchronize, or a tolist whose copy is an aten op, counts
    once), through counter._inside. Returns what _restore needs."""
    patched = []
    for owner, name in targets:
        original = getattr(owner, name)

        def counted(*a, _original=original, _name=name, **k):
            if counter._inside:
                return _original(*a, **k)
            counter._inside += 1
            try:
                record(_name)
                return _original(*a, **k)
            finally:
                counter._inside -= 1

        setattr(owner, name, counted)
        patched.append((owner, name, original))
    return patched


def _restore(patched: list) -> None:
    for owner, name, original in reversed(patched):
        setattr(owner, name, original)
    patched.clear()


class CudaSyncCounter:
    """Counts the host-device synchronizations CUDA itself sees while active, by call site:
    `torch.cuda.set_sync_debug_mode("warn")` makes every implicit one (a copy to the host, a scalar
    read, a data-dependent shape, a stream synchronize) raise a warning, recorded here with the
    first frames outside torch; the explicit ones it does not flag (`torch.cuda.synchronize`, which
    DeepSpeed's accelerator calls, and `torch.cuda.Event.synchronize`) are counted at the Python
    level. Unlike `SyncCounter` it needs no dispatch mode, so compiled code is counted as it runs
    (a dispatch mode makes dynamo run the frame eagerly). Without CUDA it counts nothing but those
    warnings and calls (`available` says whether CUDA is there).

        with CudaSyncCounter() as syncs:
            step()
        syncs.total, syncs.by_site"""

    MESSAGE = "called a synchronizing CUDA operation"
    EXPLICIT = ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"))

    def __init__(self):
        self.available = torch.cuda.is_available()
        self.by_site: Counter[str] = Counter()
        self._saved = None
        self._patched: list = []
        self._inside = 0

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if self.MESSAGE not in str(message):
            return self._show_other(message, category, filename, lineno, file, line)
        self.by_site[_call_site(3) or f"{filename}:{lineno}"] += 1
        if isinstance(getattr(self._show_other, "__self__", None), CudaSyncCounter):  # nested: the outer counts too
            self._show_other(message, category, filename, lineno, file, line)

    def __enter__(self):
        self._saved = (torch.cuda.get_sync_debug_mode() if self.available else None, warnings.catch_warnings())
        self._saved[1].__enter__()  # restores the filters and showwarning on exit
        warnings.filterwarnings("always", message=".*" + self.MESSAGE)
        self._show_other = warnings.showwarning
        warnings.showwarning = self._show
        self._patched = _count_calls(self, self.EXPLICIT, lambda name: self.by_site.update(
            [f"{name}() at {_call_site(3)}"]))
        if self.available:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.available:
            torch.cuda.set_sync_debug_mode(self._saved[0])
        _restore(self._patched)
        self._saved[1].__exit__(*exc)
        return False


def _synchronize_functions():
    """Explicit device synchronizes: torch.cuda's, and DeepSpeed's accelerator (its timers)."""
    out = [(torch.cuda, "synchronize")]
    try:  # deepspeed: optional here (the counters work without it), and slow to import
        from enat.dist import import_deepspeed

        out.append((import_deepspeed().accelerator.get_accelerator(), "synchronize"))
    except ImportError:
        pass
    return out


class CollectiveCounter(TorchDispatchMode):
    """Counts collectives and the bytes they deliver, at the dispatcher (c10d ops), so it sees
    every caller: the trainer's, DeepSpeed's (whose comm layer holds its own references to the
    torch.distributed functions) and object collectives (tensors underneath).

        with CollectiveCounter() as comm:
            ema.update()
        comm.calls, comm.bytes, comm.by_name

    Bytes are those of the op's first argument: the output of a gather or reduce-scatter (what
    arrives at this rank), the tensors of an all-reduce or broadcast."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.bytes_by_name: Counter[str] = Counter()

    @property
    def calls(self) -> int:
        return sum(self.by_name.values())

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_name.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and args:
            name = func.name().removeprefix("c10d::")
            self.by_name[name] += 1
            self.bytes_by_name[name] += sum(t.numel() * t.element_size() for t in _tensors(args[0]))
        return func(*args, **(kwargs or {}))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)


def count_graphs(fn, *args, **kwargs) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, break reasons) dynamo makes of fn(*args, **kwargs)."""
    import torch._dynamo  # dynamo: about 2 s to import, only for counting graphs (the sync counters do without)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [str(getattr(b, "reason", b)) for b in explanation.break_reasons]
    return explanation.graph_count, explanation.graph_break_count, reasons
