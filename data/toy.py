"""Low-dimensional data: toy 2-D distributions and a user's N×D tensor file.

Each toy distribution is a function (n, generator, device) -> (n, 2), scaled to roughly unit
variance so that it sits well against a standard normal source.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from errors import UserError, atomic_write


def _randn(n, g, device, d=2):
    return torch.randn(n, d, generator=g, device=device)


def _rand(n, g, device, d=1):
    return torch.rand(n, d, generator=g, device=device)


# 8gaussians: 8 equally likely components centred at angles kπ/4 on a circle of radius 2, each of std 0.2
_ANGLES = torch.arange(8)[:, None] * (math.pi / 4)
EIGHT_CENTRES, EIGHT_STD = 2 * torch.cat([torch.cos(_ANGLES), torch.sin(_ANGLES)], 1), 0.2


def eight_gaussians(n, g, device):
    k = torch.randint(0, 8, (n,), generator=g, device=device)
    return EIGHT_CENTRES.to(device)[k] + EIGHT_STD * _randn(n, g, device)


def moons(n, g, device):
    theta = math.pi * _rand(n, g, device)
    upper = torch.cat([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.cat([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    pick = torch.randint(0, 2, (n, 1), generator=g, device=device).bool()
    points = torch.where(pick, upper, lower) + 0.1 * _randn(n, g, device)
    return 1.5 * (points - torch.tensor([0.5, 0.25], device=device))


def checkerboard(n, g, device):
    x = 4 * _rand(n, g, device) - 2
    y = _rand(n, g, device) - 2 + 2 * torch.randint(0, 2, (n, 1), generator=g, device=device)
    y = y + (torch.floor(x) % 2)  # shift every other column by one square
    return torch.cat([x, y], 1)


def circles(n, g, device):
    theta = 2 * math.pi * _rand(n, g, device)
    radius = torch.where(torch.randint(0, 2, (n, 1), generator=g, device=device).bool(), 1.0, 2.0)
    return radius * torch.cat([torch.cos(theta), torch.sin(theta)], 1) + 0.05 * _randn(n, g, device)


def swissroll(n, g, device):
    theta = 1.5 * math.pi * (1 + 2 * _rand(n, g, device))
    points = theta * torch.cat([torch.cos(theta), torch.sin(theta)], 1)
    return points / 5 + 0.1 * _randn(n, g, device)


def spirals(n, g, device):
    r = torch.sqrt(_rand(n, g, device)) * 3 * math.pi  # two interleaved arms
    sign = torch.where(torch.randint(0, 2, (n, 1), generator=g, device=device).bool(), 1.0, -1.0)
    points = sign * torch.cat([-torch.cos(r) * r, torch.sin(r) * r], 1)
    return points / 3 + 0.1 * _randn(n, g, device)


TOY = {"8gaussians": eight_gaussians, "moons": moons, "checkerboard": checkerboard, "circles": circles,
       "swissroll": swissroll, "spirals": spirals}


def load_tensor_file(path: str | Path, layout: str = "N×D") -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Read a tensor of `layout` ('N×D', or 'N×C×H×W' which also takes N×H×W) as float32, and optional N
    integer labels, from .npy, .pt or .safetensors; integer (or boolean) values are converted, which the third
    value says ('' when the file held floats).

    A .safetensors file holds one tensor, or 'x' and optionally 'y' (labels); a .pt file holds a
    tensor saved with torch.save (loaded with weights_only, so no code runs).
    """
    wanted = f"set data.path to an {layout} .npy, .pt or .safetensors file"
    if not str(path):
        raise UserError(f"data.path is empty; {wanted}")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"data.path '{path}' is a folder, not a data file; {wanted}")
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist; {wanted}")
    y = None
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            x = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "x" in tensors:
                x, y = tensors["x"], tensors.get("y")
            elif len(tensors) == 1:
                (x,) = tensors.values()
            else:
                raise ValueError(f"it holds {sorted(tensors)}; name the data 'x' (and labels 'y')")
        else:
            raise ValueError("the extension must be .npy, .pt or .safetensors")
    except Exception as e:  # any reader's failure is the file's fault: say so in one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"data file {path} could not be read: {reason}") from None
    dims = (2,) if layout == "N×D" else (3, 4)
    if not isinstance(x, torch.Tensor) or x.dim() not in dims or x.shape[0] == 0 or x.is_complex():
        what = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"data file {path} must hold a non-empty {layout} tensor of real numbers, got {what}")
    converted = "" if x.is_floating_point() else f"{str(x.dtype).removeprefix('torch.')} values converted to float32"
    if not torch.isfinite(x).all():
        raise UserError(f"data file {path} holds NaN or infinite values")
    if y is not None and (y.shape != (x.shape[0],) or y.is_floating_point() or y.min() < 0):
        raise UserError(f"data file {path}: labels 'y' must be N non-negative integers, got shape {tuple(y.shape)}")
    return x.float(), None if y is None else y.long(), converted


def plot_points(generated: torch.Tensor, data: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Scatter generated points (first two coordinates) over data points and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(data[:, 0], data[:, 1], s=2, c="0.75", label="data")
    ax.scatter(generated[:, 0], generated[:, 1], s=2, c="tab:blue", alpha=0.6, label="generated")
    ref = data if len(data) else generated  # no data to draw: frame the generated points
    lim = torch.quantile(ref.abs().float().flatten(), 0.995).item() * 1.3
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax.set_title(textwrap.fill(title, 55), fontsize=9)  # long sampler descriptions wrap inside the figure
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    try:
        atomic_write(path, fig.savefig)
    finally:
        plt.close(fig)
