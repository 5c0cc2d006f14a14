import itertools

import torch

from config import Config
from flows import BatchShard, MinibatchOTCoupling, build_objective
from flows.couplings import IndependentCoupling, ot_match


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


def test_ot_keeps_labels_with_their_data():
    """At t = 1 (σ_min = 0) the model sees x_t = x1: each row must arrive with its own label."""
    cfg = Config()
    cfg.flow.coupling = "ot"
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d), num_classes=4)
    objective.time_density = lambda n, g, d: torch.ones(n, device=d)
    y = torch.randint(0, 4, (32,))
    x1 = torch.randn(32, 2) + y[:, None] * 10.0  # the label is readable from the data
    seen = {}
    objective(lambda x, t, yy: seen.update(x=x, y=yy) or torch.zeros_like(x), x1, y, torch.Generator().manual_seed(0))
    assert torch.allclose(seen["x"], x1) and torch.equal(seen["y"], y)


def test_global_ot_pairs_equal_single_process_pairs():
    """Two processes coupling the global batch get the same pairs as one process on that batch."""
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    whole = MinibatchOTCoupling().pair(x0, x1)
    sent = {}

    def broadcast(match):  # rank 0 sends what it solved; rank 1 receives it
        return sent.setdefault("match", match.clone())

    def gather(_):  # what all_gather returns: both processes' data, in rank order
        return x1

    shares = [MinibatchOTCoupling().pair(x0, x1[r * 4:(r + 1) * 4], BatchShard(r, 2, gather, broadcast))
              for r in range(2)]
    assert torch.equal(torch.cat(shares), whole)
    assert torch.equal(IndependentCoupling().pair(x0, x1[4:], BatchShard(rank=1, world=2)), x0[4:])


def test_w2_distance_equals_brute_force_and_a_known_shift():
    from flows.couplings import w2_distance

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    best = min(cost(a[list(p)], b) for p in itertools.permutations(range(6)))
    assert abs(w2_distance(a, b) - (best / 6) ** 0.5) < 1e-9
    assert abs(w2_distance(a, a + torch.tensor([3.0, 4.0], dtype=torch.float64)) - 5.0) < 1e-9  # a shift by 5
