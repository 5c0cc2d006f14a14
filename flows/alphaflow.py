"""AlphaFlow (Zhang et al. 2025, "AlphaFlow: Understanding and Improving MeanFlow Models"): a family of objectives
for the average velocity u_θ(z, t, s) between trajectory flow matching (α = 1) and MeanFlow (α = 0), trained on a
curriculum from the one to the other.

In this toolkit's convention (t = 0 noise, t = 1 data, s ≥ t; flows/meanflow.py) the average velocity over [t, s]
splits at t' = t + α·(s − t) into a short flow step and the rest of the interval:

    (s − t)·u(z_t, t, s) = (t' − t)·v + (s − t')·u(z_t', t', s),   so   u(z_t, t, s) = α·v + (1 − α)·u(z_t', t', s)

with v the velocity over [t, t'] (exact as α → 0). The regression target takes the conditional velocity v_t for v,
z_t' = z_t + α·(s − t)·v_t (the step along it: the linear path's own point at t') and the network under
stop-gradient for the rest:

    u_tgt = α·v_t + (1 − α)·sg(u_θ(z_t', t', s)),   loss = α·sg(w)·‖u_θ(z_t, t, s) − u_tgt‖²

with MeanFlow's adaptive weight w = 1 / (‖·‖² + c)^p. At α = 1 the target is v_t (trajectory flow matching; plain
flow matching for the samples with s = t). As α → 0 the residual, divided by α, tends to MeanFlow's, so α = 0 is
MeanFlow itself, with its JVP target; the α factor in front (the official code's weight of these samples) keeps
the small-α residual from being scaled up by the adaptive weight. Samples with s = t, and all samples at α = 0,
weigh 1, as in the official code. For α > 0 the step needs one more forward pass without gradient and no JVP:
most of the curriculum costs a flow-matching step and a half.

The curriculum: α(step) = start before the first of `steps`, end after the last, and between them a sigmoid
start + (end − start)·σ(γ·(progress − ½)) (the paper's; or a straight line), progress going 0 → 1 over the window.
α within 5e-3 of 0 or 1 is taken as 0 or 1 (the official code clamps α likewise, at a configurable value). The
step is the optimizer step of the micro-step (Draw.step), so the schedule resumes exactly. (t, s) are drawn as
MeanFlow draws them, and guidance baked in (ω ≠ 1) replaces v_t by ṽ_t in both the flow step and the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flows.align import forward
from flows.meanflow import MeanFlowObjective, evaluation, unwrapped
from flows.objective import Draw, ObjectiveOutput
from flows.paths import expand_like

CLAMP = 5e-3  # α this close to 0 or 1 is taken as 0 or 1


def alpha_at(step: int, start: float, end: float, steps: tuple[int, int], schedule: str = "sigmoid",
             gamma: float = 10.0) -> float:
    """α at optimizer step `step` of the curriculum from `start` to `end` over the steps [first, last]."""
    first, last = steps
    if step < first:
        alpha = start
    elif step >= last:
        alpha = end
    else:
        progress = (step - first) / (last - first)
        shape = progress if schedule == "linear" else 1 / (1 + math.exp(-gamma * (progress - 0.5)))
        alpha = start + (end - start) * shape
    return 0.0 if alpha < CLAMP else 1.0 if alpha > 1 - CLAMP else alpha


class AlphaFlowObjective(MeanFlowObjective):
    """The α-Flow loss per sample (see the module docstring), α from the curriculum at the draw's step."""

    def __init__(self, *args, alpha: Callable[[int], float], **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        alpha = self.alpha(draw.step)
        out = super().loss(model, x1, draw) if alpha == 0 else self.alpha_loss(model, x1, draw, alpha)  # 0: MeanFlow
        out.settings["alpha"] = alpha
        return out

    def alpha_loss(self, model: Callable, x1: torch.Tensor, draw: Draw, alpha: float) -> ObjectiveOutput:
        """The loss at α > 0: one forward pass without gradient for the rest of the interval, no JVP."""
        sample = self.path.sample(draw.x0, x1.to(draw.x0.dtype), draw.t)
        v = self.velocity(model, sample.x_t, draw, sample.u_t).float()
        target = v
        if alpha < 1:  # the rest of the interval from z_t', by the network without gradient
            gap = expand_like(draw.s - draw.t, v).float()
            later = draw.t + alpha * (draw.s - draw.t)
            with torch.no_grad(), evaluation(unwrapped(model)) as net:
                rest = net((sample.x_t.float() + alpha * gap * v).to(sample.x_t.dtype), later, draw.y, s=draw.s,
                           **draw.cond)
            target = alpha * v + (1 - alpha) * rest.float()
        u, hidden = forward(model, self.alignment, draw.aligning, sample.x_t, draw.t, draw.y, s=draw.s,
                            **draw.cond)
        loss = self.weighted(u.float() - target, draw)
        apart = draw.s != draw.t  # the consistency samples weigh α, the flow-matching ones 1
        return self.aligned(torch.where(apart, alpha * loss, loss), draw.t, hidden, draw, x1)

