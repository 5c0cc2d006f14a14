"""What a training-free restoration step costs in pixel space and in latent space, per image (untrained weights: the
cost does not depend on them). PnP-Flow's fidelity gradient goes through the decoder in latent space; replacement
only encodes the known image once.

    python bench/inverse_cost.py                 # MNIST: unet-mnist on 28×28 pixels, or on ae-mnist's 7×7×4 latents
    python bench/inverse_cost.py --sd256         # also LFM's 256-px setting: the SD-VAE architecture (diffusers)
                                                 # and the 256-channel ADM UNet on its 32×32×4 latents (slow on CPU)

Prints milliseconds per image of: one velocity evaluation; one decode; one PnP-Flow step (fidelity gradient, noise,
velocity) in pixel space and in latent space; the ratio of the latent step to the velocity evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_config  # noqa: E402
from data.tasks import Inpaint, sample_masks  # noqa: E402
from flows.inverse import pnp_flow  # noqa: E402
from flows.latent import LatentSpace, PixelSpace  # noqa: E402
from models import build_autoencoder, build_model  # noqa: E402


def timed(work, repeats: int) -> float:
    work()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats


def measure(name: str, model, pixel_model, autoencoder, image_shape, batch: int, repeats: int) -> None:
    space = LatentSpace(autoencoder, 0.0, 1.0, False, image_shape, "bench")
    pixels = PixelSpace(image_shape)
    task = Inpaint("center")
    x1 = torch.rand(batch, *image_shape) * 2 - 1
    m = task.measure(x1, sample_masks("center", *image_shape[1:], 0, list(range(batch))))
    z = torch.randn(batch, *space.shape)
    t = torch.full((batch,), 0.5)
    rows = {}
    with torch.no_grad():
        rows["velocity evaluation (latent model)"] = timed(lambda: model(z, t), repeats)
        rows["decode"] = timed(lambda: space.decode(z), repeats)
        if pixel_model is not None:
            rows["velocity evaluation (pixel model)"] = timed(lambda: pixel_model(x1, t), repeats)
    idx = list(range(batch))
    rows["PnP-Flow step, latent (decoder forward + backward)"] = timed(
        lambda: pnp_flow(model, task, m, space, z, 1, 0, idx), repeats)
    if pixel_model is not None:
        rows["PnP-Flow step, pixels"] = timed(lambda: pnp_flow(pixel_model, task, m, pixels, x1, 1, 0, idx), repeats)
    print(f"\n{name}: batch {batch}, {torch.get_num_threads()} threads, ms per image")
    for label, seconds in rows.items():
        print(f"  {label:52s} {1000 * seconds / batch:9.2f}")
    step = rows["PnP-Flow step, latent (decoder forward + backward)"]
    velocity = rows["velocity evaluation (latent model)"]
    print(f"  latent PnP-Flow step / velocity evaluation: {step / velocity:.1f}×")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd256", action="store_true", help="also the 256-px SD-VAE setting (needs diffusers)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)

    image = (1, 28, 28)
    ae = build_autoencoder(load_config(None, ["model.name=ae-mnist", "flow.objective=autoencoder"]), image).eval()
    latent_shape = ae.latent_shape(image)
    cfg = load_config(None, ["model.name=unet-mnist"])
    measure("MNIST (ae-mnist 7×7×4 latents, unet-mnist)", build_model(cfg, latent_shape).eval(),
            build_model(cfg, image).eval(), ae.requires_grad_(False), image, 250, args.repeats)

    if args.sd256:
        from diffusers import AutoencoderKL

        from models.autoencoder import DiffusersAutoencoder

        # The Stable Diffusion VAE's architecture (stabilityai/sd-vae-ft-mse's config), without its weights.
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=256, scaling_factor=0.18215)
        image = (3, 256, 256)
        sd = DiffusersAutoencoder(vae).eval().requires_grad_(False)
        flow_cfg = load_config("configs/imagefolder_sdvae_inpaint_unet.yaml", ["data.task="])
        measure("256 px (SD-VAE architecture, 32×32×4 latents, unet-cifar10 at 256 channels)",
                build_model(flow_cfg, sd.latent_shape(image)).eval(), None, sd, image, 1, args.repeats)


if __name__ == "__main__":
    main()
