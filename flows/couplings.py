"""Couplings: which noise sample x0 is paired with which data sample x1 in a training batch.

With several processes a coupling sees the whole global batch: the noise is drawn for the global
batch on every process (same generator, same numbers), the data are gathered, and each process
keeps the noise paired with its own data. Data never move, so labels stay with them, and the pairs
do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


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


class IndependentCoupling:
    """x0 and x1 drawn independently (I-CFM, rectified flow): pair them as they come."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, shard: BatchShard = BatchShard()) -> torch.Tensor:
        """x0: the global batch of noise (world·n, ...); x1: this process's data (n, ...).
        Returns the noise paired with each row of x1 (n, ...)."""
        return shard.local(x0)


class PairsCoupling:
    """Pairs made before training (reflow: noise and the sample a teacher made from it, Liu et al. 2023): the data
    come with their noise (data.name=pairs), which is kept as it is."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, shard: BatchShard = BatchShard()) -> torch.Tensor:
        """x0: this process's noise, paired row by row with x1 (n, ...)."""
        if x0.shape != x1.shape:
            raise ValueError("flow.coupling=pairs needs data that carry their noise (data.name=pairs)")
        return x0


class MinibatchOTCoupling:
    """Exact optimal transport between the global noise and data batches (OT-CFM, Tong et al. 2024,
    §3.2; Pooladian et al. 2023): the permutation minimizing Σ‖x0_i − x1_π(i)‖², solved as an
    assignment problem, so every x0 and every x1 is used exactly once."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, shard: BatchShard = BatchShard()) -> torch.Tensor:
        x1_all = shard.gather(x1.contiguous())
        match = torch.empty(x1_all.shape[0], dtype=torch.long, device=x1.device)
        if shard.rank == 0:  # solved once, on the main process
            match.copy_(ot_match(x0, x1_all))
        return x0[shard.local(shard.broadcast(match))]


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
