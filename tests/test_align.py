"""Representation alignment (flow.align): REPA, dispersive and SRA beside the flow loss."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script
from safetensors.torch import load_file, save_file
from test_images import make_folder
from test_train import KILL_AFTER_CHECKPOINT, assert_same_weights

from config import load_config
from flows.align import ALIGNERS, Alignment, build_alignment, cosine_loss, dispersive_loss, spatially_normalized
from models import build_model
from models.align import ConvProjector, SepConvProjector

# A small image run: 8×8 images, a narrow UNet, an encoder-free regulariser unless told otherwise.
IMAGES = ["data.name=imagefolder", "model.name=unet-mnist", "model.width=8", "train.batch_size=4",
          "train.trackers=[]", "train.preview_images=4", "train.preview_steps=2", "train.log_every=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    make_folder(root / "data", {"": [(8, 8)] * 8})
    return root


def timm_encoder_file(folder, name="test_vit"):
    """A small timm ViT (timm's test model) with random weights in a safetensors file: the encoder mechanism without
    a download."""
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_the_cosine_loss_is_one_minus_the_mean_cosine_per_sample():
    projected, target = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    by_hand = torch.stack([1 - sum(torch.dot(projected[n, :, i, j], target[n, :, i, j])
                                   / projected[n, :, i, j].norm() / target[n, :, i, j].norm()
                                   for i in range(2) for j in range(2)) / 4 for n in range(2)])
    assert torch.allclose(cosine_loss(projected, target), by_hand, atol=1e-6)
    # A target on another grid is resized to the projection's.
    assert cosine_loss(projected, torch.ones(2, 3, 4, 4)).shape == (2,)


def test_a_projector_that_maps_onto_the_features_gives_zero_loss():
    hidden = torch.randn(2, 4, 3, 3)
    conv = ConvProjector(4, 4)
    with torch.no_grad():  # the identity as a 3×3 convolution
        conv.conv.weight.zero_()
        conv.conv.weight[:, :, 1, 1] = torch.eye(4)
        conv.conv.bias.zero_()
    loss = cosine_loss(conv(hidden), hidden)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)  # REPA's −1, offset by 1
    separable = SepConvProjector(4, 4)
    with torch.no_grad():  # the identity as a depthwise 3×3 then a 1×1 convolution
        separable.depthwise.weight.zero_()
        separable.depthwise.weight[:, 0, 1, 1] = 1
        separable.pointwise.weight.copy_(torch.eye(4)[:, :, None, None])
        separable.depthwise.bias.zero_()
        separable.pointwise.bias.zero_()
    assert torch.allclose(cosine_loss(separable(hidden), hidden), torch.zeros(2), atol=1e-6)
    assert torch.allclose(cosine_loss(-hidden, hidden), torch.full((2,), 2.0), atol=1e-6)
    normalized = spatially_normalized(hidden)
    assert torch.allclose(normalized.mean((2, 3)), torch.zeros(2, 4), atol=1e-6)


def test_the_dispersive_loss_of_identical_rows_is_above_that_of_spread_rows():
    same = torch.ones(8, 4, 2, 2)
    spread = torch.randn(8, 4, 2, 2) * 3
    assert dispersive_loss(same, 0.5)[0] == pytest.approx(0.0, abs=1e-6)  # log E exp(0)
    assert dispersive_loss(spread, 0.5)[0] < dispersive_loss(same, 0.5)[0]
    assert dispersive_loss(spread, 0.5).shape == (8,)
    assert dispersive_loss(spread * 100, 0.5)[0] == pytest.approx(-torch.log(torch.tensor(8.0)).item(), abs=1e-4)


def test_the_flattened_dispersive_loss_sees_where_the_tokens_are_not_only_their_mean():
    # Two samples whose tokens are the same values in other places: pooled they are one point, flattened two.
    tokens = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    moved = torch.cat([tokens, tokens.flip(-1)])
    assert dispersive_loss(moved, 0.5, "mean")[0] == pytest.approx(0.0, abs=1e-6)
    assert dispersive_loss(moved, 0.5, "flatten")[0] < -0.01
    # by hand: log of the mean of exp(−d/(D·τ)) over the 2×2 pairs, d the squared distance of the flat vectors
    d = (moved[0] - moved[1]).square().sum() / 16
    expected = torch.log((2 + 2 * torch.exp(-d / 0.5)) / 4)
    assert dispersive_loss(moved, 0.5, "flatten")[0] == pytest.approx(expected.item(), abs=1e-5)


def test_the_cosine_dispersive_loss_cannot_be_lowered_by_scaling_the_tokens_up():
    spread = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert dispersive_loss(spread * 100, 0.5)[0] < dispersive_loss(spread, 0.5)[0] - 1  # l2: inflating pays
    cosine = dispersive_loss(spread, 0.5, distance="cosine")[0]
    assert dispersive_loss(spread * 100, 0.5, distance="cosine")[0] == pytest.approx(cosine.item(), abs=1e-5)
    assert dispersive_loss(torch.ones(8, 4, 2, 2), 0.5, distance="cosine")[0] == pytest.approx(2.0, abs=1e-5)  # 1/τ
    z = F.normalize(spread.mean((2, 3)), dim=1)
    assert cosine == pytest.approx(torch.log(torch.exp(z @ z.T / 0.5).mean()).item(), abs=1e-5)  # by hand


def test_every_regulariser_trains_saves_no_head_for_sampling_and_logs_both_losses(tmp_path, images, tiny):
    weights = timm_encoder_file(tmp_path)
    settings = {"repa": ["align.encoder=test_vit", f"align.weights={weights}", "align.resolution=64",
                         f"align.cache_dir={tmp_path / 'cache'}", "align.projector=conv"],
                "dispersive": [], "sra": ["align.depth=2", "align.projector=sepconv"]}
    for method in ALIGNERS:
        run = tmp_path / method
        out = run_script("train.py", "-e", str(run), *IMAGES, f"data.path={images / 'data'}", f"flow.align={method}",
                         *settings[method], "train.steps=4", "train.checkpoint_every=4")
        assert out.returncode == 0, out.stderr
        assert f"align: {method}" in out.stdout
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all("align_loss" in r and "flow_loss" in r for r in rows if "loss" in r)
        checkpoint = run / "checkpoints" / "step_0000004"
        for name in ("model", "ema"):
            assert not any(k.startswith("align_head") for k in load_file(str(checkpoint / f"{name}.safetensors")))
        sample = run_script("sample.py", "--weights", str(checkpoint), "--n-samples", "4", "--steps", "2",
                            "--save-dir", str(tmp_path / f"samples_{method}"))
        assert sample.returncode == 0, sample.stderr
        raw = run_script("sample.py", "--weights", str(checkpoint), "--raw", "--n-samples", "4", "--steps", "2",
                         "--save-dir", str(tmp_path / f"raw_{method}"))
        assert raw.returncode == 0, raw.stderr
    assert "feature cache" in (tmp_path / "repa" / "log.txt").read_text()


def test_the_encoder_stays_frozen_and_the_head_learns(tmp_path, images):
    """One objective step with a live timm encoder: no gradient reaches the encoder, the head gets one."""
    from data import build_dataset
    from flows import build_objective
    from flows.align import build_encoder

    weights = timm_encoder_file(tmp_path)
    cfg = load_config(None, [*IMAGES, f"data.path={images / 'data'}", "flow.align=repa",
                             "align.encoder=test_vit", f"align.weights={weights}", "align.resolution=64"])
    dataset = build_dataset(cfg)
    encoder = build_encoder(cfg, dataset.shape)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = build_model(cfg, dataset.shape)
    alignment = build_alignment(cfg, model, encoder)
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, *dataset.shape, generator=g))
    objective.alignment = alignment
    x1, _ = dataset[torch.arange(4)]
    draw = objective.draw(x1, None, torch.Generator().manual_seed(0))
    draw.aligning, draw.align_target = True, encoder(x1)
    out = objective.loss(model, x1, draw)
    optimizer = torch.optim.SGD([*model.parameters(), *encoder.parameters()], lr=0.1)
    out.total().mean().backward()
    optimizer.step()
    assert out.align is not None and out.align.shape == (4,)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.align_head.parameters())
    assert encoder(x1).shape == (4, 64, 4, 4)  # 64 px / patch 16: a 4×4 grid of 64 features


def test_resume_is_bitwise_with_a_cached_and_a_live_encoder_and_two_processes_train_as_one(tmp_path, images):
    weights = timm_encoder_file(tmp_path)
    repa = [*IMAGES, f"data.path={images / 'data'}", "flow.align=repa", "align.encoder=test_vit",
            f"align.weights={weights}", "align.resolution=64", f"align.cache_dir={tmp_path / 'cache'}",
            "train.steps=20", "train.checkpoint_every=10", "align.stop_step=15"]
    for cache in ("true", "false"):
        common = [*repa, f"align.cache={cache}"]
        once = run_script("train.py", "-e", str(tmp_path / f"once_{cache}"), *common)
        assert once.returncode == 0, once.stderr
        half = run_script("-c", KILL_AFTER_CHECKPOINT, "-e", str(tmp_path / f"twice_{cache}"), *common)
        assert half.returncode == -9
        again = run_script("train.py", "-e", str(tmp_path / f"twice_{cache}"), *common)
        assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
        assert_same_weights(tmp_path / f"once_{cache}", tmp_path / f"twice_{cache}", 20)
        rows = [json.loads(line) for line in (tmp_path / f"once_{cache}" / "metrics.jsonl").read_text().splitlines()]
        assert "align_loss" in rows[0] and "align_loss" not in rows[-1]  # HASTE: no alignment after step 15
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = run_script("train.py", "-e", str(tmp_path / "two"), *repa, launcher=launcher)
    assert two.returncode == 0 and "2 process(es)" in two.stdout, two.stderr
    # Without alignment this UNet's 1- and 2-process runs already differ by up to 1.1e-3 after 20 steps (Adam turns
    # the rounding of a reduction in another order into full-size steps of parameters whose gradient is near 0);
    # alignment over each process's batch instead of the global one (the dispersive loss) moves them by 3.5e-2.
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "once_true" / "checkpoints" / "step_0000020" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / "checkpoints" / "step_0000020" / f"{name}.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-3, name


@pytest.mark.parametrize("overrides, message", [
    (["align.encoder=vit_base_patch14_dinov", "align.weights=x.safetensors"], "did you mean vit_base_patch14_dinov2"),
    (["align.encoder=test_vit", "align.weights=missing.safetensors"], "does not exist"),
    (["align.encoder=test_vit"], "needs its pretrained weights"),
    (["align.depth=99"], "is beyond the"),
])
def test_bad_encoder_and_depth_settings_are_one_line(tmp_path, images, overrides, message):
    out = run_script("train.py", "-e", str(tmp_path / "run"), *IMAGES, f"data.path={images / 'data'}",
                     "flow.align=repa", "train.steps=1", *overrides)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_weights_of_another_architecture_are_refused(tmp_path, images):
    other = timm_encoder_file(tmp_path, "test_vit2")
    out = run_script("train.py", "-e", str(tmp_path / "run"), *IMAGES, f"data.path={images / 'data'}",
                     "flow.align=repa", "align.encoder=test_vit", f"align.weights={other}",
                     "align.resolution=64", "train.steps=1")
    assert out.returncode == 2 and "are not weights of test_vit" in out.stderr, out.stderr


@pytest.mark.parametrize("overrides, message", [
    (["flow.align=repa"], "the MLP has none"),
    (["flow.align=sra", "flow.objective=autoencoder", "model.name=ae-mnist"], "trains none"),
    (["align.weight=0.3"], "flow.align, which is not set"),
    (["flow.align=dispersive", "model.name=unet-mnist", "align.layer=mixed_3"], "does not use"),
    (["flow.align=repa", "model.name=unet-mnist", "align.pool=flatten"], "belongs to flow.align=dispersive"),
    (["flow.align=dispersive", "model.name=unet-mnist", "align.pool=max"], "unknown name 'max'"),
    (["flow.align=sra", "model.name=unet-mnist", "align.distance=cosine"], "belongs to flow.align=dispersive"),
])
def test_alignment_where_it_cannot_apply_is_one_line(tmp_path, overrides, message):
    out = run_script("train.py", "-e", str(tmp_path / "run"), "train.steps=1", *overrides)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_timm_encoders_intermediate_is_its_token_grid(tmp_path):
    """align.layer=K reads timm's K-th intermediate (a CNN's stage) in place of the last features, and keys the cache
    by it; a layer beyond the model's, or an Inception layer's name, is one line."""
    from errors import UserError
    from flows.align import build_encoder
    from models.encoders import TimmEncoder

    weights = timm_encoder_file(tmp_path, "test_resnet")
    last = TimmEncoder("test_resnet", str(weights), resolution=56)
    third = TimmEncoder("test_resnet", str(weights), resolution=56, layer=2)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert last(x).shape == (2, 96, 2, 2) and last.dim == 96
    assert third(x).shape == (2, 48, 7, 7) and third.dim == 48 and third.key != last.key
    stages = third.net.forward_intermediates(((F.interpolate(x.expand(-1, 3, -1, -1), size=(56, 56), mode="bicubic")
                                               + 1) / 2 - third.mean) / third.std, intermediates_only=True)
    assert torch.equal(third(x), stages[2])
    with pytest.raises(UserError, match="beyond the 5 intermediates of test_resnet"):
        TimmEncoder("test_resnet", str(weights), resolution=56, layer=5)
    cfg = load_config(None, ["flow.align=repa", "align.encoder=test_resnet", f"align.weights={weights}",
                             "align.layer=mixed_2"])
    with pytest.raises(UserError, match="names an Inception layer"):
        build_encoder(cfg, (1, 28, 28))


def test_a_feature_cache_made_by_another_encoder_is_refused(tmp_path, images):
    from data import build_dataset
    from errors import UserError
    from flows.align import cached_features, feature_cache_key
    from models.encoders import TimmEncoder

    weights = timm_encoder_file(tmp_path)
    cfg = load_config(None, [*IMAGES, f"data.path={images / 'data'}", f"align.cache_dir={tmp_path / 'cache'}"])
    dataset = build_dataset(cfg)
    encoder = TimmEncoder("test_vit", str(weights), resolution=64)
    features, computed, folder = cached_features(cfg, dataset, encoder, (4, 4))
    assert computed and features["mean"].shape == (8, 64, 4, 4)
    again, computed, _ = cached_features(cfg, dataset, encoder, (4, 4))
    assert not computed and torch.equal(again["mean"], features["mean"])
    assert folder.name == feature_cache_key(cfg, dataset, encoder, (4, 4))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "encoder": "inception:mixed_2:299"}))
    with pytest.raises(UserError, match="made by another encoder"):
        cached_features(cfg, dataset, encoder, (4, 4))


def test_sra_aligns_with_the_ema_model_at_less_noise():
    """The teacher sees x at t + gap: with an online model equal to the teacher and an identity head, the loss of
    a zero gap is zero."""
    cfg = load_config(None, ["model.name=unet-mnist", "model.width=8", "flow.align=sra", "align.depth=6",
                             "align.target_depth=6"])
    with pytest.raises(Exception, match="must be a later block"):
        build_alignment(cfg, build_model(cfg, (1, 8, 8)))
    model = build_model(cfg, (1, 8, 8))
    teacher = build_model(cfg, (1, 8, 8))
    teacher.load_state_dict(model.state_dict())
    alignment = Alignment("sra", 0.5, depth=3, teacher=teacher, target_depth=3, time_gap=0.0)
    from flows import LinearPath

    x0, x1, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.rand(2)
    hidden = model(LinearPath().sample(x0, x1, t).x_t, t, hidden_at=3)[1]
    assert torch.allclose(alignment.loss(hidden, None, LinearPath(), x0, x1, t, None, {}), torch.zeros(2), atol=1e-5)
    alignment.time_gap = 0.5
    assert (alignment.loss(hidden, None, LinearPath(), x0, x1, t, None, {}) > 1e-4).all()


@pytest.mark.parametrize("projector, head, normalize", [("mlp", "MLPProjector", False), ("conv", "ConvProjector", True),
                                                        ("sepconv", "SepConvProjector", True)])
def test_each_projector_builds_its_head_and_the_conv_heads_normalize_the_encoders_tokens(projector, head, normalize):
    cfg = load_config(None, ["model.name=unet-mnist", "model.width=8", "flow.align=repa",
                             f"align.projector={projector}"])
    model = build_model(cfg, (1, 8, 8))
    alignment = build_alignment(cfg, model, types.SimpleNamespace(dim=5))
    assert type(model.align_head).__name__ == head and alignment.normalize == normalize
    _, projected = model(torch.randn(2, 1, 8, 8), torch.rand(2), hidden_at=alignment.depth)
    assert projected.shape[:2] == (2, 5)  # the encoder's features, on the block's grid
