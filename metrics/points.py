"""Distances between sets of points, for low-dimensional data: exact W2 and MMD."""

from __future__ import annotations

import torch

from flows.couplings import w2_distance


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two equal-size point sets (N, D): the optimal assignment."""
    return w2_distance(a, b)


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) under a sum of Gaussian kernels exp(−‖x − y‖² / 2h²)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    m, n = len(a), len(b)

    def kernel(x, y):
        d2 = torch.cdist(x, y).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())
