"""Couplings: which noise sample x0 is paired with which data sample x1 in a training batch.

With several processes a coupling sees the whole global batch: the noise is drawn for the global
batch on every process (same generator, same numbers), the data are gathered, and each process
keeps the noise paired with its own data. Data never move, so labels stay with them, and the pairs
do not depend on the number of processes.

A coupling with a plan π (N × N, entropic, unbalanced or partial OT) gives each x1_j one x0 drawn from the
plan's column, π(i | j) = π_ij / Σ_i π_ij, with one uniform number per x1 from the micro-step's generator (drawn on
every process, so the generators stay in step). Where the plan moves unequal mass to the data (unbalanced and
partial OT), each sample's loss is weighted by its column's share of the mass, N·Σ_i π_ij / Σ π: the expectation
of the loss over the plan, without repeating or dropping data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from errors import UserError

UNDERFLOW = 600  # the largest C/ε for which exp(−C/ε) is safely above float64's smallest normal number


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class BatchShard:
    """This process's share of a global batch: rows [rank·n, (rank+1)·n) of world·n.

    `gather` concatenates a tensor over processes in rank order; `broadcast` sends the main
    process's tensor to all. Both are identities on one process.
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    broadcast: Callable[[torch.Tensor], torch.Tensor] = _identity

    @classmethod
    def from_accelerator(cls, accelerator) -> BatchShard:
        if accelerator.num_processes == 1:
            return cls()
        from accelerate.utils import broadcast

        return cls(rank=accelerator.process_index, world=accelerator.num_processes,
                   gather=accelerator.gather, broadcast=broadcast)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]


@dataclass
class Pairing:
    """The noise paired with each row of this process's data (n, ...), and the loss weight of each row (n,)
    where the coupling's plan weights the data unequally (None: all 1)."""

    x0: torch.Tensor
    weight: torch.Tensor | None = None


class IndependentCoupling:
    """x0 and x1 drawn independently (I-CFM, rectified flow): pair them as they come."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, shard: BatchShard = BatchShard(),
             generator: torch.Generator | None = None, y: torch.Tensor | None = None) -> Pairing:
        """x0: the global batch of noise (world·n, ...); x1: this process's data (n, ...); generator: the
        micro-step's (for couplings that draw); y: this process's labels (n,) or None."""
        return Pairing(shard.local(x0))


class PairsCoupling:
    """Pairs made before training (reflow: noise and the sample a teacher made from it, Liu et al. 2023): the data
    come with their noise (data.name=pairs), which is kept as it is."""

    def pair(self, x0, x1, shard=BatchShard(), generator=None, y=None) -> Pairing:
        """x0: this process's noise, paired row by row with x1 (n, ...)."""
        if x0.shape != x1.shape:
            raise ValueError("flow.coupling=pairs needs data that carry their noise (data.name=pairs)")
        return Pairing(x0)


class MinibatchOTCoupling:
    """Exact optimal transport between the global noise and data batches (OT-CFM, Tong et al. 2024,
    §3.2; Pooladian et al. 2023): the permutation minimizing Σ‖x0_i − x1_π(i)‖², solved as an
    assignment problem, so every x0 and every x1 is used exactly once."""

    def pair(self, x0, x1, shard=BatchShard(), generator=None, y=None) -> Pairing:
        x1_all = shard.gather(x1.contiguous())
        match = torch.empty(x1_all.shape[0], dtype=torch.long, device=x1.device)
        if shard.rank == 0:  # solved once, on the main process
            match.copy_(ot_match(x0, x1_all))
        return Pairing(x0[shard.local(shard.broadcast(match))])


class ClassOTCoupling:
    """Exact OT within each class, for class-conditional models: the global noise batch is split at random into
    one share per class (as many rows as that class has data) and each share is matched to its class's data by
    exact OT, so no pair crosses a class and the straightening OT gives is kept within each conditional flow."""

    def pair(self, x0, x1, shard=BatchShard(), generator=None, y=None) -> Pairing:
        if y is None:
            raise ValueError("flow.coupling=class_ot pairs within classes: the data need labels")
        x1_all, y_all = shard.gather(x1.contiguous()), shard.gather(y.contiguous())
        order = torch.randperm(len(x0), generator=generator, device=generator.device).to(x1.device)
        match = torch.empty(len(x1_all), dtype=torch.long, device=x1.device)
        if shard.rank == 0:
            start = 0
            for label in y_all.unique().tolist():
                rows = (y_all == label).nonzero().squeeze(1)
                share = order[start:start + len(rows)]
                start += len(rows)
                match[rows] = share[ot_match(x0[share], x1_all[rows])]
        return Pairing(x0[shard.local(shard.broadcast(match))])


class PlanCoupling:
    """Pairs drawn from an OT plan computed with POT (Flamary et al. 2021) on the squared Euclidean cost of the
    global batch, as torchcfm's OTPlanSampler computes it: 'entropic' (Sinkhorn, in the log domain so that a
    small ε on image-sized costs does not underflow; Cuturi 2013), 'unbalanced' (KL-relaxed marginals, weight
    `mass_reg`; Chizat et al. 2018) or 'partial' (exact OT moving the fraction `mass` of the mass; Chapel et al.
    2020). See the module docstring for how a pair is drawn and weighted."""

    def __init__(self, kind: str, reg: float = 0.05, mass_reg: float = 1.0, mass: float = 0.8):
        self.kind, self.reg, self.mass_reg, self.mass = kind, reg, mass_reg, mass

    def plan(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The plan (N × N, float64) between the rows of x0 and x1."""
        import ot

        cost = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).square_().cpu().numpy()
        n = len(cost)
        a = np.full(n, 1.0 / n)
        if self.kind == "partial":
            return torch.from_numpy(ot.partial.partial_wasserstein(a, a, cost, m=self.mass))
        # Sinkhorn-Knopp scales K = exp(−C/ε); a row or column of K underflows to 0 in float64 when even its
        # nearest pair has C/ε past ~700, as image-sized costs do: the entropic plan is then found in the log domain.
        nearest = max(cost.min(1).max(), cost.min(0).max())
        underflows = nearest / self.reg > UNDERFLOW
        with warnings.catch_warnings():  # a plan short of convergence is still a plan; torchcfm ignores it too
            warnings.simplefilter("ignore")
            if self.kind == "entropic":
                plan = ot.sinkhorn(a, a, cost, self.reg, method="sinkhorn_log" if underflows else "sinkhorn")
            elif underflows:
                raise UserError(f"flow.ot_reg={self.reg:g} is too small for unbalanced OT on these data: a sample's "
                                f"nearest partner is {nearest:.4g} away (squared), and exp(−C/ε) underflows past "
                                f"C/ε = {UNDERFLOW}; set flow.ot_reg ≥ {nearest / UNDERFLOW:.3g}")
            else:
                plan = ot.unbalanced.sinkhorn_unbalanced(a, a, cost, self.reg, self.mass_reg)
        return torch.from_numpy(plan)

    def pair(self, x0, x1, shard=BatchShard(), generator=None, y=None) -> Pairing:
        x1_all = shard.gather(x1.contiguous())
        u = torch.rand(len(x1_all), generator=generator, device=generator.device, dtype=torch.float64).cpu()
        match = torch.empty(len(x1_all), dtype=torch.long, device=x1.device)
        weight = torch.empty(len(x1_all), dtype=torch.float32, device=x1.device)
        if shard.rank == 0:
            plan = self.plan(x0, x1_all).clamp_min(0)
            column = plan.sum(0)
            if not torch.isfinite(plan).all() or column.sum() <= 0:
                raise UserError(f"the {self.kind} OT plan of this batch has no finite mass; raise flow.ot_reg")
            # Inverse CDF of each column; a column without mass (partial OT) draws uniformly, with weight 0.
            cdf = torch.where(column > 0, plan / column.clamp_min(1e-300), 1.0 / len(plan)).cumsum(0)
            rows = (cdf < u * cdf[-1]).sum(0).clamp_max(len(plan) - 1)
            match.copy_(rows)
            weight.copy_(len(plan) * column / column.sum())
        match, weight = shard.local(shard.broadcast(match)), shard.local(shard.broadcast(weight))
        return Pairing(x0[match], None if self.kind == "entropic" else weight)


def ot_match(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """For each x1_j, the index of the x0 paired with it by exact OT under squared Euclidean cost.

    The cost is computed in float64: cdist forms ‖a‖² + ‖b‖² − 2a·b for large batches, and in float32 the
    cancellation for thousands of dimensions (3,072 for CIFAR-10) can be larger than the differences between
    pairings, which then picks a non-optimal assignment."""
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    cost = torch.cdist(a, b).square_()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())  # x0[rows[k]] <-> x1[cols[k]]
    match = torch.empty(len(cols), dtype=torch.long)
    match[torch.from_numpy(cols)] = torch.from_numpy(rows)
    return match.to(x1.device)


def w2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of two equal-size sets (N, ...)."""
    a, b = a.double().cpu(), b.double().cpu()
    return (a[ot_match(a, b)] - b).flatten(1).square().sum(1).mean().sqrt().item()
