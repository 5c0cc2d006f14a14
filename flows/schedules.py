"""Sampling time grids: where the solver evaluates the velocity between t = 0 (noise) and t = 1 (data).

Every schedule returns a float64 tensor of `steps + 1` strictly increasing times from exactly 0 to
exactly 1, so `steps` is always the number of intervals. A schedule is named with optional
parameters, as on the command line: `logit_normal`, `logit_normal:mean=0.5,std=1`, `sd3_shift:shift=3`.

    python -m flows.schedules --steps 20 --out schedules.png      # draws them all in one picture
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from errors import UserError


def _u(steps: int) -> torch.Tensor:
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64)


def linear(steps: int) -> torch.Tensor:
    """Equal steps."""
    return _u(steps)


def cosine(steps: int) -> torch.Tensor:
    """S-shaped: t = (1 − cos πu) / 2, small steps at both ends."""
    return (1 - torch.cos(math.pi * _u(steps))) / 2


def polynomial(steps: int, power: float = 2.0) -> torch.Tensor:
    """S-shaped: u^p rising to 1/2 at u = 1/2, mirrored above, small steps at both ends."""
    u = _u(steps)
    return torch.where(u < 0.5, 0.5 * (2 * u) ** power, 1 - 0.5 * (2 - 2 * u) ** power)


def inverse_cubic(steps: int) -> torch.Tensor:
    """Large steps first: t = 1 − (1 − u)³, steps shrinking towards the data."""
    return 1 - (1 - _u(steps)) ** 3


def inverse_exp(steps: int, rate: float = 3.0) -> torch.Tensor:
    """Large steps first: t = (1 − e^(−ku)) / (1 − e^(−k))."""
    return -torch.expm1(-rate * _u(steps)) / -math.expm1(-rate)


def logit_normal(steps: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Quantiles of the logit-normal density (mean, std): t_i = sigmoid(mean + std · Φ⁻¹(i / steps)).
    Small steps where the density is high (the middle), large ones at the ends: the inverted S."""
    u = _u(steps)
    inner = torch.sigmoid(mean + std * math.sqrt(2) * torch.erfinv(2 * u[1:-1] - 1))
    return torch.cat([u[:1], inner, u[-1:]])


def edm(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM) eq. 5: σ_i = (σ_max^(1/ρ) + i/steps · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, mapped to
    this path's time by σ = (1 − t) / t (x_t / t = x1 + σ·x0), t = 1 / (1 + σ); the ends are set to 0 and 1."""
    u = _u(steps)
    sigma = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = 1 / (1 + sigma)
    t[0], t[-1] = 0.0, 1.0
    return t


def sd3_shift(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The timestep shift of Esser et al. 2024 (SD3) on the noise level s = 1 − t: s' = shift·s / (1 + (shift − 1)·s).
    shift > 1 spends more steps at high noise (near t = 0)."""
    s = 1 - _u(steps)
    return 1 - shift * s / (1 + (shift - 1) * s)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear, "cosine": cosine, "polynomial": polynomial, "inverse_cubic": inverse_cubic,
    "inverse_exp": inverse_exp, "logit_normal": logit_normal, "edm": edm, "sd3_shift": sd3_shift,
}


def parse_schedule(spec: str) -> tuple[str, dict[str, float]]:
    """'logit_normal:mean=0.5,std=1' -> ('logit_normal', {'mean': 0.5, 'std': 1.0}), checking names."""
    name, _, args = spec.partition(":")
    if name not in SCHEDULES:
        close = difflib.get_close_matches(name, list(SCHEDULES), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown schedule '{name}'{hint} (valid: {', '.join(SCHEDULES)})")
    params = {}
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"schedule parameter '{item}' in '{spec}' is not of the form name=number")
    return name, params


def time_grid(spec: str, steps: int) -> torch.Tensor:
    """The grid of schedule `spec` with `steps` intervals: float64, from exactly 0 to exactly 1."""
    if steps <= 0:
        raise UserError(f"steps must be positive, got {steps}")
    name, params = parse_schedule(spec)
    try:
        grid = SCHEDULES[name](steps, **params)
    except TypeError:
        import inspect

        known = [p for p in inspect.signature(SCHEDULES[name]).parameters if p != "steps"]
        raise UserError(f"schedule '{name}' takes the parameters {', '.join(known) or 'none'}, "
                        f"got {', '.join(params)}") from None
    if not (grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())):
        raise UserError(f"schedule '{spec}' with {steps} steps is not increasing from 0 to 1; change its parameters")
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description="Draw every sampling time schedule in one picture.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="schedules.png")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in SCHEDULES:
        grid = time_grid(name, args.steps)
        left.plot(range(args.steps + 1), grid, marker=".", label=name)
        right.plot(grid[:-1], torch.diff(grid), marker=".", label=name)
    left.set(xlabel="step i", ylabel="t_i", title=f"time grids, {args.steps} steps (t=0 noise, t=1 data)")
    right.set(xlabel="t_i", ylabel="t_(i+1) − t_i", title="step sizes", yscale="log")
    left.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
