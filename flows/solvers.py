"""ODE solvers for dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

Fixed-grid solvers (euler, midpoint, heun, rk4) take the time grid they are given: `steps`
intervals are always `steps` intervals. `SOLVER+LAST` takes LAST's step on the last interval, e.g.
heun+euler (EDM's sampler): heun and rk4 evaluate the velocity at the end point t = 1, where no
noise is left in x_t to tell the network which x0 it came from and a trained field can be poor;
euler and midpoint never evaluate it there. Adaptive solvers (dopri5 and torchdiffeq's other adaptive
methods) choose their own steps under atol/rtol, so giving them `steps` is an error. Every call
integrates in fp32 (or the input's float64) and returns the exact number of velocity evaluations
(NFE): one evaluation is one call of the model, with the conditional and unconditional halves of
classifier-free guidance batched into that one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from config import UserError

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


def fixed_grid_nfe(solver: str, steps: int) -> int:
    """Velocity evaluations of a fixed-grid solver ('heun', or 'heun+euler' with its last step by euler)."""
    body, _, last = solver.partition("+")
    return SOLVERS[body][1] * (steps - 1) + SOLVERS[last or body][1]


# torchdiffeq's adaptive methods.
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def uniform_grid(steps: int) -> torch.Tensor:
    """0 = t_0 < t_1 < ... < t_steps = 1, equally spaced."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64)


class _Counted:
    """velocity(x, t) with t broadcast to (N,), its output in x's dtype, and the calls counted."""

    def __init__(self, velocity: Velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.velocity(x, t).to(x.dtype)


@torch.no_grad()
def integrate(velocity: Velocity, x0: torch.Tensor, grid: torch.Tensor, solver: str = "euler") -> SolverResult:
    """Integrate dx/dt = velocity(x, t) over `grid` (a monotone 1-D tensor of times), t of shape (N,).
    solver: a name in SOLVERS, or 'SOLVER+LAST' for LAST's step on the last interval."""
    body, _, last = solver.partition("+")
    steps = [SOLVERS[body][0]] * (len(grid) - 2) + [SOLVERS[last or body][0]]
    v = _Counted(velocity)
    x = x0 if x0.dtype == torch.float64 else x0.float()
    for step, t0, t1 in zip(steps, grid[:-1].tolist(), grid[1:].tolist()):
        x = step(v, x, t0, t1)
    assert v.calls == fixed_grid_nfe(solver, len(grid) - 1)
    return SolverResult(x=x, nfe=v.calls)


@torch.no_grad()
def integrate_adaptive(velocity: Velocity, x0: torch.Tensor, solver: str = "dopri5", atol: float = 1e-5,
                       rtol: float = 1e-5, t0: float = 0.0, t1: float = 1.0) -> SolverResult:
    """Integrate from t0 to t1 (0 to 1 by default) with an adaptive torchdiffeq method; NFE is the true
    number of calls."""
    from torchdiffeq import odeint

    v = _Counted(velocity)
    x = x0 if x0.dtype == torch.float64 else x0.float()
    ends = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    out = odeint(lambda t, x: v(x, t), x, ends, method=solver, atol=atol, rtol=rtol)
    return SolverResult(x=out[-1], nfe=v.calls)


def guided(model: Callable, y: torch.Tensor | None, cfg_scale: float = 1.0, cond: dict | None = None) -> Velocity:
    """The velocity of `model(x, t, y)` with classifier-free guidance (Ho & Salimans 2022, in velocity form):
    v = v(x, t, ∅) + w · (v(x, t, y) − v(x, t, ∅)), both halves in one batched call. w = 1 is the
    conditional velocity alone (one half, no extra cost), w = 0 the unconditional one. `cond`: further
    per-sample model inputs (Latent-CFM's c), batched with x."""
    cond = cond or {}
    if cfg_scale == 1.0 or y is None:
        if y is None and cfg_scale != 1.0:
            raise UserError("classifier-free guidance needs class labels; give --class-labels or leave --cfg-scale 1")
        return lambda x, t: model(x, t, y, **cond)
    label_embed = getattr(model, "label_embed", None)
    if label_embed is None:
        raise UserError(f"--cfg-scale {cfg_scale} asks for guidance but the model is unconditional "
                        "(trained without model.class_cond); leave --cfg-scale 1")
    null = torch.full_like(y, label_embed.num_classes)
    doubled = {key: torch.cat([value, value]) for key, value in cond.items()}

    def velocity(x, t):
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return velocity


def check_solver(solver: str, steps: int | None) -> None:
    """A solver name and a step count that it can honour, or one clear sentence."""
    if solver in ADAPTIVE:
        if steps is not None:
            raise UserError(f"solver {solver} chooses its own steps (set its tolerances with --atol/--rtol); "
                            f"drop --steps {steps} or choose a fixed-grid solver ({', '.join(SOLVERS)})")
        return
    for name in solver.split("+", 1):
        if name not in SOLVERS:
            import difflib

            names = [*SOLVERS, *ADAPTIVE] if name == solver else list(SOLVERS)
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = "" if name == solver else f" in '{solver}'"
            raise UserError(f"unknown solver '{name}'{where}{hint} (valid: {', '.join(names)}; "
                            "SOLVER+LAST takes LAST's step on the last interval, e.g. heun+euler)")
    if steps is None or steps <= 0:
        raise UserError(f"solver {solver} needs a positive number of steps, got {steps}")


@torch.no_grad()
def generate(model: Callable, x0: torch.Tensor, steps: int | None = 100, solver: str = "euler",
             y: torch.Tensor | None = None, schedule: str = "linear", cfg_scale: float = 1.0,
             atol: float = 1e-5, rtol: float = 1e-5, cond: dict | None = None) -> SolverResult:
    """Samples from noise x0 (N, ...) with `model(x, t, y)`: a fixed-grid solver over `steps` intervals
    of the time schedule, or an adaptive one (steps None) under atol/rtol; guidance with cfg_scale."""
    from flows.schedules import time_grid

    check_solver(solver, steps)
    velocity = guided(model, y, cfg_scale, cond)
    if solver in ADAPTIVE:
        return integrate_adaptive(velocity, x0, solver, atol, rtol)
    return integrate(velocity, x0, time_grid(schedule, steps).to(x0.device), solver)

# Per-sample randomness: sample k's noise and label depend on (seed, k) only.


def class_labels(given: list[str] | None, n: int, num_classes: int, seed: int) -> torch.Tensor | None:
    """Label of every sample 0..n-1: the given list cycled, or uniform from a generator seeded by (seed, k)."""
    if not num_classes:
        if given:
            raise UserError("--class-labels given but the model is unconditional (trained without model.class_cond)")
        return None
    if not given or given == ["random"]:
        return torch.tensor([int(torch.randint(num_classes, (), generator=_generator(seed, k, 1))) for k in range(n)])
    try:
        labels = [int(v) for v in given]
    except ValueError:
        raise UserError(f"--class-labels must be integers or 'random', got {' '.join(given)}") from None
    if min(labels) < 0 or max(labels) >= num_classes:
        raise UserError(f"--class-labels must lie in [0, {num_classes - 1}] for this model, got {labels}")
    return torch.tensor(labels).repeat(-(-n // len(labels)))[:n]


def _generator(seed: int, k: int, stream: int = 0) -> torch.Generator:
    """The generator of sample k: one per (seed, k, stream), stream 0 the noise, 1 the label, 2 Latent-CFM's c
    (streams 0 and 1 keep the seeds of earlier versions; stream 2 lives above 2^62)."""
    return torch.Generator().manual_seed((seed * 2**32 + k) * 2 + min(stream, 1) + (2**62 if stream == 2 else 0))


def condition(model, seed: int, indices: list[int], features: torch.Tensor | None = None) -> dict:
    """Latent-CFM's condition c of the given samples: ε from (seed, k, 2), c = ε (the prior N(0, I)) or,
    with `features` of reference images (R, F), c = μ + σ·ε of reference k mod R. {} for other models."""
    layer = getattr(model, "feature_cond", None)
    if layer is None:
        return {}
    eps = torch.stack([torch.randn(layer.cond_dim, generator=_generator(seed, k, 2)) for k in indices])
    device = layer.posterior.weight.device
    if features is None:
        return {"c": eps.to(device)}
    picked = features[torch.tensor(indices) % len(features)].to(device)
    return {"c": layer.sample(picked, eps.to(device))[0]}


def noise(seed: int, indices: list[int], shape: tuple[int, ...], source: Callable | None = None) -> torch.Tensor:
    """x0 of the given samples: each drawn on the CPU from its own generator, whatever the batch; standard
    normal, or one draw of `source(n, generator, device)` (a 2-D source distribution such as 8gaussians)."""
    if source is not None:
        return torch.cat([source(1, _generator(seed, k), torch.device("cpu")) for k in indices])
    return torch.stack([torch.randn(shape, generator=_generator(seed, k)) for k in indices])
