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
is the plain regression, which diverges as the target follows the network). A coupling's per-sample weight
(unbalanced and partial OT) multiplies this loss: the adaptive weight evens out the samples' error scales, the
coupling's says how much each sample counts (0: not at all). The pseudo-Huber loss is not offered beside the
adaptive weight, which already is MeanFlow's robust loss (at p = 0.5 its gradient is the pseudo-Huber loss's,
2Δ/√(‖Δ‖² + c), as the paper notes).

Times: t and s are two draws from the time density; a fraction `ratio` of the samples has s ≠ t, the others s = t,
where the target is plain flow matching's. times='ordered' is the paper's sampler (the official JAX code's
sample_tr; py-meanflow's tr_sampler v0, "used in paper"): the two draws are ordered first, t the earlier (noisier)
and s the later, then s = t for the others, whose t is therefore the earlier of two draws. times='single' is
py-meanflow's v1: the s = t samples keep a single draw as t (with the ImageNet recipe's logit-normal(0.4, 1), their
mean t is 0.58 against 0.465). times='length' draws the jump instead: its length s − t is the second draw of the
density and its start t = t₀·(1 − (s − t)), t₀ the first, so that with the uniform density lengths are uniform and
long jumps as common as short ones (two uniform draws give s − t > 0.9 to 1% of the pairs, this to 10%; the one
jump from noise to data is (0, 1)); its s = t samples keep one draw, as 'single'. Which samples have s ≠ t is drawn
per sample with probability `ratio`, as py-meanflow does (the JAX code takes an exact fraction of each batch).

The v-loss (improved MeanFlow, Geng et al. 2025b, loss='v'): the network still predicts u, but the loss is on the
instantaneous velocity it implies through the identity, V_θ = u_θ(z_t, t, s) − (s − t)·sg(d/dt u), regressed onto
the conditional velocity: ‖V_θ − v_t‖² under the same adaptive weight. Its target v_t does not depend on the
network; the derivative's tangent is the network's own instantaneous velocity u_θ(z_t, t, t) (tangent='model'),
since v_t, the regression target, cannot also be the direction. With the stop-gradient its residual, and so its
gradient, equal the u-loss's with tangent='model' term by term: what the v-form states is the regression, not a
different step.

Self-distillation (velocity='model'; the Eulerian self-distillation of Boffi, Albergo & Vanden-Eijnden 2025, "How
to build a consistency model: learning flow maps via self-distillation"): for the s ≠ t samples v_t in the target,
and so the derivative's direction, is the network's own instantaneous velocity u_θ(z_t, t, t) (eval mode, no
gradient; velocity='ema': the EMA weights', `teacher`, set by the training loop as for splitting), u_tgt =
u_θ(z_t, t, t) + (s − t)·sg(d/dt u) along it; the s = t samples keep v_t and are the only ones
that see the data, training the velocity that the jumps' targets read. The jumps' targets carry no pairing noise:
the exact average velocity of the flow the network's velocity defines gives zero loss per sample, not only in
expectation over the pairs. AlphaFlow's steps at α > 0 keep v_t (α = 1 is flow matching on the data). With the
online network's velocity the targets chase its updates: on MNIST (AlphaFlow, OT pairs) the loss swung between 1.9
and 7.1 from α = 0 on and one-jump samples were noise by step 1,000 (docs/benchmarks.md).

Interval splitting (SplitMeanFlow, Guo et al. 2025; split > 0): for a fraction `split` of the s ≠ t samples the
target is not the JVP's but the jump over [t, s] made of two jumps of the network, split at m uniform in (t, s):
u_tgt = ((m − t)·u(z_t, t, m) + (s − m)·u(z_m, m, s)) / (s − t), z_m = z_t + (m − t)·u(z_t, t, m), without gradient
and in eval mode, which the exact average velocity satisfies (∫ v dτ is additive). The target has no pairing noise
(no x1 − x0 in it): a long jump learns what the network's shorter jumps do. The two jumps are the EMA weights'
(`teacher`, as for the shortcut model; set by the training loop) or, without them, the online network's, whose
targets chase its own updates (on MNIST its loss swung between 3.6 and 17 from step 1,375 on, against 3.2-3.4 with
the EMA's). AlphaFlow's steps at α > 0 keep their own target; its α = 0 steps are MeanFlow's and split.

With guidance baked in (the paper's ω, class-conditional models trained with label dropout), v_t is replaced by
ṽ_t = ω·v_t + (1 − ω)·u_θ(z_t, t, t | ∅) for labelled samples, so that one jump samples the guided model (the
paper's κ = 0 form; its κ > 0 mixing term is not implemented). The unconditional u of that target, and the
network's own velocity that tangent='model' follows, are evaluated in eval mode (dropout off), as the official
code evaluates guidance with train=False; the JVP and the prediction run in the training mode.

Guidance as an input (improved MeanFlow; cfg_range = [ω_min, ω_max]): instead of one ω baked in, each sample draws
its own, uniform in the range, and an interval [a, b] of t to guide in ([0, 1] for half the samples; a uniform
in [0, 1) and b uniform in [a, 1] for the others), given to the network as w = (ω, a, b)
(models/embeddings.GuidanceEmbedder). The target's velocity is ṽ_t with that sample's ω when its t lies in [a, b],
v_t elsewhere; samples whose label was dropped take w = (1, 0, 1), no guidance, and so does the unconditional
velocity inside ṽ_t. Sampling then chooses ω and [a, b] (--cfg-scale, --cfg-interval) in one forward pass per step,
without retraining.

The JVP is computed on the unwrapped network without gradient (a DDP wrapper's hooks that all-reduce
the gradients do not run under torch.func.jvp, so the gradient flows through a plain forward call of
the wrapped model), in float32 with autocast off (weights kept in bf16 or fp16, as DeepSpeed keeps them, are
read as float32 copies), and with the math attention kernel (flash and memory-efficient attention have no
forward-mode derivative). It is taken for the samples with s ≠ t only, whose target reads it (all of them while
dropout draws masks, which the JVP shares with the prediction). A MeanFlow step therefore costs a JVP of those
samples (about three forward passes of them on CPU) on top of a flow-matching step; bench/meanflow_step.py measures
it. derivative='central' takes d/dt u by the central difference of two forward passes instead (same conditions,
h = 1e-3), and derivative='onesided' by the one-sided (u(z + hv, t + h, s) − u_θ) / h from the prediction itself, one
more forward pass of the s ≠ t samples, where the prediction is plain float32 (no autocast, no torch.compile, float32
weights; the config refuses it with mixed precision or compile, and elsewhere it takes the central difference).
Cheaper, and with the efficient attention kernels, at an error far below the target's pairing noise.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable

import torch

from flows.align import forward
from flows.couplings import BatchShard
from flows.objective import Draw, FlowMatchingObjective, ObjectiveOutput
from flows.paths import expand_like


def wrappers(model: torch.nn.Module) -> list:
    """The model and each network inside its DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, outermost
    first; any other callable alone (accelerate's extract_model_from_parallel takes modules only)."""
    chain = [model]
    while True:
        inner = getattr(chain[-1], "module", None)
        inner = getattr(chain[-1], "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, torch.nn.Module):
            return chain
        chain.append(inner)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP and torch.compile wrappers (wrappers' last)."""
    return wrappers(model)[-1]


@contextlib.contextmanager
def forward_mode_safe(device: torch.device):
    """float32 without autocast, and scaled_dot_product_attention's math kernel (the others have no JVP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast(device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        yield


DIFFERENCE_STEP = 1e-3  # h of the difference along (v, 1, 0); its error, O(h) one-sided, O(h²) central, and
#                         float32's ~1e-7/h, is far below the pairing noise of the target it enters


def plain_float32(model: Callable, device: torch.device) -> bool:
    """Whether the prediction u_θ(z, t, s) is what the difference's own float32 pass would compute, so that the
    one-sided difference may start from it: float32 weights, no autocast, no torch.compile (whose fused kernels
    round otherwise)."""
    *outer, net = wrappers(model)
    return (isinstance(net, torch.nn.Module) and not any(hasattr(w, "_orig_mod") for w in outer)
            and not torch.is_autocast_enabled(device.type) and all(p.dtype == torch.float32 for p in net.parameters()))


def total_derivative(model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                     y: torch.Tensor | None = None, method: str = "jvp", base: torch.Tensor | None = None,
                     **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """u_θ(z, t, s) and its derivative along dz/dt = v with s fixed, d/dt u = v·∂_z u + ∂_t u, by one
    forward-mode JVP of the unwrapped network (method='jvp'), or by a difference of forward passes (no
    forward-mode pass, whose cost on CPU is about three forward passes): method='central', (u(z + hv, t + h, s) −
    u(z − hv, t − h, s)) / 2h in two passes, their mean for u; method='onesided' given `base`, u(z, t, s) already
    computed in float32 by the same network (the prediction), (u(z + hv, t + h, s) − base) / h in one pass (the
    central difference without `base`); every pass draws the same dropout masks. Without gradient, in float32
    (weights in a lower precision, as DeepSpeed keeps them under bf16 or fp16, are read as float32 copies);
    `inputs`: the network's further inputs (the guidance w), held fixed."""
    net = unwrapped(model)
    tensors = itertools.chain(net.named_parameters(), net.named_buffers()) if isinstance(net, torch.nn.Module) else ()
    widened = {name: p.float() for name, p in tensors if p.is_floating_point() and p.dtype != torch.float32}

    def u(z_, t_, s_):
        if widened:
            return torch.func.functional_call(net, widened, (z_, t_, y), {"s": s_, **inputs})
        return net(z_, t_, y, s=s_, **inputs)

    if method in ("central", "onesided"):
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            z, t, s, v, h = z.float(), t.float(), s.float(), v.float(), DIFFERENCE_STEP
            rng = _rng_state(z.device)
            ahead = u(z + h * v, t + h, s)
            if method == "onesided" and base is not None:
                return base, (ahead - base) / h
            _set_rng_state(z.device, rng)
            behind = u(z - h * v, t - h, s)
            return (ahead + behind) / 2, (ahead - behind) / (2 * h)
    with torch.no_grad(), forward_mode_safe(z.device), warnings.catch_warnings():
        # torch loads its forward-mode decompositions with torch.jit.script, deprecated: once per process.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        z, t, s, v = z.float(), t.float(), s.float(), v.float()
        return torch.func.jvp(u, (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))


def derivative_rows(model: torch.nn.Module, draw: Draw) -> torch.Tensor:
    """The samples whose target needs d/dt u: those with s ≠ t (for s = t the target is v itself), at least one (a
    sharded model gathers its weights in every forward pass, on every process at once); every sample while the
    network draws dropout masks, which the JVP shares with the prediction. On the MNIST UNet on CPU this takes 37%
    off the step with a quarter of the samples jumping, and nothing measurable with three quarters (the JVP's cost
    does not follow its batch there; docs/benchmarks.md)."""
    net = unwrapped(model)
    dropout = isinstance(net, torch.nn.Module) and any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in net.modules())
    rows = (draw.s != draw.t).nonzero().squeeze(1)
    if dropout or rows.numel() == draw.s.numel():
        return torch.arange(draw.s.numel(), device=draw.s.device)
    return rows if rows.numel() else rows.new_zeros(1)


def meanflow_target(model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                    y: torch.Tensor | None = None, along: torch.Tensor | None = None, method: str = "jvp",
                    base: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """u_tgt = v + (s − t)·d/dt u_θ(z, t, s) with the derivative along dz/dt = `along` (default v) by `method` and
    `base` (total_derivative's): the MeanFlow identity, without gradient, in float32."""
    _, dudt = total_derivative(model, z, t, s, v if along is None else along, y, method, base, **inputs)
    return v.float() + expand_like(s - t, v).float() * dudt


class MeanFlowObjective(FlowMatchingObjective):
    """The MeanFlow loss per sample (see the module docstring); draws as flow matching does, plus s."""

    def __init__(self, *args, ratio: float = 0.25, power: float = 1.0, eps: float = 1e-3, cfg_scale: float = 1.0,
                 tangent: str = "conditional", times: str = "ordered", loss: str = "u",
                 cfg_range: tuple[float, float] | list[float] = (), split: float = 0.0, velocity: str = "conditional",
                 derivative: str = "jvp", **kwargs):
        super().__init__(*args, **kwargs)
        if self.huber_c is not None:
            raise ValueError("MeanFlow's loss is its adaptively weighted squared error, not pseudo-Huber")
        if loss == "v" and tangent != "model":
            raise ValueError("the v-loss's derivative follows the model's own velocity (tangent='model')")
        if split and loss != "u":
            raise ValueError("interval splitting replaces the u-loss's target; it has no v-loss form here")
        self.ratio, self.power, self.eps, self.cfg_scale, self.tangent = ratio, power, eps, cfg_scale, tangent
        self.times, self.loss_on, self.cfg_range, self.split = times, loss, tuple(cfg_range), split
        self.jump_velocity = velocity  # 'conditional', or the network's ('model') or the EMA's ('ema') velocity
        self.derivative = derivative  # how d/dt u is taken: 'jvp' (forward mode), 'central' or 'onesided' (differences)
        self.teacher = None  # the EMA model that takes the split targets' jumps (set by the training loop), or None

    def draw(self, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             shard: BatchShard = BatchShard(), x0: torch.Tensor | None = None,
             image_cond: torch.Tensor | None = None) -> Draw:
        """Flow matching's draw with (t, s) from two times of the density (see the module docstring: s ≠ t for a
        fraction `ratio` of the samples, s = t for the others), all drawn for the global batch."""
        draw = super().draw(x1, y, generator, shard, x0, image_cond)
        n_global, device = x1.shape[0] * shard.world, x1.device
        other = shard.local(self.time_density(n_global, generator, device))
        apart = shard.local(torch.rand(n_global, generator=generator, device=device) < self.ratio)
        if self.times == "length":  # the jump's length from the density, its start spread over [0, 1 − length]
            earlier, later = draw.t * (1 - other), draw.t * (1 - other) + other
        else:
            earlier, later = torch.minimum(draw.t, other), torch.maximum(draw.t, other)
        t = earlier if self.times == "ordered" else torch.where(apart, earlier, draw.t)
        draw.t, draw.s = t, torch.where(apart, later, t)
        if self.split:  # a fraction of the s ≠ t samples split [t, s] at a uniform point
            chosen = shard.local(torch.rand(n_global, generator=generator, device=device) < self.split)
            where = shard.local(torch.rand(n_global, generator=generator, device=device, dtype=t.dtype))
            draw.mid = torch.where(apart & chosen, t + where * (draw.s - t), draw.s)
        if self.cfg_range:  # guidance as an input: ω and the interval [a, b] of each sample
            low, high = self.cfg_range
            omega, whole, a, b = (shard.local(torch.rand(n_global, generator=generator, device=device))
                                  for _ in range(4))
            omega, whole = low + (high - low) * omega, whole < 0.5
            b = a + (1 - a) * b
            w = torch.stack([omega, torch.where(whole, 0.0, a), torch.where(whole, 1.0, b)], dim=1)
            if draw.y is not None:  # no guidance where the label was dropped
                none = torch.tensor([1.0, 0.0, 1.0], device=device, dtype=w.dtype)
                w = torch.where((draw.y == self.num_classes)[:, None], none, w)
            draw.cond["w"] = w.to(draw.t.dtype)
        return draw

    def velocity(self, model: Callable, x_t: torch.Tensor, draw: Draw, v: torch.Tensor) -> torch.Tensor:
        """The conditional velocity v, or with guidance baked in ṽ = ω·v + (1 − ω)·u_θ(z_t, t, t | ∅) for the
        labelled samples; with guidance as an input, each sample's ω where its t lies in its interval [a, b]."""
        if (self.cfg_scale == 1 and not self.cfg_range) or draw.y is None:
            return v
        with torch.no_grad(), evaluation(unwrapped(model)) as net:  # the unconditional velocity: no guidance input
            unconditional = net(x_t, draw.t, torch.full_like(draw.y, self.num_classes)).to(v.dtype)
        labelled = expand_like(draw.y != self.num_classes, v)
        if not self.cfg_range:
            return torch.where(labelled, self.cfg_scale * v + (1 - self.cfg_scale) * unconditional, v)
        w = draw.cond["w"]
        inside = expand_like((draw.t >= w[:, 1]) & (draw.t <= w[:, 2]), v)
        omega = expand_like(w[:, 0], v).to(v.dtype)
        return torch.where(labelled & inside, omega * v + (1 - omega) * unconditional, v)

    def weighted(self, residual: torch.Tensor, draw: Draw) -> torch.Tensor:
        """sg(w)·‖residual‖² per sample, w = 1 / (‖residual‖² + c)^p, times the coupling's weight of each sample
        (unbalanced, partial OT)."""
        error = residual.float().square().flatten(1).sum(1)
        loss = (error.detach() + self.eps) ** -self.power * error
        return loss if draw.weight is None else loss * draw.weight.float()

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        sample = self.path.sample(draw.x0, x1.to(draw.x0.dtype), draw.t)
        v = self.velocity(model, sample.x_t, draw, sample.u_t)
        along = v
        if self.tangent == "model" or self.jump_velocity != "conditional":  # the network's velocity, no pairing noise
            own = self.teacher if self.jump_velocity == "ema" and self.teacher is not None else unwrapped(model)
            with torch.no_grad(), evaluation(own) as net:
                along = net(sample.x_t, draw.t, draw.y, **draw.cond).to(v.dtype)
        if self.jump_velocity != "conditional":  # self-distillation: the jumps take the network's, s = t keep v_t
            v = torch.where(expand_like(draw.s != draw.t, v), along, v)
        rng = _rng_state(v.device)  # the derivative's passes and the prediction see the same dropout masks
        rows = derivative_rows(model, draw)  # the JVP's samples: those with s ≠ t, whose target reads it
        z, t, s, y, cond = (sample.x_t[rows], draw.t[rows], draw.s[rows],
                            None if draw.y is None else draw.y[rows], {k: c[rows] for k, c in draw.cond.items()})
        prediction, base = None, None
        if self.derivative == "onesided" and plain_float32(model, v.device):  # the prediction is u(z, t, s) itself
            prediction = forward(model, self.alignment, draw.aligning, sample.x_t, draw.t, draw.y, s=draw.s,
                                 **draw.cond)
            base = prediction[0].detach()[rows] if prediction[0].dtype == torch.float32 else None
            _set_rng_state(v.device, rng)
        if self.loss_on == "v":  # V_θ = u_θ − (s − t)·sg(du/dt), regressed onto v
            _, dudt = total_derivative(model, z, t, s, along[rows], y, self.derivative, base=base, **cond)
            implied = expand_like(s - t, dudt).float() * dudt
            implied = implied.new_zeros(v.shape).index_copy(0, rows, implied)
        else:  # u_θ regressed onto u_tgt = v + (s − t)·sg(du/dt)
            jumps = meanflow_target(model, z, t, s, v[rows], y, along[rows], self.derivative, base=base, **cond)
            target = v.float().to(jumps.dtype).index_copy(0, rows, jumps)
        if prediction is None:
            _set_rng_state(v.device, rng)
        if draw.mid is not None:
            target = self.split_target(model, sample.x_t, draw, target)
        u, hidden = prediction or forward(model, self.alignment, draw.aligning, sample.x_t, draw.t, draw.y, s=draw.s,
                                          **draw.cond)
        residual = (u.float() - implied) - v.float() if self.loss_on == "v" else u.float() - target
        return self.aligned(self.weighted(residual, draw), draw.t, hidden, draw, x1)

    def split_target(self, model: Callable, z: torch.Tensor, draw: Draw, target: torch.Tensor) -> torch.Tensor:
        """Interval splitting (SplitMeanFlow) for the samples split at t < m < s: the jump over [t, s] as two jumps
        of the network without gradient, u_tgt = ((m − t)·u(z, t, m) + (s − m)·u(z_m, m, s)) / (s − t) with
        z_m = z + (m − t)·u(z, t, m); `target` (the JVP's, which the batch's JVP also computed for the split
        samples) elsewhere. Taken even when this process has no split
        sample (a sharded model gathers its weights in every forward pass, on every process at once)."""
        index = (draw.mid < draw.s).nonzero().squeeze(1)
        t, m, s, z = draw.t[index], draw.mid[index], draw.s[index], z[index]
        y = None if draw.y is None else draw.y[index]
        cond = {key: value[index] for key, value in draw.cond.items()}
        with torch.no_grad(), evaluation(self.teacher or unwrapped(model)) as net:
            first = net(z, t, y, s=m, **cond).float()
            z_m = (z.float() + expand_like(m - t, first).float() * first).to(z.dtype)
            second = net(z_m, m, y, s=s, **cond).float()
        split = (expand_like(m - t, first) * first + expand_like(s - m, second) * second) / expand_like(s - t, first)
        return target.index_copy(0, index, split.to(target.dtype))


@contextlib.contextmanager
def evaluation(net: torch.nn.Module):
    """The network in eval mode (dropout off) inside the block, each module's own mode restored after it (any other
    callable as it is)."""
    modes = [(module, module.training) for module in net.modules()] if isinstance(net, torch.nn.Module) else []
    if modes:
        net.eval()
    try:
        yield net
    finally:
        for module, training in modes:
            module.training = training


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
