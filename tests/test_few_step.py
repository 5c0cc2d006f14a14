"""One-stage few-step objectives beside MeanFlow: improved MeanFlow's v-loss, AlphaFlow and shortcut models, against
closed forms and hand computations; their samplers, configs, resume and processes."""

import json
import math

import pytest
import torch
from conftest import run_script
from test_meanflow import TINY, ExactOnPath, LinearAverageVelocity, teacher  # noqa: F401 (a fixture)

from config import load_config
from errors import UserError
from flows import build_objective
from flows.alphaflow import alpha_at
from flows.paths import LinearPath
from flows.solvers import generate

M = torch.tensor([2.0, -1.0], dtype=torch.float64)


def gaussian(n, g, d):
    return torch.randn(n, 2, generator=g, device=d, dtype=torch.float64)


def objective_of(*overrides, num_classes=0):
    return build_objective(load_config(None, list(overrides)), gaussian, num_classes=num_classes)


class Curved(torch.nn.Module):
    """A smooth nonlinear u(z, t, s): its derivative along (v, 1, 0) has a second-order part, which a finite
    difference does not take exactly. Counts its forward passes."""

    interval_embed = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z, t, y=None, s=None):
        self.calls += 1
        return torch.tanh(z.flip(1) * (1 + t[:, None])) + torch.sin(3 * t[:, None] * s[:, None]) * z


@pytest.mark.parametrize("derivative,dtype,passes,tolerance", [
    ("jvp", torch.float32, 2, 1e-5),
    ("onesided", torch.float32, 2, 1e-2),  # O(h); this toy's curvature is larger than a network's
    ("onesided", torch.float64, 3, 1e-3),  # a float64 prediction is not the float32 pass's: central, O(h²)
    ("central", torch.float32, 3, 1e-3),
])
def test_the_derivative_is_taken_for_the_jumping_samples_only_by_either_method(derivative, dtype, passes, tolerance,
                                                                               monkeypatch):
    """d/dt u enters only the s ≠ t samples' target (s = t: the target is v), so it is taken for those samples
    alone: each sample's loss is the one of a JVP over the whole batch, to float32's rounding. The differences
    (flow.meanflow_derivative=central|onesided) give the same losses within their error: central in two passes more
    than the prediction, one-sided from the prediction itself when that is float32 in one."""
    import flows.meanflow as meanflow

    objective = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.25", "flow.meanflow_p=0",
                             f"flow.meanflow_derivative={derivative}")
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    draw = objective.draw(x1, None, torch.Generator().manual_seed(2))
    draw.x0, draw.t, draw.s = draw.x0.to(dtype), draw.t.to(dtype), draw.s.to(dtype)
    jumping = int((draw.s != draw.t).sum())
    assert 30 < jumping < 100
    rows, real = [], meanflow.total_derivative
    monkeypatch.setattr(meanflow, "total_derivative", lambda m, z, *rest, **kw: rows.append(len(z)) or
                        real(m, z, *rest, **kw))
    model = Curved()
    loss = objective.loss(model, x1, draw).loss
    assert rows == [jumping] and model.calls == passes
    x_t = draw.t[:, None] * x1 + (1 - draw.t[:, None]) * draw.x0
    v = x1 - draw.x0
    _, dudt = real(model, x_t, draw.t, draw.s, v)  # the JVP over the whole batch
    target = v + (draw.s - draw.t)[:, None] * dudt
    whole = (model(x_t, draw.t, s=draw.s) - target).square().sum(1)
    assert loss.max() > 1 and torch.allclose(loss, whole.float(), rtol=tolerance, atol=tolerance)


class ExactStraight(torch.nn.Module):
    """Gaussian → Gaussian by its optimal map x1 = M + σ·x0: every path is a straight line, so the average velocity
    over any [t, s] is the path's constant velocity M + (σ − 1)·x0, with x0 read back from z = t·M + (1 − t + tσ)·x0."""

    interval_embed = True

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, z, t, y=None, s=None):
        x0 = (z - t[:, None] * M) / (1 - t + t * self.sigma)[:, None]
        return M + (self.sigma - 1) * x0


@pytest.mark.parametrize("loss", ["u", "v"])
def test_the_v_loss_and_the_u_loss_have_the_same_minimiser(loss):
    """Gaussian → Gaussian through its optimal map (conditional velocity = marginal velocity): the exact average
    velocity gives zero loss under both losses, and so does the exact one of a curved path (all data at one point,
    cosine path, d/dt u ≠ 0); off the minimiser the v-loss's residual is the u-loss's with the model tangent, term
    by term."""
    objective = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_tangent=model",
                             f"flow.meanflow_loss={loss}")
    draw = objective.draw(torch.zeros(256, 2, dtype=torch.float64), None, torch.Generator().manual_seed(0))
    assert (draw.s > draw.t).float().mean() > 0.6
    x1 = M + 0.5 * draw.x0  # the pairing of the optimal map
    assert objective.loss(ExactStraight(0.5), x1, draw).loss.max() < 1e-10
    curved = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_tangent=model",
                          f"flow.meanflow_loss={loss}", "flow.path=cosine")
    point = M.expand(256, 2).clone()
    assert curved.loss(ExactOnPath(curved.path), point, curved.draw(point, None, torch.Generator())).loss.max() < 1e-5
    other = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_tangent=model",
                         f"flow.meanflow_loss={'v' if loss == 'u' else 'u'}", "flow.meanflow_p=0.5")
    mine = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_tangent=model",
                        f"flow.meanflow_loss={loss}", "flow.meanflow_p=0.5")
    model, y = LinearAverageVelocity(), torch.arange(256) % 3
    draw.y = y
    a, b = mine.loss(model, x1, draw).loss, other.loss(model, x1, draw).loss
    assert a.min() > 1e-3 and torch.allclose(a, b, rtol=1e-6)


class ExactIndependent(torch.nn.Module):
    """Gaussian → Gaussian with noise and data drawn independently, x1 ~ N(M, σ²·I): the marginal flow keeps
    z_t = t·M + std(t)·ε with std(t)² = (1 − t)² + t²σ², so the average velocity over [t, s] is (z_s − z) / (s − t)
    with z_s = s·M + std(s) / std(t)·(z − t·M), and at s = t the velocity M + std'(t) / std(t)·(z − t·M)."""

    interval_embed = True

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def std(self, t):
        return ((1 - t) ** 2 + (t * self.sigma) ** 2).sqrt()[:, None]

    def forward(self, z, t, y=None, s=None):
        s = t if s is None else s
        gap = (s - t)[:, None]
        centred = z - t[:, None] * M
        jump = (s[:, None] * M + self.std(s) / self.std(t) * centred - z) / torch.where(gap > 0, gap, 1.0)
        slope = (t * self.sigma**2 - (1 - t))[:, None] / self.std(t) ** 2
        return torch.where(gap > 0, jump, M + slope * centred)


def test_self_distillation_gives_the_exact_flow_zero_loss_per_sample_with_independent_pairs():
    """flow.meanflow_velocity=model: the s ≠ t samples' target takes the network's own velocity, so the exact
    average velocity of a curved marginal flow (independent pairs) has zero loss on every one of them, where x1 − x0
    leaves each sample's pairing noise in the target; the s = t samples keep x1 − x0, as without it."""
    keys = ("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_p=0")
    own = objective_of(*keys, "flow.meanflow_velocity=model")
    draw = own.draw(torch.zeros(512, 2, dtype=torch.float64), None, torch.Generator().manual_seed(1))
    apart = draw.s != draw.t
    x1 = M + 0.5 * gaussian(512, torch.Generator().manual_seed(2), "cpu")  # drawn apart from the noise
    model = ExactIndependent(0.5)
    mine, conditional = own.loss(model, x1, draw).loss, objective_of(*keys).loss(model, x1, draw).loss
    assert 0.6 < apart.float().mean() < 0.9
    assert mine[apart].max() < 1e-8 and conditional[apart].mean() > 0.1
    assert conditional[~apart].min() > 0 and torch.equal(mine[~apart], conditional[~apart])
    ema = objective_of(*keys, "flow.meanflow_velocity=ema")  # the EMA model's velocity, the JVP along it
    ema.teacher = ExactIndependent(0.3)
    z = ema.path.sample(draw.x0, x1, draw.t).x_t
    along = ema.teacher(z, draw.t)
    u, dudt = torch.func.jvp(lambda z, t: model(z, t, s=draw.s), (z, draw.t), (along, torch.ones_like(draw.t)))
    expected = (u - along - (draw.s - draw.t)[:, None] * dudt).square().sum(1)
    from_ema = ema.loss(model, x1, draw).loss
    assert expected[apart].mean() > 1e-2 and torch.allclose(from_ema[apart].double(), expected[apart], rtol=1e-4)
    assert torch.equal(from_ema[~apart], conditional[~apart])


def test_interval_splitting_is_zero_for_the_exact_field_and_two_jumps_of_the_network_otherwise():
    """flow.meanflow_split: a fraction of the s ≠ t samples split [t, s] at a uniform m; for the exact average
    velocity (curved path, all data at one point) the two jumps make the whole one, loss zero; for a hand model their
    target is ((m − t)·u(z, t, m) + (s − m)·u(z_m, m, s)) / (s − t), z_m = z + (m − t)·u(z, t, m), and the other
    samples keep the JVP's target, as without splitting. With the EMA `teacher`, its jumps make the target."""
    keys = ("flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_p=0", "flow.path=cosine")
    objective = objective_of(*keys, "flow.meanflow_split=0.5")
    point = M.expand(512, 2).clone()
    draw = objective.draw(point, None, torch.Generator().manual_seed(3))
    split = draw.mid < draw.s
    assert 0.3 < split.float().mean() < 0.45 and (draw.mid > draw.t)[split].all() and (draw.s > draw.t)[split].all()
    assert objective.loss(ExactOnPath(objective.path), point, draw).loss.max() < 1e-8  # float32 targets
    model, x1 = LinearAverageVelocity(), M + 0.5 * draw.x0
    draw.y = torch.arange(512) % 3
    loss = objective.loss(model, x1, draw).loss
    z = objective.path.sample(draw.x0, x1, draw.t).x_t
    with torch.no_grad():
        first = model(z, draw.t, draw.y, s=draw.mid)
        second = model(z + (draw.mid - draw.t)[:, None] * first, draw.mid, draw.y, s=draw.s)
        before, after = (draw.mid - draw.t)[:, None], (draw.s - draw.mid)[:, None]
        target = (before * first + after * second) / (before + after)
        expected = (model(z, draw.t, draw.y, s=draw.s) - target).square().sum(1)
    assert torch.allclose(loss[split].double(), expected[split], rtol=1e-5)
    objective.teacher = lambda z, t, y=None, s=None: torch.zeros_like(z)  # the EMA model's jumps stand still
    still = objective.loss(model, x1, draw).loss
    with torch.no_grad():
        assert torch.allclose(still[split].double(), model(z, draw.t, draw.y, s=draw.s).square().sum(1)[split])
    assert torch.equal(still[~split], loss[~split])
    draw.mid = None  # the draw without splitting
    unsplit = objective_of(*keys).loss(model, x1, draw).loss
    assert not torch.allclose(loss[split], unsplit[split]) and torch.equal(loss[~split], unsplit[~split])


def test_the_alpha_schedule_goes_from_start_to_end_over_its_window_and_clamps():
    at = lambda step, **kw: alpha_at(step, 1.0, 0.0, (100, 300), **kw)  # noqa: E731
    assert at(0) == at(99) == 1.0 and at(300) == at(10_000) == 0.0
    assert at(200) == pytest.approx(0.5) and at(200, schedule="linear") == pytest.approx(0.5)
    assert at(150, schedule="linear") == pytest.approx(0.75)
    sigmoid = [at(k) for k in range(100, 301)]
    assert all(a >= b for a, b in zip(sigmoid, sigmoid[1:]))  # never back up
    assert 0.99 < at(100) < 1 and 0 < at(299) < 0.01  # σ(∓5): 6.7e-3 from an end, not clamped
    assert at(100, gamma=20) == 1.0 and at(299, gamma=20) == 0.0  # σ(∓10): within 5e-3 of an end, that end
    assert 0 < at(110) < 1 and at(110) == pytest.approx(1 - 1 / (1 + math.exp(-10 * (0.05 - 0.5))))


def alphaflow(start_step: int, *extra):
    """An AlphaFlow objective whose curriculum runs over steps [10, 20]; draws at `start_step`."""
    return objective_of("flow.objective=alphaflow", "flow.meanflow_ratio=0.5", "flow.meanflow_p=0",
                        "flow.alpha_steps=[10,20]", "flow.alpha_schedule=linear", *extra, num_classes=3)


def test_alphaflow_at_alpha_1_is_flow_matching_and_at_alpha_0_is_meanflow_term_by_term():
    objective = alphaflow(0)
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(128) % 3
    draw = objective.draw(x1, y, torch.Generator().manual_seed(2))
    model = LinearAverageVelocity()
    same = draw.s == draw.t
    assert same.any() and (~same).any()
    # α = 1 (before the window): the target is the conditional velocity; at s = t that is flow matching.
    draw.step = 5
    loss = objective.loss(model, x1, draw).loss
    sample = objective.path.sample(draw.x0, x1, draw.t)
    with torch.no_grad():
        expected = (model(sample.x_t, draw.t, y, s=draw.s) - sample.u_t).square().sum(1)
    assert torch.allclose(loss.double(), expected, rtol=1e-6)
    fm = objective_of("flow.objective=cfm", num_classes=3).loss(model, x1, draw).loss
    assert torch.allclose(loss[same].double(), 2 * fm[same].double(), rtol=1e-6)  # the mean over 2 elements × 2
    # α = 0 (after the window): MeanFlow's loss itself, with its JVP.
    draw.step = 20
    meanflow = objective_of("flow.objective=meanflow", "flow.meanflow_ratio=0.5", "flow.meanflow_p=0", num_classes=3)
    assert torch.equal(objective.loss(model, x1, draw).loss, meanflow.loss(model, x1, draw).loss)
    # α in between: α·v + (1 − α)·u(z + α(s − t)v, t + α(s − t), s) as the target, α·‖·‖² on the s ≠ t samples.
    draw.step = 15
    a = 0.5
    with torch.no_grad():
        gap = (draw.s - draw.t)[:, None]
        rest = model(sample.x_t + a * gap * sample.u_t, draw.t + a * (draw.s - draw.t), y, s=draw.s)
        target = a * sample.u_t + (1 - a) * rest
        error = (model(sample.x_t, draw.t, y, s=draw.s) - target).square().sum(1)
    expected = torch.where(same, error, a * error)
    assert torch.allclose(objective.loss(model, x1, draw).loss.double(), expected, rtol=1e-6)


def test_the_micro_steps_carry_their_optimizer_step():
    from flows.batches import micro_steps
    from flows.couplings import BatchShard

    loader = iter([(torch.zeros(4, 2), None)] * 10)
    steps = micro_steps(loader, objective_of(), BatchShard(), 0, 6, torch.device("cpu"), False, grad_accum=3)
    assert [next(steps)[1].step for _ in range(4)] == [2, 2, 2, 3]


def shortcut_objective(*extra):
    return objective_of("flow.objective=shortcut", "flow.path=cosine", *extra)


def test_shortcut_draws_dyadic_steps_on_their_grid():
    objective = shortcut_objective("flow.shortcut_fraction=0.5", "flow.shortcut_steps=16")
    draw = objective.draw(torch.zeros(4000, 2, dtype=torch.float64), None, torch.Generator().manual_seed(3))
    d = draw.s - draw.t
    apart = d > 0
    assert 0.45 < apart.float().mean() < 0.55
    assert set(d[apart].tolist()) == {1.0, 0.5, 0.25, 0.125}  # 2/M ... 1 with M = 16
    k = draw.t[apart] / d[apart]
    assert torch.equal(k, k.round()) and (draw.s <= 1).all()  # t a multiple of d, the jump inside [0, 1]


def test_a_shortcut_models_two_half_steps_equal_one_full_step_for_the_exact_field():
    """On a curved path with all data at one point, the exact average velocity's two half jumps make its whole jump:
    the self-consistency loss is zero wherever the half step is coarser than the finest, whose target is an Euler
    step (an error of order h²); flow matching at d = 0 is zero too. With the EMA `teacher`, the targets are the
    teacher's."""
    objective = shortcut_objective("flow.shortcut_fraction=0.5")
    point = M.expand(512, 2).clone()
    draw = objective.draw(point, None, torch.Generator().manual_seed(4))
    exact = ExactOnPath(objective.path)
    loss = objective.loss(exact, point, draw).loss
    h = (draw.s - draw.t) / 2
    coarse, finest = h > 1 / 128, h == 1 / 128
    assert coarse.sum() > 150 and finest.any()
    assert loss[coarse].max() < 1e-10 and loss[h == 0].max() < 1e-10  # float32 targets
    assert 1e-8 < loss[finest].max() < 1e-3
    objective.teacher = lambda z, t, y=None, s=None: torch.zeros_like(z)  # its jumps stand still: target 0
    still = objective.loss(exact, point, draw).loss
    sample = objective.path.sample(draw.x0, point, draw.t)
    with torch.no_grad():
        expected = exact(sample.x_t, draw.t, s=draw.s).square().mean(1)
    assert torch.allclose(still[h > 0].double(), expected[h > 0], rtol=1e-5)
    assert torch.equal(still[h == 0], loss[h == 0])  # flow matching does not ask the teacher


def test_the_shortcut_sampler_jumps_with_exact_nfe():
    path = LinearPath(0.0)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = ExactOnPath(path)
    for steps in (1, 4, 8):
        out = generate(exact, x0, steps, "shortcut")
        assert out.nfe == steps and torch.allclose(out.x, M.expand(300, 2), atol=1e-9)
    with pytest.raises(UserError, match="--solver shortcut jumps with a shortcut model's step-size input"):
        generate(lambda x, t, y=None: x, x0, 2, "shortcut")
    with pytest.raises(UserError, match="give --solver shortcut without \\+LAST"):
        generate(exact, x0, 2, "shortcut+euler")


@pytest.mark.parametrize(("overrides", "message"), [
    (["flow.objective=alphaflow", "flow.alpha_end=0.5"], "AlphaFlow's curriculum must end at α = 0"),
    (["flow.objective=alphaflow", "flow.alpha_steps=[50,10]"], "flow.alpha_steps must be two optimizer steps"),
    (["flow.objective=meanflow", "flow.meanflow_loss=v"], "set flow.meanflow_tangent=model too"),
    (["flow.objective=shortcut", "flow.shortcut_steps=100"], "a power of 2"),
    (["flow.objective=meanflow", "flow.shortcut_steps=64"], "is read only with flow.objective=shortcut"),
    (["flow.objective=cfm", "flow.alpha_start=0.5"], "is read only with flow.objective=alphaflow"),
    (["flow.objective=shortcut", "flow.meanflow_cfg=2"], "is read only with flow.objective=meanflow or alphaflow"),
    (["flow.objective=shortcut", "flow.path=icfm", "flow.sigma=0.1"], "trains the average velocity on an affine"),
    (["flow.objective=meanflow", "flow.meanflow_cfg_range=[4,1]"], "must be \\[ω_min, ω_max\\], 0 ≤ ω_min < ω_max"),
    (["flow.objective=meanflow", "flow.meanflow_cfg_range=[1,4]", "flow.meanflow_cfg=2"], "set one of them"),
    (["flow.objective=cfm", "flow.meanflow_cfg_range=[1,4]"], "is read only with flow.objective=meanflow"),
    (["flow.objective=meanflow", "flow.meanflow_loss=v", "flow.meanflow_tangent=model", "flow.meanflow_split=0.5"],
     "flow.meanflow_split replaces the u-loss's target"),
    (["flow.objective=meanflow", "flow.meanflow_velocity=model", "model.class_cond=true", "flow.label_dropout=0.1",
      "flow.meanflow_cfg=2"], "guidance cannot be baked into their target"),
    (["flow.objective=meanflow", "flow.meanflow_velocity=ema", "flow.meanflow_split=0.5",
      "flow.meanflow_split_ema=false"], "set flow.meanflow_split_ema=true"),
    (["flow.objective=meanflow", "flow.meanflow_velocity=data"], "flow.meanflow_velocity: unknown name .data."),
    (["flow.objective=meanflow", "flow.meanflow_derivative=finite"], "flow.meanflow_derivative: unknown name .finite."),
    (["flow.objective=shortcut", "flow.meanflow_derivative=central"], "is read only with flow.objective=meanflow"),
    (["flow.objective=meanflow", "flow.meanflow_derivative=onesided", "train.mixed_precision=bf16"],
     "must be plain float32: with train.mixed_precision or train.compile use flow.meanflow_derivative=central"),
])
def test_bad_few_step_settings_are_one_clear_line(overrides, message):
    from registries import check_names

    with pytest.raises(UserError, match=message):
        check_names(load_config(None, overrides))


def test_bad_few_step_input_exits_2_with_one_line(tmp_path, teacher):  # noqa: F811
    out = run_script("sample.py", "--weights", str(teacher), "--n-samples", "4", "--solver", "shortcut", "--steps",
                     "2", "--save-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and out.stderr.startswith("error: --solver shortcut jumps with a shortcut model's")
    out = run_script("train.py", "-e", str(tmp_path / "run"), *TINY, "flow.objective=alphaflow", "flow.alpha_end=0.2")
    assert out.returncode == 2 and "curriculum must end at α = 0" in out.stderr and len(out.stderr.splitlines()) == 1


# Guidance as an input (improved MeanFlow): ω and its interval drawn at training, chosen at sampling.


class GuidedLinear(LinearAverageVelocity):
    """LinearAverageVelocity that also reads the guidance input w (N, 3): + e·ω."""

    guidance_embed = True

    def forward(self, z, t, y=None, s=None, w=None):
        out = super().forward(z, t, y, s=s)
        return out if w is None else out + w[:, :1] * torch.tensor([0.1, -0.2], dtype=z.dtype)


def guided_objective(*extra):
    return objective_of("flow.objective=meanflow", "flow.meanflow_cfg_range=[1,4]", "flow.meanflow_p=0",
                        "model.class_cond=true", "flow.label_dropout=0.2", *extra, num_classes=3)


def test_guidance_as_an_input_draws_its_scales_and_intervals_and_guides_the_target_where_asked():
    objective = guided_objective()
    x1 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.arange(4000) % 3
    draw = objective.draw(x1, y, torch.Generator().manual_seed(7))
    w, dropped = draw.cond["w"], draw.y == 3
    assert dropped.any() and torch.equal(w[dropped], torch.tensor([[1.0, 0.0, 1.0]], dtype=w.dtype).expand(
        int(dropped.sum()), 3))  # no guidance where the label was dropped
    kept = w[~dropped]
    assert 1 <= kept[:, 0].min() and kept[:, 0].max() <= 4 and abs(kept[:, 0].mean() - 2.5) < 0.1
    whole = (kept[:, 1] == 0) & (kept[:, 2] == 1)
    assert 0.45 < whole.float().mean() < 0.55 and (kept[:, 1] <= kept[:, 2]).all()
    # The target: ṽ = ω·v + (1 − ω)·u(z, t, t | ∅) where t ∈ [a, b] for labelled samples, v elsewhere.
    model = GuidedLinear()
    sample = objective.path.sample(draw.x0, x1, draw.t)
    with torch.no_grad():
        unconditional = model(sample.x_t, draw.t, torch.full_like(y, 3))  # its guidance input: none
        omega = w[:, :1]
        inside = ((draw.t >= w[:, 1]) & (draw.t <= w[:, 2]) & ~dropped)[:, None]
        expected = torch.where(inside, omega * sample.u_t + (1 - omega) * unconditional, sample.u_t)
        assert inside.any() and (~inside).any()
        assert torch.allclose(objective.velocity(model, sample.x_t, draw, sample.u_t), expected)
        # ω = 1 is no guidance: the conditional velocity itself.
        draw.cond["w"] = torch.cat([torch.ones_like(w[:, :1]), w[:, 1:]], dim=1)
        assert torch.equal(objective.velocity(model, sample.x_t, draw, sample.u_t), sample.u_t)
    # The prediction and the JVP see each sample's w.
    loss = objective.loss(model, x1, draw).loss
    draw.cond["w"] = w
    assert not torch.allclose(objective.loss(model, x1, draw).loss, loss)


def test_sampling_gives_the_scale_and_interval_to_the_model_in_one_pass():
    from flows.solvers import check_guidance

    model, x0 = GuidedLinear(), torch.randn(6, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.arange(6) % 3
    seen = []
    real = model.forward
    model.forward = lambda z, t, y=None, s=None, w=None: seen.append(w) or real(z, t, y, s=s, w=w)
    out = generate(model, x0, 2, "meanflow", y=y, cfg_scale=2.5, cfg_interval=(0.2, 0.9))
    assert out.nfe == 2 and len(seen) == 2 and all(len(v) == 6 for v in seen)  # one pass of the batch per jump
    assert torch.equal(seen[0][0], torch.tensor([2.5, 0.2, 0.9], dtype=torch.float64))
    seen.clear()
    plain = generate(model, x0, 2, "meanflow", y=y)
    assert seen == [None, None]  # --cfg-scale 1: no guidance input, the model's unguided jumps
    assert not torch.equal(plain.x, out.x)
    check_guidance(4.0, 3, 0.2, trained=[1, 4])
    with pytest.raises(UserError, match="outside \\[1, 4\\], the guidance scales this model was trained"):
        check_guidance(4.5, 3, 0.2, trained=[1, 4])
    with pytest.raises(UserError, match="takes classifier-free guidance as an input"):
        from flows.guidance import Guidance

        generate(model, x0, 2, "meanflow", y=y, guidance=Guidance("apg", 2.0, (0.0, 1.0)))


def test_a_model_with_guidance_as_input_samples_any_scale_of_its_range_in_one_pass(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (512,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])
    save_file({"x": centers[y] + 0.3 * torch.randn(512, 2, generator=g), "y": y}, str(tmp_path / "data.safetensors"))
    out = run_script("train.py", "-e", str(tmp_path / "run"), *TINY, "data.name=tensor_file",
                     f"data.path={tmp_path / 'data.safetensors'}", "model.class_cond=true", "flow.label_dropout=0.2",
                     "flow.objective=meanflow", "model.time_scale=1", "flow.meanflow_cfg_range=[1,3]",
                     "train.steps=10")
    assert out.returncode == 0, out.stderr
    weights = tmp_path / "run" / "checkpoints" / "step_0000010"

    def sample(*args):
        return run_script("sample.py", "--weights", str(weights), "--n-samples", "8", "--solver", "meanflow",
                          "--steps", "2", "--save-dir", str(tmp_path / "_".join(args)), *args)

    for scale in ("1.5", "3"):
        done = sample("--cfg-scale", scale)
        assert done.returncode == 0, done.stderr
        info = json.loads((tmp_path / f"--cfg-scale_{scale}" / "info.json").read_text())
        assert info["nfe"] == info["forward_passes"] == 2  # guided in one pass per jump
    for args, message in ((["--cfg-scale", "3.5"], "is outside [1, 3], the guidance scales this model was trained"),
                          (["--cfg-scale", "2", "--guidance", "apg"], "takes classifier-free guidance as an input")):
        bad = sample(*args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["unet-mnist", "DiT-S/4"])
@pytest.mark.parametrize("objective", [
    ["flow.objective=alphaflow", "flow.alpha_steps=[0,2]"],
    ["flow.objective=shortcut"],
    ["flow.objective=meanflow", "flow.meanflow_loss=v", "flow.meanflow_tangent=model",
     "flow.meanflow_cfg_range=[1,3]", "model.class_cond=true", "flow.label_dropout=0.5"],
    ["flow.objective=meanflow", "flow.meanflow_ratio=1", "flow.meanflow_split=0.5", "flow.meanflow_cfg_range=[1,3]",
     "model.class_cond=true", "flow.label_dropout=0.5"],
], ids=["alphaflow", "shortcut", "imf", "split"])
def test_every_new_objective_trains_an_image_model_under_bf16(name, objective):
    """One step of each objective on the UNet and a DiT under bf16 autocast: finite loss, gradients reach the
    interval (and guidance) embedding."""
    from models import build_model

    cfg = load_config(None, [f"model.name={name}", "model.width=32", "model.time_scale=1", *objective]
                      + (["model.depth=1", "model.heads=2"] if "DiT" in name else []))
    classes = 3 if cfg.model.class_cond else 0
    model = build_model(cfg, (1, 8, 8), classes)
    for p in model.parameters():  # out of the zero start, so that every input reaches the output
        p.data.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 1, 8, 8, generator=g, device=d),
                                num_classes=classes)
    x1 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    draw = objective.draw(x1, torch.arange(8) % 3 if classes else None, torch.Generator().manual_seed(10))
    draw.step = 1
    with torch.autocast("cpu", torch.bfloat16):
        loss = objective.loss(model, x1, draw).loss.mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.interval_embed.embed.mlp[2].weight.grad.abs().sum() > 0
    if classes:
        assert sum(e.mlp[2].weight.grad.abs().sum() for e in model.guidance_embed.embeds) > 0
