"""MeanFlow: the identity and the loss against closed forms, the models' second time, the one-jump sampler."""

import copy
import json

import pytest
import torch
from conftest import run_script
from torch import nn

from config import load_config
from errors import UserError
from flows import build_objective
from flows.meanflow import meanflow_target
from flows.solvers import generate

M, S1 = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5  # data N(M, S1² I), noise N(0, I)


def moments(t: torch.Tensor):
    """Mean and standard deviation of x_t = (1 − t)·x0 + t·x1 for independent x0 ~ N(0, I), x1 ~ N(M, S1² I)."""
    return t[:, None] * M, torch.sqrt((1 - t) ** 2 + (t * S1) ** 2)[:, None]


class ExactAverageVelocity(nn.Module):
    """The marginal flow of the Gaussian pair is affine: z_s = μ_s + (σ_s/σ_t)(z − μ_t), so the average velocity is
    u(z, t, s) = (z_s − z)/(s − t), and at s = t the instantaneous v = μ̇ + (σ̇/σ)(z − μ)."""

    interval_embed = True  # takes the second time, as a MeanFlow model does

    def forward(self, z, t, y=None, s=None):
        s = t if s is None else s
        mu_t, sd_t = moments(t)
        mu_s, sd_s = moments(s)
        gap = (s - t)[:, None]
        jump = (mu_s - mu_t + (sd_s / sd_t - 1) * (z - mu_t)) / torch.where(gap == 0, 1, gap)
        dsd = (-(1 - t) + t * S1**2)[:, None] / sd_t  # σ̇_t
        instantaneous = M + dsd / sd_t * (z - mu_t)
        return torch.where(gap == 0, instantaneous, jump)


def test_the_meanflow_identity_gives_back_the_exact_average_velocity():
    """u_tgt = v + (s − t)·d/dt u along the marginal velocity equals u itself for the exact average velocity of a
    curved flow (Gaussian → Gaussian of another variance): the tangent, the sign of s − t and the JVP are right."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    s = torch.where(torch.arange(64) % 4 == 0, t, t + (1 - t) * torch.rand(64, generator=g, dtype=torch.float64))
    z = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
    exact = ExactAverageVelocity()
    v = exact(z, t)
    target = meanflow_target(exact, z.double(), t, s, v)
    assert torch.allclose(target.double(), exact(z, t, s=s), atol=1e-4)
    assert (exact(z, t, s=s) - v).abs().max() > 0.1  # the flow is curved: average and instantaneous differ


class ExactOnPath(nn.Module):
    """The exact average velocity when all data sit at one point M, on a curved affine path: x0 is read back from
    z = α_t·M + σ_t·x0, so the conditional velocity is the marginal one, and u(z, t, s) = (z_s − z)/(s − t) with
    z_s = α_s·M + σ_s·x0; at s = t the instantaneous v = α̇_t·M + σ̇_t·x0. `offset` is added to every output."""

    interval_embed = True

    def __init__(self, path, offset=None):
        super().__init__()
        self.path, self.offset = path, offset

    def forward(self, z, t, y=None, s=None):
        s, p = (t if s is None else s), self.path
        x0 = (z - p.alpha(t)[:, None] * M.to(z)) / p.sigma(t)[:, None]
        gap = (s - t)[:, None]
        jump = (p.alpha(s)[:, None] * M.to(z) + p.sigma(s)[:, None] * x0 - z) / torch.where(gap == 0, 1, gap)
        instantaneous = p.d_alpha(t)[:, None] * M.to(z) + p.d_sigma(t)[:, None] * x0
        out = torch.where(gap == 0, instantaneous, jump)
        return out if self.offset is None else out + self.offset.to(z)


@pytest.mark.parametrize("path", ["cosine", "vp"])
def test_the_loss_of_a_deterministic_pair_on_a_curved_path_pins_the_identity_and_the_weight(path):
    """All data at one point M on a curved path, where d/dt u ≠ 0: the exact model's MeanFlow loss is zero at every
    (t, s) (a wrong sign of s − t, tangent or JVP would not be); the exact model plus a constant c (whose JVP is the
    exact one's) has the error ‖c‖² and the loss ‖c‖²/(‖c‖² + ε)^p exactly, times each coupling weight."""
    cfg = load_config(None, ["flow.objective=meanflow", "flow.meanflow_ratio=0.75", f"flow.path={path}",
                             "flow.meanflow_p=0.75", "flow.meanflow_eps=0.01"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64))
    objective.time_density = lambda n, g, d: torch.rand(n, generator=g, device=d, dtype=torch.float64) * 0.95
    x1 = M.expand(256, 2).clone()
    draw = objective.draw(x1, None, torch.Generator().manual_seed(1))
    assert (draw.s > draw.t).float().mean() > 0.6 and (draw.s >= draw.t).all()
    exact = ExactOnPath(objective.path)
    sample = objective.path.sample(draw.x0, x1, draw.t)
    apart = draw.s > draw.t
    curved = (exact(sample.x_t, draw.t, s=draw.s) - sample.u_t).norm(dim=1)[apart]
    assert curved.min() > 1e-3  # u ≠ v where s ≠ t: the (s − t)·d/dt u term carries the target
    assert objective.loss(exact, x1, draw).loss.max() < 1e-5  # the JVP runs in float32
    c = torch.tensor([0.3, -0.2], dtype=torch.float64)
    off = objective.loss(ExactOnPath(objective.path, c), x1, draw).loss
    norm = float(c.square().sum())
    assert torch.allclose(off, torch.full_like(off, norm / (norm + 0.01) ** 0.75), rtol=1e-3)
    draw.weight = torch.linspace(0, 2, 256, dtype=torch.float64)
    weighted = objective.loss(ExactOnPath(objective.path, c), x1, draw).loss
    assert torch.allclose(weighted, off * draw.weight.float(), rtol=1e-6)


def test_meanflow_applies_the_partial_couplings_weights():
    """flow.coupling=partial gives half the samples weight 0: their MeanFlow loss is 0, the others' is not."""
    cfg = load_config(None, ["flow.objective=meanflow", "flow.coupling=partial", "flow.ot_mass=0.5"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64))
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 3
    draw = objective.draw(x1, None, torch.Generator().manual_seed(4))
    assert draw.weight is not None and (draw.weight == 0).sum() >= 16
    loss = objective.loss(lambda z, t, y=None, s=None: torch.zeros_like(z), x1, draw).loss
    assert (loss[draw.weight == 0] == 0).all() and (loss[draw.weight > 0] > 0).all()


def test_meanflow_with_pseudo_huber_is_refused_at_config_time():
    from registries import check_names

    with pytest.raises(UserError, match="flow.loss=pseudo_huber does not apply to flow.objective=meanflow"):
        check_names(load_config(None, ["flow.objective=meanflow", "flow.loss=pseudo_huber"]))


@pytest.mark.parametrize("times, mean_t", [("ordered", 1 / 3), ("single", 1 / 2)])
def test_the_time_samplers_of_the_paper_and_of_py_meanflow_v1(times, mean_t):
    """Uniform draws: the paper's sampler gives the s = t samples the earlier of two draws (mean 1/3), py-meanflow's
    v1 one draw (mean 1/2); the s ≠ t samples are the ordered pair in both (means 1/3 and 2/3), a fraction `ratio`."""
    cfg = load_config(None, ["flow.objective=meanflow", "flow.meanflow_ratio=0.25", f"flow.meanflow_times={times}"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64))
    draw = objective.draw(torch.zeros(200_000, 2), None, torch.Generator().manual_seed(0))
    apart = draw.s != draw.t
    assert abs(apart.float().mean() - 0.25) < 0.005 and (draw.s >= draw.t).all()
    assert abs(draw.t[~apart].mean() - mean_t) < 0.005
    assert abs(draw.t[apart].mean() - 1 / 3) < 0.005 and abs(draw.s[apart].mean() - 2 / 3) < 0.005


def test_the_length_sampler_makes_long_jumps_as_common_as_short_ones():
    """times='length' with uniform draws: s − t uniform on [0, 1] (a tenth of the jumps longer than 0.9, against a
    hundredth for two ordered draws), t uniform on [0, 1 − (s − t)] so that s stays in [t, 1]; s = t keeps one draw."""
    cfg = load_config(None, ["flow.objective=meanflow", "flow.meanflow_ratio=0.75", "flow.meanflow_times=length",
                             "flow.time_density=uniform"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64))
    draw = objective.draw(torch.zeros(200_000, 2), None, torch.Generator().manual_seed(0))
    apart = draw.s != draw.t
    length = (draw.s - draw.t)[apart]
    assert abs(apart.float().mean() - 0.75) < 0.005 and (draw.s >= draw.t).all() and (draw.s <= 1).all()
    assert abs(length.mean() - 1 / 2) < 0.005 and abs((length > 0.9).float().mean() - 0.1) < 0.005
    assert abs((draw.t[apart] / (1 - length)).mean() - 1 / 2) < 0.005  # the start spread evenly over its room
    assert abs(draw.t[~apart].mean() - 1 / 2) < 0.005

class LinearAverageVelocity(nn.Module):
    """u(z, t, s | y) = A·z + b·t + c·s + d_y, its JVP by hand: d/dt u along w is A·w + b. With `dropout`, a dropout
    layer on the output (it must be off wherever the objective evaluates the model without training it)."""

    interval_embed = True

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.A = nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.3)
        self.b, self.c = (nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64)) for _ in range(2))
        self.d = nn.Parameter(torch.randn(4, 2, generator=g, dtype=torch.float64))  # 3 classes and the null one
        self.drop = nn.Dropout(dropout)

    def forward(self, z, t, y=None, s=None):
        s = t if s is None else s
        return self.drop(z @ self.A.T + t[:, None] * self.b + s[:, None] * self.c + self.d[y])


@pytest.mark.parametrize("tangent", ["conditional", "model"])
def test_baked_guidance_and_the_model_tangent_against_a_hand_computation(tangent):
    """ω = 2 baked in: labelled samples regress on ṽ = ω·v_t + (1 − ω)·u(z, t, t | ∅) + (s − t)·(A·w + b), with w = ṽ
    (tangent 'conditional') or u(z, t, t | y) (tangent 'model'); samples whose label was dropped keep v_t."""
    cfg = load_config(None, ["flow.objective=meanflow", "model.class_cond=true", "flow.label_dropout=0.3",
                             "flow.meanflow_cfg=2", f"flow.meanflow_tangent={tangent}", "flow.meanflow_p=0"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64),
                                num_classes=3)
    model = LinearAverageVelocity()
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.arange(64) % 3
    draw = objective.draw(x1, y, torch.Generator().manual_seed(7))
    assert (draw.y == 3).any() and (draw.y < 3).any()
    with torch.no_grad():
        sample = objective.path.sample(draw.x0, x1, draw.t)
        z, t, s, v = sample.x_t, draw.t, draw.s, sample.u_t
        guided = 2 * v + (1 - 2) * model(z, t, torch.full_like(y, 3))
        v_tilde = torch.where((draw.y < 3)[:, None], guided, v)
        w = v_tilde if tangent == "conditional" else model(z, t, draw.y)
        target = v_tilde + (s - t)[:, None] * (w @ model.A.T + model.b)
        expected = (model(z, t, draw.y, s=s) - target).square().sum(1)
    assert torch.allclose(objective.loss(model, x1, draw).loss.double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tangent", ["conditional", "model"])
def test_the_guidance_and_tangent_forwards_run_without_dropout(tangent, monkeypatch):
    """With dropout in the model, the guided velocity and the tangent that the target is built from are the same
    twice for one draw (eval mode; the official code evaluates guidance with train=False), and the model's modes
    are as they were afterwards."""
    import flows.meanflow as meanflow

    cfg = load_config(None, ["flow.objective=meanflow", "model.class_cond=true", "flow.label_dropout=0.3",
                             "flow.meanflow_cfg=2", f"flow.meanflow_tangent={tangent}"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64),
                                num_classes=3)
    model = LinearAverageVelocity(dropout=0.5).train()
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    draw = objective.draw(x1, torch.arange(64) % 3, torch.Generator().manual_seed(7))
    seen = []
    real = meanflow.meanflow_target
    monkeypatch.setattr(meanflow, "meanflow_target", lambda m, z, t, s, v, y=None, along=None, method="jvp", **kw:
                        seen.append((v.clone(), along.clone())) or real(m, z, t, s, v, y, along, method, **kw))
    for _ in range(2):
        objective.loss(model, x1, draw)
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    assert model.training and model.drop.training


@pytest.mark.parametrize("name", ["mlp", "DiT-S/4", "unet-mnist"])
def test_the_jvp_of_a_bf16_model_runs_in_float32(name):
    """Weights kept in bf16 (as DeepSpeed keeps them) are read as float32 copies by the JVP: the same u and d/dt u as
    the float32 model with the same (rounded) weights."""
    from flows.meanflow import total_derivative
    from models import build_model

    shape = (2,) if name == "mlp" else (1, 8, 8)
    overrides = [f"model.name={name}", "model.width=32", "flow.objective=meanflow"] + \
        (["model.depth=1", "model.heads=2"] if "DiT" in name else [])
    model = build_model(load_config(None, overrides), shape).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    low = copy.deepcopy(model).to(torch.bfloat16)
    rounded = copy.deepcopy(low).float()
    g = torch.Generator().manual_seed(8)
    z, v = torch.randn(4, *shape, generator=g), torch.randn(4, *shape, generator=g)
    t = torch.rand(4, generator=g)
    s = t + (1 - t) * torch.rand(4, generator=g)
    u_low, dudt_low = total_derivative(low, z, t, s, v)
    u, dudt = total_derivative(rounded, z, t, s, v)
    assert u_low.dtype == torch.float32 and torch.allclose(u_low, u, atol=1e-6) and torch.allclose(dudt_low, dudt,
                                                                                                   atol=1e-5)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())  # the model itself is left as it was


def test_guidance_on_a_model_with_guidance_baked_in_is_refused():
    from flows.solvers import check_guidance

    check_guidance(1.0, 10, 0.1, baked=2.0)  # the model's own guided jumps
    check_guidance(1.5, 10, 0.1, baked=1.0)  # CFG on a MeanFlow model without baked guidance: its own choice
    with pytest.raises(UserError, match="guided already \\(trained with flow.meanflow_cfg=2"):
        check_guidance(1.5, 10, 0.1, baked=2.0)


@pytest.mark.parametrize("name", ["mlp", "unet-mnist", "DiT-S/4"])
def test_a_flow_matching_checkpoint_loads_into_the_meanflow_model_unchanged(name, tmp_path):
    """The interval embedding starts at zero: a flow-matching model's weights give the same velocity through the
    MeanFlow model at any s, and init_from reports the new tensors."""
    from models import build_model
    from models.checkpoint import load_weights, save_weights

    shape = (2,) if name == "mlp" else (1, 8, 8)
    overrides = [f"model.name={name}", "model.width=32"] + (["model.depth=1", "model.heads=2"] if "DiT" in name else [])
    fm = build_model(load_config(None, overrides), shape, 3)
    for p in fm.parameters():
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    save_weights(fm, tmp_path / "fm.safetensors")
    mf = build_model(load_config(None, [*overrides, "flow.objective=meanflow"]), shape, 3)
    new = load_weights(mf, tmp_path / "fm.safetensors", missing_ok=("interval_embed.",))
    assert new and all(k.startswith("interval_embed.") for k in new)
    x, t, y = torch.randn(4, *shape), torch.rand(4), torch.tensor([0, 1, 2, 3])
    fm.eval(), mf.eval()
    for s in (None, t, torch.ones(4)):
        assert torch.allclose(mf(x, t, y, s=s), fm(x, t, y), atol=1e-6)
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(mf, tmp_path / "fm.safetensors")  # without the allowance: strict


def test_meanflow_jumps_with_exact_nfe_and_refuses_a_flow_matching_model():
    exact = ExactAverageVelocity()
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps in (1, 2, 5):
        out = generate(exact, x0, steps, "meanflow")
        assert out.nfe == steps
        mu, sd = moments(torch.ones(1, dtype=torch.float64))
        assert torch.allclose(out.x, mu + sd * x0, atol=1e-9)  # the exact map noise → data in any number of jumps
    with pytest.raises(UserError, match="--solver meanflow jumps with the average velocity"):
        generate(lambda x, t, y=None: x, x0, 1, "meanflow")
    with pytest.raises(UserError, match="give --solver meanflow without \\+LAST"):
        generate(exact, x0, 2, "meanflow+euler")
    euler = generate(exact, x0, 400, "euler").x  # s = t: a MeanFlow model is also an ordinary flow
    assert (euler - (mu + sd * x0)).abs().max() < 1e-2


# End to end: train.py, sample.py and evaluate.py with MeanFlow and reflow pairs.

TINY = ["model.width=32", "model.depth=2", "model.time_dim=16", "train.batch_size=32", "data.size=512",
        "train.log_every=5", "train.preview_every=0", "train.preview_n=16", "train.preview_steps=2",
        "train.trackers=[]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    out = run_script("train.py", "-e", str(run), *TINY, "train.steps=40")
    assert out.returncode == 0, out.stderr
    return run / "checkpoints" / "step_0000040"


@pytest.mark.parametrize("objective", [
    ["flow.objective=meanflow", "flow.meanflow_ratio=0.5"],
    ["flow.objective=alphaflow", "flow.meanflow_ratio=0.5", "flow.alpha_steps=[5,15]"],  # α: 1 → 0 across step 10
    ["flow.objective=shortcut", "flow.shortcut_fraction=0.5", "flow.shortcut_steps=8"],  # EMA targets
    ["flow.objective=meanflow", "flow.meanflow_ratio=0.5", "flow.meanflow_split=0.5"],  # interval splitting by the EMA
], ids=["meanflow", "alphaflow", "shortcut", "split"])
def test_few_step_training_resumes_bitwise_and_two_processes_train_as_one(tmp_path, teacher, objective):
    """MeanFlow's JVP runs on the unwrapped network and the gradient through the DDP wrapper, AlphaFlow's α follows
    the optimizer step, a shortcut model's and interval splitting's targets come from the EMA model: for each, 2 gloo
    processes end where 1 does; a run stopped at a checkpoint and resumed ends bitwise where an uninterrupted one
    does; it samples in jumps."""
    import sys

    from test_train import KILL_AFTER_CHECKPOINT, assert_same_weights

    common = [*TINY, *objective, f"train.init_from={teacher}", "train.steps=20", "train.checkpoint_every=10"]
    once = run_script("train.py", "-e", str(tmp_path / "once"), *common)
    assert once.returncode == 0 and "initialized from" in once.stdout and "start adding zero" in once.stdout
    half = run_script("-c", KILL_AFTER_CHECKPOINT, "-e", str(tmp_path / "twice"), *common)
    assert half.returncode == -9
    again = run_script("train.py", "-e", str(tmp_path / "twice"), *common)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    assert_same_weights(tmp_path / "once", tmp_path / "twice", 20)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = run_script("train.py", "-e", str(tmp_path / "two"), *common, launcher=launcher)
    assert two.returncode == 0 and "2 process(es)" in two.stdout, two.stderr
    a, b = weights(tmp_path / "once", 20), weights(tmp_path / "two", 20)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    moved = weights(tmp_path / "once", 20)["interval_embed.embed.mlp.2.weight"]
    assert moved.abs().max() > 0  # the new input learned something
    if "alphaflow" in objective[0]:  # α logged, from 1 before the curriculum to 0 after it
        logged = [json.loads(line) for line in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
        alphas = [m["alpha"] for m in logged if "alpha" in m]
        assert alphas[0] == 1.0 and alphas[-1] == 0.0 and 0 < alphas[1] < 1
    solver = "shortcut" if "shortcut" in objective[0] else "meanflow"
    jumps = run_script("sample.py", "--weights", str(tmp_path / "once" / "checkpoints" / "step_0000020"),
                       "--n-samples", "8", "--solver", solver, "--steps", "2", "--save-dir", str(tmp_path / "jumps"))
    assert jumps.returncode == 0 and "NFE 2" in jumps.stdout, jumps.stdout + jumps.stderr


def weights(run, step):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def test_pairs_do_not_depend_on_batch_size_or_processes_and_train_a_reflow(tmp_path, teacher):
    import sys

    args = ["sample.py", "--weights", str(teacher), "--pairs", "--n-samples", "1500", "--steps", "4"]
    a = run_script(*args, "--bspp", "100", "--save-dir", str(tmp_path / "a"))
    b = run_script(*args, "--bspp", "700", "--save-dir", str(tmp_path / "b"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    c = run_script(*args, "--bspp", "64", "--save-dir", str(tmp_path / "c"), launcher=launcher)
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    shards = ["pairs_00000.safetensors", "pairs_00001.safetensors"]
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() \
            == (tmp_path / "c" / name).read_bytes()
    info = json.loads((tmp_path / "a" / "pairs.json").read_text())
    assert info["n"] == 1500 and info["shape"] == [2] and info["teacher_data"]["name"] == "moons" and info["nfe"] == 4
    from data.pairs import PairsDataset
    from flows.solvers import generate, noise
    from models import build_model
    from models.checkpoint import load_weights

    pairs = PairsDataset(tmp_path / "a")  # x0 is the noise of item k, x1 the teacher's sample from it
    model = build_model(load_config(teacher / "config.yaml"), (2,))
    load_weights(model, teacher / "ema.safetensors")
    x1, _, extras = pairs[torch.arange(1400, 1500)]
    x0 = extras["x0"]
    assert torch.equal(x0, noise(0, list(range(1400, 1500)), (2,)))
    assert torch.allclose(x1, generate(model.double(), x0.double(), 4, "euler").x.float(), atol=1e-6)
    reflow = run_script("train.py", "-e", str(tmp_path / "reflow"), *TINY, "data.name=pairs",
                        f"data.path={tmp_path / 'a'}", "flow.coupling=pairs", f"train.init_from={teacher}",
                        "train.steps=10")
    assert reflow.returncode == 0 and "trained on 1500 reflow pairs" in reflow.stdout, reflow.stderr
    reflowed = tmp_path / "reflow" / "checkpoints" / "step_0000010"
    distill = run_script("train.py", "-e", str(tmp_path / "distill"), *TINY, "data.name=pairs",
                         f"data.path={tmp_path / 'a'}", "flow.coupling=pairs", "flow.time_density=grid",
                         "flow.loss=pseudo_huber", f"train.init_from={reflowed}", "train.steps=10")
    assert distill.returncode == 0, distill.stderr
    report = run_script("evaluate.py", "-e", str(tmp_path / "distill"), "--samplers", "euler:1", "--n-samples", "100")
    assert report.returncode == 0 and "against moons" in (tmp_path / "distill" / "eval" / "report.md").read_text()


@pytest.mark.parametrize(("how", "message"), [
    ("no_manifest", "has no pairs.json: its generation was cut off (2 shards written); run the same sample.py "
                    "--pairs command again to finish it"),
    ("cut_shard", "pairs_00001.safetensors is missing or cut off"),
    ("image_model", "model.name 'unet-mnist' takes images (N, C, H, W) but the data have shape (2,)"),
    ("no_coupling", "flow.coupling=pairs trains on the noise that reflow pairs carry"),
])
def test_bad_pairs_are_one_clear_line(tmp_path, teacher, how, message):
    made = run_script("sample.py", "--weights", str(teacher), "--pairs", "--n-samples", "1100", "--steps", "2",
                      "--save-dir", str(tmp_path / "pairs"))
    assert made.returncode == 0, made.stderr
    extra = ["flow.coupling=pairs"]
    if how == "no_manifest":
        (tmp_path / "pairs" / "pairs.json").unlink()
    elif how == "cut_shard":
        shard = tmp_path / "pairs" / "pairs_00001.safetensors"
        shard.write_bytes(shard.read_bytes()[:200])
    elif how == "image_model":
        extra.append("model.name=unet-mnist")
    else:
        extra = []
    out = run_script("train.py", "-e", str(tmp_path / "run"), *[a for a in TINY if not a.startswith("model.")],
                     "data.name=pairs", f"data.path={tmp_path / 'pairs'}", *extra, "train.steps=2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert message in out.stderr.strip().splitlines()[-1], out.stderr


def test_a_pairs_folder_is_made_by_one_teacher_and_sampler(tmp_path, teacher):
    """Another solver and steps on a complete folder, another seed on a cut-off one, shards with no record: each
    refused in one line naming the difference, nothing written; the same command continues a cut-off folder to the
    shards and manifest of a straight run."""
    import shutil

    args = ["sample.py", "--weights", str(teacher), "--pairs", "--n-samples", "2100", "--steps", "2"]
    straight = run_script(*args, "--save-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    manifest = (tmp_path / "straight" / "pairs.json").read_text()
    assert not (tmp_path / "straight" / "pairs.started.json").exists()
    other = run_script(*args[:-2], "--solver", "heun", "--steps", "5", "--save-dir", str(tmp_path / "straight"))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "was made with solver 'euler', steps 2; this command asks for solver 'heun', steps 5" in other.stderr
    assert (tmp_path / "straight" / "pairs.json").read_text() == manifest  # the manifest says what made the shards
    # Cut off before its last shard and its manifest: the settings recorded at the start stay.
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    (tmp_path / "cut" / "pairs.json").rename(tmp_path / "cut" / "pairs.started.json")
    (tmp_path / "cut" / "pairs_00002.safetensors").unlink()
    reseeded = run_script(*args, "--seed", "3", "--save-dir", str(tmp_path / "cut"))
    assert reseeded.returncode == 2 and "was made with seed 0; this command asks for seed 3" in reseeded.stderr
    assert not (tmp_path / "cut" / "pairs_00002.safetensors").exists()
    again = run_script(*args, "--save-dir", str(tmp_path / "cut"))
    assert again.returncode == 0, again.stderr
    for k in range(3):
        name = f"pairs_{k:05d}.safetensors"
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    made = {k: v for k, v in json.loads((tmp_path / "cut" / "pairs.json").read_text()).items() if k != "date"}
    assert made == {k: v for k, v in json.loads(manifest).items() if k != "date"}
    # Shards with no record of what made them (an older version's cut-off folder).
    (tmp_path / "cut" / "pairs.json").unlink()
    orphan = run_script(*args, "--save-dir", str(tmp_path / "cut"))
    assert orphan.returncode == 2 and "holds 3 shards but no record of what made them" in orphan.stderr


def test_sampling_a_flow_matching_checkpoint_with_meanflow_is_one_line(tmp_path, teacher):
    out = run_script("sample.py", "--weights", str(teacher), "--n-samples", "4", "--solver", "meanflow", "--steps",
                     "1", "--save-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and out.stderr.startswith("error: --solver meanflow jumps with the average velocity")
    out = run_script("evaluate.py", "-e", str(teacher.parent.parent), "--samplers", "meanflow:1", "--n-samples", "50",
                     "--out", str(tmp_path / "eval"))
    assert out.returncode == 2 and out.stderr.startswith("error: --solver meanflow jumps with the average velocity")
