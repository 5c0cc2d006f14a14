"""What training shows of itself, from the EMA weights: preview pictures (samples/step_N.png) and the in-training
quality check (train.eval_every: FID of images, W2 of 2-D points), behind one object built once per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from config import Config
from data import build_source, reference_points
from data.images import save_grid, to_uint8
from data.tasks import cases_from_dataset, task_picture
from data.toy import plot_points
from flows import velocity_model
from flows.solvers import class_labels, condition, generate, noise
from metrics.fid import build_features, default_stats_dir, frechet_distance, load_reference
from metrics.points import w2


class Monitor:
    """Previews and quality checks of a run: its config, reference dataset, source, flow space, task and classes."""

    def __init__(self, cfg: Config, dataset, source, space, task, num_classes: int, device: torch.device):
        self.cfg, self.dataset, self.source, self.space = cfg, dataset, source, space
        self.task, self.num_classes, self.device = task, num_classes, device
        self.cache: dict = {}  # the feature network and the reference, kept between quality checks

    def preview(self, path: Path, ema_model, step: int) -> None:
        """The preview picture of the EMA model at `step`: reconstructions of an autoencoder, condition | sample |
        original of an image-conditioned task, or samples (points over the data, or an image grid)."""
        cfg, dataset = self.cfg, self.dataset
        if cfg.flow.objective == "autoencoder":
            save_reconstructions(path, ema_model, dataset, cfg, self.device)
        elif self.task is not None:
            save_task_preview(path, velocity_model(ema_model, cfg), dataset, cfg, self.device, self.task, self.space)
        else:
            save_preview(path, velocity_model(ema_model, cfg), dataset, self.source, cfg, self.device, step,
                         self.num_classes, self.space)

    def quality(self, ema_model) -> dict[str, float]:
        """The in-training quality check of the EMA model (see sample_quality)."""
        return sample_quality(velocity_model(ema_model, self.cfg), self.dataset, self.cfg, self.device,
                              self.num_classes, self.space, self.cache)


def preview_solver(cfg: Config) -> str:
    """Previews and the in-training check sample with Euler, average-velocity models (MeanFlow, AlphaFlow, shortcut)
    with their jumps."""
    return "meanflow" if cfg.flow.objective in ("meanflow", "alphaflow", "shortcut") else "euler"


@torch.no_grad()
def save_preview(path: Path, ema_model, dataset, source, cfg: Config, device: torch.device, step: int,
                 num_classes: int, space) -> None:
    """Samples of the EMA model from fixed noise: 2-D points drawn over the data, or a grid of images
    (class-conditional models: one row per class shown, at most 10 classes spread over the range);
    latents are decoded by `space`."""
    t = cfg.train
    g = torch.Generator(device).manual_seed(0)
    if len(dataset.shape) == 1:
        out = generate(ema_model, source(t.preview_n, g, device), steps=t.preview_steps, solver=preview_solver(cfg))
        plot_points(out.x.cpu(), dataset.x[: t.preview_n], path,
                    title=f"{cfg.data.name}, step {step}, EMA, {preview_solver(cfg)} {out.nfe} NFE")
        return
    rows = min(num_classes, 10) or max(1, round(t.preview_images ** 0.5))
    cols = -(-t.preview_images // rows)
    y, labels = None, None
    if num_classes:
        classes = torch.linspace(0, num_classes - 1, rows).round().long()
        y, labels = classes.repeat_interleave(cols).to(device), [str(c) for c in classes.tolist()]
    x0 = source(rows * cols, g, device)
    cond = condition(ema_model, t.seed, list(range(len(x0))))  # Latent-CFM: c from the prior
    out = generate(ema_model, x0, steps=t.preview_steps, solver=preview_solver(cfg), y=y, cond=cond)
    save_grid(getattr(dataset, "to_uint8", to_uint8)(space.decode(out.x)), path, rows, row_labels=labels)


@torch.no_grad()
def save_reconstructions(path: Path, autoencoder, dataset, cfg: Config, device: torch.device) -> None:
    """A grid of fixed dataset images (odd rows) above their reconstructions from the latent means (even rows)."""
    n = min(cfg.train.preview_images, len(dataset))
    cols = max(1, round(n ** 0.5))
    rows = -(-n // cols)
    x, _ = dataset[torch.arange(rows * cols) % len(dataset)]
    reconstruction, _ = autoencoder(x.to(device))
    pairs = torch.stack([x.view(rows, cols, *x.shape[1:]), reconstruction.cpu().view(rows, cols, *x.shape[1:])], 1)
    save_grid(getattr(dataset, "to_uint8", to_uint8)(pairs.flatten(0, 2)), path, 2 * rows,
              row_labels=["data", "recon."] * rows)


@torch.no_grad()
def save_task_preview(path: Path, ema_model, dataset, cfg: Config, device: torch.device, task, space) -> None:
    """A grid of fixed dataset images: per row, condition | sample of the EMA model | original, Euler with
    train.preview_steps steps, masks and noise from seed 0 as evaluate.py --task draws them."""
    rows = max(1, min(len(dataset), cfg.train.preview_images // 3, 16))
    cases = cases_from_dataset(task, dataset, rows, mask_kind=getattr(task, "mask", "mixed"))
    x1, m = cases.original(list(range(rows))).to(device), cases.measurement(list(range(rows))).to(device)
    x0 = noise(0, list(range(rows)), space.shape).to(device)
    out = generate(ema_model, x0, steps=cfg.train.preview_steps, cond={"image_cond": task.condition(m, space)})
    x = task.enforce(space.decode(out.x).float(), m)
    grid = torch.stack([task_picture(task, m, x1.shape[1]), x, x1], 1).flatten(0, 1)
    save_grid(to_uint8(grid), path, rows, row_labels=None)


@torch.no_grad()
def sample_quality(ema_model, dataset, cfg: Config, device: torch.device, num_classes: int, space,
                   cache: dict) -> dict[str, float]:
    """train.eval_n samples of the EMA model (Euler, MeanFlow models' jumps, train.preview_steps steps) drawn as
    evaluate.py draws them with --seed 0 (sample k's noise, label and condition from (0, k)): FID against
    train.eval_ref (default: the dataset, its statistics computed once) for images, W2 to as many dataset points
    (data.reference_points, seed 0) for 2-D data.
    `evaluate.py -e RUN --samplers euler:STEPS --n-samples N` (meanflow:STEPS) reports the same number for that
    checkpoint.
    `cache` keeps the feature network and the reference between calls."""
    t, n = cfg.train, cfg.train.eval_n
    source = None if cfg.data.source == "gaussian" else build_source(cfg, space.shape)
    labels = class_labels(None, n, num_classes, 0)
    chunks = []
    for first in range(0, n, 250):
        batch = list(range(first, min(first + 250, n)))
        chunks.append(generate(ema_model, noise(0, batch, space.shape, source).to(device), steps=t.preview_steps,
                               solver=preview_solver(cfg), y=None if labels is None else labels[batch].to(device),
                               cond=condition(ema_model, 0, batch)).x)
    x = space.decode(torch.cat(chunks))
    if len(dataset.shape) == 1:
        return {"w2": w2(x.cpu(), dataset.x[reference_points(len(dataset), n, 0)])}
    if "reference" not in cache:
        cache["features"] = build_features(t.eval_features, device=device)
        cache["reference"] = load_reference(t.eval_ref or None, cache["features"], tuple(dataset.shape[-2:]),
                                            default_stats_dir(), cfg, dataset)
    features, reference = cache["features"](to_uint8(x).cpu()), cache["reference"]
    name = "fid" if t.eval_features == "inception" else f"fid_{t.eval_features}"
    return {name: frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)}
