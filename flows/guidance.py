"""Guidance: two velocities at (x, t), the model's and a worse one, combined into the velocity the solver follows.

Each rule is one function `rule(g, v, v_bad, x, t)` and one line in GUIDANCE; `v` is the conditional (or main) model's
velocity, `v_bad` the one it is pushed away from, w = g.scale, and w = 1 is no guidance:

- 'cfg', classifier-free guidance (Ho & Salimans 2022): v_bad = v(x, t, ∅), v_bad + w·(v − v_bad).
- 'auto', autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2): v_bad is
  a weaker model of the same task and inputs (a smaller or shorter-trained run; --guide-weights), same formula. It
  needs no label dropout and guides unconditional models too.
- 'apg', adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
  Scales", §4-5): the CFG update ΔD = D(c) − D(∅) of the denoised estimates D = E[x1|x_t] (flows/paths.py), with
  momentum β (ΔD ← ΔD + β·ΔD_previous, per velocity evaluation), its norm capped at r (0: no cap) and split into
  the part parallel to D(c), weighted by η, and the orthogonal part: D(c) + (w − 1)·(ΔD⊥ + η·ΔD∥), turned back into
  a velocity. η = 1, r = 0, β = 0 is CFG exactly.
- 'cfg_zero', CFG-Zero* (Fan et al. 2025, eq. 6-8): the unconditional velocity scaled by s* = ⟨v, v_bad⟩ / ‖v_bad‖²
  per sample (the scale that fits it to the conditional one best), s*·v_bad + w·(v − s*·v_bad); its zero-init
  (sample.zero_steps = K: the first K steps of the grid output zero velocity) is the integration starting at the
  grid's time t_K from x0, which spends no evaluation there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from errors import UserError, check_name
from flows.paths import T_EPS, expand_like


@dataclass
class Guidance:
    """A guidance rule with its weight w, its interval [a, b] of t, autoguidance's guide model, APG's η, r and β,
    CFG-Zero*'s zero-init steps and the path (APG works on the path's denoised estimates). `state` holds APG's
    momentum between evaluations of one integration."""

    name: str = "cfg"
    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    guide: object = None
    eta: float = 0.0
    r: float = 0.0
    momentum: float = 0.0
    zero_steps: int = 0
    path: object = None
    state: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether it changes the velocity anywhere (w ≠ 1)."""
        return self.scale != 1.0

    @property
    def needs_null_class(self) -> bool:
        """Whether its worse velocity is the model's own unconditional one (all but autoguidance)."""
        return self.name != "auto"


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a_i, b_i⟩ per sample, shaped to broadcast against a (N, 1, ...)."""
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1))


def cfg(g: Guidance, v, v_bad, x, t):
    return v_bad + g.scale * (v - v_bad)


def apg(g: Guidance, v, v_bad, x, t):
    path, tt = g.path, expand_like(t.clamp(T_EPS, 1 - T_EPS), x)
    # E[x1|x_t] = (σ_t·v − σ̇_t·x_t)/D_t is affine in v: a difference of estimates is (σ_t/D_t)·(v − v_bad).
    slope = path.sigma(tt) / path.determinant(tt)
    d_cond = (path.sigma(tt) * v - path.d_sigma(tt) * x) / path.determinant(tt)
    delta = slope * (v - v_bad)
    if g.momentum:
        if "previous" in g.state:
            delta = delta + g.momentum * g.state["previous"]
        g.state["previous"] = delta
    if g.r > 0:
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(g.r / norm.clamp_min(1e-12), max=1.0)
    parallel = _per_sample_dot(delta, d_cond) / _per_sample_dot(d_cond, d_cond).clamp_min(1e-12) * d_cond
    update = delta - parallel + g.eta * parallel
    return v + (g.scale - 1) * update / slope  # D(c) + (w − 1)·update, as a velocity


def cfg_zero(g: Guidance, v, v_bad, x, t):
    s = _per_sample_dot(v, v_bad) / _per_sample_dot(v_bad, v_bad).clamp_min(1e-12)
    return s * v_bad + g.scale * (v - s * v_bad)


GUIDANCE = {
    "cfg": cfg,  # classifier-free guidance
    "auto": cfg,  # autoguidance: the same combination, with a weaker model as the bad velocity
    "apg": apg,  # adaptive projected guidance
    "cfg_zero": cfg_zero,  # CFG-Zero*: optimized scale (its zero-init is Guidance.zero_steps)
}


def check_settings(s, samplers) -> None:
    """The guidance knobs of the sample section `s` that each sampler (its own rule, or s.guidance) can honour, or
    one clear sentence."""
    check_name(GUIDANCE, s.guidance, "sample.guidance")
    names = {sampler.guidance or s.guidance for sampler in samplers}
    if "auto" in names and not s.guide_weights and s.cfg_scale != 1:
        raise UserError("--guidance auto guides with a weaker model of the same task: give its checkpoint with "
                        "--guide-weights (an early checkpoint of this run, or a smaller run on the same data)")
    if s.zero_steps and "cfg_zero" not in names:
        raise UserError(f"--zero-steps belongs to --guidance cfg_zero, not {', '.join(sorted(names))}; remove it")
    if (s.apg_eta or s.apg_r or s.apg_momentum) and "apg" not in names:
        raise UserError(f"--apg-eta, --apg-r and --apg-momentum belong to --guidance apg, not "
                        f"{', '.join(sorted(names))}; remove them")
    for sampler in samplers:
        name = sampler.guidance or s.guidance
        if name == "cfg_zero" and s.zero_steps and sampler.steps is None:
            raise UserError(f"--zero-steps skips the first steps of a fixed grid; {sampler.solver} chooses its own "
                            "steps: use a fixed-grid solver or --zero-steps 0")
        if name == "cfg_zero" and sampler.steps is not None and s.zero_steps >= sampler.steps:
            raise UserError(f"--zero-steps {s.zero_steps} would skip all {sampler.steps} steps of {sampler.label}; "
                            "give fewer than its steps")
        if name == "apg" and s.apg_momentum and sampler.steps is None:
            raise UserError(f"APG's momentum carries the update from one evaluation to the next, which "
                            f"{sampler.solver}'s rejected steps would disturb: use a fixed-grid solver or "
                            "--apg-momentum 0")
