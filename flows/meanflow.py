"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): a network u_θ(z, t, s) for the
average velocity over [t, s], trained from the instantaneous one, sampled in one or a few jumps.

In this toolkit's convention (t = 0 noise, t = 1 data, sampling runs forward in t) the average velocity of
the flow dz/dτ = v(z_τ, τ) over [t, s], s ≥ t, is

    u(z_t, t, s) = 1/(s − t) ∫_t^s v(z_τ, τ) dτ,   so that   z_s = z_t + (s − t)·u(z_t, t, s)

and u(z, t, t) = v(z, t). Differentiating (s − t)·u(z_t, t, s) = ∫_t^s v dτ in t with s fixed gives
−u + (s − t)·du/dt = −v(z_t, t): the MeanFlow identity

    u(z_t, t, s) = v(z_t, t) + (s − t)·d/dt u(z_t, t, s),   d/dt u = v·∂_z u + ∂_t u,

the total derivative along the trajectory (the paper's eq. 6 with its r < t, data at 0, read backwards:
its t − r is our s − t and its −d/dt is our d/dt). The regression target replaces v by the conditional
velocity v_t = x1 − x0 of the linear path (whose expectation given z_t is v) and the derivative by a
Jacobian-vector product of the network itself, tangent (v_t, 1, 0) in (z, t, s), under stop-gradient:

    u_tgt = v_t + (s − t)·sg(JVP),   loss = sg(w)·‖u_θ(z_t, t, s) − u_tgt‖²,   w = 1 / (‖·‖² + c)^p

with ‖·‖² the squared L2 norm of the sample (summed over its elements, as the official code does; p = 0
is the plain regression, which diverges as the target follows the network). A fraction `ratio` of the samples has
s ≠ t, drawn as the larger of two times from the time density; the others have s = t, where the
target is plain flow matching's. With guidance baked in (the paper's ω, class-conditional models
trained with label dropout), v_t is replaced by ṽ_t = ω·v_t + (1 − ω)·u_θ(z_t, t, t | ∅) for labelled
samples, so that one jump samples the guided model.

The JVP is computed on the unwrapped network without gradient (a DDP wrapper's hooks that all-reduce
the gradients do not run under torch.func.jvp, so the gradient flows through a plain forward call of
the wrapped model), in float32 with autocast off, and with the math attention kernel (flash and
memory-efficient attention have no forward-mode derivative). A MeanFlow step therefore costs a JVP
(about two forward passes) on top of a flow-matching step; bench/meanflow_step.py measures it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from flows.couplings import BatchShard
from flows.objective import Draw, FlowMatchingObjective, ObjectiveOutput
from flows.paths import expand_like


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers; any other callable as it is
    (accelerate's extract_model_from_parallel takes modules only)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


@contextlib.contextmanager
def forward_mode_safe(device: torch.device):
    """float32 without autocast, and scaled_dot_product_attention's math kernel (the others have no JVP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast(device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        yield


def total_derivative(model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                     y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """u_θ(z, t, s) and its derivative along dz/dt = v with s fixed, d/dt u = v·∂_z u + ∂_t u, by one
    forward-mode JVP of the unwrapped network, without gradient, in float32."""
    net = unwrapped(model)

    def u(z_, t_, s_):
        return net(z_, t_, y, s=s_)

    with torch.no_grad(), forward_mode_safe(z.device), warnings.catch_warnings():
        # torch loads its forward-mode decompositions with torch.jit.script, deprecated: once per process.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        z, t, s, v = z.float(), t.float(), s.float(), v.float()
        return torch.func.jvp(u, (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))


def meanflow_target(model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                    y: torch.Tensor | None = None, along: torch.Tensor | None = None) -> torch.Tensor:
    """u_tgt = v + (s − t)·d/dt u_θ(z, t, s) with the derivative along dz/dt = `along` (default v): the MeanFlow
    identity, without gradient, in float32."""
    _, dudt = total_derivative(model, z, t, s, v if along is None else along, y)
    return v.float() + expand_like(s - t, v).float() * dudt


class MeanFlowObjective(FlowMatchingObjective):
    """The MeanFlow loss per sample (see the module docstring); draws as flow matching does, plus s."""

    def __init__(self, *args, ratio: float = 0.25, power: float = 1.0, eps: float = 1e-3, cfg_scale: float = 1.0,
                 tangent: str = "conditional", **kwargs):
        super().__init__(*args, **kwargs)
        self.ratio, self.power, self.eps, self.cfg_scale, self.tangent = ratio, power, eps, cfg_scale, tangent

    def draw(self, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             shard: BatchShard = BatchShard(), x0: torch.Tensor | None = None,
             image_cond: torch.Tensor | None = None) -> Draw:
        """Flow matching's draw, its t the smaller and s the larger of two times from the density for a
        fraction `ratio` of the samples, s = t for the others (all drawn for the global batch)."""
        draw = super().draw(x1, y, generator, shard, x0, image_cond)
        n_global, device = x1.shape[0] * shard.world, x1.device
        other = shard.local(self.time_density(n_global, generator, device))
        apart = shard.local(torch.rand(n_global, generator=generator, device=device) < self.ratio)
        t = torch.where(apart, torch.minimum(draw.t, other), draw.t)
        draw.t, draw.s = t, torch.where(apart, torch.maximum(draw.t, other), t)
        return draw

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        sample = self.path.sample(draw.x0, x1.to(draw.x0.dtype), draw.t)
        v = sample.u_t
        if self.cfg_scale != 1 and draw.y is not None:  # guidance baked into the target, for labelled samples
            with torch.no_grad():
                unconditional = unwrapped(model)(sample.x_t, draw.t, torch.full_like(draw.y, self.num_classes))
            labelled = expand_like(draw.y != self.num_classes, v)
            v = torch.where(labelled, self.cfg_scale * v + (1 - self.cfg_scale) * unconditional.to(v.dtype), v)
        along = v
        if self.tangent == "model":  # the network's own instantaneous velocity: a tangent without the pairing's noise
            with torch.no_grad():
                along = unwrapped(model)(sample.x_t, draw.t, draw.y).to(v.dtype)
        rng = _rng_state(v.device)  # the JVP and the prediction see the same dropout masks
        target = meanflow_target(model, sample.x_t, draw.t, draw.s, v, draw.y, along)
        _set_rng_state(v.device, rng)
        u = model(sample.x_t, draw.t, draw.y, s=draw.s)
        error = (u.float() - target).square().flatten(1).sum(1)
        weight = (error.detach() + self.eps) ** -self.power
        return ObjectiveOutput(loss=weight * error, t=draw.t)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
