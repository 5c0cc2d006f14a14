"""Fixed-grid ODE solvers for dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

Every call integrates in fp32 and returns the exact number of velocity evaluations (NFE).
A solver takes the grid it is given: `steps` intervals are always `steps` intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SolverResult:
    """The state at the end of the grid and the number of velocity evaluations spent."""

    x: torch.Tensor
    nfe: int


def _euler(v: Velocity, x, t0, t1):
    return x + (t1 - t0) * v(x, t0)


def _midpoint(v: Velocity, x, t0, t1):
    h = t1 - t0
    return x + h * v(x + h / 2 * v(x, t0), t0 + h / 2)


def _heun(v: Velocity, x, t0, t1):
    h = t1 - t0
    k1 = v(x, t0)
    k2 = v(x + h * k1, t1)
    return x + h / 2 * (k1 + k2)


def _rk4(v: Velocity, x, t0, t1):
    h = t1 - t0
    k1 = v(x, t0)
    k2 = v(x + h / 2 * k1, t0 + h / 2)
    k3 = v(x + h / 2 * k2, t0 + h / 2)
    k4 = v(x + h * k3, t1)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


# name -> (one step, velocity evaluations per step)
SOLVERS = {"euler": (_euler, 1), "midpoint": (_midpoint, 2), "heun": (_heun, 2), "rk4": (_rk4, 4)}


def uniform_grid(steps: int) -> torch.Tensor:
    """0 = t_0 < t_1 < ... < t_steps = 1, equally spaced."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64)


@torch.no_grad()
def integrate(velocity: Velocity, x0: torch.Tensor, grid: torch.Tensor, solver: str = "euler") -> SolverResult:
    """Integrate dx/dt = velocity(x, t) over `grid` (a monotone 1-D tensor of times), t of shape (N,)."""
    step, evals = SOLVERS[solver]
    calls = 0

    def v(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, torch.full((x.shape[0],), float(t), device=x.device)).float()

    x = x0.float()
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = step(v, x, t0, t1)
    assert calls == evals * (len(grid) - 1)
    return SolverResult(x=x, nfe=calls)


@torch.no_grad()
def generate(model: Callable, x0: torch.Tensor, steps: int, solver: str = "euler",
             y: torch.Tensor | None = None) -> SolverResult:
    """Samples from noise x0 with `model(x, t, y)` on a uniform grid of `steps` intervals."""
    return integrate(lambda x, t: model(x, t, y), x0, uniform_grid(steps).to(x0.device), solver)
