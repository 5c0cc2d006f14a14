"""Shortcut models (Frans et al., ICLR 2025, "One Step Diffusion via Shortcut Models"): a network u_θ(z, t, s) told
the step size d = s − t as its second time input, trained by flow matching at d = 0 and by self-consistency at the
sizes the sampler jumps with, and no JVP at all.

In this toolkit's convention (t = 0 noise, t = 1 data; the network is the MeanFlow one, whose interval input
embeds s − t) a jump of size d is z_{t+d} = z_t + d·u(z_t, t, t + d), and two half jumps make one whole:

    u(z_t, t, t + d) = ½·u(z_t, t, t + d/2) + ½·u(z', t + d/2, t + d),   z' = z_t + (d/2)·u(z_t, t, t + d/2)

Per sample (a fraction `fraction` of each batch by self-consistency, the rest by flow matching):
- flow matching: ‖u_θ(z_t, t, t) − v_t‖², t from the time density;
- self-consistency: ‖u_θ(z_t, t, t + d) − sg(target)‖², the right side above as target, d drawn uniformly from
  {2/M, 4/M, ..., 1} (M = `steps`, the finest step 1/M), t uniformly from the multiples of d below 1 (the positions
  a d-step sampler visits). The target's two half jumps are taken by the EMA weights (`teacher`; the paper's
  choice) or, without them, by the online network under no_grad; a half jump of the finest size 1/M is the
  network's flow-matching velocity u(z, t, t), the level that flow matching trains directly.

Losses are mean squared errors over the sample's elements (flow matching's), times a coupling's per-sample weight.
Sampling: `--solver shortcut --steps N` jumps over the uniform grid with d = 1/N (N a power of 2 up to M is what
the network was trained for), N network calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flows.align import forward
from flows.couplings import BatchShard
from flows.meanflow import evaluation, unwrapped
from flows.objective import Draw, FlowMatchingObjective, ObjectiveOutput
from flows.paths import expand_like


class ShortcutObjective(FlowMatchingObjective):
    """The shortcut loss per sample (see the module docstring); draws as flow matching does, plus s = t + d."""

    def __init__(self, *args, fraction: float = 0.25, steps: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        if steps < 2 or steps & (steps - 1):
            raise ValueError(f"the finest shortcut step is 1/M with M a power of 2 ≥ 2, got M = {steps}")
        self.fraction, self.steps = fraction, steps
        self.teacher = None  # the EMA model that takes the targets' half jumps (set by the training loop), or None

    def draw(self, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             shard: BatchShard = BatchShard(), x0: torch.Tensor | None = None,
             image_cond: torch.Tensor | None = None) -> Draw:
        """Flow matching's draw, then for a fraction of the samples a step size d and a grid time t, all drawn for
        the global batch; s = t + d (s = t for flow matching)."""
        draw = super().draw(x1, y, generator, shard, x0, image_cond)
        n_global, device = x1.shape[0] * shard.world, x1.device
        consistent = shard.local(torch.rand(n_global, generator=generator, device=device) < self.fraction)
        level = shard.local(torch.randint(0, int(math.log2(self.steps)), (n_global,), generator=generator,
                                          device=device))
        position = shard.local(torch.rand(n_global, generator=generator, device=device))
        d = 2.0 ** -level.to(draw.t.dtype)  # 1, 1/2, ..., 2/M
        on_grid = torch.floor(position / d) * d
        draw.t = torch.where(consistent, on_grid, draw.t)
        draw.s = torch.where(consistent, on_grid + d, draw.t)
        return draw

    def half_jump(self, net: Callable, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        """u(z, t, t + h), or at the finest half step h = 1/M the flow-matching velocity u(z, t, t)."""
        finest = h <= 1 / self.steps
        return net(z, t, y, s=torch.where(finest, t, t + h)).float()

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        sample = self.path.sample(draw.x0, x1.to(draw.x0.dtype), draw.t)
        target = sample.u_t.float()
        # Self-consistency: two half jumps of the teacher, on those samples only, taken even when this process has
        # none of them (a sharded model gathers its weights in every forward pass, on every process at once).
        apart = (draw.s != draw.t).nonzero().squeeze(1)
        z, t, h = sample.x_t[apart], draw.t[apart], (draw.s - draw.t)[apart] / 2
        y = None if draw.y is None else draw.y[apart]
        with torch.no_grad(), evaluation(self.teacher or unwrapped(model)) as net:
            first = self.half_jump(net, z, t, h, y)
            second = self.half_jump(net, (z.float() + expand_like(h, first) * first).to(z.dtype), t + h, h, y)
        target = target.index_copy(0, apart, (first + second) / 2)
        u, hidden = forward(model, self.alignment, draw.aligning, sample.x_t, draw.t, draw.y, s=draw.s)
        loss = self.distance(u, target)
        if draw.weight is not None:
            loss = loss * draw.weight.float()
        return self.aligned(loss, draw.t, hidden, draw, x1)
