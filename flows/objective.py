"""The conditional flow-matching objective (Lipman et al. 2023, eq. 9; Tong et al. 2024, eq. 14).

All training randomness lives here: the noise x0, its pairing with the data, t, and label dropout.
Every draw is made for the global batch from a generator seeded per micro-step and sliced to this
process's share, so the same config trains the same way on any number of processes and resumes
exactly from any step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flows.align import forward
from flows.couplings import BatchShard
from flows.paths import Prediction


@dataclass
class Draw:
    """The randomness of one micro-step for this process's data: the noise x0 paired with each x1
    (N, ...), the times t (N,) and the labels after dropout (N,) or None. For the autoencoder
    objective x0 is the reparameterization noise ε of the latent and t is None."""

    x0: torch.Tensor
    t: torch.Tensor | None
    y: torch.Tensor | None
    cond: dict = field(default_factory=dict)  # Latent-CFM: encoder features and the noise ε of c; data.task: image_cond
    s: torch.Tensor | None = None  # MeanFlow: the end of the interval [t, s] (N,)
    mid: torch.Tensor | None = None  # MeanFlow's interval splitting: where [t, s] is split (N,); s: not split
    weight: torch.Tensor | None = None  # the coupling's loss weight of each sample (N,) (unbalanced, partial OT)
    eps: torch.Tensor | None = None  # a bridge path's noise ε (N, ...)
    aligning: bool = False  # flow.align: this micro-step adds the alignment term (HASTE stops it)
    align_target: torch.Tensor | None = None  # REPA: the frozen encoder's features of the clean data (N, D, h, w)
    step: int = 0  # the optimizer step this micro-step belongs to (AlphaFlow's curriculum reads it)


@dataclass
class ObjectiveOutput:
    """Per-sample loss (N,) in fp32 and the times t (N,) at which it was taken (None: no time); with flow.align, the
    alignment loss per sample (N,) and its weight λ."""

    loss: torch.Tensor
    t: torch.Tensor | None
    align: torch.Tensor | None = None
    align_weight: float = 0.0
    settings: dict = field(default_factory=dict)  # what the objective set for this micro-step (AlphaFlow's α), logged

    def total(self) -> torch.Tensor:
        """What is minimized, per sample: the loss, plus λ·the alignment loss."""
        return self.loss if self.align is None else self.loss + self.align_weight * self.align


class FlowMatchingObjective:
    """‖v_θ(x_t, t, y) − u_t‖² per sample, with x_t and u_t from `path` for x0 paired to x1 by `coupling`; with
    `prediction` (flows/paths.py), w(t)·‖f_θ(x_t, t, y) − target‖² for a network that predicts the data, the noise
    or the score instead, w the prediction's loss weight.

    source(n, generator, device) draws x0 of the data's shape; time_density(n, generator, device)
    draws t. Labels are replaced by the null class `num_classes` with probability `label_dropout`,
    which trains the unconditional velocity used by classifier-free guidance.

    `draw` holds all the randomness and no model, so a training loop may prepare the next
    micro-step's draw (an OT solve on the CPU) while the current one trains; `loss` uses the model.
    """

    def __init__(self, path, coupling, time_density, source: Callable, label_dropout: float = 0.0,
                 num_classes: int = 0, features: Callable | None = None, cond_dim: int = 0, beta: float = 0.0,
                 huber_c: float | None = None, cond_dropout: float = 0.0, null_condition: Callable | None = None,
                 prediction: Prediction | None = None):
        self.path, self.coupling, self.time_density, self.source = path, coupling, time_density, source
        self.prediction = prediction or Prediction(path)
        self.label_dropout, self.num_classes = label_dropout, num_classes
        # None: the squared error; c ≥ 0: the pseudo-Huber loss √(‖·‖² + c²) − c (c = 0: 0.00054·√D, Song &
        # Dhariwal 2023, as Lee et al. 2024 use it for rectified flows), ‖·‖² summed over the sample's elements.
        self.huber_c = huber_c
        # Latent-CFM (Samaddar et al. 2025, eq. 8): the loss adds β·KL(q(c|f) ‖ N(0, I)), f = features(x1).
        self.features, self.cond_dim, self.beta = features, cond_dim, beta
        # Image-conditioned tasks: the spatial condition is replaced by null_condition(condition) ("nothing known")
        # with probability cond_dropout, which trains the unconditional velocity that guidance needs.
        self.cond_dropout, self.null_condition = cond_dropout, null_condition
        self.alignment = None  # flow.align's regulariser (flows/align.py), set by the training loop

    def aligned(self, loss: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor | None, draw: Draw,
                x1: torch.Tensor) -> ObjectiveOutput:
        """The output with the alignment loss of the hidden state, when this micro-step aligns."""
        if hidden is None:
            return ObjectiveOutput(loss=loss, t=t)
        a = self.alignment
        return ObjectiveOutput(loss=loss, t=t, align=a.loss(hidden, draw.align_target, self.path, draw.x0, x1, draw.t,
                                                            draw.y, draw.cond),
                               align_weight=a.weight)

    def draw(self, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             shard: BatchShard = BatchShard(), x0: torch.Tensor | None = None,
             image_cond: torch.Tensor | None = None) -> Draw:
        """The randomness of a micro-step; x0: the noise that the data come paired with (reflow pairs), if any;
        image_cond: the spatial condition of an image-conditioned task (N, C_c, H, W), dropped here."""
        n_global, device = x1.shape[0] * shard.world, x1.device
        pairing = self.coupling.pair(self.source(n_global, generator, device) if x0 is None else x0, x1, shard,
                                     generator, y)
        x0 = pairing.x0
        t = shard.local(self.time_density(n_global, generator, device))
        if y is not None and self.label_dropout > 0:
            drop = shard.local(torch.rand(n_global, generator=generator, device=device) < self.label_dropout)
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        cond = {}
        if self.features is not None:
            eps = shard.local(torch.randn(n_global, self.cond_dim, generator=generator, device=device))
            cond = {"features": self.features(x1), "eps": eps}
        if image_cond is not None:
            if self.cond_dropout > 0:
                drop = shard.local(torch.rand(n_global, generator=generator, device=device) < self.cond_dropout)
                image_cond = torch.where(drop[:, None, None, None], self.null_condition(image_cond), image_cond)
            cond["image_cond"] = image_cond
        bridge_noise = None
        if self.path.bridge:  # drawn last, so that the other draws are those of the paths without bridge noise
            bridge_noise = shard.local(torch.randn(n_global, *x1.shape[1:], generator=generator, device=device))
        return Draw(x0=x0, t=t, y=y, cond=cond, weight=pairing.weight, eps=bridge_noise)

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        sample = self.path.sample(draw.x0, x1.to(draw.x0.dtype), draw.t, draw.eps)
        out, hidden = forward(model, self.alignment, draw.aligning, sample.x_t, draw.t, draw.y, **draw.cond)
        kl = None
        if isinstance(out, tuple):  # Latent-CFM: the velocity and the KL of its condition
            out, kl = out
        loss = self.distance(self.prediction.output(out, draw.t), self.prediction.target(sample))
        for weight in (self.prediction.loss_weight(draw.t), draw.weight):
            if weight is not None:
                loss = loss * weight.float()
        return self.aligned(loss if kl is None else loss + self.beta * kl.float(), draw.t, hidden, draw, x1)

    def distance(self, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss between a prediction and its target: the mean squared error, or pseudo-Huber."""
        squared = (v.float() - target.float()).square().flatten(1)
        if self.huber_c is None:
            return squared.mean(1)
        c = self.huber_c or 0.00054 * squared.shape[1] ** 0.5
        return (squared.sum(1) + c * c).sqrt() - c

    def __call__(self, model: Callable, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
                 shard: BatchShard = BatchShard()) -> ObjectiveOutput:
        return self.loss(model, x1, self.draw(x1, y, generator, shard))


class AutoencoderObjective:
    """‖D(z) − x‖² averaged over pixels + β·KL(q(z|x) ‖ N(0, I)) / pixels, per sample, z = μ + σ·ε
    (Kingma & Welling 2014, eq. 10, with a weighted KL as in Rombach et al. 2022). ε of the global batch is
    drawn from the micro-step's generator, like every draw."""

    def __init__(self, kl_weight: float, latent_shape: tuple[int, ...]):
        self.kl_weight, self.latent_shape = kl_weight, latent_shape

    def draw(self, x1: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             shard: BatchShard = BatchShard(), x0: torch.Tensor | None = None,
             image_cond: torch.Tensor | None = None) -> Draw:
        eps = torch.randn(x1.shape[0] * shard.world, *self.latent_shape, generator=generator, device=x1.device)
        return Draw(x0=shard.local(eps), t=None, y=None)

    def loss(self, model: Callable, x1: torch.Tensor, draw: Draw) -> ObjectiveOutput:
        reconstruction, posterior = model(x1, draw.x0)
        pixels = x1[0].numel()
        loss = (reconstruction.float() - x1.float()).square().flatten(1).mean(1)
        return ObjectiveOutput(loss=loss + self.kl_weight * posterior.kl().float() / pixels, t=None)


class LossByTime:
    """Running sums of the per-sample loss in `bins` equal bins of t, kept on the device (no host
    sync per step) and read out, summed over processes, at log time."""

    def __init__(self, bins: int, device: torch.device):
        self.bins = bins
        self.sums = torch.zeros(bins, device=device)
        self.counts = torch.zeros(bins, device=device)

    def add(self, out: ObjectiveOutput) -> None:
        if out.t is None:
            return
        idx = (out.t.detach() * self.bins).long().clamp_(0, self.bins - 1)
        self.sums.index_add_(0, idx, out.loss.detach().float())
        self.counts.index_add_(0, idx, torch.ones_like(out.t, dtype=torch.float))

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Mean loss per bin (bins with no sample are left out), then reset."""
        sums, counts = reduce(self.sums).tolist(), reduce(self.counts).tolist()
        self.sums.zero_()
        self.counts.zero_()
        return {f"loss_t/{i / self.bins:g}-{(i + 1) / self.bins:g}": s / c
                for i, (s, c) in enumerate(zip(sums, counts)) if c > 0}
