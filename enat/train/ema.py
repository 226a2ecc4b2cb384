"""Exponential moving average of the weights, sized to scale with ZeRO.

    ema = EMA(model, decay)            # before deepspeed.initialize, from the fresh fp32 model
    engine, ... = deepspeed.initialize(model=model, ...)
    ema.attach(engine, zero_stage)     # once, before any checkpoint load
    ...
    engine.step(); ema.update()        # after each successful optimizer step
    prev = ema(prev_ids, labels, logits="none")   # the reuse-mode z_prev pass
    with ema.full_model() as m: ...    # validation, sampling (collective under ZeRO-3)
    ema.state_dict() / ema.load_state_dict(state)  # full fp32 dict (collective under ZeRO-3)

What lives where (P parameters, W data-parallel ranks):

* ZeRO 0/1/2: `ema.model` is a full fp32 copy of the network on the engine's device, 4P bytes per
  rank. `update()` is `torch._foreach_lerp_` towards the module's parameters (cast to fp32: the
  bf16 working weights in bf16 runs, as before). No communication: every rank holds the full
  online weights already, so every rank computes the same EMA.

* ZeRO-3: the EMA is sharded exactly like the optimizer's fp32 master partitions: one flat fp32
  tensor per optimizer sub-group, the same length as `optimizer.fp32_partitioned_groups_flat[i]`
  and on the same device, parameter after parameter in the order of `optimizer.fp16_groups[i]`,
  each taking `param.partition_numel()` elements (its `ds_tensor`: elements
  [rank*n, (rank+1)*n) of the flattened parameter; past its end, padding). Memory: 4P/W bytes
  per rank (plus < W padding elements per parameter). `update()` lerps each local shard towards
  its local fp32 master partition: no collective, 0 bytes moved. In bf16 runs this averages the
  fp32 masters, not the bf16 working copies. In fp32 runs DeepSpeed 0.19.8 keeps a separate fp32
  master as well (the "reuse the working partition" branch of `_create_fp32_partitions` compares
  a torch.device with a str and is never taken) and copies it into the working partition after
  every step, so the values equal those of averaging the gathered working weights, bit for bit.
  If a later version shares the buffer, nothing changes here.

  The network itself is kept as a shell: the same module structure with empty parameters.
  Calling the EMA gathers one natural unit at a time (the root's own parameters, and every child:
  `embed`, `label_embed`, `reuse_proj`, `head`, each element of the `encoder`/`decoder`
  ModuleLists) with one all-gather per unit in the training dtype (bf16 in bf16 runs, else fp32)
  and frees it after the unit ran: extra memory is about one unit, and the bytes received are at
  most 1x the model per call. Units that are not called are not gathered: in eval mode a
  full-mode pass skips `reuse_proj`, and `logits="none"` skips `head` (ENAT's z_prev pass: about
  0.9x of the tiny model). Only reuse-mode steps call it, once per micro-batch, so a reuse step
  receives grad_accum x (<= 1x the model) in that dtype and other steps 0. A parameter used by
  more than one unit (the tied token table that `head` reads: DeepSpeed is told through
  `deepspeed.zero.register_external_parameter`, and we read that registration back from the
  engine's module) stays gathered from first use to the end of the call, so it is gathered
  once. `full_model()` gathers everything in fp32 for validation/sampling and frees it on exit;
  `state_dict()` gathers unit by unit to CPU. These are collectives, and so is every EMA call:
  all ranks must make the same calls with the same sequence of module calls (as for the online
  ZeRO-3 model). `load_state_dict()` is local: each rank cuts its partition out of the full
  tensors, so a checkpoint of any world size or stage loads.

Checkpoint format (all stages): {"decay": float, "model": {state_dict key: full fp32 CPU
tensor}} with the network's own state_dict keys, so `enat export`, the FID job and runs with a
different world size or ZeRO stage read and write it alike.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from enat.dist import all_gather_single

_CAST_CHUNK = 1 << 26  # elements cast to fp32 at a time by the ZeRO 0/1/2 update (256 MB)


@dataclass
class _Slot:
    """Where one parameter's EMA lives under ZeRO-3: elements [rank*part, (rank+1)*part) of the
    flattened parameter (padded to world*part) sit at shards[group][offset:offset+part]."""

    name: str
    param: nn.Parameter  # the shell's parameter: empty unless gathered
    group: int
    offset: int
    part: int
    numel: int
    shape: torch.Size
    pg: object
    rank: int
    world: int


@dataclass
class _Unit:
    module: nn.Module
    needs: list[int]  # slots to gather before the unit runs
    frees: list[int]  # slots to free after it ran (needs minus those other units also use)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise RuntimeError("EMA(model) must be built from the plain model before deepspeed.initialize "
                               "(and outside deepspeed.zero.Init): its parameters are already ZeRO-partitioned")
        self.decay = float(decay)
        self._model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.zero_stage: int | None = None  # set by attach()
        self._sharded = False

    # --------------------------------------------------------------------------------------
    # setup

    @property
    def model(self) -> nn.Module:
        """The full fp32 EMA network (ZeRO 0/1/2, or before attach()). Under ZeRO-3 there is no
        full copy: call the EMA itself, or use `with ema.full_model() as m`."""
        if self._sharded:
            raise RuntimeError("under ZeRO-3 the EMA is sharded and has no full .model: call ema(...) for a "
                               "forward, or use `with ema.full_model() as m:` (a collective) for a full network")
        return self._model

    @property
    def sharded(self) -> bool:
        return self._sharded

    def attach(self, engine, zero_stage: int) -> None:
        """Bind to the DeepSpeed engine; call once right after deepspeed.initialize and before
        loading a checkpoint into the EMA."""
        if self.zero_stage is not None:
            raise RuntimeError("EMA.attach() called twice")
        actual = engine.zero_optimization_stage()
        if actual != zero_stage:
            raise ValueError(f"EMA.attach(zero_stage={zero_stage}) but the engine runs ZeRO stage {actual}")
        self._engine = engine
        self._device = engine.device
        online = engine.module
        if zero_stage < 3:
            self._model.to(self._device)
            ema_named, online_named = list(self._model.named_parameters()), list(online.named_parameters())
            if [n for n, _ in ema_named] != [n for n, _ in online_named]:
                raise RuntimeError("the EMA and the engine's module have different parameters")
            self._ema_params = [p for _, p in ema_named]
            self._online_params = [p for _, p in online_named]
        else:
            self._attach_zero3(engine)
        self.zero_stage = zero_stage

    def _attach_zero3(self, engine) -> None:
        opt = engine.optimizer
        needed = ("fp16_groups", "fp16_partitioned_groups_flat_numel", "fp32_partitioned_groups_flat")
        if not all(hasattr(opt, a) for a in needed):
            raise RuntimeError(f"ZeRO-3 EMA needs DeepSpeed's stage-3 optimizer (attributes {needed}); the engine "
                               f"has {type(opt).__name__}")
        online = engine.module
        names = {id(p): n for n, p in online.named_parameters()}
        shell = dict(self._model.named_parameters())
        slots: list[_Slot] = []
        for g, params in enumerate(opt.fp16_groups):
            master = opt.fp32_partitioned_groups_flat[g]
            expect = opt.fp16_partitioned_groups_flat_numel[g]
            # The masters must be resident fp32 tensors: NVMe optimizer offload keeps an empty
            # placeholder between steps, and bf16/fp16 master options change the dtype.
            if master.dtype != torch.float32 or master.numel() != expect:
                raise RuntimeError(
                    f"ZeRO-3 EMA: optimizer sub-group {g} has no resident fp32 master partition (found "
                    f"{master.dtype} with {master.numel()} elements, expected float32 with {expect}); NVMe "
                    f"optimizer offload and non-fp32 master weights are not supported")
            offset = 0
            for p in params:
                name = names.get(id(p))
                if name is None or name not in shell:
                    raise RuntimeError("ZeRO-3 EMA: an optimizer parameter is not a parameter of the EMA network")
                part = p.partition_numel()
                world = dist.get_world_size(group=p.ds_process_group)
                if part * world < p.ds_numel or part * world - p.ds_numel >= world:
                    raise RuntimeError(f"ZeRO-3 EMA: unexpected partitioning of {name}: {part} x {world} ranks "
                                       f"for {p.ds_numel} elements")
                if tuple(shell[name].shape) != tuple(p.ds_shape):
                    raise RuntimeError(f"ZeRO-3 EMA: {name} has shape {tuple(p.ds_shape)} in the engine, "
                                       f"{tuple(shell[name].shape)} in the EMA")
                slots.append(_Slot(name, shell[name], g, offset, part, p.ds_numel, torch.Size(p.ds_shape),
                                   p.ds_process_group, dist.get_rank(group=p.ds_process_group), world))
                offset += part
            if offset != expect:
                raise RuntimeError(f"ZeRO-3 EMA: sub-group {g} partitions sum to {offset}, the flat partition "
                                   f"holds {expect}")
        covered = [s.name for s in slots]
        if sorted(covered) != sorted(shell):
            missing = sorted(set(shell) - set(covered))
            raise RuntimeError(f"ZeRO-3 EMA: every parameter must be trained by the optimizer (its fp32 "
                               f"master is what the EMA follows); not in the optimizer: {missing[:5]}"
                               if missing else "ZeRO-3 EMA: a parameter appears twice in the optimizer")

        # The EMA shards start as copies of the masters (= the initial weights) and live on the
        # masters' device, so update() never moves data between devices or ranks.
        self._opt = opt
        self._shards = [m.detach().clone() for m in opt.fp32_partitioned_groups_flat]
        self._slots = slots
        self._live: set[int] = set()  # slots whose shell parameter currently holds gathered data
        self._full = False  # inside full_model(): everything gathered in fp32, hooks stand still
        self._dtype = (torch.bfloat16 if engine.bfloat16_enabled() else
                       torch.float16 if engine.fp16_enabled() else torch.float32)
        for s in slots:  # drop the full copy: this is where the memory goes from 4P to 4P/W
            s.param.data = torch.empty(0, dtype=torch.float32, device=self._device)
        self._model.to(self._device)  # buffers only; the parameters are empty now
        self._aliases = {}  # slot -> every state_dict name of that parameter (shared parameters)
        slot_of = {id(s.param): i for i, s in enumerate(slots)}
        for n, p in self._model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(slot_of[id(p)], []).append(n)
        self._units = self._make_units(online, names, slot_of)
        self._sharded = True

    def _make_units(self, online: nn.Module, names: dict, slot_of: dict) -> list[_Unit]:
        root = self._model
        # The root is a unit too: its own parameters, and external ones registered on it
        # (DeepSpeed registers the tied token table on the root itself once it sees the table
        # passed around inside the root's forward).
        found: list[tuple[str, nn.Module, list[int]]] = [
            ("", root, [slot_of[id(p)] for p in root.parameters(recurse=False)])]
        for cname, child in root.named_children():
            # ModuleList/ModuleDict are never called themselves: their elements are the units.
            members = (list(child.named_children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict))
                       else [(None, child)])
            for mname, m in members:
                own = [slot_of[id(p)] for p in m.parameters()]
                if own:
                    found.append((cname if mname is None else f"{cname}.{mname}", m, own))
        owned = [i for _, _, own in found for i in own]
        if sorted(set(owned)) != list(range(len(self._slots))):
            raise RuntimeError("ZeRO-3 EMA: could not assign every parameter to one forward unit")

        # Parameters a module uses outside its own subtree, as declared to DeepSpeed.
        def unit_of(module_name: str) -> int:
            best, best_len = 0, 0  # the root contains every module
            for k, (uname, _, _) in enumerate(found):
                if (module_name == uname or module_name.startswith(uname + ".")) and len(uname) > best_len:
                    best, best_len = k, len(uname)
            return best

        needs = [list(own) for _, _, own in found]
        for mname, m in online.named_modules():
            for p in getattr(m, "_external_params", {}).values():
                i = slot_of[id(self._model.get_parameter(names[id(p)]))]
                k = unit_of(mname)
                if i not in needs[k]:
                    needs[k].append(i)
        users: dict[int, int] = {}
        for n in needs:
            for i in n:
                users[i] = users.get(i, 0) + 1
        # Used by more than one unit: keep from first gather to the end of the call.
        units = [_Unit(m, n, [i for i in n if users[i] == 1]) for (_, m, _), n in zip(found, needs) if n]
        for u in units:
            u.module.register_forward_pre_hook(lambda mod, args, u=u: self._pre_unit(u))
            u.module.register_forward_hook(lambda mod, args, out, u=u: self._post_unit(u))
        return units

    # --------------------------------------------------------------------------------------
    # the average

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after a successful optimizer step. Never a collective."""
        if self.zero_stage is None:
            raise RuntimeError("call ema.attach(engine, zero_stage) after deepspeed.initialize before ema.update()")
        weight = 1.0 - self.decay
        if self._sharded:
            # Read the list each time: DeepSpeed may rebind its elements (offload_states, loads).
            masters = [m.detach() for m in self._opt.fp32_partitioned_groups_flat]
            torch._foreach_lerp_(self._shards, masters, weight)
        else:
            # .to() is a no-op for fp32 parameters on the EMA's device (no copy in fp32 runs);
            # bf16 working weights are cast in chunks, so the fp32 temporaries stay bounded
            # instead of a second full fp32 model.
            ema, online, numel = [], [], 0
            for e, p in zip(self._ema_params, self._online_params):
                ema.append(e)
                online.append(p.detach().to(device=e.device, dtype=torch.float32))
                if p.dtype != torch.float32 or p.device != e.device:  # a temporary copy
                    numel += p.numel()
                if numel >= _CAST_CHUNK:
                    torch._foreach_lerp_(ema, online, weight)
                    ema, online, numel = [], [], 0
            if ema:
                torch._foreach_lerp_(ema, online, weight)

    # --------------------------------------------------------------------------------------
    # running the EMA network

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Run the EMA network without gradients; arguments go to the network unchanged.
        Under ZeRO-3 a collective (see the module docstring)."""
        with torch.no_grad():
            if not self._sharded:
                return self._model(*args, **kwargs)
            try:
                return self._model(*args, **kwargs)
            finally:
                if not self._full:  # also after an exception in the middle of a forward
                    self._release(list(self._live))

    def _pre_unit(self, u: _Unit) -> None:
        if not self._full:
            self._gather_into([i for i in u.needs if i not in self._live], self._dtype)

    def _post_unit(self, u: _Unit) -> None:
        if not self._full:
            self._release([i for i in u.frees if i in self._live])

    @contextlib.contextmanager
    def full_model(self):
        """Yields an nn.Module with the full fp32 EMA weights on the device. ZeRO 0/1/2: the
        EMA model itself. ZeRO-3: the shell, gathered in fp32 (a collective on entry; freed on
        exit), so all ranks must enter it together."""
        if not self._sharded:
            yield self.model
            return
        if self._full:  # nested: already materialised
            yield self._model
            return
        self._release(list(self._live))
        try:
            for u in self._units:  # unit by unit bounds the transient gather buffer
                self._gather_into([i for i in u.needs if i not in self._live], torch.float32)
            self._full = True
            yield self._model
        finally:
            self._full = False
            self._release(list(self._live))

    def _gather(self, idx: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """Full tensors of the given slots: one all-gather per process group (the slots' local
        pieces concatenated), then each parameter cut out of the rank-major result."""
        out: list[torch.Tensor | None] = [None] * len(idx)
        groups: dict[int, list[int]] = {}
        for j, i in enumerate(idx):
            groups.setdefault(id(self._slots[i].pg), []).append(j)
        for js in groups.values():
            slots = [self._slots[idx[j]] for j in js]
            world = slots[0].world
            local = torch.cat([self._shards[s.group].narrow(0, s.offset, s.part) for s in slots])
            local = local.to(device=self._device, dtype=dtype)
            if world > 1:
                full = torch.empty(world * local.numel(), dtype=dtype, device=self._device)
                all_gather_single(full, local, group=slots[0].pg)
            else:
                full = local
            rows = full.view(world, -1)  # row r = rank r's pieces of these slots
            col = 0
            for j, s in zip(js, slots):
                # Its own buffer per parameter (so freeing one frees its memory); the tail holds
                # the < world padding elements, which the view leaves out.
                buf = torch.empty(world * s.part, dtype=dtype, device=self._device)
                buf.view(world, s.part).copy_(rows[:, col:col + s.part])
                out[j] = buf[:s.numel].view(s.shape)
                col += s.part
        return out

    def _gather_into(self, idx: list[int], dtype: torch.dtype) -> None:
        if not idx:
            return
        for i, t in zip(idx, self._gather(idx, dtype)):
            self._slots[i].param.data = t
            self._live.add(i)

    def _release(self, idx) -> None:
        for i in idx:
            self._slots[i].param.data = torch.empty(0, dtype=torch.float32, device=self._device)
            self._live.discard(i)

    def memory_bytes(self) -> int:
        """Bytes of EMA weights this rank holds between calls."""
        if self._sharded:
            return sum(t.numel() * t.element_size() for t in self._shards)
        return sum(p.numel() * p.element_size() for p in self._model.parameters())

    # --------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        """{"decay", "model": full fp32 CPU state dict of the network}. Under ZeRO-3 a
        collective (every rank gathers, unit by unit, and gets the full dict)."""
        if not self._sharded:
            return {"decay": self.decay,
                    "model": {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}}
        gathered: dict[str, torch.Tensor] = {}
        for u in self._units:
            own = [i for i in u.needs if self._aliases[i][0] not in gathered]
            for i, t in zip(own, self._gather(own, torch.float32)):
                t = t.cpu().clone()
                for n in self._aliases[i]:
                    gathered[n] = t
        model = {}
        for k, v in self._model.state_dict().items():  # the network's key order; buffers as they are
            model[k] = gathered[k] if k in gathered else v.detach().cpu().clone()
        return {"decay": self.decay, "model": model}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load the full format of state_dict(), whatever world size or stage wrote it. Under
        ZeRO-3 each rank copies its own partition out of the full tensors (no communication)."""
        self.decay = float(state["decay"])
        sd = state["model"]
        if not self._sharded:
            self._model.load_state_dict(sd)
            return
        if self._live:
            raise RuntimeError("EMA.load_state_dict inside full_model() or a forward")
        keys = list(self._model.state_dict().keys())
        missing, unexpected = sorted(set(keys) - set(sd)), sorted(set(sd) - set(keys))
        if missing or unexpected:
            raise RuntimeError(f"EMA state dict does not match the network: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        for s in self._slots:
            t = sd[s.name]
            if tuple(t.shape) != tuple(s.shape):
                raise RuntimeError(f"EMA state dict: {s.name} has shape {tuple(t.shape)}, the network "
                                   f"{tuple(s.shape)}")
            flat = t.detach().reshape(-1)
            lo, hi = s.rank * s.part, min((s.rank + 1) * s.part, s.numel)
            dst = self._shards[s.group].narrow(0, s.offset, s.part)
            dst.zero_()  # padding
            if hi > lo:
                dst[:hi - lo].copy_(flat[lo:hi])
        params = {n for names in self._aliases.values() for n in names}
        rest = {k: v for k, v in sd.items() if k not in params}
        if rest:
            self._model.load_state_dict(rest, strict=False)
