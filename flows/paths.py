"""Probability paths between noise and data.

Conventions, used everywhere in the toolkit:
- Time t ∈ [0, 1]; t = 0 is noise (x0), t = 1 is data (x1).
- x_t = α_t·x1 + σ_t·x0 and the target velocity u_t = α̇_t·x1 + σ̇_t·x0.
- I-CFM / rectified flow (Lipman et al. 2023, eq. 20; Liu et al. 2023): α_t = t,
  σ_t = 1 − (1 − σ_min)·t, so u_t = x1 − (1 − σ_min)·x0. σ_min = 0 is rectified flow.
- A model maps (x, t, y) to a velocity of x's shape: `model(x, t, y=None) -> v`, t of shape (N,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PathSample:
    """A point on the path: t (N,), endpoints x0 and x1, x_t and the target velocity u_t (N, ...)."""

    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    x_t: torch.Tensor
    u_t: torch.Tensor


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View t (N,) as (N, 1, ..., 1) so that it broadcasts against x (N, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class LinearPath:
    """Straight line from x0 to x1 with σ_min noise left at t = 1 (I-CFM; rectified flow when 0)."""

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = sigma_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.sigma_min) * t

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        tt = expand_like(t, x1)
        x_t = tt * x1 + (1 - (1 - self.sigma_min) * tt) * x0
        u_t = x1 - (1 - self.sigma_min) * x0
        return PathSample(t=t, x0=x0, x1=x1, x_t=x_t, u_t=u_t)
