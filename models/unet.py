"""ADM UNet as a velocity field: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"
(the guided-diffusion architecture), as used by the flow-matching papers on CIFAR-10 and ImageNet.

Anatomy: a conv stem; per resolution level `num_res_blocks` residual blocks (GroupNorm, SiLU, 3×3
conv; the time (+ label) embedding enters each block, added or as a scale-shift of the second
normalization), self-attention at the chosen resolutions, then a down-sampling; a middle of
block-attention-block; the mirror path up with skip connections; GroupNorm, SiLU and a zero-initialized
3×3 conv out, so the untrained model predicts zero velocity. Class-conditional models add a label
embedding (with the null class of classifier-free guidance) to the time embedding; image-conditioned models
(data.task) take the condition's channels beside x's in the stem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import embeddings
from models.embeddings import FeatureCondition, ImageCondition, IntervalEmbedder, LabelEmbedder, TimestepEmbedder


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1, channels)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Resample(nn.Module):
    """×2 down (stride-2 3×3 conv) or up (nearest, then 3×3 conv) to the target spatial size."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.up:  # odd sizes (28 -> 14 -> 7) come back exactly when the target size is given
            x = F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest")
        return self.conv(x)


class ResBlock(nn.Module):
    """x (N, C_in, H, W), emb (N, E) -> (N, C_out, H, W), optionally resampled inside the block
    (ADM's resblock_updown: the resampling acts on both the residual and the skip path)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.resample = resample
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.dropout = norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))  # the block starts as the identity
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, ceil_mode=True)
        if self.resample == "up":
            return F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h, size), self._resample(x, size)
        h = self.conv1(h)
        e = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.scale_shift:  # ADM's adaptive group norm: norm(h)·(1 + scale) + shift
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, heads of `head_channels` channels."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention over {channels} channels cannot have heads of {head_channels}")
        self.heads = channels // head_channels
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (N, heads, HW, d)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Level(nn.Module):
    """One residual block, then attention where the resolution asks for it."""

    def __init__(self, block: ResBlock, attention: Attention | None):
        super().__init__()
        self.block, self.attention = block, attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        return x if self.attention is None else self.attention(x)


class UNet(nn.Module):
    """ADM UNet. x (N, C, H, W), t (N,) in [0, 1], y (N,) labels in [0, num_classes] or None -> (N, C, H, W).

    channels: base width; channel_mult: width multiplier per resolution level (one down-sampling
    between levels); attention_resolutions: spatial sizes (in pixels) that get self-attention.
    grad_checkpoint: recompute the activations of each level (residual block + attention) and of the middle in the
    backward pass instead of keeping them.
    """

    _no_split_modules = ("ResBlock", "Attention")  # the units FSDP shards and gathers one at a time
    grad_checkpoint = False

    def __init__(self, in_channels: int, resolution: int, channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(16,), head_channels: int = 64,
                 dropout: float = 0.0, num_classes: int = 0, scale_shift: bool = False,
                 resblock_updown: bool = False, feature_dim: int = 0, cond_dim: int = 0, mean_flow: bool = False,
                 time_scale: float = 1000.0, cond_channels: int = 0, cond_classes: int = 0,
                 guidance_input: bool = False):
        super().__init__()
        self.align_depth, self.align_head = 0, None  # flow.align (flows/align.py): the block read, its head
        self.resolution = resolution
        self.image_cond = ImageCondition(cond_channels, cond_classes) if cond_channels else None
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=channels, scale=time_scale)
        self.interval_embed = IntervalEmbedder(emb_dim, freq_dim=channels, scale=time_scale) if mean_flow else None
        self.guidance_embed = embeddings.GuidanceEmbedder(emb_dim, freq_dim=channels) if guidance_input else None
        self.label_embed = LabelEmbedder(num_classes, emb_dim) if num_classes > 0 else None
        self.feature_cond = FeatureCondition(feature_dim, cond_dim, emb_dim) if cond_dim > 0 else None

        def level(c_in: int, c_out: int, size: int) -> Level:
            use_attention = size in attention_resolutions
            return Level(ResBlock(c_in, c_out, emb_dim, dropout, scale_shift),
                         Attention(c_out, min(head_channels, c_out)) if use_attention else None)

        def resample(c: int, up: bool) -> nn.Module:
            if resblock_updown:
                return ResBlock(c, c, emb_dim, dropout, scale_shift, resample="up" if up else "down")
            return Resample(c, up)

        # Down path: every module's output is kept for the skip connections.
        self.stem = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, c, size = [channels], channels, resolution
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level(c, channels * mult, size))
                c = channels * mult
                skips.append(c)
            if i < len(channel_mult) - 1:
                self.down.append(resample(c, up=False))
                skips.append(c)
                size = (size + 1) // 2
        self.middle = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, scale_shift),
                                     Attention(c, min(head_channels, c)),
                                     ResBlock(c, c, emb_dim, dropout, scale_shift)])
        # Up path: num_res_blocks + 1 blocks per level, each taking one skip; up-sampling ends a level.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(level(c + skips.pop(), channels * mult, size))
                c = channels * mult
            if i > 0:
                self.up.append(resample(c, up=True))
                size *= 2  # nominal; the true size is taken from the skip at run time
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, in_channels, 3, padding=1)))

    @property
    def hidden_depths(self) -> int:
        """How many hidden states `hidden_at` can read: the modules of the down path, then the middle."""
        return len(self.down) + 1

    def hidden_dim(self, depth: int) -> int:
        """Channels of the hidden state after down-path module `depth` (1-based; len(down) + 1: the middle)."""
        modules = [*self.down, self.middle[-1]][:depth]
        for module in reversed(modules):
            block = module.block if isinstance(module, Level) else module
            if isinstance(block, ResBlock):
                return block.conv2.out_channels
        return self.stem.out_channels

    def hidden_grid(self, depth: int) -> tuple[int, int]:
        """The spatial size (h, w) of the hidden state after down-path module `depth`, for inputs of the model's
        resolution."""
        h = w = self.resolution
        for module in self.down[:depth]:
            if isinstance(module, Resample) or getattr(module, "resample", None) == "down":
                h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, s=None, features=None,
                eps=None, c=None, image_cond=None, w=None, hidden_at: int = 0, hidden_only: bool = False):
        """The velocity (MeanFlow models: the average velocity over [t, s], s None for s = t; w: guidance (ω, a, b)
        per sample for a model trained with it as input, None for none); a Latent-CFM model
        trained from encoder features returns (velocity, KL per sample); image_cond: a task's spatial condition.
        hidden_at = k: (velocity, the hidden state after down-path module k (len(down) + 1: the middle), a map
        (N, C, h, w), through the alignment head if the model has one); with hidden_only, that map alone (no head),
        the rest of the network skipped."""
        if self.image_cond is not None:
            x = self.image_cond(x, image_cond)
        emb = self.time_embed(t)
        if self.interval_embed is not None:
            emb = emb + self.interval_embed(t, s)
        if self.guidance_embed is not None:
            emb = emb + self.guidance_embed(w, x.shape[0])
        if self.label_embed is not None:  # y None: the null class
            emb = emb + self.label_embed(y, x.shape[0])
        kl = None
        if self.feature_cond is not None:
            emb_c, kl = self.feature_cond(features, eps, c)
            emb = emb + emb_c
        h = self.stem(x)
        skips = [h]
        on = self.grad_checkpoint
        hidden = None
        for k, module in enumerate(self.down, 1):
            h = embeddings.checkpointed(module, h, emb, enabled=on) if not isinstance(module, Resample) else module(h)
            skips.append(h)
            if k == hidden_at:
                hidden = h
                if hidden_only:
                    return hidden
        h = embeddings.checkpointed(self.middle_forward, h, emb, enabled=on)
        if hidden_at == len(self.down) + 1:
            hidden = h
            if hidden_only:
                return hidden
        for module in self.up:
            if isinstance(module, Level):
                h = embeddings.checkpointed(module, torch.cat([h, skips.pop()], dim=1), emb, enabled=on)
            else:  # up-sample to the size of the skip the next block takes
                size = tuple(skips[-1].shape[-2:])
                h = module(h, size) if isinstance(module, Resample) else module(h, emb, size)
        if hidden_at:
            return self.out(h), hidden if self.align_head is None else self.align_head(hidden)
        return self.out(h) if kl is None else (self.out(h), kl)

    def middle_forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)


# Presets: name -> constructor arguments (the data give in_channels, resolution and num_classes).
PRESETS = {
    # The flow-matching CIFAR-10 network of Tong et al. 2024 (torchcfm) and Lipman et al. 2023: 35,746,307 parameters.
    "unet-cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                         head_channels=64, dropout=0.1),
    # A small network for 28×28 digits that trains on a few CPU cores (686,769 parameters for 1 channel;
    # 86 images/s for forward, backward and AdamW on 2 cores, where 32 base channels manage 40).
    "unet-mnist": dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(7,),
                       head_channels=64, dropout=0.0),
    # ADM's ImageNet-64 / LSUN-256 style networks (scale-shift norm, resampling residual blocks).
    "unet-64": dict(channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                    head_channels=64, dropout=0.1, scale_shift=True, resblock_updown=True),
    "unet-256": dict(channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     attention_resolutions=(32, 16, 8), head_channels=64, dropout=0.1, scale_shift=True,
                     resblock_updown=True),
}
