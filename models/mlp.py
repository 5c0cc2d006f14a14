"""A time-conditioned MLP velocity field for low-dimensional data (2-D toy problems, tabular data).

x (N, D) and the time input (and the embedding of the label, for conditional models) are concatenated and
passed through `depth` hidden layers of `width` units with the activation (SiLU; SELU as torchcfm's MLP). The
time input is either the embedding of t (sinusoidal features of time_scale·t through a small MLP, as the image
models) or t itself as one more input (`time_input="raw"`, as torchcfm's MLP takes it). The output layer starts at
zero, so the untrained model predicts zero velocity.
"""

from __future__ import annotations

import torch
from torch import nn

from models.embeddings import GuidanceEmbedder, IntervalEmbedder, LabelEmbedder, TimestepEmbedder

ACTIVATIONS = {"silu": nn.SiLU, "selu": nn.SELU, "gelu": nn.GELU}
TIME_INPUTS = ("sines", "raw")  # the sinusoidal embedding of time_scale·t, or t itself as one more input


class MLP(nn.Module):
    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_dim: int = 64, num_classes: int = 0,
                 mean_flow: bool = False, time_scale: float = 1000.0, activation: str = "silu",
                 time_input: str = "sines", guidance_input: bool = False):
        super().__init__()
        if time_input == "raw":
            if mean_flow:
                raise ValueError("time_input='raw' has no second time input for MeanFlow")
            self.time_embed, self.interval_embed = None, None
            d_time = 1 + (time_dim if num_classes > 0 else 0)  # t, and the label's embedding beside it
        else:  # time_dim frequencies (256 are overkill here)
            self.time_embed = TimestepEmbedder(time_dim, freq_dim=time_dim, scale=time_scale)
            self.interval_embed = (IntervalEmbedder(time_dim, freq_dim=time_dim, scale=time_scale) if mean_flow
                                   else None)
            d_time = time_dim
        if guidance_input and time_input == "raw":
            raise ValueError("time_input='raw' has no embedding to add the guidance input to")
        self.guidance_embed = GuidanceEmbedder(time_dim, freq_dim=time_dim) if guidance_input else None
        self.label_embed = LabelEmbedder(num_classes, time_dim) if num_classes > 0 else None
        layers, d_in = [], dim + d_time
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), ACTIVATIONS[activation]()]
            d_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d_in, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                s: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, D), t (N,) in [0, 1], y (N,) labels or None -> velocity (N, D); MeanFlow models: the average
        velocity over [t, s] (s (N,) ≥ t, None for s = t); w: guidance (ω, a, b) per sample for a model trained
        with it as input (None: none)."""
        label = None if self.label_embed is None else self.label_embed(y, x.shape[0])  # y None: the null class
        if self.time_embed is None:  # t itself, the label's embedding beside it
            c = torch.cat([t.to(x.dtype)[:, None], *([] if label is None else [label.to(x.dtype)])], dim=-1)
        else:  # the embeddings of t, of s − t and of the label, summed
            c = self.time_embed(t)
            if self.interval_embed is not None:
                c = c + self.interval_embed(t, s)
            if self.guidance_embed is not None:
                c = c + self.guidance_embed(w, x.shape[0])
            if label is not None:
                c = c + label
        return self.out(self.body(torch.cat([x, c.to(x.dtype)], dim=-1)))


PRESETS = {"mlp": MLP}
