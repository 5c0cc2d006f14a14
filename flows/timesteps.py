"""Training densities of t ∈ (0, 1) (t = 0 noise, t = 1 data).

Each draws n times from a torch.Generator; the objective calls it once per micro-step.
"""

from __future__ import annotations

import math

import torch


class UniformTime:
    """t ~ U(0, 1), as in I-CFM and rectified flow."""

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device)


class LogitNormalTime:
    """t = sigmoid(m + s·ε), ε ~ N(0, 1) (SD3, Esser et al. 2024, eq. 19).

    Our t runs from noise to data, SD3's from data to noise: SD3's location m is our −m.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))


class ModeTime:
    """SD3's mode density with heavy tails (Esser et al. 2024, eq. 20):
    t = 1 − u − s·(cos²(πu/2) − 1 + u), u ~ U(0, 1). Symmetric about 1/2; s = 0 is uniform."""

    def __init__(self, scale: float = 1.29):
        self.scale = scale

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=device)
        return 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


class GridTime:
    """t uniform on the grid {0, 1/k, ..., (k − 1)/k}: the start times of k Euler steps. With reflow pairs this is
    k-step distillation (Liu et al. 2023, §3.3: for k = 1, t = 0 and the loss fits x0 + v(x0, 0) to x1)."""

    def __init__(self, steps: int = 1):
        self.steps = steps

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.steps, (n,), generator=generator, device=device).float() / self.steps
