"""MeanFlow: the identity and the loss against closed forms, the models' second time, the one-jump sampler."""

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


def test_the_loss_is_zero_for_the_exact_average_velocity_of_a_deterministic_pair():
    """All data at one point M: x0 is read back from x_t, so the conditional velocity is the marginal one and
    the exact model's MeanFlow loss is zero at every (t, s), the adaptive weight included."""

    class Exact(nn.Module):
        interval_embed = True

        def forward(self, z, t, y=None, s=None):
            return (M.to(z) - z) / (1 - t)[:, None]  # straight lines: the average velocity is the instantaneous one

    cfg = load_config(None, ["flow.objective=meanflow", "flow.meanflow_ratio=0.75"])
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 2, generator=g, device=d, dtype=torch.float64))
    objective.time_density = lambda n, g, d: torch.rand(n, generator=g, device=d, dtype=torch.float64) * 0.95
    x1 = M.expand(256, 2).clone()
    draw = objective.draw(x1, None, torch.Generator().manual_seed(1))
    assert (draw.s > draw.t).float().mean() > 0.6 and (draw.s >= draw.t).all()
    out = objective.loss(Exact(), x1, draw)
    assert out.loss.max() < 1e-6
    wrong = objective.loss(lambda z, t, y=None, s=None: Exact()(z, t) * 0.9, x1, draw)
    assert wrong.loss.min() > 1e-3


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


def test_meanflow_training_resumes_bitwise_and_two_processes_train_as_one(tmp_path, teacher):
    """The JVP runs on the unwrapped network and the gradient through the DDP wrapper: 2 gloo processes end where
    1 does; a run stopped at a checkpoint and resumed ends bitwise where an uninterrupted one does."""
    import sys

    from test_train import KILL_AFTER_CHECKPOINT, assert_same_weights

    common = [*TINY, "flow.objective=meanflow", "flow.meanflow_ratio=0.5", f"train.init_from={teacher}",
              "train.steps=20", "train.checkpoint_every=10"]
    once = run_script("train.py", "-e", str(tmp_path / "once"), *common)
    assert once.returncode == 0 and "initialized from" in once.stdout and "interval embedding" in once.stdout
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


def test_sampling_a_flow_matching_checkpoint_with_meanflow_is_one_line(tmp_path, teacher):
    out = run_script("sample.py", "--weights", str(teacher), "--n-samples", "4", "--solver", "meanflow", "--steps",
                     "1", "--save-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and out.stderr.startswith("error: --solver meanflow jumps with the average velocity")
    out = run_script("evaluate.py", "-e", str(teacher.parent.parent), "--samplers", "meanflow:1", "--n-samples", "50",
                     "--out", str(tmp_path / "eval"))
    assert out.returncode == 2 and out.stderr.startswith("error: --solver meanflow jumps with the average velocity")
