"""Exponential moving average of the weights: an explicit frozen copy, updated after optimizer.step()."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ on every parameter and floating buffer.

    With `warmup`, the decay at update n (1-based) is d_n = min(decay, (1 + n) / (10 + n)), so the
    average forgets the random initial weights quickly instead of carrying e^(−n(1−decay)) of them
    (5% after 3,000 steps at 0.999); the fixed decay takes over from step (10·decay − 1) / (1 − decay)
    (8,990 at 0.999).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # (source model, its tensors, ours), listed at the first update: walking the module tree costs
        # milliseconds of host time per step, and training and loading weights update the tensors in place.
        self._pairs: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """Update n (1-based: the optimizer step just taken)."""
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, self._tensors(model), self._tensors(self.model))
        _, source, ours = self._pairs
        torch._foreach_lerp_(ours, source, 1.0 - self.decay_at(n))
