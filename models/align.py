"""Projection heads for representation alignment (flows/align.py): the network's hidden tokens of one block mapped
to the space of a target representation. A head is trained with the model and saved in model.safetensors (and the
training state), but it is not part of the velocity field: the EMA, ema.safetensors and sampling leave it out.

- `MLPProjector`: REPA's projector (Yu et al. 2025, §3.3): three linear layers with SiLU between, applied to
  each token on its own.
- `ConvProjector`: iREPA's (arXiv 2512.10794): one 3×3 convolution over the token grid, so that a token's
  projection sees its neighbours and the spatial structure is kept.
- `SepConvProjector`: the same neighbourhood at a fraction of the cost: a depthwise 3×3 convolution over the grid,
  then a 1×1 convolution to the features (ours, not iREPA's: for a narrow model, whose 3×3 head from D to the
  encoder's features costs a sizeable part of the network; 9·D + D·D_out multiply-adds a token against 9·D·D_out).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD = "align_head"  # the attribute (and state-dict prefix) of the head on a model


class MLPProjector(nn.Module):
    """Hidden tokens as a map (N, D, h, w) -> (N, D_out, h, w) through Linear(D, W), SiLU, Linear(W, W), SiLU,
    Linear(W, D_out) on each token."""

    def __init__(self, dim: int, out_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden.movedim(1, -1)).movedim(-1, 1)


class ConvProjector(nn.Module):
    """Hidden tokens as a map (N, D, h, w) -> (N, D_out, h, w) through a 3×3 convolution over the grid."""

    def __init__(self, dim: int, out_dim: int, width: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden)


class SepConvProjector(nn.Module):
    """Hidden tokens as a map (N, D, h, w) -> (N, D_out, h, w) through a depthwise 3×3 convolution (each channel
    over its neighbours) and a 1×1 convolution across channels."""

    def __init__(self, dim: int, out_dim: int, width: int = 0):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pointwise = nn.Conv2d(dim, out_dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(hidden))


PROJECTORS = {"mlp": MLPProjector, "conv": ConvProjector, "sepconv": SepConvProjector}


def attach_head(model: nn.Module, projector: str, out_dim: int, width: int) -> None:
    """Give `model` (a DiT or UNet whose `align_depth` is set) a projection head of kind `projector` from the hidden
    size of its aligned block to `out_dim`; `width`: the MLP's hidden width."""
    setattr(model, HEAD, PROJECTORS[projector](model.hidden_dim(model.align_depth), out_dim, width))


def without_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the head's tensors: the velocity field's weights."""
    return {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
