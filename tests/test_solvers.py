import math

import pytest
import torch

from errors import UserError
from flows import SOLVERS, integrate
from flows.schedules import SCHEDULES, parse_schedule, time_grid
from flows.solvers import (
    ADAPTIVE,
    check_guidance,
    fixed_grid_nfe,
    forward_passes,
    generate,
    guided,
    integrate_adaptive,
    uniform_grid,
)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_3t_squared_integrates_to_x_plus_one_with_exact_nfe(solver):
    x0 = torch.randn(4, 2)
    steps = 200

    def velocity(x, t, s=None):  # meanflow jumps with the average of 3τ² over [t, s]: s² + st + t²
        average = 3 * t**2 if s is None else s**2 + s * t + t**2
        return average[:, None] * torch.ones_like(x)

    out = integrate(velocity, x0, uniform_grid(steps), solver)
    tol = {"euler": 2e-2, "midpoint": 1e-4, "heun": 1e-4}.get(solver, 1e-5)  # global error O(h^order)
    assert torch.allclose(out.x, x0 + 1, atol=tol)
    assert out.nfe == steps * SOLVERS[solver][1]


@pytest.mark.parametrize(("solver", "nfe"), [("heun+euler", 2 * 7 + 1), ("rk4+euler", 4 * 7 + 1),
                                             ("rk4+midpoint", 4 * 7 + 2)])
def test_a_last_step_by_another_solver_never_evaluates_t_1_and_counts_its_nfe(solver, nfe):
    times = []

    def velocity(x, t):
        times.extend(t.tolist())
        return 3 * t[:, None] ** 2 * torch.ones_like(x)

    x0 = torch.randn(3, 2, dtype=torch.float64)
    out = integrate(velocity, x0, uniform_grid(8), solver)
    assert out.nfe == fixed_grid_nfe(solver, 8) == nfe == len(times) // 3
    assert max(times) == 1 - 1 / 8 if solver.endswith("euler") else max(times) == 1 - 1 / 16
    assert torch.allclose(out.x, x0 + 1, atol=0.05)  # the last Euler step errs by 3 h^2 / 2 at most


def rotation(x, t):
    """dx/dt = A(t) x with a time-dependent rotation: x(1) = R(θ(1)) x(0), θ(t) = t + t²."""
    w = (1 + 2 * t)[:, None]
    return torch.stack([-w[:, 0] * x[:, 1], w[:, 0] * x[:, 0]], dim=1)


def rotation_exact(x0):
    c, s = math.cos(2.0), math.sin(2.0)
    return torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4),
                                               ("heun+euler", 2), ("rk4+euler", 2)])  # one Euler step: O(h^2)
def test_error_falls_at_the_solver_order_when_steps_double(solver, order):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    errors = [(integrate(rotation, x0, uniform_grid(n), solver).x - rotation_exact(x0)).abs().max().item()
              for n in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.3 for r in rates), rates


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_follow_their_tolerance_and_count_true_calls(solver):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):  # 1e-5 is the default: tolerances that were ignored would give equal errors
        calls = 0

        def counted(x, t):
            nonlocal calls
            calls += 1
            return rotation(x, t)

        out = integrate_adaptive(counted, x0, solver, atol=tol, rtol=tol)
        assert out.nfe == calls and out.sample_nfe.max() <= calls
        errors.append((out.x - rotation_exact(x0)).abs().max().item())
        nfes.append(out.nfe)
    assert errors[0] > 10 * errors[1] > 100 * errors[2] and errors[2] < 1e-4, errors
    assert nfes[0] < nfes[1] < nfes[2]


def stiff_rows(x, t):
    """dx/dt = −30·a·x with a = x's first coordinate (a > 0): x(t) = x(0) / (1 + 30·a(0)·t), stiffer for larger a."""
    return -x * (30 * x[:, :1].abs())


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_steps_are_controlled_per_sample_so_batch_neighbours_change_nothing(solver):
    """A sample integrates the same alone or beside a much harder one: same steps (NFE), same bits. A step size
    shared over the batch (torchdiffeq's odeint) takes the hard sample's small steps for both."""
    from torchdiffeq import odeint

    easy, hard = torch.tensor([[0.01, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    alone = integrate_adaptive(stiff_rows, easy, solver, 1e-6, 1e-6)
    together = integrate_adaptive(stiff_rows, torch.cat([easy, hard, easy]), solver, 1e-6, 1e-6)
    assert torch.equal(together.x[:1], alone.x) and torch.equal(together.x[2:], alone.x)
    assert together.sample_nfe.tolist() == [alone.nfe, together.nfe, alone.nfe] and together.nfe > 2 * alone.nfe
    assert torch.allclose(alone.x, easy / 1.3, atol=1e-5, rtol=0)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    shared = odeint(lambda t, x: stiff_rows(x, t), torch.cat([easy, hard]), ends, method=solver, atol=1e-6, rtol=1e-6)
    assert not torch.equal(shared[-1, :1], odeint(lambda t, x: stiff_rows(x, t), easy, ends, method=solver,
                                                  atol=1e-6, rtol=1e-6)[-1])


def test_adaptive_integration_runs_backwards_and_honours_a_pure_relative_tolerance():
    x1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    back = integrate_adaptive(lambda x, t: 0.7 * x, x1, "dopri5", 1e-9, 1e-9, t0=1.0, t1=0.0)
    assert torch.allclose(back.x, x1 * math.exp(-0.7), atol=1e-8, rtol=0)
    loose = integrate_adaptive(rotation, x1, "dopri5", atol=0.0, rtol=1e-3)
    tight = integrate_adaptive(rotation, x1, "dopri5", atol=0.0, rtol=1e-8)
    assert tight.nfe > loose.nfe and (tight.x - rotation_exact(x1)).abs().max() < 1e-6
    for atol, rtol in ((0.0, 0.0), (-1e-5, 1e-5)):
        with pytest.raises(UserError, match="adaptive solvers need atol ≥ 0 and rtol ≥ 0, not both 0"):
            integrate_adaptive(rotation, x1, "dopri5", atol, rtol)
    with pytest.raises(UserError, match="dopri5 made 20 velocity evaluations without reaching t = 1"):
        integrate_adaptive(rotation, x1, "dopri5", 1e-10, 1e-10, max_calls=20)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 7, 100])
def test_every_schedule_is_increasing_from_exactly_0_to_exactly_1(name, steps):
    grid = time_grid(name, steps)
    assert grid.dtype == torch.float64 and len(grid) == steps + 1
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert bool((grid[1:] > grid[:-1]).all())


def test_schedule_shapes_and_parameters():
    s_shape, inverted = time_grid("cosine", 10), time_grid("logit_normal", 10)
    steps_cos, steps_ln = torch.diff(s_shape), torch.diff(inverted)
    assert steps_cos[0] < steps_cos[5] and steps_ln[0] > steps_ln[5]  # small ends vs large ends
    assert torch.diff(time_grid("inverse_cubic", 10))[0] > torch.diff(time_grid("inverse_cubic", 10))[-1]
    assert parse_schedule("logit_normal:mean=0.5,std=2") == ("logit_normal", {"mean": 0.5, "std": 2.0})
    assert time_grid("sd3_shift:shift=1", 8).allclose(uniform_grid(8))  # shift 1 is the identity
    with pytest.raises(UserError, match="unknown schedule 'cosin'; did you mean 'cosine'"):
        time_grid("cosin", 5)
    with pytest.raises(UserError, match="schedule 'edm' takes the parameters sigma_min, sigma_max, rho"):
        time_grid("edm:mean=1", 5)
    with pytest.raises(UserError, match="steps must be positive"):
        time_grid("linear", 0)


class TwoClassModel(torch.nn.Module):
    """v(x, t, y) = y-th constant (null class 2 gives a third constant)."""

    def __init__(self):
        super().__init__()
        self.label_embed = torch.nn.Module()
        self.label_embed.num_classes = 2
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        return torch.tensor([1.0, -1.0, 10.0])[y][:, None].expand_as(x).clone()


def test_guidance_scale_1_is_conditional_0_unconditional_in_one_batched_call():
    model, x, t, y = TwoClassModel(), torch.zeros(3, 2), torch.rand(3), torch.tensor([0, 1, 0])
    assert torch.equal(guided(model, y, 1.0)(x, t), model(x, t, y))
    assert torch.equal(guided(model, y, 0.0)(x, t), torch.full((3, 2), 10.0))
    model.calls = 0
    v = guided(model, y, 2.0)(x, t)  # v_u + 2 (v_c - v_u)
    assert model.calls == 1 and torch.equal(v[:, 0], torch.tensor([-8.0, -12.0, -8.0]))
    out = generate(model, x, steps=4, solver="heun", y=y, cfg_scale=2.0)
    assert out.nfe == 8 and model.calls == 9


def test_guidance_needs_a_model_trained_with_label_dropout_and_costs_two_passes_per_evaluation():
    check_guidance(1.0, 0, 0.0)  # no guidance: any model
    check_guidance(2.0, 10, 0.1)
    with pytest.raises(UserError, match="--cfg-scale 2.0 needs the unconditional velocity, which this model never "
                                        "learned \\(trained with flow.label_dropout=0"):
        check_guidance(2.0, 10, 0.0)
    with pytest.raises(UserError, match="the model is unconditional"):
        check_guidance(1.5, 0, 0.1)
    assert forward_passes(8, 1.0) == 8 and forward_passes(8, 1.5) == forward_passes(8, 0.0) == 16


def test_bad_solver_arguments_fail_with_one_sentence():
    model = lambda x, t, y=None: x  # noqa: E731
    with pytest.raises(UserError, match="unknown solver 'eulr'; did you mean 'euler'"):
        generate(model, torch.zeros(2, 2), 10, "eulr")
    with pytest.raises(UserError, match="unknown solver 'eulr' in 'heun\\+eulr'; did you mean 'euler'"):
        generate(model, torch.zeros(2, 2), 10, "heun+eulr")
    with pytest.raises(UserError, match="solver dopri5 chooses its own steps"):
        generate(model, torch.zeros(2, 2), 10, "dopri5")
    with pytest.raises(UserError, match="needs a positive number of steps, got 0"):
        generate(model, torch.zeros(2, 2), 0, "rk4")
    with pytest.raises(UserError, match="the model is unconditional"):
        generate(model, torch.zeros(2, 2), 3, "euler", y=torch.tensor([0, 1]), cfg_scale=1.5)


def test_noise_from_a_2d_source_is_drawn_per_sample():
    from config import load_config
    from data import build_source
    from flows.solvers import noise

    source = build_source(load_config(None, ["data.source=8gaussians"]), (2,))
    together = noise(3, [0, 1, 2, 3], (2,), source)
    assert torch.equal(together[2:], noise(3, [2, 3], (2,), source))  # sample k does not depend on its batch
    radius = together.norm(dim=1)
    assert not torch.equal(together, noise(3, [0, 1, 2, 3], (2,))) and (radius > 1).all()  # not the Gaussian
