"""Latent-CFM: features of a frozen encoder, through a trainable stochastic layer, condition the velocity."""

import json
import math

import pytest
import torch
from conftest import run_script
from PIL import Image
from test_images import make_folder

from config import load_config
from data import build_dataset
from flows import build_objective
from flows.latent import build_feature_encoder
from flows.solvers import condition, generate
from models import build_model
from models.checkpoint import load_weights, read_metadata
from models.embeddings import FeatureCondition


def test_the_stochastic_layer_samples_c_and_its_kl():
    layer = FeatureCondition(feature_dim=5, cond_dim=3, dim=8)
    features, eps = torch.randn(4, 5), torch.randn(4, 3)
    c, kl = layer.sample(features, eps)
    mean, logvar = layer.posterior(features).chunk(2, dim=1)
    assert torch.allclose(c, mean + (0.5 * logvar).exp() * eps)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl, expected, atol=1e-6)
    emb, none = layer(c=torch.zeros(4, 3))
    assert emb.shape == (4, 8) and none is None
    with pytest.raises(ValueError, match="needs its condition"):
        layer()


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcfm")
    make_folder(root / "data", {"": [(8, 8)] * 8})
    out = run_script("train.py", "-e", str(root / "ae"), "data.name=imagefolder", f"data.path={root / 'data'}",
                     "train.trackers=[]", "train.batch_size=4", "flow.objective=autoencoder", "model.name=ae-mnist",
                     "model.width=8", "train.steps=2", "train.preview_images=4")
    assert out.returncode == 0, out.stderr
    return root


def test_the_loss_adds_beta_times_the_kl(autoencoder):
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={autoencoder / 'data'}", "model.name=unet-mnist",
                             "model.width=8", f"latentcfm.encoder={autoencoder / 'ae/checkpoints/step_0000002'}"])
    dataset = build_dataset(cfg)
    features = build_feature_encoder(cfg, dataset.shape)
    model = build_model(cfg, dataset.shape, 0, features.dim)
    x1, _ = dataset[torch.arange(4)]
    losses = []
    for beta in (0.0, 2.0):
        cfg.latentcfm.beta = beta
        objective = build_objective(cfg, lambda n, g, d: torch.randn(n, *dataset.shape, generator=g), 0, (), features)
        losses.append(objective(model, x1, None, torch.Generator().manual_seed(0)).loss)
    draw = objective.draw(x1, None, torch.Generator().manual_seed(0))
    _, kl = model.feature_cond.sample(draw.cond["features"], draw.cond["eps"])
    assert (kl > 0).all() and torch.allclose(losses[1] - losses[0], 2.0 * kl, atol=1e-5)


@pytest.mark.parametrize("net", [["model.name=unet-mnist", "model.width=8"],
                                 ["model.name=DiT-S/4", "model.width=16", "model.depth=1", "model.heads=2"]])
def test_prior_and_reference_conditioned_sampling(autoencoder, tmp_path, net):
    root = autoencoder
    encoder = f"latentcfm.encoder={root / 'ae/checkpoints/step_0000002'}"
    out = run_script("train.py", "-e", str(tmp_path / "flow"), "data.name=imagefolder", f"data.path={root / 'data'}",
                     "train.trackers=[]", "train.batch_size=4", encoder, *net, "train.steps=3", "train.lr=1e-2",
                     "train.preview_images=4", "train.preview_steps=2")
    assert out.returncode == 0, out.stderr
    weights = tmp_path / "flow" / "checkpoints" / "step_0000003"
    assert read_metadata(weights / "ema.safetensors")["condition_dim"] == "16"
    for name, color in (("black", 0), ("white", 255)):
        (tmp_path / f"ref_{name}").mkdir()
        Image.new("RGB", (8, 8), (color,) * 3).save(tmp_path / f"ref_{name}" / "0.png")
    runs = {}
    black = ["--condition-images", str(tmp_path / "ref_black")]
    for name, extra in (("prior", []), ("black", black), ("black_again", black)):
        out = run_script("sample.py", "--weights", str(weights), "--n-samples", "3", "--steps", "2",
                         "--save-dir", str(tmp_path / name), *extra)
        assert out.returncode == 0, out.stderr
        runs[name] = [p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))]
    assert len(runs["prior"]) == 3 and runs["black"] == runs["black_again"]
    info = json.loads((tmp_path / "black" / "info.json").read_text())
    assert info["condition"] == str(tmp_path / "ref_black")
    # The samples depend on the reference: the same noise, black vs white features, different velocities.
    cfg = load_config(weights / "config.yaml")
    encoder = build_feature_encoder(cfg, (3, 8, 8))
    model = build_model(cfg, (3, 8, 8), 0, encoder.dim)
    load_weights(model, weights / "ema.safetensors")
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = [generate(model, x0, 2, cond=condition(model, 0, [0, 1], encoder(torch.full((1, 3, 8, 8), value)))).x
            for value in (-1.0, 1.0)]
    assert not torch.allclose(outs[0], outs[1])
    out = run_script("evaluate.py", "-e", str(tmp_path / "flow"), "--samplers", "euler:2", "--n-samples", "6",
                     "--features", "pixels", "--stats-dir", str(tmp_path / "stats"), "--bpd", "--bpd-n", "2",
                     "--bpd-tol", "1e-3")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "flow" / "eval" / "report.json").read_text())["rows"]
    # --bpd of a Latent-CFM model used to call it without its condition and fail; now the upper bound with c from
    # q(c|x). An untrained model has no known value to compare with: the bound is computed and stated.
    assert math.isfinite(row["bpd"]) and "Latent-CFM: the upper bound E_q[−log p(x|c)] + KL" in row["protocol"]


def test_condition_images_need_a_latent_cfm_model(autoencoder, tmp_path):
    out = run_script("train.py", "-e", str(tmp_path / "plain"), "data.name=imagefolder",
                     f"data.path={autoencoder / 'data'}", "train.trackers=[]", "train.batch_size=4",
                     "model.name=unet-mnist", "model.width=8", "train.steps=1", "train.preview_images=4",
                     "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    out = run_script("sample.py", "--weights", str(tmp_path / "plain/checkpoints/step_0000001"), "--n-samples", "1",
                     "--save-dir", str(tmp_path / "s"), "--condition-images", str(autoencoder / "data"))
    assert out.returncode == 2 and out.stderr.strip() == ("error: --condition-images conditions Latent-CFM models "
                                                          "(trained with latentcfm.encoder); this model is not one")
