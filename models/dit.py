"""DiT as a velocity field: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

Anatomy: the input (pixels or latents) is cut into p×p patches and embedded as tokens with fixed
2-D sine-cosine positions; `depth` transformer blocks with adaLN-Zero conditioning (the time + label
embedding regresses a shift, a scale and a gate for each sub-layer; the gates start at zero, so each
block starts as the identity); a final adaptive layer norm and a zero-initialized linear map back to
patches, so the untrained model predicts zero velocity. Class-conditional models add a label
embedding with the null class of classifier-free guidance.

The velocity has the input's channels (no learned variance as in the paper's diffusion models), so
the presets have a few thousand parameters fewer than the paper's table at the same size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import embeddings
from models.embeddings import FeatureCondition, ImageCondition, IntervalEmbedder, LabelEmbedder, TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_positions(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h·grid_w, dim) fixed 2-D sine-cosine position embedding: half the features encode the row,
    half the column, each as sin/cos of the position at frequencies 1/10000^(k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"DiT width {dim} must be divisible by 4 for 2-D positions")
    freqs = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None] * freqs[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"DiT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class DiTBlock(nn.Module):
    """x (N, T, D), c (N, D) -> (N, T, D): attention and MLP, each with adaLN-Zero modulation."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """(N, T, D) -> (N, T, p·p·C): adaptive layer norm, then a linear map to patches."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """x (N, C, H, W), t (N,) in [0, 1], y (N,) labels in [0, num_classes] or None -> (N, C, H, W).

    resolution: H (square inputs) or (H, W); both must be multiples of `patch`.
    grad_checkpoint: recompute each block's activations in the backward pass instead of keeping them.
    """

    _no_split_modules = ("DiTBlock",)  # the units FSDP shards and gathers one at a time (accelerate reads this)
    grad_checkpoint = False

    def __init__(self, in_channels: int, resolution: int | tuple[int, int], patch: int = 2, width: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0, feature_dim: int = 0,
                 cond_dim: int = 0, mean_flow: bool = False, time_scale: float = 1000.0, cond_channels: int = 0,
                 cond_classes: int = 0, guidance_input: bool = False):
        super().__init__()
        self.align_depth, self.align_head = 0, None  # flow.align (flows/align.py): the block read, its head
        self.image_cond = ImageCondition(cond_channels, cond_classes) if cond_channels else None
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        if h % patch or w % patch:
            raise ValueError(f"DiT with patch {patch} needs image sides divisible by {patch}, got {h}×{w}")
        self.in_channels, self.patch, self.grid = in_channels, patch, (h // patch, w // patch)
        self.patch_embed = nn.Conv2d(in_channels + cond_channels, width, patch, stride=patch)
        # Fixed positions; not saved with the weights, as they follow from the sizes.
        self.register_buffer("pos_embed", sincos_positions(width, *self.grid)[None], persistent=False)
        self.time_embed = TimestepEmbedder(width, scale=time_scale)
        self.interval_embed = IntervalEmbedder(width, scale=time_scale) if mean_flow else None
        self.guidance_embed = embeddings.GuidanceEmbedder(width) if guidance_input else None
        self.label_embed = LabelEmbedder(num_classes, width) if num_classes > 0 else None
        self.feature_cond = FeatureCondition(feature_dim, cond_dim, width) if cond_dim > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(width, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialization: Xavier-uniform linear layers, N(0, 0.02) embeddings, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        if self.interval_embed is not None:  # its output layer stays zero: it starts adding nothing
            nn.init.normal_(self.interval_embed.embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.interval_embed.embed.mlp[2].weight)
        for embed in self.guidance_embed.embeds if self.guidance_embed is not None else ():  # zero output too
            nn.init.normal_(embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(embed.mlp[2].weight)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for p in (*self.final.adaLN[-1].parameters(), *self.final.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) -> (N, C, H, W)."""
        n, p, (gh, gw), c = x.shape[0], self.patch, self.grid, self.in_channels
        x = x.reshape(n, gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, gh * p, gw * p)

    @property
    def hidden_depths(self) -> int:
        """How many hidden states `hidden_at` can read: one per block."""
        return len(self.blocks)

    def hidden_dim(self, depth: int) -> int:
        """Channels of the hidden tokens after block `depth` (1-based)."""
        return self.blocks[0].attn.proj.out_features

    def hidden_grid(self, depth: int) -> tuple[int, int]:
        """The token grid (h, w) of the hidden state after block `depth`."""
        return self.grid

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, s=None, features=None,
                eps=None, c=None, image_cond=None, w=None, hidden_at: int = 0, hidden_only: bool = False):
        """The velocity (MeanFlow models: the average velocity over [t, s], s None for s = t; w: guidance (ω, a, b)
        per sample for a model trained with it as input, None for none); a Latent-CFM model
        trained from encoder features returns (velocity, KL per sample); image_cond: a task's spatial condition.
        hidden_at = k: (velocity, tokens after block k as a map (N, D, h, w), through the alignment head if the model
        has one); with hidden_only, those tokens alone (no head), the later blocks skipped."""
        if self.image_cond is not None:
            x = self.image_cond(x, image_cond)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (N, T, D)
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
        hidden = None
        for k, block in enumerate(self.blocks, 1):
            h = embeddings.checkpointed(block, h, emb, enabled=self.grad_checkpoint)
            if k == hidden_at:
                hidden = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *self.grid)
                if hidden_only:
                    return hidden
        out = self.unpatchify(self.final(h, emb))
        if hidden_at:
            return out, hidden if self.align_head is None else self.align_head(hidden)
        return out if kl is None else (out, kl)


# Presets: the paper's sizes (Table 1) × patch 2, 4, 8. The data give in_channels, resolution and num_classes.
SIZES = {"S": dict(depth=12, width=384, heads=6), "B": dict(depth=12, width=768, heads=12),
         "L": dict(depth=24, width=1024, heads=16), "XL": dict(depth=28, width=1152, heads=16)}
PRESETS = {f"DiT-{size}/{patch}": dict(**kwargs, patch=patch) for size, kwargs in SIZES.items() for patch in (2, 4, 8)}

