"""The space the flow lives in: pixels, or the latent space of a frozen autoencoder.

Latent flow matching (Dao et al. 2023, "Flow Matching in Latent Space"; Rombach et al. 2022 for the
autoencoder): the same objective on z = (E(x) − shift) · scale, where E(x) is the mean of the frozen
encoder's q(z|x) (or a sample of it with latent.sample_posterior), and samples are decoded with
D(z / scale + shift). shift and scale make the latents zero-mean and unit-variance; they come from
the config (latent.scale, latent.shift) or from the autoencoder checkpoint, which estimates them.
Training, sampling, previews and evaluation all go through `encode` / `decode`, so sample.py and
evaluate.py decode to images with no extra flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from config import Config, load_config
from errors import UserError


class PixelSpace:
    """The identity: the flow lives on the data."""

    def __init__(self, data_shape: tuple[int, ...]):
        self.shape = tuple(data_shape)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def to(self, device: torch.device) -> PixelSpace:
        return self


class LatentSpace:
    """A frozen autoencoder: images (N, C, H, W) <-> normalized latents (N, C_z, H/f, W/f)."""

    def __init__(self, autoencoder, shift: float, scale: float, sample_posterior: bool, data_shape, name: str):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.shift, self.scale, self.sample_posterior, self.name = shift, scale, sample_posterior, name
        self.shape = autoencoder.latent_shape(tuple(data_shape))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        q = self.autoencoder.encode(x)
        z = q.mean
        if self.sample_posterior and generator is not None:
            z = q.sample(torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
        return (z - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images of latents z. Differentiable in z (PnP-Flow's fidelity gradient goes through it); the frozen
        autoencoder records no graph for z that needs no gradient."""
        return self.autoencoder.decode(z.to(next(self.autoencoder.parameters()).dtype) / self.scale + self.shift)

    def to(self, device: torch.device) -> LatentSpace:
        self.autoencoder.to(device)
        return self


def load_autoencoder(path: str, data_shape: tuple[int, ...], key: str):
    """A trained autoencoder (checkpoint folder or its ema.safetensors; or diffusers' AutoencoderKL as a folder or
    hub id), its weights file and the metadata with its latent shift and scale."""
    from models import build_autoencoder
    from models.autoencoder import is_diffusers_autoencoder, load_diffusers_autoencoder
    from models.checkpoint import load_weights, read_metadata

    if is_diffusers_autoencoder(path):  # the Stable Diffusion VAE and its kind
        autoencoder = load_diffusers_autoencoder(path).eval().requires_grad_(False)
        if autoencoder.in_channels != data_shape[0] or data_shape[1] % autoencoder.factor:
            raise UserError(f"{key} {path} takes {autoencoder.in_channels}-channel images with sides divisible by "
                            f"{autoencoder.factor}; these data have shape {tuple(data_shape)}")
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        meta = {"latent_shift": repr(autoencoder.shift), "latent_scale": repr(autoencoder.scale)}
        return autoencoder, (files[0] if files else Path(path)), meta
    weights = Path(path)
    if weights.is_dir():
        weights = weights / "ema.safetensors"
    if not weights.is_file() or not (weights.parent / "config.yaml").is_file():
        raise UserError(f"{key} {path} is not an autoencoder checkpoint; give a checkpoint folder "
                        "(runs/NAME/checkpoints/step_N) of a run trained with flow.objective=autoencoder")
    ae_cfg = load_config(weights.parent / "config.yaml")
    if ae_cfg.flow.objective != "autoencoder":
        raise UserError(f"{key} {path} was trained with flow.objective={ae_cfg.flow.objective}, not as an "
                        "autoencoder; give an autoencoder checkpoint")
    meta = read_metadata(weights)
    trained_on = tuple(json.loads(meta["data_shape"])) if "data_shape" in meta else tuple(data_shape)
    if trained_on != tuple(data_shape):
        raise UserError(f"{key} {path} was trained on data of shape {trained_on} but these data have shape "
                        f"{tuple(data_shape)}; use an autoencoder of this data")
    autoencoder = build_autoencoder(ae_cfg, data_shape)
    load_weights(autoencoder, weights)
    return autoencoder.eval().requires_grad_(False), weights, meta


class FeatureEncoder:
    """Latent-CFM's frozen pretrained encoder: images (N, C, H, W) -> the means of q(z|x), flattened (N, F)."""

    def __init__(self, autoencoder, data_shape: tuple[int, ...]):
        self.autoencoder = autoencoder
        self.dim = int(torch.tensor(autoencoder.latent_shape(tuple(data_shape))).prod())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x.to(next(self.autoencoder.parameters()).dtype)).mean.flatten(1)

    def to(self, device: torch.device) -> FeatureEncoder:
        self.autoencoder.to(device)
        return self


def build_feature_encoder(cfg: Config, data_shape: tuple[int, ...]) -> FeatureEncoder | None:
    """The frozen encoder of cfg.latentcfm.encoder, or None (no Latent-CFM)."""
    if not cfg.latentcfm.encoder:
        return None
    if cfg.latent.autoencoder:
        raise UserError("Latent-CFM (latentcfm.encoder) conditions a flow on pixels here; remove latent.autoencoder")
    autoencoder, _, _ = load_autoencoder(cfg.latentcfm.encoder, data_shape, "latentcfm.encoder")
    return FeatureEncoder(autoencoder, data_shape)


def build_space(cfg: Config, data_shape: tuple[int, ...]) -> PixelSpace | LatentSpace:
    """Pixels, or the autoencoder at cfg.latent.autoencoder (a checkpoint folder or its ema.safetensors)."""
    if not cfg.latent.autoencoder:
        return PixelSpace(data_shape)
    autoencoder, weights, meta = load_autoencoder(cfg.latent.autoencoder, data_shape, "latent.autoencoder")
    if cfg.latent.scale:
        shift, scale = cfg.latent.shift, cfg.latent.scale
    elif "latent_scale" in meta:
        shift, scale = float(meta["latent_shift"]), float(meta["latent_scale"])
    else:
        raise UserError(f"{weights} stores no latent scale; set latent.scale (and latent.shift)")
    return LatentSpace(autoencoder, shift, scale, cfg.latent.sample_posterior, data_shape, str(weights))


def reference_features(condition_images: str | None, cfg: Config, meta: dict, device: torch.device
                       ) -> torch.Tensor | None:
    """Features of sample.py's --condition-images under a Latent-CFM model's frozen encoder (R, F), or None."""
    if not condition_images:
        return None
    if "feature_dim" not in meta:
        raise UserError("--condition-images conditions Latent-CFM models (trained with latentcfm.encoder); this "
                        "model is not one")
    from data.images import read_image_folder, to_model_range

    folder, data_shape = Path(condition_images), tuple(json.loads(meta["data_shape"]))
    if not folder.is_dir():
        raise UserError(f"--condition-images {folder} is not a folder of images")
    images = read_image_folder(folder)
    if tuple(images.shape[1:]) != data_shape:
        raise UserError(f"--condition-images {folder} holds images of shape {tuple(images.shape[1:])} but the model "
                        f"was trained on {data_shape}; give images of the training data's size and channels")
    encoder = build_feature_encoder(cfg, data_shape).to(device)
    return encoder(to_model_range(images).to(device))


def training_data(cfg: Config, dataset, pairs, space, accelerator, log) -> tuple[object, object, bool]:
    """What the training loop reads: reflow pairs or the dataset, or for latent flow matching with latent.cache the
    dataset's latents, encoded once by all processes (logged with `log`). Returns the data, the space that encodes
    each batch (latent flow matching without the cache; else None) and whether the loop mirrors images (data.hflip
    where the cache does not hold the mirrors)."""
    from data.latents import encode_dataset

    data, encode_per_step = pairs if pairs is not None else dataset, space if cfg.latent.autoencoder else None
    loop_flips = cfg.data.hflip and pairs is None and not (cfg.latent.autoencoder and cfg.latent.cache)
    if cfg.latent.autoencoder and cfg.latent.cache:
        if cfg.latent.sample_posterior:
            raise UserError("the latent cache stores posterior means; latent.sample_posterior=true needs "
                            "latent.cache=false")
        cache_dir = Path(cfg.latent.cache_dir) if cfg.latent.cache_dir else None
        data, encoded = encode_dataset(cfg, dataset, space, accelerator, cache_dir)
        encode_per_step = None
        log(f"latent cache: {len(data)} latents {'encoded' if encoded else 'reused'}"
            + (" (images and their mirrors)" if cfg.data.hflip else ""))
    return data, encode_per_step, loop_flips
