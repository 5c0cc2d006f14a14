"""Exponential moving average of the weights: an explicit frozen copy, updated after optimizer.step()."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ, on every parameter and floating buffer."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.model.state_dict().values() if p.is_floating_point()]
        new = [p for p in model.state_dict().values() if p.is_floating_point()]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)
