"""Guidance beyond CFG (flows/guidance.py): each rule against its defining property, and sample.py / evaluate.py as a
user runs them, with exact NFE and forward passes and one line for each mistake."""

import json

import pytest
import torch
from conftest import TINY, run_script
from safetensors.torch import save_file

from config import load_config
from flows.guidance import Guidance, apg, cfg, cfg_zero
from flows.paths import LinearPath
from flows.sampling import Sampler, guidance_key
from flows.schedules import time_grid
from flows.solvers import generate, guided, integrate


def velocities(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64))


def test_apg_with_eta_one_and_no_cap_or_momentum_is_cfg():
    v, v_bad, x, t = velocities()
    g = Guidance("apg", 3.0, eta=1.0, path=LinearPath())
    assert torch.allclose(apg(g, v, v_bad, x, t), cfg(g, v, v_bad, x, t), atol=1e-12)


def test_apg_keeps_only_the_part_orthogonal_to_the_conditional_estimate_and_caps_its_norm():
    v, v_bad, x, t = velocities()
    path, w = LinearPath(), 4.0
    tt = t[:, None]
    d_cond = x + (1 - tt) * v  # E[x1 | x_t] of the linear path from the conditional velocity
    update = (apg(Guidance("apg", w, path=path), v, v_bad, x, t) - v) * (1 - tt) / (w - 1)  # in data space
    assert torch.allclose((update * d_cond).sum(1), torch.zeros(len(v), dtype=torch.float64), atol=1e-10)
    capped = (apg(Guidance("apg", w, eta=1.0, r=0.05, path=path), v, v_bad, x, t) - v) * (1 - tt) / (w - 1)
    uncapped = ((v - v_bad) * (1 - tt)).norm(dim=1)
    assert (uncapped > 0.05).sum() >= 3 and torch.allclose(capped.norm(dim=1), uncapped.clamp(max=0.05))


def test_apg_momentum_adds_the_previous_update():
    v, v_bad, x, t = velocities()
    g = Guidance("apg", 2.0, eta=1.0, momentum=-0.5, path=LinearPath())
    first = apg(g, v, v_bad, x, t)
    second = apg(g, v, v_bad, x, t)  # the same difference again: 1 − 0.5 of it
    plain = cfg(g, v, v_bad, x, t)
    assert torch.allclose(first, plain) and torch.allclose(second - v, 0.5 * (plain - v))


def test_apg_momentum_starts_afresh_in_every_integration():
    model, x0 = Counted(1.0), torch.randn(4, 3, dtype=torch.float64)
    model.label_embed = type("Null", (), {"num_classes": 1})()
    y = torch.zeros(4, dtype=torch.long)
    g = Guidance("apg", 2.0, momentum=-0.5, path=LinearPath())
    first = generate(model, x0, 4, "euler", y=y, guidance=g)
    assert torch.equal(generate(model, x0, 4, "euler", y=y, guidance=g).x, first.x)  # no state left from the first
    assert torch.equal(generate(model, x0[:3], 4, "euler", y=y[:3], guidance=g).x, first.x[:3])  # nor its batch


def test_cfg_zero_scale_is_the_best_fit_of_the_unconditional_velocity():
    v, v_bad, x, t = velocities()
    s = (v * v_bad).sum(1, keepdim=True) / (v_bad * v_bad).sum(1, keepdim=True)
    for eps in (-1e-3, 1e-3):  # s* minimizes ‖v − s·v_bad‖
        assert ((v - s * v_bad).norm(dim=1) < (v - (s + eps) * v_bad).norm(dim=1)).all()
    assert torch.allclose(cfg_zero(Guidance("cfg_zero", 3.0), v, v_bad, x, t), s * v_bad + 3 * (v - s * v_bad))
    assert torch.allclose(cfg_zero(Guidance("cfg_zero", 1.0), v, v_bad, x, t), v)  # w = 1: the conditional velocity


class Counted(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        return self.scale * x * (1 + t[:, None])


def test_autoguidance_pushes_away_from_the_guide_and_costs_one_guide_pass_per_evaluation():
    model, guide, x0 = Counted(1.0), Counted(0.5), torch.randn(4, 3, dtype=torch.float64)
    out = generate(model, x0, 5, "euler", guidance=Guidance("auto", 3.0, guide=guide))
    assert out.nfe == 5 and model.calls == 5 and guide.calls == 5
    # The guided field: v_guide + 3·(v − v_guide) = 2·x·(1 + t).
    exact = generate(Counted(2.0), x0, 5, "euler")
    assert torch.allclose(out.x, exact.x)
    itself = generate(model, x0, 5, "euler", guidance=Guidance("auto", 3.0, guide=model))
    assert torch.allclose(itself.x, generate(model, x0, 5, "euler").x)  # its own guide: no guidance


def test_cfg_zero_zero_init_starts_the_grid_at_its_kth_time_and_spends_no_evaluation_there():
    model, x0 = Counted(1.0), torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    model.label_embed = type("Null", (), {"num_classes": 1})()
    g = Guidance("cfg_zero", 1.5, zero_steps=3)
    out = generate(model, x0, 8, "heun", y=y, guidance=g)
    grid = time_grid("linear", 8)[3:]
    skipped = integrate(guided(model, y, guidance=g), x0, grid, "heun")
    assert out.nfe == skipped.nfe == 2 * 5 and torch.equal(out.x, skipped.x)


# As a user runs it.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A labelled 2-D dataset, a class-conditional run (checkpoints 15 and 30), and a smaller run on the same data."""
    root = tmp_path_factory.mktemp("guidance")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (512,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])
    save_file({"x": centers[y] + 0.3 * torch.randn(512, 2, generator=g), "y": y}, str(root / "labelled.safetensors"))
    common = [*TINY, "data.name=tensor_file", f"data.path={root / 'labelled.safetensors'}", "model.class_cond=true",
              "flow.label_dropout=0.2", "train.checkpoint_every=15", "train.steps=30"]
    for name, extra in (("main", []), ("small", ["model.width=8"])):
        out = run_script("train.py", "-e", str(root / name), *common, *extra)
        assert out.returncode == 0, out.stderr
    return root


def sample(runs, out, *args):
    return run_script("sample.py", "--weights", str(runs / "main/checkpoints/step_0000030"), "--save-dir", str(out),
                      "--n-samples", "16", "--steps", "4", "--cfg-scale", "2", *args)


@pytest.mark.parametrize("rule, args, nfe, passes", [
    ("cfg", [], 4, 8),
    ("apg", ["--apg-r", "1", "--apg-momentum", "-0.5"], 4, 8),
    ("cfg_zero", ["--zero-steps", "1"], 3, 6),
    ("auto", ["--guide-weights", "main/checkpoints/step_0000015"], 4, 8),
    ("auto", ["--guide-weights", "small/checkpoints/step_0000030"], 4, 8),
])
def test_every_rule_samples_with_exact_nfe_and_forward_passes(runs, tmp_path, rule, args, nfe, passes):
    args = [str(runs / a) if a.startswith(("main/", "small/")) else a for a in args]
    out = sample(runs, tmp_path / "s", "--guidance", rule, *args)
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["nfe"] == nfe and info["forward_passes"] == passes
    assert (rule == "cfg") == ("guidance" not in info)
    if "small/" in " ".join(args):  # the smaller guide's passes cost less, and the report says how much
        cost = info["guide_cost"]
        assert 0 < cost < 0.5 and info["main_pass_equivalents"] == pytest.approx(4 + 4 * cost)


def test_autoguidance_guides_an_unconditional_model(tmp_path):
    common = [*TINY, "train.checkpoint_every=10", "train.steps=20"]
    assert run_script("train.py", "-e", str(tmp_path / "run"), *common).returncode == 0
    weights = tmp_path / "run/checkpoints"
    out = run_script("sample.py", "--weights", str(weights / "step_0000020"), "--save-dir", str(tmp_path / "s"),
                     "--n-samples", "8", "--steps", "3", "--cfg-scale", "2", "--guidance", "auto", "--guide-weights",
                     str(weights / "step_0000010"))
    assert out.returncode == 0, out.stderr
    plain = run_script("sample.py", "--weights", str(weights / "step_0000020"), "--save-dir", str(tmp_path / "p"),
                       "--n-samples", "8", "--steps", "3", "--cfg-scale", "2")
    assert plain.returncode == 2 and "the model is unconditional" in plain.stderr  # CFG cannot; autoguidance can
    apg = run_script("sample.py", "--weights", str(weights / "step_0000020"), "--save-dir", str(tmp_path / "a"),
                     "--n-samples", "8", "--steps", "3", "--cfg-scale", "2", "--guidance", "apg")
    assert apg.returncode == 2 and apg.stderr.strip() == (  # APG and CFG-Zero* rework CFG's update: they cannot
        "error: --cfg-scale 2.0 with --guidance apg needs the unconditional velocity of a class-conditional model, "
        "but the model is unconditional (trained without model.class_cond); leave --cfg-scale 1, or guide it with a "
        "weaker model of itself: --guidance auto --guide-weights CKPT"), apg.stderr


@pytest.mark.parametrize("args, message", [
    (["--guidance", "auto"], "error: --guidance auto guides with a weaker model of the same task: give its "
                             "checkpoint with --guide-weights"),
    (["--guidance", "cfg_zero", "--zero-steps", "4"], "error: --zero-steps 4 would skip all 4 steps of euler:4"),
    (["--guidance", "cfg", "--apg-eta", "0.5"],
     "error: --apg-eta, --apg-r and --apg-momentum belong to --guidance apg"),
    (["--guidance", "auto", "--guide-weights", "nowhere"], "error: --guide-weights nowhere is no checkpoint"),
])
def test_bad_guidance_is_one_line(runs, tmp_path, args, message):
    out = sample(runs, tmp_path / "s", *args)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr


def test_zero_init_with_an_adaptive_solver_is_one_line(runs, tmp_path):
    out = run_script("sample.py", "--weights", str(runs / "main/checkpoints/step_0000030"), "--save-dir",
                     str(tmp_path / "s"), "--n-samples", "4", "--cfg-scale", "2", "--solver", "dopri5", "--guidance",
                     "cfg_zero", "--zero-steps", "1")
    assert out.returncode == 2 and out.stderr.startswith(
        "error: --zero-steps skips the first steps of a fixed grid; dopri5 chooses its own steps"), out.stderr


def test_a_guide_of_other_data_is_refused(runs, tmp_path):
    other = tmp_path / "other"
    assert run_script("train.py", "-e", str(other), *TINY, "train.steps=2").returncode == 0  # unconditional moons
    out = sample(runs, tmp_path / "s", "--guidance", "auto", "--guide-weights", str(other / "checkpoints/step_0000002"))
    assert out.returncode == 2 and out.stderr.startswith(
        f"error: --guide-weights {other / 'checkpoints/step_0000002/ema.safetensors'} was trained with num_classes 0, "
        "the model with 4; guide with a run on the same data and inputs"), out.stderr


def test_evaluate_rows_name_their_guidance_and_count_the_guides_passes(runs, tmp_path):
    out = run_script("evaluate.py", "-e", str(runs / "main"), "--checkpoints", "last", "--samplers",
                     "euler:4,euler:4@auto,euler:4@cfg_zero", "--cfg-scale", "2", "--n-samples", "64",
                     "--guide-weights", str(runs / "small/checkpoints/step_0000030"), "--zero-steps", "1", "--out",
                     str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = {r["guidance"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert set(rows) == {None, f"auto:{runs / 'small/checkpoints/step_0000030'}", "cfg_zero:zero_steps=1"}
    auto = rows[f"auto:{runs / 'small/checkpoints/step_0000030'}"]
    assert auto["nfe"] == 4 and auto["forward_passes"] == 8 and 0 < auto["guide_cost"] < 0.5
    assert rows["cfg_zero:zero_steps=1"]["nfe"] == 3 and rows[None]["guide_cost"] is None
    assert "auto:" in (tmp_path / "report.md").read_text()


def test_a_guide_spelled_another_way_is_the_same_row(tmp_path, monkeypatch):
    """Reports find a row again by its guidance key: `--guide-weights run/checkpoints/step_10` from the repository
    and the same folder by its absolute path (or through `..`) must give one key, not two rows scored twice."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints" / "step_10").mkdir(parents=True)
    keys = {guidance_key(load_config(None, ["sample.guidance=auto", f"sample.guide_weights={spelling}"]),
                         Sampler("euler", 4, "linear", None))
            for spelling in ("run/checkpoints/step_10", tmp_path / "run/checkpoints/step_10",
                             "run/../run/checkpoints/step_10")}
    assert keys == {f"auto:{(tmp_path / 'run/checkpoints/step_10').resolve()}"}
