"""ODE solvers for dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

Fixed-grid solvers (euler, midpoint, heun, rk4) take the time grid they are given: `steps`
intervals are always `steps` intervals. `SOLVER+LAST` takes LAST's step on the last interval, e.g.
heun+euler (EDM's sampler): heun and rk4 evaluate the velocity at the end point t = 1, where no
noise is left in x_t to tell the network which x0 it came from and a trained field can be poor;
euler and midpoint never evaluate it there. Adaptive solvers (dopri5 and the other embedded
Runge-Kutta pairs torchdiffeq defines) choose their own steps under atol/rtol, so giving them
`steps` is an error; their step size is controlled per sample, so a sample's steps never depend on
the other samples of its batch. Every call integrates in fp32 (or the input's float64).

NFE counts velocity evaluations per sample: exact for fixed-grid solvers, and the evaluations each
sample needed for adaptive ones. A guided evaluation is one, its conditional and unconditional
halves batched into one call of the network on twice the rows; `forward_passes` counts those rows
(2·NFE under guidance, fewer with a guidance interval), the count of papers that charge guidance for its
second pass.

SDE samplers (euler_maruyama, sde_heun) integrate dx = [v + w(t)·s] dt + √(2w(t)) dW̄ from t = 0 to 1, which
has the probability-flow ODE's marginals for any diffusion coefficient w(t) ≥ 0 (Song et al. 2021, eq. 6; Ma et
al. 2024, SiT §2.3); the score s follows from the velocity on an affine path from a Gaussian source
(flows/paths.py). The last interval takes no noise: 'mean' (the drift step), 'tweedie' (the denoised E[x1|x_t])
or 'euler' (an ODE step), as SiT's last_step. The noise of each step comes from the sample's own generator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import seeds
from errors import UserError
from flows.meanflow import unwrapped

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SolverResult:
    """The state at the end and the velocity evaluations spent: `nfe` calls of the velocity (on the whole
    batch) and, for adaptive solvers, `sample_nfe` (N,), the evaluations each sample needed (fixed-grid
    solvers: every sample needs `nfe`)."""

    x: torch.Tensor
    nfe: int
    sample_nfe: torch.Tensor | None = None


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


def _meanflow(v: Velocity, x, t0, t1):
    """One jump of a MeanFlow model: x_{t1} = x_{t0} + (t1 − t0)·u(x_{t0}, t0, t1), the average velocity (of a
    shortcut model: its shortcut of step size t1 − t0, the same call)."""
    return x + (t1 - t0) * v(x, t0, t1)


JUMPS = ("meanflow", "shortcut")  # solvers that jump with u(x, t, s) over each interval of the grid


# name -> (one step, velocity evaluations per step)
SOLVERS = {"euler": (_euler, 1), "midpoint": (_midpoint, 2), "heun": (_heun, 2), "rk4": (_rk4, 4),
           "meanflow": (_meanflow, 1), "shortcut": (_meanflow, 1)}
# SDE samplers: name -> velocity evaluations per step (the last step, without noise, takes one).
SDE_SOLVERS = {"euler_maruyama": 1, "sde_heun": 2}
LAST_STEPS = ("mean", "tweedie", "euler")


def fixed_grid_nfe(solver: str, steps: int) -> int:
    """Velocity evaluations of a fixed-grid solver ('heun', or 'heun+euler' with its last step by euler)."""
    if solver in SDE_SOLVERS:
        return SDE_SOLVERS[solver] * (steps - 1) + 1
    body, _, last = solver.partition("+")
    return SOLVERS[body][1] * (steps - 1) + SOLVERS[last or body][1]


def stage_times(solver: str, grid: list[float]) -> list[float]:
    """The times at which a fixed-grid solver evaluates the velocity over `grid`, in order."""
    stages = {"euler": lambda a, b: [a], "midpoint": lambda a, b: [a, (a + b) / 2], "heun": lambda a, b: [a, b],
              "rk4": lambda a, b: [a, (a + b) / 2, (a + b) / 2, b], "meanflow": lambda a, b: [a],
              "shortcut": lambda a, b: [a], "euler_maruyama": lambda a, b: [a], "sde_heun": lambda a, b: [a, b]}
    body, _, last = solver.partition("+")
    last = "euler" if solver in SDE_SOLVERS else last or body
    pairs = list(zip(grid[:-1], grid[1:]))
    return [t for a, b in pairs[:-1] for t in stages[body](a, b)] + stages[last](*pairs[-1])


# torchdiffeq's adaptive methods.
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def uniform_grid(steps: int) -> torch.Tensor:
    """0 = t_0 < t_1 < ... < t_steps = 1, equally spaced."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64)


class _Counted:
    """velocity(x, t) (or velocity(x, t, s), the average over [t, s]) with t and s broadcast to (N,), its output
    in x's dtype, and the calls counted."""

    def __init__(self, velocity: Velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t, s=None) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if s is None:
            return self.velocity(x, t).to(x.dtype)
        return self.velocity(x, t, torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])).to(x.dtype)


@torch.no_grad()
def integrate(velocity: Velocity, x0: torch.Tensor, grid: torch.Tensor, solver: str = "euler",
              after_step: Callable | None = None) -> SolverResult:
    """Integrate dx/dt = velocity(x, t) over `grid` (a monotone 1-D tensor of times), t of shape (N,).
    solver: a name in SOLVERS, or 'SOLVER+LAST' for LAST's step on the last interval. after_step(x, t) -> x
    changes the state after each step (inpainting by replacement)."""
    body, _, last = solver.partition("+")
    steps = [SOLVERS[body][0]] * (len(grid) - 2) + [SOLVERS[last or body][0]]
    v = _Counted(velocity)
    x = x0 if x0.dtype == torch.float64 else x0.float()
    for step, t0, t1 in zip(steps, grid[:-1].tolist(), grid[1:].tolist()):
        x = step(v, x, t0, t1)
        if after_step is not None:
            x = after_step(x, t1)
    assert v.calls == fixed_grid_nfe(solver, len(grid) - 1)
    return SolverResult(x=x, nfe=v.calls)


# Diffusion coefficients w(t) of SDE sampling (SiT's diffusion forms, its t = 0 noise too), times `norm`.
DIFFUSIONS = {
    "sigma": "w = norm·σ_t (SiT's default)",
    "constant": "w = norm",
    "sbdm": "w = norm·σ_t·D_t/α_t, score-based diffusion's own (large near t = 0: take small first steps)",
    "linear": "w = norm·(1 − t)",
    "decreasing": "w = ¼(norm·cos(πt) + 1)²",
    "increasing_decreasing": "w = norm·sin²(πt)",
}


@dataclass
class SDE:
    """What SDE sampling needs besides the velocity: the path (for the score), the diffusion coefficient's form and
    scale, the last step, and one generator per sample of the batch (the noise of every step is drawn from it)."""

    path: object
    generators: list
    diffusion: str = "sigma"
    norm: float = 1.0
    last_step: str = "mean"

    def w(self, t: float) -> float:
        """w(t), its path coefficients taken within [T_EPS, 1 − T_EPS] (see flows/paths.py)."""
        from flows.paths import T_EPS

        p, n, tt = self.path, self.norm, torch.tensor(min(max(t, T_EPS), 1 - T_EPS), dtype=torch.float64)
        forms = {"sigma": lambda: n * p.sigma(tt), "constant": lambda: torch.tensor(n),
                 "sbdm": lambda: n * p.sigma(tt) * p.determinant(tt) / p.alpha(tt), "linear": lambda: n * (1 - tt),
                 "decreasing": lambda: 0.25 * (n * torch.cos(math.pi * tt) + 1) ** 2,
                 "increasing_decreasing": lambda: n * torch.sin(math.pi * tt) ** 2}
        return float(forms[self.diffusion]())

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """One standard normal draw per sample, each from its own generator, on like's device."""
        return per_sample_normal(self.generators, like.shape[1:], like.dtype).to(like.device)


@torch.no_grad()
def integrate_sde(velocity: Velocity, x0: torch.Tensor, grid: torch.Tensor, solver: str, sde: SDE) -> SolverResult:
    """Integrate dx = [v + w·s] dt + √(2w) dW̄ over `grid` with euler_maruyama or sde_heun (SiT's Heun step:
    noise first, then Heun's drift step), and the noiseless last step sde.last_step on the last interval."""
    from flows.paths import T_EPS, data_from_velocity, score_from_velocity

    v = _Counted(velocity)
    x = x0 if x0.dtype == torch.float64 else x0.float()

    def drift(x_: torch.Tensor, t: float) -> torch.Tensor:
        vel = v(x_, t)
        # The score's formula divides by σ_t·D_t, which vanishes at t = 1 and, where α̇_0 = 0 (polynomial paths), at
        # t = 0: its coefficients are taken within [T_EPS, 1 − T_EPS], as the predictions' are.
        tt = torch.full((len(x_),), min(max(t, T_EPS), 1 - T_EPS), dtype=x_.dtype, device=x_.device)
        return vel + sde.w(t) * score_from_velocity(sde.path, vel, x_, tt)

    times = grid.tolist()
    for t0, t1 in zip(times[:-2], times[1:-1]):
        h = t1 - t0
        kick = math.sqrt(2 * sde.w(t0) * h) * sde.noise(x)
        if solver == "euler_maruyama":
            x = x + h * drift(x, t0) + kick
        else:
            x_hat = x + kick
            k1 = drift(x_hat, t0)
            x = x_hat + h / 2 * (k1 + drift(x_hat + h * k1, t1))
    t0, t1 = times[-2], times[-1]
    if sde.last_step == "mean":
        x = x + (t1 - t0) * drift(x, t0)
    elif sde.last_step == "euler":
        x = x + (t1 - t0) * v(x, t0)
    else:  # tweedie: the denoised estimate at t0
        x = data_from_velocity(sde.path, v(x, t0), x, torch.full((len(x),), t0, dtype=x.dtype, device=x.device))
    assert v.calls == fixed_grid_nfe(solver, len(times) - 1)
    return SolverResult(x=x, nfe=v.calls)


def _embedded_pair(solver: str):
    """The Butcher tableau (alpha: stage times, beta: stage rows, c_sol: weights of the solution, c_error: weights
    of the error estimate) and the order of one of torchdiffeq's embedded Runge-Kutta pairs."""
    from torchdiffeq._impl.odeint import SOLVERS as methods

    return methods[solver].tableau, methods[solver].order


def check_tolerances(atol: float, rtol: float) -> None:
    """Tolerances an adaptive solver can meet, or one clear sentence."""
    if atol < 0 or rtol < 0 or atol == rtol == 0:
        raise UserError(f"adaptive solvers need atol ≥ 0 and rtol ≥ 0, not both 0; got atol {atol:g}, rtol {rtol:g}")


@torch.no_grad()
def integrate_adaptive(velocity: Velocity, x0: torch.Tensor, solver: str = "dopri5", atol: float = 1e-5,
                       rtol: float = 1e-5, t0: float = 0.0, t1: float = 1.0, max_calls: int = 100_000) -> SolverResult:
    """Integrate from t0 to t1 (0 to 1 by default, or backwards) with an embedded Runge-Kutta pair whose step size
    is controlled per sample (Hairer, Nørsett & Wanner, "Solving ODEs I", §II.4: the initial step, the error
    ratio ‖err / (atol + rtol·max(|x|, |x_new|))‖ as the RMS over the sample's own elements, and the step factor
    0.9·ratio^(−1/order) kept within [0.2, 10], never below 1 after an accepted step).

    Each sample has its own time and step, so what a sample goes through does not depend on the rest of the
    batch: samples are the same for any batch size wherever the network's arithmetic is (float64 vectors, or
    images rounded to uint8; float32 results can differ in the last bits between batch sizes, which may
    move a step by that much). Every call evaluates the whole batch, each row at its own time; rows that have
    arrived are evaluated at t1 and no longer move. Returns the per-sample evaluations in `sample_nfe`."""
    check_tolerances(atol, rtol)
    tableau, order = _embedded_pair(solver)
    v = _Counted(velocity)
    x = x0 if x0.dtype == torch.float64 else x0.float()
    n, device = len(x), x.device
    per_row = (n,) + (1,) * (x.dim() - 1)
    sign = 1.0 if t1 >= t0 else -1.0
    alpha, c_sol, c_error = tableau.alpha.tolist(), tableau.c_sol.tolist(), tableau.c_error.tolist()
    beta = [b.tolist() for b in tableau.beta]
    # First same as last: the last stage is the velocity at the new state, the next step's first stage.
    fsal = c_sol[-1] == 0 and c_sol[:-1] == beta[-1]
    tiny = torch.finfo(x.dtype).tiny

    def rms(z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1).double().square().mean(1).sqrt()

    t = torch.full((n,), float(t0), dtype=torch.float64, device=device)
    sample_nfe = torch.zeros(n, dtype=torch.long, device=device)
    arrived = torch.zeros(n, dtype=torch.bool, device=device)

    def evaluate(x_: torch.Tensor, t_: torch.Tensor, needed: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity of every row; counted for the rows that need it (default: those still under way)."""
        nonlocal sample_nfe
        if v.calls >= max_calls:
            raise UserError(f"{solver} made {max_calls} velocity evaluations without reaching t = {t1:g} (atol "
                            f"{atol:g}, rtol {rtol:g}); loosen the tolerances or use a fixed-grid solver")
        sample_nfe = sample_nfe + (~arrived if needed is None else needed).long()
        return v(x_, t_)

    # The first step (Hairer et al. §II.4, algorithm (4.14)), per sample.
    f = evaluate(x, t)
    scale = (atol + rtol * x.abs()).clamp_min(tiny)
    d0, d1 = rms(x / scale), rms(f / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(tiny))
    f_probe = evaluate(x + (sign * h0).view(per_row).to(x.dtype) * f, t + sign * h0)
    d2 = rms((f_probe - f) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.clamp_min(h0 * 1e-3, 1e-6),
                     (0.01 / torch.maximum(d1, d2).clamp_min(tiny)) ** (1.0 / order))
    h = torch.minimum(100 * h0, h1)

    while not bool(arrived.all()):
        remaining = (t1 - t) * sign
        last = h >= remaining
        dt = torch.where(arrived, torch.zeros_like(h), torch.where(last, remaining, h)) * sign
        dt_x = dt.view(per_row).to(x.dtype)
        k = [f]
        for a_i, b_i in zip(alpha, beta):
            x_i = x + dt_x * sum(b * k_j for b, k_j in zip(b_i, k) if b != 0)
            k.append(evaluate(x_i, torch.where(last, t1, t + a_i * dt) if a_i == 1 else t + a_i * dt))
        x_new = x_i if fsal else x + dt_x * sum(c * k_j for c, k_j in zip(c_sol, k) if c != 0)
        error = dt_x * sum(c * k_j for c, k_j in zip(c_error, k) if c != 0)
        ratio = rms(error / (atol + rtol * torch.maximum(x.abs(), x_new.abs())).clamp_min(tiny))
        ratio = torch.nan_to_num(ratio, nan=math.inf)  # a non-finite state is a rejected step
        accept = (ratio <= 1) & ~arrived
        x = torch.where(accept.view(per_row), x_new, x)
        t = torch.where(accept, torch.where(last, torch.full_like(t, t1), t + dt), t)
        arrived = arrived | (accept & last)
        # The next step: 0.9·ratio^(−1/order) within [0.2, 10], and no smaller after an accepted step.
        factor = (0.9 * ratio.pow(-1.0 / order)).clamp(0.2, 10.0)
        h = torch.where(arrived, h, dt.abs() * torch.where(accept, factor.clamp_min(1.0), factor))
        if fsal:
            f = torch.where(accept.view(per_row), k[-1], f)
        elif bool((accept & ~arrived).any()):  # the velocity at the new state, for the samples that moved on
            f = torch.where(accept.view(per_row), evaluate(x, t, needed=accept & ~arrived), f)
        if bool(((h < 1e-12 * abs(t1 - t0)) & ~arrived).any()):
            raise UserError(f"{solver}'s step size fell below 1e-12 of the interval without meeting atol {atol:g}, "
                            f"rtol {rtol:g} (a non-finite velocity?); loosen the tolerances or check the model")
    return SolverResult(x=x, nfe=v.calls, sample_nfe=sample_nfe.cpu())


def guided(model: Callable, y: torch.Tensor | None, cfg_scale: float = 1.0, cond: dict | None = None,
           null_cond: dict | None = None, interval: tuple[float, float] = (0.0, 1.0), guidance=None) -> Velocity:
    """The velocity of `model(x, t, y)` with classifier-free guidance (Ho & Salimans 2022, in velocity form):
    v = v(x, t, ∅) + w · (v(x, t, y) − v(x, t, ∅)), both halves in one batched call. w = 1 is the
    conditional velocity alone (one half, no extra cost), w = 0 the unconditional one. Meta flow_matching writes
    the same guidance as (1 + w')·v(x, t, y) − w'·v(x, t, ∅): its w' is our w − 1. `cond`: further
    per-sample model inputs (Latent-CFM's c, a task's image_cond), batched with x; `null_cond`: those of them that
    the unconditional half replaces (a task's null condition), which makes guidance apply to them. `interval`:
    guidance only for t in [a, b] (Kynkäänniemi et al. 2024), the conditional velocity alone elsewhere (one pass).
    `guidance` (flows/guidance.py; it replaces cfg_scale and interval): another rule combining the two velocities, or
    autoguidance, whose worse velocity is a weaker model's (two calls, the main model's and the guide's)."""
    from flows.guidance import GUIDANCE, Guidance

    cond = cond or {}
    # A fresh state per integration: APG's momentum must not carry over from another batch.
    g = dataclasses.replace(guidance, state={}) if guidance is not None else Guidance("cfg", cfg_scale, tuple(interval))
    cfg_scale, interval, rule = g.scale, g.interval, GUIDANCE[g.name]
    if getattr(unwrapped(model), "guidance_embed", None) is not None and cfg_scale != 1.0:
        if g.name != "cfg":
            raise UserError(f"--guidance {g.name}: this model takes classifier-free guidance as an input "
                            "(flow.meanflow_cfg_range), in one pass per step; guide it with --guidance cfg")
        return guidance_as_input(model, y, cfg_scale, interval, cond)
    if g.name == "auto" and cfg_scale != 1.0:
        def autoguided(x, t, s=None):
            mean_flow = {} if s is None else {"s": s}
            v = model(x, t, y, **mean_flow, **cond)
            inside = (t >= interval[0]) & (t <= interval[1])
            if not bool(inside.any()):
                return v
            v_guide = g.guide(x, t, y, **mean_flow, **cond)
            return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), rule(g, v, v_guide, x, t), v)

        return autoguided
    if cfg_scale == 1.0 or (y is None and not null_cond):
        if cfg_scale != 1.0:
            raise UserError("classifier-free guidance needs class labels; give --class-labels or leave --cfg-scale 1")
        return lambda x, t, s=None: model(x, t, y, **({} if s is None else {"s": s}), **cond)
    labels = None
    if y is not None:
        label_embed = getattr(model, "label_embed", None)
        if label_embed is None:
            raise UserError(f"--cfg-scale {cfg_scale} asks for guidance but the model is unconditional "
                            "(trained without model.class_cond); leave --cfg-scale 1")
        labels = torch.cat([y, torch.full_like(y, label_embed.num_classes)])
    unconditional = {**cond, **(null_cond or {})}
    doubled = {key: torch.cat([value, unconditional[key]]) for key, value in cond.items()}

    def velocity(x, t, s=None):
        mean_flow = {} if s is None else {"s": s}
        inside = (t >= interval[0]) & (t <= interval[1])
        if not bool(inside.any()):
            return model(x, t, y, **mean_flow, **cond)
        if s is not None:
            mean_flow = {"s": torch.cat([s, s])}
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels, **mean_flow, **doubled).chunk(2)
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), rule(g, v_cond, v_uncond, x, t), v_cond)

    return velocity


def guidance_as_input(model: Callable, y: torch.Tensor | None, cfg_scale: float, interval: tuple[float, float],
                      cond: dict) -> Velocity:
    """The velocity of a model trained with guidance as an input (improved MeanFlow): ω and [a, b] given to the
    network, one forward pass per evaluation."""
    if y is None:
        raise UserError("classifier-free guidance needs class labels; give --class-labels or leave --cfg-scale 1")

    def velocity(x, t, s=None):
        w = torch.tensor([cfg_scale, *interval], dtype=x.dtype, device=x.device).expand(x.shape[0], 3)
        return model(x, t, y, **({} if s is None else {"s": s}), w=w, **cond)

    return velocity


def check_guidance(cfg_scale: float, num_classes: int, label_dropout: float, baked: float = 1.0,
                   trained: list[float] | None = None, rule: str = "cfg") -> None:
    """Guidance scale w that the model can honour, or one clear sentence: w ≠ 1 needs the unconditional velocity,
    which only a class-conditional model trained with label dropout has learned (its null class is otherwise
    never trained), a MeanFlow model with guidance ω ≠ 1 baked in (flow.meanflow_cfg, `baked`) is guided
    already: a second guidance on top of it would sample neither scale; a model that takes the scale as an input
    (flow.meanflow_cfg_range, `trained`) knows the scales of its range only."""
    if trained and not trained[0] <= cfg_scale <= trained[1]:
        raise UserError(f"--cfg-scale {cfg_scale:g} (or sample.cfg_scale) is outside [{trained[0]:g}, "
                        f"{trained[1]:g}], the guidance scales this model was trained to take as input "
                        "(flow.meanflow_cfg_range); choose a scale in that range")
    if cfg_scale == 1:
        return
    if baked != 1:
        raise UserError(f"--cfg-scale {cfg_scale:g} (or sample.cfg_scale) would guide a MeanFlow model whose samples "
                        f"are guided already (trained with flow.meanflow_cfg={baked:g}, the scale baked into its "
                        "average velocity); leave --cfg-scale 1")
    if not num_classes:
        asks = "asks for classifier-free guidance" if rule == "cfg" else \
            f"with --guidance {rule} needs the unconditional velocity of a class-conditional model,"
        raise UserError(f"--cfg-scale {cfg_scale} {asks} but the model is unconditional (trained without "
                        "model.class_cond); leave --cfg-scale 1, or guide it with a weaker model of itself: "
                        "--guidance auto --guide-weights CKPT")
    if label_dropout <= 0:
        raise UserError(f"--cfg-scale {cfg_scale} needs the unconditional velocity, which this model never learned "
                        "(trained with flow.label_dropout=0, its null class is untrained); leave --cfg-scale 1 or "
                        "train with flow.label_dropout=0.1")


def forward_passes(nfe: float, cfg_scale: float, guided_nfe: float | None = None) -> float:
    """The network's forward passes per sample behind `nfe` velocity evaluations: two under guidance (w ≠ 1), the
    conditional and the unconditional row, batched into one call; with a guidance interval, two for the
    `guided_nfe` evaluations inside it only."""
    if cfg_scale == 1:
        return nfe
    return nfe + (nfe if guided_nfe is None else guided_nfe)


def guided_evaluations(solver: str, steps: int, schedule: str, interval: tuple[float, float], skip: int = 0) -> int:
    """How many of a fixed-grid solver's velocity evaluations fall in the guidance interval (the grid starting at its
    `skip`-th time, as CFG-Zero*'s zero-init integrates)."""
    from flows.schedules import time_grid

    grid = time_grid(schedule, steps)[skip:].tolist()
    return sum(interval[0] <= t <= interval[1] for t in stage_times(solver, grid))


def sampler_passes(nfe: float, cfg_scale: float, solver: str, steps: int | None, schedule: str,
                   interval: tuple[float, float], skip: int = 0) -> float:
    """forward_passes of a sampler: with a guidance interval other than [0, 1] (fixed grids only), two passes for
    the evaluations inside it."""
    inside = guided_evaluations(solver, steps, schedule, interval, skip) if steps and interval != (0, 1) else None
    return forward_passes(nfe, cfg_scale, inside)


def parse_interval(text: str) -> list[float]:
    """--cfg-interval's 'A,B' -> [A, B], or one clear sentence."""
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--cfg-interval must be two times A,B such as 0.1,0.7, got '{text}'") from None
    return [a, b]


def check_interval(interval: tuple[float, float], solver: str) -> None:
    """A guidance interval [a, b] within [0, 1] and a solver whose evaluation times are known, or one sentence."""
    a, b = interval
    if not 0 <= a <= b <= 1:
        raise UserError(f"--cfg-interval {a:g},{b:g} must be two times 0 ≤ a ≤ b ≤ 1 (t = 0 noise, t = 1 data)")
    if (a, b) != (0, 1) and solver in ADAPTIVE:
        raise UserError(f"--cfg-interval needs the evaluation times fixed in advance; {solver} chooses its own: use "
                        "a fixed-grid solver (euler, heun, ...)")


def check_solver(solver: str, steps: int | None) -> None:
    """A solver name and a step count that it can honour, or one clear sentence."""
    if solver.partition("+")[0] in SDE_SOLVERS:
        if "+" in solver:
            raise UserError(f"solver '{solver}': SDE samplers take their noiseless last step from --last-step "
                            f"({', '.join(LAST_STEPS)}), not +LAST")
        if steps is None or steps <= 0:
            raise UserError(f"solver {solver} needs a positive number of steps, got {steps}")
        return
    if solver in ADAPTIVE:
        if steps is not None:
            raise UserError(f"solver {solver} chooses its own steps (set its tolerances with --atol/--rtol); "
                            f"drop --steps {steps} or choose a fixed-grid solver ({', '.join(SOLVERS)})")
        return
    jump = next((name for name in solver.split("+") if name in JUMPS), None)
    if jump and solver != jump:
        raise UserError(f"solver '{solver}': {jump} jumps over each interval of the grid on its own; give "
                        f"--solver {jump} without +LAST")
    for name in solver.split("+", 1):
        if name not in SOLVERS:
            import difflib

            names = [*SOLVERS, *SDE_SOLVERS, *ADAPTIVE] if name == solver else list(SOLVERS)
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
             atol: float = 1e-5, rtol: float = 1e-5, cond: dict | None = None, null_cond: dict | None = None,
             after_step: Callable | None = None, sde: SDE | None = None,
             cfg_interval: tuple[float, float] = (0.0, 1.0), guidance=None) -> SolverResult:
    """Samples from noise x0 (N, ...) with `model(x, t, y)`: a fixed-grid solver over `steps` intervals
    of the time schedule, an SDE sampler (euler_maruyama, sde_heun; `sde` gives its path, diffusion and the
    samples' generators), or an adaptive one (steps None) under atol/rtol; guidance with cfg_scale (over the
    labels, and over the inputs of `cond` that `null_cond` replaces) for t in cfg_interval, or another `guidance`
    (flows/guidance.py: it replaces cfg_scale and cfg_interval; CFG-Zero*'s zero-init starts the grid at its K-th
    time); after_step: see integrate."""
    from flows.schedules import time_grid

    check_solver(solver, steps)
    if guidance is not None:
        cfg_scale, cfg_interval = guidance.scale, guidance.interval
    check_interval(cfg_interval, solver)
    if solver in JUMPS and getattr(unwrapped(model), "interval_embed", None) is None:
        what = ("the average velocity u(x, t, s) of a MeanFlow model (flow.objective=meanflow or alphaflow)"
                if solver == "meanflow" else "a shortcut model's step-size input (flow.objective=shortcut)")
        raise UserError(f"--solver {solver} jumps with {what}; this model has no second time input and gives the "
                        "instantaneous velocity only: use euler, midpoint, heun, rk4 or dopri5")
    velocity = guided(model, y, cfg_scale, cond, null_cond, cfg_interval, guidance)
    skip = guidance.zero_steps if guidance is not None and guidance.active else 0  # CFG-Zero*'s zero-init
    if solver in SDE_SOLVERS:
        if sde is None or after_step is not None:
            raise UserError(f"solver {solver} needs the path's score and per-sample noise (sample.py gives them), "
                            "and restores nothing between steps; use an ODE solver here")
        return integrate_sde(velocity, x0, time_grid(schedule, steps)[skip:].to(x0.device), solver, sde)
    if solver in ADAPTIVE:
        if after_step is not None:
            raise UserError(f"{solver} chooses its own steps, between which nothing can be replaced; use a "
                            "fixed-grid solver (euler, midpoint, heun, rk4) with this method")
        return integrate_adaptive(velocity, x0, solver, atol, rtol)
    return integrate(velocity, x0, time_grid(schedule, steps)[skip:].to(x0.device), solver, after_step)

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
    """The generator of sample k: one per (seed, k, stream), independent of every other (seeds.py), stream 0 the
    noise, 1 the label, 2 Latent-CFM's c, 3 the noise a restoration sampler injects at each step, 4 the noise of an
    SDE sampler's steps."""
    return seeds.generator("sample", seed, k, stream)


def per_sample_normal(generators: list[torch.Generator], shape: tuple[int, ...],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One standard normal draw of `shape` per sample, each from its own generator, stacked on the CPU: what a
    sampler that injects noise step after step draws, the same whatever the batch."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators])


def sample_generators(seed: int, indices: list[int], stream: int) -> list[torch.Generator]:
    """One generator per sample of a stream (see _generator), for draws a sampler makes step after step."""
    return [_generator(seed, k, stream) for k in indices]


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
