import math

import torch

from config import Config
from flows import BatchShard, LinearPath, build_objective
from flows.objective import LossByTime, ObjectiveOutput
from flows.timesteps import LogitNormalTime, ModeTime, UniformTime


def test_linear_path_endpoints_and_velocity_match_autograd():
    for sigma_min in (0.0, 0.1):
        path = LinearPath(sigma_min)
        x0, x1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        assert torch.allclose(path.sample(x0, x1, torch.zeros(5)).x_t, x0)
        end = path.sample(x0, x1, torch.ones(5, dtype=torch.float64)).x_t
        assert torch.allclose(end, x1 + sigma_min * x0)  # σ_min of noise left at t = 1
        t = torch.rand(5, dtype=torch.float64, requires_grad=True)
        sample = path.sample(x0, x1, t)
        dxdt = torch.stack([torch.autograd.grad(sample.x_t[:, j].sum(), t, retain_graph=True)[0] for j in range(3)], 1)
        assert torch.allclose(dxdt, sample.u_t)


def test_loss_is_zero_for_the_oracle_velocity():
    cfg = Config()
    objective = build_objective(cfg, source=lambda n, g, d: torch.randn(n, 2, generator=g, device=d))
    x1 = torch.randn(64, 2)
    seen = {}

    def oracle(x_t, t, y):  # knows the pairing: u_t = x1 − x0, with x0 = (x_t − t·x1) / (1 − t)
        x0 = (x_t - t[:, None] * x1) / (1 - t[:, None])
        seen["t"] = t
        return x1 - x0

    out = objective(oracle, x1, None, torch.Generator().manual_seed(0))
    assert out.loss.shape == (64,) and out.loss.max() < 1e-8
    wrong = objective(lambda x, t, y: torch.zeros_like(x), x1, None, torch.Generator().manual_seed(0))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))  # the noise that draw paired with x1
    assert torch.allclose(wrong.loss, (x1 - x0).square().mean(1))  # a zero velocity misses u_t = x1 − x0 entirely


def test_time_densities_stay_in_unit_interval_and_have_their_shape():
    g = torch.Generator().manual_seed(0)
    for density in (UniformTime(), LogitNormalTime(0.0, 1.0), ModeTime(1.29), ModeTime(0.0)):
        t = density(20_000, g, torch.device("cpu"))
        assert t.shape == (20_000,) and t.min() >= 0 and t.max() <= 1
        assert abs(t.mean() - 0.5) < 0.01  # all symmetric about 1/2 at these settings
    shifted = LogitNormalTime(1.0, 1.0)(20_000, g, torch.device("cpu"))
    # E[sigmoid(1 + ε)] by quadrature: a positive mean moves t towards the data.
    e = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    expected = (torch.sigmoid(1 + e) * torch.exp(-e**2 / 2)).sum() / torch.exp(-e**2 / 2).sum()
    assert abs(shifted.mean().item() - expected.item()) < 0.005  # 20,000 draws: standard error 0.0013
    # The mode density maps u ~ U(0, 1) through a decreasing f: P(1/4 < t < 3/4) = f⁻¹(1/4) − f⁻¹(3/4).
    s = 1.29
    f = lambda u: 1 - u - s * (math.cos(math.pi / 2 * u) ** 2 - 1 + u)  # noqa: E731
    inverse = lambda t: next(u for u in [i / 100_000 for i in range(100_001)] if f(u) <= t)  # noqa: E731
    middle = ((ModeTime(s)(20_000, g, torch.device("cpu")) - 0.5).abs() < 0.25).float().mean().item()
    assert abs(middle - (inverse(0.25) - inverse(0.75))) < 0.012  # standard error 0.0033
    # s = −1, the U-shaped density the reflow configs use: t = cos²(πu/2), the arcsine law, P(t ≤ x) = (2/π)·asin(√x).
    u_shaped = ModeTime(-1.0)(20_000, g, torch.device("cpu"))
    for x in (0.05, 0.25, 0.5, 0.9):
        assert abs((u_shaped <= x).float().mean().item() - 2 / math.pi * math.asin(math.sqrt(x))) < 0.012


def test_label_dropout_replaces_labels_by_the_null_class_at_the_configured_rate():
    cfg = Config()
    cfg.flow.label_dropout = 0.3
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d), num_classes=10)
    seen = []
    objective(lambda x, t, y: seen.append(y) or torch.zeros_like(x), torch.randn(10_000, 2),
              torch.randint(0, 10, (10_000,)), torch.Generator().manual_seed(0))
    null = (seen[0] == 10).float().mean()
    assert abs(null - 0.3) < 0.02


def test_draws_do_not_depend_on_the_number_of_processes():
    """Each process keeps its rows of draws made for the global batch."""
    cfg = Config()
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d))
    x1 = torch.randn(8, 2)
    record = lambda store: lambda x, t, y: store.append((x, t)) or torch.zeros_like(x)  # noqa: E731
    whole, halves = [], []
    objective(record(whole), x1, None, torch.Generator().manual_seed(3))
    for rank in range(2):
        objective(record(halves), x1[rank * 4:(rank + 1) * 4], None, torch.Generator().manual_seed(3),
                  BatchShard(rank=rank, world=2))
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), whole[0][0])
    assert torch.equal(torch.cat([halves[0][1], halves[1][1]]), whole[0][1])


def test_loss_by_time_bins():
    stats = LossByTime(4, torch.device("cpu"))
    stats.add(ObjectiveOutput(loss=torch.tensor([1.0, 3.0, 10.0]), t=torch.tensor([0.1, 0.2, 0.99])))
    out = stats.read(lambda x: x)
    assert out == {"loss_t/0-0.25": 2.0, "loss_t/0.75-1": 10.0}
