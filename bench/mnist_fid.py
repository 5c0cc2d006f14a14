"""Real FID (clean-fid, Inception-v3) of a trained MNIST run against the 10,000 MNIST test digits.

    ../shared/tools/inception-offline .venv/bin/python        # once per machine: clean-fid's network, offline
    python bench/mnist_fid.py -e runs/NAME [--n 1000] [--solver euler] [--steps 100] [--schedule linear] [--real]

Protocol: the run's newest checkpoint, EMA weights; n samples from fixed noise (seed 0), integrated
with the given solver and steps; each written as an RGB PNG (gray replicated), exactly as the
reference statistics in ../shared/data/mnist/t10k-fid-stats-clean.npz were made; clean-fid mode
"clean" features of that folder; Fréchet distance to the reference mean and covariance.
--real also scores n real test digits the same way: the floor of FID at that sample size.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from data.images import load_mnist, to_uint8  # noqa: E402
from flows import generate  # noqa: E402
from flows.solvers import ADAPTIVE  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import list_checkpoints, load_weights  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mnist"


def write_pngs(images: torch.Tensor, folder: Path, start: int) -> None:
    """uint8 (N, 1, H, W) -> RGB PNGs named by index."""
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).convert("RGB").save(folder / f"{start + i:06d}.png")


def fid_of_folder(folder: Path, reference: Path) -> float:
    from cleanfid import fid

    device = torch.device("cpu")
    model = fid.build_feature_extractor("clean", device=device, use_dataparallel=False)
    features = fid.get_folder_features(str(folder), model=model, num_workers=0, batch_size=50, device=device,
                                       mode="clean", description="inception ")
    ref = np.load(reference)
    return float(fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False), ref["mu"], ref["sigma"]))


class _Resized(torch.utils.data.Dataset):
    """uint8 images (N, 1 or 3, H, W) as clean-fid's "clean" mode reads image files: RGB (gray replicated),
    each channel resized to 299×299 by PIL's bicubic filter in float, values in [0, 255]."""

    def __init__(self, images: torch.Tensor):
        from cleanfid.resize import build_resizer

        self.images, self.resize = images, build_resizer("clean")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i].expand(3, -1, -1).permute(1, 2, 0).numpy()
        return torch.from_numpy(self.resize(image)).permute(2, 0, 1)


def inception_features(images: torch.Tensor, device: torch.device, batch_size: int = 250,
                       num_workers: int = 0) -> np.ndarray:
    """clean-fid's Inception features (N, 2048) of uint8 images held in memory; the same numbers as
    writing them as PNG files and calling clean-fid on the folder."""
    from cleanfid import fid

    loader = torch.utils.data.DataLoader(_Resized(images.cpu()), batch_size=batch_size, num_workers=num_workers)
    return np.concatenate([fid.get_batch_features(batch, _inception(device), device) for batch in loader])


@functools.cache
def _inception(device: torch.device):
    from cleanfid import fid

    return fid.build_feature_extractor("clean", device=device, use_dataparallel=False)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


class FrechetReference:
    """Reference statistics for the Fréchet distance, with the symmetric square root R = S2^½ of their covariance
    computed once (float64, on `device`)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, device: torch.device | str = "cpu"):
        self.mu, self.sigma = mu, sigma
        w, v = torch.linalg.eigh(torch.from_numpy(np.asarray(sigma, dtype=np.float64)).to(device))
        self.root = (v * w.clamp(min=0).sqrt()) @ v.T


def frechet(features: np.ndarray, reference: FrechetReference) -> float:
    """clean-fid's Fréchet distance |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), with the last trace as the
    sum of the square roots of the eigenvalues of R S1 R, R = S2^½ (the same eigenvalues as S1 S2): a symmetric
    eigenvalue problem in float64 on the reference's device, instead of scipy's sqrtm of S1 S2 (about 15 s on
    the CPU at 2048 features). On 1,000-sample covariances of the MNIST reference the two agree to 2e-5."""
    mu1, sigma1 = statistics(features)
    root = reference.root
    product = root @ torch.from_numpy(sigma1).to(root.device) @ root
    trace = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum().item()
    return float(((mu1 - reference.mu) ** 2).sum() + np.trace(sigma1) + np.trace(reference.sigma) - 2 * trace)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-e", "--exp", required=True, help="run folder of an MNIST training run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--solver", default="euler")
    p.add_argument("--steps", type=int, help="fixed-grid steps (default 100; none for adaptive solvers)")
    p.add_argument("--tol", type=float, default=1e-5, help="atol = rtol of an adaptive solver")
    p.add_argument("--schedule", default="linear", help="time grid of a fixed-grid solver (flows/schedules.py)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--reference", default=str(SHARED / "t10k-fid-stats-clean.npz"))
    p.add_argument("--real", action="store_true", help="also score n real test digits (the small-sample floor)")
    args = p.parse_args()
    if args.steps is None and args.solver not in ADAPTIVE:
        args.steps = 100

    run = Path(args.exp)
    step, checkpoint = list_checkpoints(run)[-1]
    cfg = load_config(checkpoint / "config.yaml")
    model = build_model(cfg, (1, 28, 28), 10 if cfg.model.class_cond else 0)
    load_weights(model, checkpoint / "ema.safetensors")
    model.eval()
    print(f"{checkpoint}: step {step}, EMA weights, {args.n} samples, {args.solver} {args.steps} steps, "
          f"{args.schedule} grid")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "generated"
        folder.mkdir()
        g = torch.Generator().manual_seed(0)
        start, nfe = time.perf_counter(), 0
        with torch.no_grad():
            for first in tqdm(range(0, args.n, args.batch), desc="sampling"):
                n = min(args.batch, args.n - first)
                y = torch.arange(first, first + n) % 10 if cfg.model.class_cond else None
                out = generate(model, torch.randn(n, 1, 28, 28, generator=g), args.steps, args.solver, y=y,
                               schedule=args.schedule, atol=args.tol, rtol=args.tol)
                write_pngs(to_uint8(out.x), folder, first)
                nfe = out.nfe if out.sample_nfe is None else round(out.sample_nfe.float().mean().item())
        print(f"sampled {args.n} in {time.perf_counter() - start:.0f} s ({nfe} NFE)")
        print(f"FID {fid_of_folder(folder, Path(args.reference)):.2f} ({args.n} samples vs 10,000 MNIST test digits)")
        if args.real:
            real = Path(tmp) / "real"
            real.mkdir()
            ds = load_mnist(SHARED, "test", download=False)
            pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[: args.n]
            write_pngs(ds.images[pick], real, 0)
            print(f"FID {fid_of_folder(real, Path(args.reference)):.2f} ({args.n} real test digits vs all 10,000)")


if __name__ == "__main__":
    main()
