import itertools

import pytest
import torch

from config import Config
from flows import BatchShard, MinibatchOTCoupling, build_objective
from flows.couplings import ClassOTCoupling, IndependentCoupling, PlanCoupling, ot_match


def cost(x0, x1):
    return (x0 - x1).square().sum().item()


def test_ot_is_a_permutation_never_worse_than_identity():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 256):
        x0, x1 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 2
        match = ot_match(x0, x1)
        assert sorted(match.tolist()) == list(range(n))  # every x0 used exactly once
        assert cost(x0[match], x1) <= cost(x0, x1) + 1e-5


def test_ot_equals_brute_force_on_small_batches():
    g = torch.Generator().manual_seed(1)
    for n in range(2, 7):
        for _ in range(5):
            x0, x1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
            best = min(cost(x0[list(p)], x1) for p in itertools.permutations(range(n)))
            assert abs(cost(x0[ot_match(x0, x1)], x1) - best) < 1e-5


def test_ot_pairs_each_data_point_with_its_optimal_noise_and_keeps_its_label():
    """At t = 1/2 the model sees x_t = (x0 + x1)/2 and the loss target x1 − x0: from them the pairing it trained
    on is read back, and it must be the optimal one, every x1 arriving with its own label."""
    cfg = Config()
    cfg.flow.coupling = "ot"
    noise = lambda n, g, d: torch.randn(n, 2, generator=g, device=d)  # noqa: E731
    objective = build_objective(cfg, noise, num_classes=4)
    objective.time_density = lambda n, g, d: torch.full((n,), 0.5, device=d)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(5))
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(6)) + y[:, None] * 10.0  # label readable
    seen = {}
    objective(lambda x, t, yy: seen.update(x=x, y=yy) or torch.zeros_like(x), x1, y, torch.Generator().manual_seed(0))
    x0_seen = 2 * seen["x"] - x1  # the noise each x1 was paired with
    x0_drawn = noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.allclose(x0_seen, x0_drawn[ot_match(x0_drawn, x1)], atol=1e-5)
    assert cost(x0_seen, x1) < cost(x0_drawn, x1) - 1  # not the independent pairing
    assert torch.equal(seen["y"], y)
    assert torch.equal((seen["x"][:, 0] / 5).round().long(), y)  # x_t sits by its own label's cluster


def test_ot_cost_is_exact_for_high_dimensional_points_with_a_large_common_offset():
    """CIFAR-size points (3,072 dimensions) far from the origin: a float32 ‖a‖² + ‖b‖² − 2a·b cost loses the
    differences between pairings to cancellation; the assignment must still be the float64 optimum."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(2, 64, 3072, generator=g) * 0.05 + 10
    exact = ((x0.double()[:, None] - x1.double()[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(exact.numpy())
    assert cost(x0.double()[ot_match(x0, x1)], x1.double()) == pytest.approx(exact[rows, cols].sum().item(), rel=1e-12)


COUPLED = {"ot": MinibatchOTCoupling(), "entropic": PlanCoupling("entropic", 0.05),
           "unbalanced": PlanCoupling("unbalanced", 0.05, mass_reg=1.0), "partial": PlanCoupling("partial", mass=0.6),
           "class_ot": ClassOTCoupling()}


@pytest.mark.parametrize("name", COUPLED)
def test_global_pairs_equal_single_process_pairs(name):
    """Two processes coupling the global batch get the same pairs and weights as one process on that batch, and
    the micro-step's generator ends in the same state on both (the draws after the coupling stay in step)."""
    coupling = COUPLED[name]
    g = torch.Generator().manual_seed(2)
    x0, x1, y = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.tensor([0, 1] * 4)
    whole = coupling.pair(x0, x1, generator=torch.Generator().manual_seed(5), y=y)
    sent = []

    def broadcaster(rank):  # rank 0 sends what it solved, in order; rank 1 receives the same, in the same order
        received = iter(sent) if rank else None
        return lambda tensor: sent.append(tensor.clone()) or tensor if rank == 0 else next(received)

    def gather(part):  # what all_gather returns: both processes' data, in rank order
        return x1 if part.dim() == 2 else y

    shares, states = [], []
    for r in range(2):
        gen = torch.Generator().manual_seed(5)
        shares.append(coupling.pair(x0, x1[r * 4:(r + 1) * 4], BatchShard(r, 2, gather, broadcaster(r)), gen,
                                    y[r * 4:(r + 1) * 4]))
        states.append(torch.rand(1, generator=gen))
    assert torch.equal(torch.cat([p.x0 for p in shares]), whole.x0)
    assert torch.equal(states[0], states[1])
    if whole.weight is not None:
        assert torch.equal(torch.cat([p.weight for p in shares]), whole.weight)
    assert torch.equal(IndependentCoupling().pair(x0, x1[4:], BatchShard(rank=1, world=2)).x0, x0[4:])


def test_w2_distance_equals_brute_force_and_a_known_shift():
    from flows.couplings import w2_distance

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    best = min(cost(a[list(p)], b) for p in itertools.permutations(range(6)))
    assert abs(w2_distance(a, b) - (best / 6) ** 0.5) < 1e-9
    assert abs(w2_distance(a, a + torch.tensor([3.0, 4.0], dtype=torch.float64)) - 5.0) < 1e-9  # a shift by 5
