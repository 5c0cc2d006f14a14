"""Negative log-likelihood and bits per dimension of data under a flow, by the instantaneous change of variables.

For dx/dt = v(x, t) carrying the standard normal p₀ at t = 0 to the model's p₁ at t = 1 (Chen et al.
2018, "Neural ODEs", Theorem 1):  log p₁(x₁) = log p₀(x₀) − ∫₀¹ ∇·v(x_t, t) dt,  where x₀ is found by
integrating the ODE backwards from x₁. The state (x, ∫∇·v) is integrated from t = 1 down to t = 0 with
the same solvers (and time grid, reversed) that sampling uses. The divergence is exact (one backward
pass per dimension) for low-dimensional data and Hutchinson's estimator E[εᵀ(∂v/∂x)ε] with one
Rademacher ε per sample, fixed over the trajectory (Grathwohl et al. 2019, FFJORD), for images.

Bits per dimension of 8-bit images use uniform dequantization (Theis et al. 2016) on the grid the model was
trained on: pixel u ∈ {0..255} is trained as x_u = u/127.5 − 1 (data/images.py), so its bin is the interval of
width Δ = 2/255 centred there, x = x_u + (U − ½)·Δ with U ~ U[0, 1)^D. The probability of u under the model is
P(u) = ∫_bin p₁(x) dx, and by Jensen  −log P(u) ≤ E_U[−log p₁(x)] − D log Δ;  bits/dim = that / (D ln 2).
(Bins of width 2/256 starting at u·2/256 − 1 would not contain the training points: x_0 = −1, MNIST's
background, would sit on a bin's edge and the rest off centre.) Continuous data (2-D points, fields) get
−log p₁(x) / (D ln 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import seeds
from cluster import Stopped
from flows.solvers import ADAPTIVE, check_solver, integrate, integrate_adaptive

EXACT_DIVERGENCE_MAX_DIM = 16  # up to this many dimensions the divergence is exact
BIN = 2 / 255  # width of an 8-bit pixel's bin in the model's range [-1, 1]


@dataclass
class LikelihoodResult:
    """Per-sample log p₁(x) in nats (N,), bits per dimension (N,) and velocity evaluations spent."""

    log_p: torch.Tensor
    bpd: torch.Tensor
    nfe: int


def standard_normal_log_p(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per sample, summed over all but the first dimension."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).square().sum(1) - 0.5 * d * math.log(2 * math.pi)


def divergence(v: torch.Tensor, x: torch.Tensor, epsilon: torch.Tensor | None) -> torch.Tensor:
    """∇·v per sample: exact when epsilon is None, else Hutchinson's εᵀ(∂v/∂x)ε (v computed from x with grad)."""
    if not v.requires_grad:  # v does not depend on x
        return torch.zeros(len(x), dtype=x.dtype, device=x.device)
    if epsilon is not None:
        (vjp,) = torch.autograd.grad(v, x, epsilon, create_graph=False)
        return (vjp * epsilon).flatten(1).sum(1)
    flat_v, total = v.flatten(1), torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(flat_v.shape[1]):
        (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True)
        total = total + grad.flatten(1)[:, i]
    return total


def log_likelihood(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x1: torch.Tensor,
                   steps: int | None = 100, solver: str = "euler", schedule: str = "linear", atol: float = 1e-5,
                   rtol: float = 1e-5, dequantize: bool = False, hutchinson: bool | None = None,
                   generator: torch.Generator | None = None,
                   generators: list[torch.Generator] | None = None) -> LikelihoodResult:
    """log p₁ and bits/dim of data x1 (N, ...) in the model's range under the flow dx/dt = velocity(x, t).

    dequantize: x1 holds 8-bit images in [-1, 1] (u · 2/255 − 1); uniform noise over each pixel's bin (width
    2/255, centred on u · 2/255 − 1) is added and the bound's − D log(2/255) applied. hutchinson: None chooses
    exact divergence up to EXACT_DIVERGENCE_MAX_DIM dimensions. generator: the dequantization and Hutchinson
    noise; or `generators`, one per item, for noise that does not depend on how the items are batched."""
    from flows.schedules import time_grid

    check_solver(solver, steps)
    shape, d = x1.shape[1:], x1[0].numel()
    x = x1.double() if x1.dtype == torch.float64 else x1.float()

    def draw(sample: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Noise of x's shape on the CPU: from `generator`, or each item's from its own."""
        if generators is None:
            return sample(x.shape, generator=generator).to(x)
        return torch.stack([sample(shape, generator=g) for g in generators]).to(x)

    if dequantize:
        u = torch.round((x + 1) * 127.5)
        x = (u + draw(torch.rand) - 0.5) * BIN - 1
    if hutchinson is None:
        hutchinson = d > EXACT_DIVERGENCE_MAX_DIM
    epsilon = draw(lambda shape, generator: torch.randint(0, 2, shape, generator=generator)) * 2 - 1 \
        if hutchinson else None

    def augmented(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # z = [x flattened, running ∫∇·v]; returns [v, ∇·v].
        with torch.enable_grad():
            xt = z[:, :d].detach().reshape(len(z), *shape).requires_grad_(True)
            v = velocity(xt, t)
            div = divergence(v, xt, epsilon)
        return torch.cat([v.detach().flatten(1), div.detach()[:, None]], 1)

    z1 = torch.cat([x.flatten(1), torch.zeros(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    if solver in ADAPTIVE:
        out = integrate_adaptive(augmented, z1, solver, atol, rtol, t0=1.0, t1=0.0)
    else:
        grid = time_grid(schedule, steps).flip(0).to(x.device)  # from t = 1 (data) down to t = 0 (noise)
        out = integrate(augmented, z1, grid, solver)
    x0, integral = out.x[:, :d], out.x[:, d]  # integral = ∫₁⁰ ∇·v dt = −∫₀¹ ∇·v dt
    log_p = standard_normal_log_p(x0) + integral
    nll = -log_p - (d * math.log(BIN) if dequantize else 0.0)
    return LikelihoodResult(log_p=log_p, bpd=nll / (d * math.log(2)), nfe=out.nfe)


def bits_per_dim(accelerator, model, dataset, kind: str, cfg, n: int, seed: int, batch_size: int, tol: float,
                 stop) -> float:
    """Mean bits/dim of the first n items of a permutation of the dataset drawn from `seed`, shared over the
    processes in batches of `batch_size`, integrated with dopri5 at atol = rtol = `tol` (evaluate.py --bpd): fixed-grid
    solvers of a few steps are far too coarse backwards. `stop`: a StopRequest, honoured after each batch.

    A Latent-CFM model's density is a mixture over its condition c, log p(x) = log E_p(c)[p(x|c)]; it is bounded
    with c drawn from q(c|x) (the encoder's features of x through the trained posterior layer):
    −log p(x) ≤ E_q[−log p(x|c)] + KL(q(c|x) ‖ N(0, I)), one c per item."""
    from flows.latent import build_feature_encoder

    n = min(n, len(dataset))
    pick = torch.randperm(len(dataset), generator=seeds.generator("likelihood items", seed))[:n]
    mine = pick[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    dtype = next(model.parameters()).dtype
    conditional = getattr(model, "label_embed", None) is not None
    layer = getattr(model, "feature_cond", None)
    encoder = build_feature_encoder(cfg, dataset.shape).to(accelerator.device) if layer is not None else None
    for first in range(0, -(-n // accelerator.num_processes), batch_size):  # as many batches on every process
        idx = mine[first: first + batch_size]
        if len(idx):
            x, y = dataset[idx]
            x = x.to(accelerator.device, dtype)
            y = y.to(accelerator.device) if conditional and y is not None else None
            # Item i's noise whatever the batch and processes: dequantization and Hutchinson (stream 0), c (2).
            keys = [("likelihood", seed, int(i)) for i in idx]
            cond, kl = {}, torch.zeros(len(idx), dtype=torch.float64, device=accelerator.device)
            if layer is not None:
                eps = torch.stack([torch.randn(layer.cond_dim, generator=seeds.generator(*key, 2))
                                   for key in keys]).to(accelerator.device)
                c, kl = layer.sample(encoder(x), eps)
                cond, kl = {"c": c}, kl.double()
            out = log_likelihood(lambda x, t, y=y, cond=cond: model(x, t, y, **cond), x, None, "dopri5",
                                 atol=tol, rtol=tol, dequantize=kind == "image",
                                 generators=[seeds.generator(*key, 0) for key in keys])
            bpd = out.bpd.double() + kl / (x[0].numel() * math.log(2))
            total += torch.tensor([bpd.sum().item(), len(idx)], dtype=torch.float64, device=accelerator.device)
        if stop.now(accelerator):
            raise Stopped
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])
