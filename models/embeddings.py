"""Conditioning embedders shared by every model: timestep, class label, encoder features and spatial conditions;
and the activation checkpointing of their blocks."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] (N,) -> (N, dim): sinusoidal features (Vaswani et al. 2017) of scale·t, then an MLP.

    The ×1000 (the default scale) puts t on the scale the frequencies were designed for; it lives here and
    nowhere else. MeanFlow differentiates the network in t, and sines of 1000·t make that derivative a
    thousand times larger: its models use scale 1 (model.time_scale), as MeanFlow's own code feeds t.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.max_period, self.scale = freq_dim, max_period, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = self.scale * t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))


class IntervalEmbedder(nn.Module):
    """MeanFlow's second time (Geng et al. 2025): the model predicts the average velocity over [t, s], and the
    interval's length s − t (0 when s is None: the instantaneous velocity) is embedded like t and added to the
    time embedding. The output layer starts at zero, so a flow-matching model given this input starts as the
    same model (train.init_from)."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.embed = TimestepEmbedder(dim, freq_dim, scale=scale)
        nn.init.zeros_(self.embed.mlp[2].weight)
        nn.init.zeros_(self.embed.mlp[2].bias)

    def forward(self, t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return self.embed(torch.zeros_like(t) if s is None else s - t)


class GuidanceEmbedder(nn.Module):
    """Classifier-free guidance as a model input (improved MeanFlow, Geng et al. 2025b): w (N, 3) holds the scale ω
    and the interval [a, b] of t it guides in; each is embedded like t (sines of the value, then an MLP) and the
    three are added to the time embedding (iMF feeds them to a DiT as in-context tokens; here they join the
    embedding every model already has). None is no guidance, (1, 0, 1). The output layers start at zero: a model
    given this input starts as the same model (train.init_from)."""

    NONE = (1.0, 0.0, 1.0)  # ω = 1 on [0, 1]: no guidance

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.embeds = nn.ModuleList(TimestepEmbedder(dim, freq_dim, scale=1.0) for _ in range(3))
        for embed in self.embeds:
            nn.init.zeros_(embed.mlp[2].weight)
            nn.init.zeros_(embed.mlp[2].bias)
        self.register_buffer("none", torch.tensor(self.NONE), persistent=False)  # not in the weight files

    def forward(self, w: torch.Tensor | None, batch: int) -> torch.Tensor:
        if w is None:
            w = self.none.expand(batch, 3)
        return sum(embed(w[:, k]) for k, embed in enumerate(self.embeds))


class LabelEmbedder(nn.Module):
    """Class labels (N,) in [0, num_classes] -> (N, dim). Label `num_classes` is the null class,
    the 'no label' that classifier-free guidance needs; the objective decides when to use it."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """y (batch,) labels, or None for 'no label' (the null class) -> (batch, dim)."""
        if y is None:
            y = torch.full((batch,), self.num_classes, device=self.table.weight.device, dtype=torch.long)
        return self.table(y)


class FeatureCondition(nn.Module):
    """Latent-CFM's conditioning (Samaddar et al. 2025, "Efficient Flow Matching using Latent Variables"):
    features f (N, F) of a frozen pretrained encoder pass through a trainable stochastic layer
    q(c|f) = N(μ(f), diag σ²(f)), c (N, cond_dim) = μ + σ·ε, whose embedding (N, dim) is added to the
    time embedding. Training gives f and ε and gets the KL(q(c|f) ‖ N(0, I)) per sample for the loss;
    sampling gives c itself: drawn from the prior N(0, I), or `sample(f, ε)` of a reference image."""

    def __init__(self, feature_dim: int, cond_dim: int, dim: int):
        super().__init__()
        self.feature_dim, self.cond_dim = feature_dim, cond_dim
        self.posterior = nn.Linear(feature_dim, 2 * cond_dim)
        self.embed = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sample(self, features: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c = μ(f) + σ(f)·ε and KL(q(c|f) ‖ N(0, I)) per sample."""
        mean, logvar = self.posterior(features.to(self.posterior.weight.dtype)).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1)
        return mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype), kl

    def forward(self, features: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding of c (given, or sampled from the features) and the KL (None when c was given)."""
        if c is None:
            if features is None or eps is None:
                raise ValueError("a Latent-CFM model needs its condition: c, or encoder features and noise eps")
            c, kl = self.sample(features, eps)
        else:
            kl = None
        return self.embed(c.to(self.posterior.weight.dtype)), kl


class ImageCondition(nn.Module):
    """A task's spatial condition (data/tasks.py) beside x: x (N, C, H, W), cond (N, C_c, H, W) -> (N, C + C_c, H, W),
    concatenated channel-wise as LFM's models take it (Dao et al. 2023). A semantic map arrives as `classes` one-hot
    channels and is first projected to `channels` by a learned 1×1 convolution (trained with the model; LFM's never
    receives a gradient)."""

    def __init__(self, channels: int, classes: int = 0):
        super().__init__()
        self.project = nn.Conv2d(classes, channels, 1) if classes else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("an image-conditioned model needs its condition (image_cond)")
        cond = cond.to(x.dtype)
        if self.project is not None:
            cond = self.project(cond)
        return torch.cat([x, cond], dim=1)


def checkpointed(module: nn.Module, *args, enabled: bool = False):
    """module(*args); `enabled` while gradients are recorded, its activations are not kept for the backward pass
    but recomputed there (train.grad_checkpoint: memory for ~1/3 more compute). The gradients are exact: the
    recomputation replays the forward's random draws (dropout)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
