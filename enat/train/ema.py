"""Exponential moving average of the weights, correct under every ZeRO stage.

The EMA is kept gathered: a full fp32 copy of the network on every rank (what reuse-mode steps
need for z_prev, and what sampling and export use). Under ZeRO-3 each rank holds only a shard
of the online weights, so the update gathers them block by block (deepspeed.zero.
GatheredParameters) before averaging; otherwise it reads them directly. Memory: one fp32 copy
of the model per rank (4 GB at XL)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # One top-level child at a time bounds the gathered memory to the largest child.
            for (name, child), ema_child in zip(online.named_children(), self.model.children()):
                params = list(child.parameters())
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    self._lerp(ema_child.parameters(), params)
            own = [p for n, p in online.named_parameters(recurse=False)]
            if own:
                with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                    self._lerp(self.model.parameters(recurse=False), own)
        else:
            self._lerp(self.model.parameters(), online.parameters())

    def _lerp(self, ema_params, params) -> None:
        ema_params, params = list(ema_params), list(params)
        if len(ema_params) != len(params):
            raise RuntimeError("EMA and online model have different parameter lists")
        for e, p in zip(ema_params, params):
            e.lerp_(p.detach().to(e.device, torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
