"""Paths, prediction targets, loss weights, couplings and SDE samplers against closed forms, and every combination
end to end (train, resume bitwise, sample, evaluate) at tiny sizes."""

import json
import math

import pytest
import torch
from conftest import TINY, run_script

from config import load_config
from errors import UserError
from flows import PATHS, SDE, build_objective, integrate, sde_sampler
from flows.couplings import ClassOTCoupling, MinibatchOTCoupling, PlanCoupling, ot_match
from flows.paths import T_EPS, PredictedVelocity, Prediction, expand_like
from flows.schedules import time_grid
from flows.solvers import DIFFUSIONS, LAST_STEPS, integrate_sde, uniform_grid
from registries import check_names

AFFINE = ["linear", "cosine", "vp", "polynomial"]
BRIDGES = {"icfm": ["flow.sigma=0.2"], "sb": ["flow.sigma=0.3", "flow.coupling=entropic"]}
PREDICTIONS = ["velocity", "data", "noise", "score"]
MU, S = 1.5, 0.5  # the target N(μ, s²) of the Gaussian -> Gaussian transport, from N(0, 1)


def path_of(name: str, *overrides: str):
    return PATHS[name](load_config(None, [f"flow.path={name}", *BRIDGES.get(name, []), *overrides]))


def moments(path, t):
    """Mean m_t and variance V_t of x_t for x0 ~ N(0, 1), x1 ~ N(μ, s²) independent, and their derivatives."""
    with torch.enable_grad():  # the solvers integrate under no_grad
        t = t.double().detach().requires_grad_(True)
        g = path.g(t) if path.bridge else torch.zeros_like(t)
        m, v = path.alpha(t) * MU, path.alpha(t) ** 2 * S**2 + path.sigma(t) ** 2 + g**2
        dm, dv = (torch.autograd.grad(q.sum(), t, retain_graph=True)[0] for q in (m, v))
    return m.detach(), v.detach(), dm, dv


def oracle_velocity(path, x, t):
    """The marginal velocity of a Gaussian -> Gaussian path: m' + (V'/2V)(x − m) (x_t is Gaussian, and the flow
    of a Gaussian family is affine)."""
    m, v, dm, dv = moments(path, t)
    return expand_like(dm, x) + expand_like(dv / (2 * v), x) * (x - expand_like(m, x))


def oracle_output(path, kind, x, t):
    """E[x1|x_t], E[x0|x_t] or the score of the same Gaussian path (deterministic affine paths)."""
    m, v, _, _ = moments(path, t)
    r = (x - expand_like(m, x)) / expand_like(v, x)
    tt = expand_like(t.double(), x)
    if kind == "data":
        return MU + path.alpha(tt) * S**2 * r
    if kind == "noise":
        return path.sigma(tt) * r
    return -r if kind == "score" else oracle_velocity(path, x, t)


@pytest.mark.parametrize("name", AFFINE + list(BRIDGES))
def test_every_path_velocity_is_the_time_derivative_of_x_t(name):
    path = path_of(name, "flow.poly_n=3")
    x0, x1, eps = (torch.randn(6, 3, dtype=torch.float64) for _ in range(3))
    t = torch.rand(6, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    sample = path.sample(x0, x1, t, eps if path.bridge else None)
    dxdt = torch.stack([torch.autograd.grad(sample.x_t[:, j].sum(), t, retain_graph=True)[0] for j in range(3)], 1)
    assert torch.allclose(dxdt, sample.u_t)
    ends = path.sample(x0, x1, torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(3), eps if path.bridge else None)
    start, end = ends.x_t[0::2], ends.x_t[1::2]
    if name == "vp":  # a trace of data at t = 0 and of noise at t = 1 (α_0 = e^−5.025, t ≤ 1 − T_EPS)
        assert torch.allclose(start, x0[0::2], atol=0.05) and torch.allclose(end, x1[1::2], atol=0.05)
    elif name == "icfm":  # torchcfm's I-CFM keeps its noise σ at both ends
        assert torch.allclose(start, x0[0::2] + 0.2 * eps[0::2]) and torch.allclose(end, x1[1::2] + 0.2 * eps[1::2])
    else:
        assert torch.allclose(start, x0[0::2]) and torch.allclose(end, x1[1::2])


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_each_prediction_of_the_exact_posterior_is_read_as_the_exact_velocity(name, kind):
    path = path_of(name)
    x, t = torch.randn(64, 1, dtype=torch.float64), torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    read = Prediction(path, kind).velocity(oracle_output(path, kind, x, t), x, t)
    assert torch.allclose(read, oracle_velocity(path, x, t), atol=1e-10)


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_a_network_that_outputs_the_exact_target_has_zero_loss(name, kind):
    """Data at one point μ: the posterior knows x1 = μ, hence x0, so the exact output is the conditional target."""
    cfg = load_config(None, [f"flow.path={name}", f"flow.prediction={kind}"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 1, generator=g, device=d, dtype=torch.float64))
    path = objective.path
    x1 = torch.full((256, 1), MU, dtype=torch.float64)

    def exact(x, t, y):
        tt = expand_like(t, x)
        x0 = (x - path.alpha(tt) * MU) / path.sigma(tt)
        return {"velocity": path.d_alpha(tt) * MU + path.d_sigma(tt) * x0, "data": torch.full_like(x, MU),
                "noise": x0, "score": -x0 / path.sigma(tt)}[kind]

    draw = objective.draw(x1, None, torch.Generator().manual_seed(0))
    draw.t = draw.t.double().clamp(T_EPS, 1 - T_EPS)
    assert objective.loss(exact, x1, draw).loss.max() < 1e-12
    assert objective.loss(lambda x, t, y: exact(x, t, y) + 0.1, x1, draw).loss.mean() > 1e-4


def transport_error(path, velocity, steps: int, solver: str) -> float:
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    m0, v0, _, _ = moments(path, torch.zeros(1))
    m1, v1, _, _ = moments(path, torch.ones(1))
    exact = m1 + (v1 / v0).sqrt() * (x0 - m0)  # the flow of a Gaussian family is affine
    return (integrate(velocity, x0, uniform_grid(steps), solver).x - exact).abs().max().item()


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial", "icfm", "sb"])
@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_the_ode_transports_source_to_target_at_each_solvers_order(name, solver, order):
    """The exact marginal velocity, integrated with n and 2n steps: the error at t = 1 falls by 2^order at least
    (midpoint does better on the straight paths; rk4's errors of ~1e-9 cancel erratically, hence its slack). VP's σ̇_t
    is unbounded at t = 1, which spoils any fixed-step order; it is checked for arrival below."""
    path = path_of(name, "flow.poly_n=2")
    velocity = lambda x, t: oracle_velocity(path, x, t.clamp(1e-9, 1 - 1e-9))  # noqa: E731
    coarse, fine = (transport_error(path, velocity, n, solver) for n in (32, 64))
    assert fine < 0.05 and coarse / fine > {1: 1.8, 2: 3.5, 4: 7.0}[order]


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_every_prediction_transports_source_to_target_through_its_conversion(name, kind):
    path = path_of(name)
    model = PredictedVelocity(lambda x, t, y=None: oracle_output(path, kind, x, t), Prediction(path, kind))
    assert transport_error(path, lambda x, t: model(x, t), 400, "heun") < 0.02


class BatchNoise(SDE):
    """The SDE's step noise from one generator for the whole batch: fast for 100,000 samples (each sample's own
    generator is tested by test_sde_samples_do_not_depend_on_the_batch)."""

    def noise(self, like):
        return torch.randn(like.shape, generator=self.generators[0], dtype=like.dtype)


@pytest.mark.parametrize("name", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("k, diffusion", list(enumerate(DIFFUSIONS)))
def test_sde_samplers_reach_the_target_mean_and_variance(name, k, diffusion):
    """Every diffusion form, with each solver and last step in turn, on 200 cosine-spaced steps (small ones at the
    stiff end t = 1): the target's mean within 4 standard errors of the mean (n = 100,000) plus 0.005, its variance
    within 4 standard errors of the variance (1.8%) plus 1.5% for the discretisation (measured at most 1.6% at 200
    steps; 'constant' at t = 1 converges at first order: -6.3%, -2.4%, -1.3% at 200, 400, 800 uniform steps)."""
    solver, last = ("euler_maruyama", "sde_heun")[k % 2], LAST_STEPS[k % 3]
    path, n = path_of(name), 100_000
    x0 = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = integrate_sde(lambda x, t: oracle_velocity(path, x, t), x0, time_grid("cosine", 200), solver,
                        BatchNoise(path, [torch.Generator().manual_seed(2)], diffusion, 1.0, last))
    mean, var = out.x.mean().item(), out.x.var().item()
    m1, v1, _, _ = moments(path, torch.ones(1))
    assert abs(mean - m1.item()) < 4 * math.sqrt(v1.item() / n) + 0.005
    assert abs(var / v1.item() - 1) < 4 * math.sqrt(2 / n) + 0.015
    assert out.nfe == {"euler_maruyama": 200, "sde_heun": 399}[solver]


def test_sde_samples_do_not_depend_on_the_batch():
    cfg = load_config(None, ["sample.solver=euler_maruyama"])
    path = PATHS["linear"](cfg)
    x0 = torch.randn(6, 2, dtype=torch.float64)

    def run(indices, seed=0):
        return integrate_sde(lambda x, t: oracle_velocity(path, x, t), x0[indices], uniform_grid(10),
                             "euler_maruyama", sde_sampler(cfg, "euler_maruyama", seed, indices)).x

    assert torch.equal(torch.cat([run([0, 1, 2]), run([3, 4, 5])]), run(list(range(6))))
    assert not torch.equal(run(list(range(6)), seed=1), run(list(range(6))))  # the seed is the noise's too


@pytest.mark.parametrize("kind", ["data", "noise", "score"])
def test_the_velocity_weight_turns_each_error_into_the_velocitys(kind):
    """w(t)·‖f − target‖² equals ‖v(f) − u_t‖² for any output f: SiT's velocity weighting."""
    for name in AFFINE:
        path = path_of(name)
        pred = Prediction(path, kind, "velocity")
        x0, x1 = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
        t = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
        sample, out = path.sample(x0, x1, t), torch.randn(32, 3, dtype=torch.float64)
        weighted = pred.loss_weight(t) * (pred.output(out, t) - pred.target(sample)).square().sum(1)
        velocity = (pred.velocity(out, sample.x_t, t) - sample.u_t).square().sum(1)
        assert torch.allclose(weighted, velocity)


def test_sd3_weights_and_the_likelihood_weight():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    linear = path_of("linear")
    assert torch.allclose(Prediction(linear, "velocity", "sigma_sqrt").loss_weight(t), (1 - t) ** -2)
    s = 1 - t
    cosmap = 2 / (math.pi * (1 - 2 * s + 2 * s * s))
    assert torch.allclose(Prediction(linear, "velocity", "cosmap").loss_weight(t), cosmap)
    # Rectified flow: D = 1, so SiT's likelihood weight drift_var/σ² is 1/(t(1 − t)).
    assert torch.allclose(Prediction(linear, "noise", "likelihood").loss_weight(t), 1 / (t * (1 - t)))


def test_entropic_ot_approaches_exact_ot_and_partial_ot_weights_its_mass():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 1
    exact = (x0[ot_match(x0, x1)] - x1).square().sum()
    sharp = PlanCoupling("entropic", 1e-3).pair(x0, x1, generator=torch.Generator().manual_seed(1)).x0
    blurred = PlanCoupling("entropic", 10.0).pair(x0, x1, generator=torch.Generator().manual_seed(1)).x0
    independent = (x0 - x1).square().sum()
    assert (sharp - x1).square().sum() < 1.05 * exact < (blurred - x1).square().sum() < 1.3 * independent
    partial = PlanCoupling("partial", mass=0.5).pair(x0, x1, generator=torch.Generator().manual_seed(1))
    assert partial.weight.sum().item() == pytest.approx(64) and (partial.weight == 0).sum() >= 30
    unbalanced = PlanCoupling("unbalanced", 0.05, mass_reg=0.1).pair(x0, x1, generator=torch.Generator())
    assert unbalanced.weight.sum().item() == pytest.approx(64) and unbalanced.weight.std() > 0.1


def test_class_ot_pairs_within_classes_by_exact_ot():
    g = torch.Generator().manual_seed(0)
    x0, x1, y = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g), torch.arange(40) % 3
    paired = ClassOTCoupling().pair(x0, x1, generator=torch.Generator().manual_seed(2), y=y).x0
    assert sorted(paired[:, 0].tolist()) == sorted(x0[:, 0].tolist())  # each noise used once
    for c in range(3):  # within a class, the pairs are the exact OT of the noise it was given
        rows = y == c
        mine = paired[rows]
        assert torch.equal(mine[ot_match(mine, x1[rows])], mine)
    whole = MinibatchOTCoupling().pair(x0, x1).x0  # across classes, OT could pair more cheaply
    assert (whole - x1).square().sum() <= (paired - x1).square().sum()


@pytest.mark.parametrize("overrides, message", [
    (["flow.prediction=score", "data.source=8gaussians"], "score of a Gaussian source"),
    (["flow.path=sb", "flow.sigma=0.2"], "set flow.coupling=entropic"),
    (["flow.path=icfm", "flow.sigma=0.2", "flow.prediction=data"], "needs an affine path"),
    (["flow.path=icfm"], "set flow.sigma > 0"),
    (["flow.sigma=0.1"], "bridge noise of flow.path=icfm or sb"),
    (["flow.path=cosine", "flow.sigma_min=0.1"], "belongs to flow.path=linear"),
    (["flow.loss_weight=likelihood"], "weights the noise or score error"),
    (["flow.coupling=class_ot"], "set model.class_cond=true"),
    (["flow.coupling=entropic"], "set flow.ot_reg > 0"),
    (["flow.objective=meanflow", "flow.prediction=data"], "flow.objective=meanflow trains the average velocity"),
    (["flow.path=icfm", "flow.sigma=0.2", "sample.solver=euler_maruyama"], "needs the score"),
    (["data.source=8gaussians", "sample.solver=sde_heun"], "needs the score"),
    (["sample.diffusion=sbmd"], "did you mean 'sbdm'"),
    (["flow.prediction=x1"], "unknown name 'x1'"),
    (["sample.cfg_interval=[0.8,0.2]"], "must be two times 0 ≤ a ≤ b ≤ 1"),
    (["model.time_input=raw", "flow.objective=meanflow"], "no second time input"),
    (["model.time_input=raw", "model.time_scale=1"], "remove model.time_scale"),
    # Settings that another choice would silently ignore.
    (["flow.time_mean=0.4"], "flow.time_mean=0.4 is read only with flow.time_density=logit_normal, and this config "
                             "has flow.time_density=uniform: remove flow.time_mean or change flow.time_density"),
    (["flow.meanflow_cfg=2", "model.class_cond=true"], "flow.meanflow_cfg=2.0 is read only with flow.objective"),
    (["flow.huber_c=0.1"], "flow.huber_c=0.1 is read only with flow.loss=pseudo_huber"),
    (["flow.coupling=entropic", "flow.ot_mass=0.5", "flow.ot_reg=0.1"], "flow.ot_mass=0.5 is read only with "
                                                                        "flow.coupling=partial"),
    (["flow.path=cosine", "flow.poly_n=3"], "flow.poly_n=3.0 is read only with flow.path=polynomial"),
    (["flow.objective=meanflow", "flow.meanflow_tangent=modle"], "did you mean 'model'"),
    (["flow.objective=meanflow", "flow.loss=pseudo_huber"], "flow.loss=pseudo_huber does not apply to "
                                                            "flow.objective=meanflow"),
])
def test_names_that_do_not_fit_together_fail_at_config_time(overrides, message):
    with pytest.raises(UserError, match=message):
        check_names(load_config(None, overrides))


# ---------------------------------------------------------------------------------------------
# Every combination as a user runs it: train, resume bitwise, sample (ODE and SDE), evaluate.

COMBOS = {
    **{f"{p}-{k}": [f"flow.path={p}", f"flow.prediction={k}"] for p in AFFINE for k in PREDICTIONS},
    **{b: [f"flow.path={b}", *o] for b, o in BRIDGES.items()},
    "linear-noise-likelihood": ["flow.prediction=noise", "flow.loss_weight=likelihood"],
    "cosine-score-velocity-weight": ["flow.path=cosine", "flow.prediction=score", "flow.loss_weight=velocity"],
    "logit-normal-sigma-sqrt": ["flow.time_density=logit_normal", "flow.loss_weight=sigma_sqrt"],
    "cosmap": ["flow.loss_weight=cosmap"],
    "entropic": ["flow.coupling=entropic", "flow.ot_reg=0.1"],
    "unbalanced": ["flow.coupling=unbalanced", "flow.ot_reg=0.1"],
    "partial": ["flow.coupling=partial", "flow.ot_mass=0.7"],
    "class-ot": ["flow.coupling=class_ot", "model.class_cond=true", "flow.label_dropout=0.2"],
}

DRIVER = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
import evaluate, sample, train

root, combos, tiny = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
results = {}
for name, overrides in combos.items():
    print(f"combination {name}", file=sys.stderr)
    common = [*tiny, *overrides, "train.checkpoint_every=3", "train.preview_every=6"]
    if "model.class_cond=true" in overrides:
        common += ["data.name=tensor_file", f"data.path={root / 'labelled.safetensors'}"]
    train.main(["-e", str(root / name / "once"), *common, "train.steps=6"])
    train.main(["-e", str(root / name / "twice"), *common, "train.steps=3"])
    train.main(["-e", str(root / name / "twice"), *common, "train.steps=6"])
    same = all(torch.equal(a, b) for kind in ("model", "ema") for a, b in zip(
        load_file(str(root / name / "once/checkpoints/step_0000006" / f"{kind}.safetensors")).values(),
        load_file(str(root / name / "twice/checkpoints/step_0000006" / f"{kind}.safetensors")).values()))
    weights = str(root / name / "once/checkpoints/step_0000006")
    solvers = ["heun"] + ([] if any(b in " ".join(overrides) for b in ("icfm", "sb")) else ["euler_maruyama"])
    finite = True
    for solver in solvers:
        out = root / name / solver
        sample.main(["--weights", weights, "--n-samples", "16", "--save-dir", str(out), "--solver", solver,
                     "--steps", "4"])
        finite = finite and bool(torch.isfinite(torch.from_numpy(__import__("numpy").load(out / "samples.npy"))).all())
    evaluate.main(["-e", str(root / name / "once"), "--samplers", ",".join(f"{s}:4" for s in solvers),
                   "--n-samples", "16"])
    rows = json.loads((root / name / "once/eval/report.json").read_text())["rows"]
    results[name] = {"same": same, "finite": finite, "w2": [r["w2"] for r in rows]}
print(json.dumps(results))
"""


def test_every_combination_trains_resumes_bitwise_samples_and_evaluates(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    save_file({"x": x, "y": (x[:, 0] > 0).long()}, str(tmp_path / "labelled.safetensors"))  # two classes
    done = run_script("-c", DRIVER, str(tmp_path), json.dumps(COMBOS), json.dumps(TINY), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == set(COMBOS)
    for name, r in results.items():
        assert r["same"], f"{name}: resuming is not bitwise identical"
        assert r["finite"], f"{name}: non-finite samples"
        assert all(math.isfinite(w) for w in r["w2"]), f"{name}: W2 {r['w2']}"


def test_guidance_interval_guides_inside_and_counts_the_passes_it_spends():
    from flows.solvers import forward_passes, guided, guided_evaluations

    class Labelled(torch.nn.Module):  # v(x, t, y) = y (the null class 2 gives 2)
        label_embed = torch.nn.Embedding(3, 1)
        label_embed.num_classes = 2

        def forward(self, x, t, y, **cond):
            return y.to(x.dtype)[:, None].expand_as(x)

    v = guided(Labelled(), torch.tensor([0, 0]), cfg_scale=3.0, interval=(0.2, 0.6))
    x = torch.zeros(2, 1)
    inside, outside = v(x, torch.tensor([0.4, 0.4])), v(x, torch.tensor([0.8, 0.8]))
    assert torch.equal(inside, torch.full_like(x, 2 + 3 * (0 - 2))) and torch.equal(outside, torch.zeros_like(x))
    assert guided_evaluations("euler", 10, "linear", (0.2, 0.6)) == 5  # t = 0.2, 0.3, 0.4, 0.5, 0.6
    assert guided_evaluations("heun", 4, "linear", (0.0, 1.0)) == 8
    assert forward_passes(10, 3.0, 5) == 15 and forward_passes(10, 3.0) == 20 and forward_passes(10, 1.0, 5) == 10
