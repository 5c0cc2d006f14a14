"""KL autoencoder for latent flow matching: the first stage of Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models" (their 'KL-f4/f8' models), at sizes a CPU can train.

Anatomy: encoder = conv stem; per level `num_res_blocks` residual blocks (GroupNorm, SiLU, 3×3 conv),
a stride-2 conv between levels; a middle block; GroupNorm, SiLU and a 3×3 conv to the mean and
log-variance of a diagonal Gaussian q(z|x) with `latent_channels` channels. The decoder mirrors it
with nearest up-sampling. The downsampling factor is f = 2^(levels − 1), so MNIST's 28×28 with
channel multipliers (1, 2, 2) gives 7×7 latents. Trained by train.py with `flow.objective=autoencoder`:
‖D(z) − x‖² per pixel + β·KL(q(z|x) ‖ N(0, I)) per pixel, z = μ + σ·ε (Kingma & Welling 2014).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import Resample, norm


class Block(nn.Module):
    """Residual block without conditioning: x (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


@dataclass
class Posterior:
    """q(z|x) = N(mean, exp(logvar)) per latent element, (N, C_z, h, w) each."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per sample, summed over the latent's elements (N,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1 - self.logvar).flatten(1).sum(1)


class AutoencoderKL(nn.Module):
    """Images (N, C, H, W) in [-1, 1] <-> latents (N, latent_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, channels: int = 32, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, latent_channels: int = 4):
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.factor = 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]

        # Encoder.
        self.enc_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        c = widths[0]
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(Block(c, width))
                c = width
            self.down.append(nn.ModuleDict({"blocks": nn.Sequential(*blocks)}))
            if level < len(widths) - 1:
                self.down[-1]["resample"] = Resample(c, up=False)
        self.enc_mid = Block(c, c)
        self.enc_out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1))

        # Decoder.
        self.dec_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.dec_mid = Block(c, c)
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(Block(c, width))
                c = width
            self.up.append(nn.ModuleDict({"blocks": nn.Sequential(*blocks)}))
            if level > 0:
                self.up[-1]["resample"] = Resample(c, up=True)
        self.dec_out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))

    def check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.in_channels or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"the autoencoder takes {self.in_channels}-channel images with sides divisible by "
                             f"{self.factor}, got shape {tuple(x.shape[1:])}")

    def encode(self, x: torch.Tensor) -> Posterior:
        self.check(x)
        h = self.enc_in(x)
        for level in self.down:
            h = level["blocks"](h)
            if "resample" in level:
                h = level["resample"](h)
        mean, logvar = self.enc_out(self.enc_mid(h)).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30, 20))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_mid(self.dec_in(z))
        for level in self.up:
            h = level["blocks"](h)
            if "resample" in level:
                h = level["resample"](h)
        return self.dec_out(h)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, Posterior]:
        """Reconstruction of x from z = μ + σ·eps (the mean when eps is None), and q(z|x)."""
        posterior = self.encode(x)
        z = posterior.mean if eps is None else posterior.sample(eps.to(posterior.mean.dtype))
        return self.decode(z), posterior

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return (self.latent_channels, shape[1] // self.factor, shape[2] // self.factor)


PRESETS = {
    "ae-mnist": dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4),  # f4: 28 -> 7
    "ae-cifar10": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4),  # f4: 32 -> 8
    "ae-f8": dict(channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4),  # LDM's KL-f8 layout
}


class DiffusersAutoencoder(nn.Module):
    """diffusers' AutoencoderKL (e.g. the Stable Diffusion VAE, f8 with 4 channels) behind this module's
    interface: encode -> Posterior, decode, latent_shape. Its latent scale (and shift) come from its config."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.in_channels = vae.config.in_channels
        self.latent_channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = float(vae.config.scaling_factor or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(self, x: torch.Tensor) -> Posterior:
        q = self.vae.encode(x).latent_dist
        return Posterior(q.mean, q.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return (self.latent_channels, shape[1] // self.factor, shape[2] // self.factor)


def is_diffusers_autoencoder(path: str) -> bool:
    """A local folder saved by diffusers' AutoencoderKL.save_pretrained, or a hub id (owner/name) not on disk."""
    import json
    from pathlib import Path

    folder = Path(path)
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    return not folder.exists() and path.count("/") == 1 and not path.startswith((".", "/"))


def load_diffusers_autoencoder(path: str) -> DiffusersAutoencoder:
    """diffusers' AutoencoderKL from a local folder or a hub id (downloaded by diffusers; needs network)."""
    from errors import UserError

    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError(f"{path} is a diffusers AutoencoderKL; install diffusers (pip install diffusers) to use "
                        "it") from None
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except Exception as e:  # missing files, no network for a hub id, ...
        raise UserError(f"diffusers could not load an AutoencoderKL from {path} ({type(e).__name__}); give a folder "
                        "saved with save_pretrained or a hub id such as stabilityai/sd-vae-ft-mse") from None
    return DiffusersAutoencoder(vae)


@torch.no_grad()
def latent_statistics(autoencoder, dataset, device: torch.device, n: int = 1024) -> dict[str, str]:
    """The latent shape, and the shift and scale that make the latent means of up to n fixed dataset items zero
    mean and unit variance (latent flow matching trains on (z − shift) · scale), as weight-file metadata."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    z = torch.cat([autoencoder.encode(dataset[chunk][0].to(device)).mean.float().cpu() for chunk in idx.split(256)])
    return {"latent_shape": json.dumps(list(z.shape[1:])), "latent_shift": repr(z.mean().item()),
            "latent_scale": repr(1 / z.std().item())}
