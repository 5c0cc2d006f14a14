"""Representation regularisers added to the flow loss (flow.align, settings in the align: section).

loss = flow loss + λ·L_align, L_align per sample, on the hidden state h of one block of the network (a DiT block,
or a UNet down-path module; models read it with `hidden_at`), as a map (N, D, h, w) of tokens:

- 'repa' (Yu et al. 2025, "Representation Alignment for Generation", eq. 4): a projection head p (models/align.py)
  maps the noisy input's tokens to the patch features y* of a frozen encoder of the clean image;
  L = 1 − mean over tokens of cos(p(h), y*), y* resized to the model's token grid where the grids differ (REPA
  writes −cos; the offset 1 makes a perfect alignment 0). With align.projector=conv (iREPA, arXiv 2512.10794) the
  encoder's tokens are also normalized over space, each channel to zero mean and unit variance over the tokens
  (likewise with align.projector=sepconv, the 3×3 neighbourhood as a cheaper depthwise-then-1×1 head).
- 'dispersive' (Wang & He 2025, "Diffuse and Disperse", InfoNCE without positives): z_i the tokens of sample i
  mean-pooled (align.pool=mean) or flattened into one vector (flatten, as the paper's code), D its length,
  L = log E_ij exp(−d_ij / τ) over this process's batch (every sample carries the batch's value), d_ij =
  ‖z_i − z_j‖² / D (align.distance=l2, the paper's choice) or −cos(z_i, z_j) (cosine, its variant, which the
  network cannot satisfy by scaling z up); it pushes the samples' representations apart, no encoder, no head.
- 'sra' (Jiang et al. 2025, "Self-Representation Alignment"): the head maps the online model's block `depth` at
  time t to the EMA model's block `target_depth` at the less noisy t + time_gap (same noise and data); L as for
  repa. No encoder.

HASTE (arXiv 2505.16792): with align.stop_step, the term is dropped from that optimizer step on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from config import Config
from errors import UserError, check_name
from models.align import PROJECTORS, attach_head


def resized(target: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A feature map (N, D, h', w') on the token grid (h, w) (bilinear; unchanged when the grids agree)."""
    if tuple(target.shape[-2:]) == tuple(grid):
        return target
    return F.interpolate(target.float(), size=tuple(grid), mode="bilinear", align_corners=False)


def spatially_normalized(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalization: each channel of each sample to zero mean and unit variance over the tokens."""
    target = target.float()
    mean, std = target.mean((2, 3), keepdim=True), target.std((2, 3), keepdim=True)
    return (target - mean) / (std + eps)


def cosine_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − the mean over tokens of cos(projected, target) per sample (N,); maps (N, D, h, w), the target resized
    to the projection's grid."""
    target = resized(target, projected.shape[-2:])
    return 1 - F.cosine_similarity(projected.float(), target.float(), dim=1).flatten(1).mean(1)


def dispersive_loss(hidden: torch.Tensor, temperature: float, pool: str = "mean", distance: str = "l2") -> torch.Tensor:
    """log E_ij exp(−d_ij / τ) of the batch's tokens (N, C, h, w), each sample's mean-pooled (z: N, C) or flattened
    (z: N, C·h·w), d_ij = ‖z_i − z_j‖² / D ('l2') or −cos(z_i, z_j) ('cosine'), as (N,) (each sample carries the
    batch's value, so that the loop's mean is it)."""
    z = hidden.float().mean((2, 3)) if pool == "mean" else hidden.float().flatten(1)
    if distance == "cosine":
        z = F.normalize(z, dim=1)
        d = -(z @ z.T)
    else:
        d = torch.cdist(z, z).square() / z.shape[1]
    value = torch.logsumexp((-d / temperature).flatten(), 0) - 2 * torch.log(torch.tensor(float(len(z))))
    return value.expand(len(z))


@dataclass
class Alignment:
    """The regulariser of one run: which block the online model reads (`depth`), λ (`weight`), the step it stops
    at (HASTE; 0: never), and for sra the EMA model (`teacher`) and its block and time gap."""

    method: str
    weight: float
    depth: int
    stop_step: int = 0
    normalize: bool = False  # repa with a conv projector: iREPA's spatial normalization of the encoder's tokens
    temperature: float = 0.5
    pool: str = "mean"
    distance: str = "l2"
    teacher: torch.nn.Module | None = None
    target_depth: int = 0
    time_gap: float = 0.1
    grid: tuple[int, int] = (0, 0)  # the aligned block's token grid (h, w)

    def active(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) is aligned."""
        return self.stop_step == 0 or step < self.stop_step

    def loss(self, hidden: torch.Tensor, target: torch.Tensor | None, path, x0: torch.Tensor, x1: torch.Tensor,
             t: torch.Tensor, y: torch.Tensor | None, cond: dict) -> torch.Tensor:
        """L_align per sample (N,) of the online model's (projected) hidden state; `target`: repa's encoder
        features (N, D', h', w'); the rest (the micro-step's draw) is what sra's teacher sees."""
        return ALIGNERS[self.method](self, hidden, target, path, x0, x1, t, y, cond)


def _repa(a: Alignment, hidden, target, path, x0, x1, t, y, cond) -> torch.Tensor:
    return cosine_loss(hidden, spatially_normalized(target) if a.normalize else target)


def _dispersive(a: Alignment, hidden, target, path, x0, x1, t, y, cond) -> torch.Tensor:
    return dispersive_loss(hidden, a.temperature, a.pool, a.distance)


@torch.no_grad()
def _sra_target(a: Alignment, path, x0, x1, t, y, cond) -> torch.Tensor:
    later = (t + a.time_gap).clamp(max=1.0)
    x_later = path.sample(x0, x1.to(x0.dtype), later).x_t
    return a.teacher(x_later, later, y, **cond, hidden_at=a.target_depth, hidden_only=True)


def _sra(a: Alignment, hidden, target, path, x0, x1, t, y, cond) -> torch.Tensor:
    return cosine_loss(hidden, _sra_target(a, path, x0, x1, t, y, cond))


# flow.align -> L_align(alignment, projected hidden state, encoder target, path, x0, x1, t, y, cond) per sample.
ALIGNERS: dict[str, Callable[..., torch.Tensor]] = {"repa": _repa, "dispersive": _dispersive, "sra": _sra}
NEEDS_HEAD = ("repa", "sra")


def forward(model, alignment: Alignment | None, aligning: bool, x_t, t, y, **kwargs):
    """model(x_t, t, y, **kwargs), and the (projected) hidden state of the aligned block when `aligning`
    (else None)."""
    if not aligning:
        return model(x_t, t, y, **kwargs), None
    return model(x_t, t, y, **kwargs, hidden_at=alignment.depth)


# ---------------------------------------------------------------------------------------------
# Building it from the config.


def default_depth(model, method: str) -> int:
    """align.depth 0: a third of a DiT's blocks, at most 8 (REPA aligns block 8 of SiT-XL's 28, 4 of B's 12);
    a UNet's middle (sra, whose target is the middle: half way down)."""
    if type(model).__name__ == "DiT":
        return max(1, min(8, model.hidden_depths // 3))
    return max(1, model.hidden_depths // 2) if method == "sra" else model.hidden_depths


def check_config(cfg: Config) -> None:
    """flow.align's name and what it cannot go with, one line each (the model's depth is checked when built)."""
    method = cfg.flow.align
    a, default = cfg.align, type(cfg.align)()
    if not method:
        changed = [k for k in vars(a) if getattr(a, k) != getattr(default, k)]
        if changed:
            raise UserError(f"align.{changed[0]} sets up flow.align, which is not set; set flow.align=repa, dispersive "
                            f"or sra, or remove align.{changed[0]}")
        return
    check_name(ALIGNERS, method, "flow.align")
    check_name(PROJECTORS, a.projector, "align.projector")
    check_name(("mean", "flatten"), a.pool, "align.pool")
    check_name(("l2", "cosine"), a.distance, "align.distance")
    if cfg.flow.objective == "autoencoder":
        raise UserError(f"flow.align={method} regularises a velocity field's hidden states; flow.objective="
                        f"{cfg.flow.objective} trains none: remove flow.align")
    if cfg.model.name == "mlp":
        raise UserError(f"flow.align={method} aligns the tokens of an image model (DiT, UNet); the MLP has none: "
                        "choose model.name=unet-... or DiT-... or remove flow.align")
    if cfg.latentcfm.encoder:
        raise UserError(f"flow.align={method} does not go with Latent-CFM (latentcfm.encoder) here; remove one")
    if method != "repa":
        for key in ("encoder", "weights", "download", "layer", "resolution", "cache", "cache_dir"):
            if getattr(a, key) != getattr(default, key):
                raise UserError(f"align.{key} sets up REPA's encoder, which flow.align={method} does not use; remove "
                                f"align.{key}")
    for key in ("temperature", "pool", "distance"):
        if method != "dispersive" and getattr(a, key) != getattr(default, key):
            raise UserError(f"align.{key} belongs to flow.align=dispersive; remove it")
    if method != "sra" and (a.target_depth != default.target_depth or a.time_gap != default.time_gap):
        raise UserError("align.target_depth and align.time_gap belong to flow.align=sra; remove them")
    if method == "repa" and cfg.latent.autoencoder and not a.cache and cfg.latent.cache:
        raise UserError("REPA in latent space with the latent cache reads the images' features from align's cache; "
                        "set align.cache=true (or latent.cache=false to encode both every step)")


def build_encoder(cfg: Config, data_shape: tuple[int, ...]):
    """REPA's frozen encoder of cfg.align.encoder (models/encoders.py)."""
    from models.encoders import AutoencoderEncoder, InceptionEncoder, TimmEncoder

    a = cfg.align
    if a.encoder == "inception":
        if a.weights:
            raise UserError("align.encoder=inception reads the FID network from its own place; remove align.weights")
        return InceptionEncoder(a.layer or "mixed_2", a.resolution or 299)
    if a.encoder == "autoencoder":
        if not a.weights:
            raise UserError("align.encoder=autoencoder needs the autoencoder: set align.weights=runs/NAME/checkpoints/"
                            "step_N (a run trained with flow.objective=autoencoder)")
        if a.layer or a.resolution:
            raise UserError("align.encoder=autoencoder reads its latent means at the data's size; remove align.layer "
                            "and align.resolution")
        from flows.latent import load_autoencoder

        autoencoder, weights, _ = load_autoencoder(a.weights, data_shape, "align.weights")
        return AutoencoderEncoder(autoencoder, weights)
    if a.layer and not a.layer.isdigit():
        raise UserError(f"align.layer '{a.layer}' names an Inception layer; a timm encoder's is the number of one of "
                        "its intermediates (its blocks or stages, from 0), or empty for its last features")
    return TimmEncoder(a.encoder, a.weights, a.download, a.resolution, int(a.layer) if a.layer else None)


def check_depth(cfg: Config, model, name: str, depth: int) -> None:
    if not 1 <= depth <= model.hidden_depths:
        raise UserError(f"{name} {depth} is beyond the {model.hidden_depths} hidden states of {cfg.model.name} "
                        f"({'blocks' if type(model).__name__ == 'DiT' else 'down-path modules, then the middle'}); "
                        f"choose 1 to {model.hidden_depths}")


def build_alignment(cfg: Config, model, encoder=None, ema_model=None) -> Alignment:
    """The run's Alignment, and the projection head attached to `model` (repa: to the encoder's dim; sra: to the
    target block's); `ema_model`: sra's teacher."""
    a, method = cfg.align, cfg.flow.align
    if not hasattr(model, "hidden_depths"):
        raise UserError(f"flow.align={method} reads the hidden states of DiT and UNet models, not of "
                        f"{type(model).__name__}")
    depth = a.depth or default_depth(model, method)
    check_depth(cfg, model, "align.depth", depth)
    model.align_depth = depth
    target_depth = a.target_depth or model.hidden_depths
    if method == "sra":
        check_depth(cfg, model, "align.target_depth", target_depth)
        if target_depth <= depth:
            raise UserError(f"align.target_depth {target_depth} must be a later block than align.depth {depth} (SRA "
                            "aligns an early block with a later one of the EMA model)")
    if method in NEEDS_HEAD:
        out_dim = encoder.dim if method == "repa" else model.hidden_dim(target_depth)
        width = a.proj_width or min(2048, 4 * model.hidden_dim(depth))
        attach_head(model, a.projector, out_dim, width)
    return Alignment(method, a.weight, depth, a.stop_step, normalize=method == "repa" and a.projector != "mlp",
                     temperature=a.temperature, pool=a.pool, distance=a.distance, teacher=ema_model,
                     target_depth=target_depth, time_gap=a.time_gap, grid=tuple(model.hidden_grid(depth)))


# ---------------------------------------------------------------------------------------------
# REPA's features of a fixed dataset, computed once.


def default_cache_dir() -> Path:
    from data.latents import default_cache_dir as latents_dir

    return latents_dir().parent / "align"


def feature_cache_key(cfg: Config, dataset, encoder, grid: tuple[int, int]) -> str:
    """Changes with the encoder (what it computes, its weights' bytes), the dataset, the flips and the token grid
    the features are stored on."""
    from data.latents import file_sha256

    weights = encoder.weights_file
    h = file_sha256(weights) if weights is not None and Path(weights).is_file() else hashlib.sha256()
    d = cfg.data
    location = str(Path(d.path).resolve()) if d.path else ""
    h.update(json.dumps([encoder.key, d.name, location, d.split, d.resolution, d.class_folders, len(dataset),
                         d.hflip, list(grid)]).encode())
    return h.hexdigest()[:16]


def cached_features(cfg: Config, dataset, encoder, grid: tuple[int, int], accelerator=None,
                    device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], bool, Path]:
    """The encoder's features of every dataset item on the token grid `grid`, in float16 ({"mean": (N, D, h, w)},
    with data.hflip also "mirrored"), computed once into shards under align.cache_dir. Returns them, whether
    anything was computed, and the folder."""
    from data.latents import cached_encoding

    folder = (Path(cfg.align.cache_dir) if cfg.align.cache_dir else default_cache_dir()) / feature_cache_key(
        cfg, dataset, encoder, grid)
    manifest = folder / "manifest.json"
    made_by = json.loads(manifest.read_text()).get("encoder") if manifest.is_file() else encoder.key
    if made_by != encoder.key:
        raise UserError(f"feature cache {folder} was made by another encoder ({made_by}); delete it or set "
                        "align.cache_dir")

    def encode(x: torch.Tensor) -> torch.Tensor:
        return resized(encoder(x), grid).half()

    parts, computed = cached_encoding(folder, dataset, encode, cfg.data.hflip, accelerator,
                                      f"features of {cfg.data.name} ({encoder.key})",
                                      {"encoder": encoder.key, "grid": list(grid), "data": cfg.data.name,
                                       "split": cfg.data.split}, batch_size=64)
    return {k: v.half() for k, v in parts.items()}, computed, folder


class WithFeatures:
    """A dataset whose items also carry REPA's cached features, in the extras dict as "align" (and, for data
    mirrored by the loop, "align_mirrored")."""

    def __init__(self, dataset, features: torch.Tensor, mirrored: torch.Tensor | None = None):
        self.dataset, self.features, self.mirrored = dataset, features, mirrored
        self.shape, self.num_classes = dataset.shape, dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: torch.Tensor):
        x, y, *extras = self.dataset[idx]
        extras = dict(extras[0]) if extras else {}
        extras["align"] = self.features[idx]
        if self.mirrored is not None:
            extras["align_mirrored"] = self.mirrored[idx]
        return x, y, extras


def align_data(cfg: Config, alignment, encoder, dataset, train_data, pairs, accelerator, log, loop_flips: bool):
    """REPA's targets: the training data with the encoder's features cached beside each item (align.cache), or the
    encoder to run on each batch's images; for the other regularisers the data as they are. Returns the data and
    that function (or None)."""
    a = cfg.align
    described = f"align: {cfg.flow.align}, λ {alignment.weight:g}, block {alignment.depth}"
    if encoder is None:
        dispersive = f", τ {alignment.temperature:g}, tokens {alignment.pool}, distance {alignment.distance}"
        log(described + (f", target block {alignment.target_depth} of the EMA model at t + {alignment.time_gap:g}"
                         if alignment.method == "sra" else dispersive)
            + (f", stops at step {alignment.stop_step}" if alignment.stop_step else ""))
        return train_data, None
    described += (f", encoder {encoder.key} ({encoder.dim} features on the {alignment.grid[0]}×{alignment.grid[1]} "
                  f"token grid)" + (f", stops at step {alignment.stop_step}" if alignment.stop_step else ""))
    if not a.cache:
        log(described + ", run on every batch")
        autocast = accelerator.autocast
        return train_data, lambda x: resized(_under(autocast, encoder, x), alignment.grid).float()
    if pairs is not None:
        raise UserError("REPA's feature cache holds the dataset's images, not reflow pairs' samples; set "
                        "align.cache=false to encode each batch")
    started = time.perf_counter()
    parts, computed, folder = cached_features(cfg, dataset, encoder, alignment.grid, accelerator)
    mirrored = parts.get("mirrored")
    features = parts["mean"] if mirrored is None or loop_flips else torch.cat([parts["mean"], mirrored])
    log(described + f"; feature cache {folder}: {len(parts['mean'])} images "
        + (f"computed in {time.perf_counter() - started:.1f} s" if computed else "reused")
        + (" (and their mirrors)" if mirrored is not None else ""))
    return WithFeatures(train_data, features, mirrored if loop_flips else None), None


def _under(autocast, encoder, x: torch.Tensor) -> torch.Tensor:
    with autocast():  # the training precision
        return encoder(x)
