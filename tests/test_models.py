import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from config import Config
from errors import UserError
from models import MODELS, build_model
from models.checkpoint import load_weights, read_metadata, save_weights, unwrapped_state
from models.ema import EMA


# Every registry entry at a tiny size: the keys that change a preset, per architecture.
def tiny_model(name: str, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    cfg = Config()
    cfg.model.name = name
    cfg.model.width, cfg.model.depth = {"mlp": (16, 2), "DiT": (32, 1)}.get(name.split("-")[0], (32, 1))
    if name.startswith("DiT"):
        cfg.model.heads = 2
    return build_model(cfg, data_shape, num_classes)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_classes", [0, 3])
def test_every_model_maps_x_t_y_to_a_velocity_of_x_shape(name, num_classes):
    shape = (2,) if name == "mlp" else (3, 16, 16)
    model = tiny_model(name, shape, num_classes)
    torch.manual_seed(0)
    x, t = torch.randn(4, *shape), torch.rand(4)
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None  # 3 is the null class
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # the output layer (DiT: adaLN-Zero) starts at zero
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    v = model(x, t, y)
    assert v.shape == x.shape
    v.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()  # no dropout from here on
    if num_classes:
        assert not torch.allclose(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, None))
        assert torch.equal(model(x, t, None), model(x, t, torch.full((4,), num_classes)))  # None = null class
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))  # the velocity depends on t


@pytest.mark.parametrize(("name", "shape", "num_classes", "expected"), [
    ("unet-cifar10", (3, 32, 32), 0, 35_746_307),  # torchcfm's CIFAR-10 network, exactly
    # The DiT paper's Table 1 at 32×32×4 latents, 1000 classes (33.0M, 130.5M, 458.0M, 675.1M) counts
    # its learned variance and position table; our velocity has the input's channels and fixed positions.
    ("DiT-S/2", (4, 32, 32), 1000, 32_858_896),
    ("DiT-B/2", (4, 32, 32), 1000, 130_303_504),
    ("DiT-L/2", (4, 32, 32), 1000, 457_824_272),
    ("DiT-XL/2", (4, 32, 32), 1000, 674_816_272),
])
def test_preset_parameter_counts_without_allocating(name, shape, num_classes, expected):
    cfg = Config()
    cfg.model.name = name
    with torch.device("meta"):
        model = build_model(cfg, shape, num_classes)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    paper = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.0e6, "DiT-XL/2": 675.1e6}.get(name, expected)
    assert abs(count - paper) / paper < 0.005


def test_dit_output_is_laid_out_like_its_input():
    """With patch embedding and output map made inverse, DiT returns its input: unpatchify is right."""
    model = tiny_model("DiT-S/2", (3, 8, 12), 0)
    x = torch.randn(2, 3, 8, 12)
    patches = x.reshape(2, 3, 4, 2, 6, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 24, 12)  # (N, T, p·p·C)
    assert torch.equal(model.unpatchify(patches), x)


def test_image_models_reject_what_does_not_fit():
    with pytest.raises(UserError, match="takes vectors"):
        build_model(Config(), (1, 28, 28))
    cfg = Config()
    cfg.model.name = "unet-mnist"
    with pytest.raises(UserError, match="takes images"):
        build_model(cfg, (2,))
    cfg.model.name = "DiT-S/8"
    with pytest.raises(UserError, match="divisible by 8"):
        build_model(cfg, (1, 28, 28))
    cfg.model.name, cfg.model.heads = "unet-mnist", 4
    with pytest.raises(UserError, match="model.heads does not apply"):
        build_model(cfg, (1, 28, 28))
    cfg.model.heads, cfg.model.activation = None, "selu"
    with pytest.raises(UserError, match="model.activation does not apply"):
        build_model(cfg, (1, 28, 28))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_the_mlp_with_raw_time_and_selu_is_torchcfms_network(num_classes):
    """model.time_input=raw model.activation=selu: the network sees cat([x, t]) (and the label's embedding) through
    Linear-SELU layers, nothing else, so a plain Sequential with its weights gives its output."""
    cfg = Config()
    cfg.model.width, cfg.model.depth, cfg.model.time_input, cfg.model.activation = 16, 3, "raw", "selu"
    model = build_model(cfg, (2,), num_classes)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])[:5] if num_classes else None
    layers = [m for m in model.body if isinstance(m, nn.Linear)]
    plain = nn.Sequential(*[m for layer in layers for m in (layer, nn.SELU())], model.out)
    inputs = [x, t[:, None]] + ([model.label_embed(y, 5)] if num_classes else [])
    assert layers[0].in_features == 3 + (cfg.model.time_dim if num_classes else 0)
    torch.testing.assert_close(model(x, t, y), plain(torch.cat(inputs, dim=-1)))
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))


def test_ema_is_a_frozen_copy_moving_towards_the_model():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())
    # the tensors are listed once: later in-place changes (optimizer steps, loaded weights) are followed
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.mul_(3.0)
    model.load_state_dict({"weight": model.weight + 1.0, "bias": model.bias})
    ema.update(model, 2)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    other = nn.Linear(3, 3)  # and another model is averaged in from its own tensors
    before = ema.model.weight.clone()
    ema.update(other, 3)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * other.weight)


def test_ema_warmup_forgets_the_initial_weights_as_its_closed_form_says():
    """Weights 0 at the start, then 1 after every step: the EMA holds 1 − w_N, w_N the weight left on the start.
    Fixed decay d: w_N = d^N. Warmup d_n = min(d, (1 + n)/(10 + n)): while (1 + n)/(10 + n) < d the product
    telescopes, w_N = Π (n + 1)/(n + 10) = (N + 1)! · 10! / (N + 10)!."""
    model = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    fixed, warm = EMA(model, decay=0.999, warmup=False), EMA(model, decay=0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for n in range(1, 201):
        fixed.update(model, n)
        warm.update(model, n)
        if n in (1, 10, 200):
            left = math.exp(math.lgamma(n + 2) + math.lgamma(11) - math.lgamma(n + 11))
            assert 1 - warm.model.weight.item() == pytest.approx(left, rel=1e-6, abs=1e-15)
            assert 1 - fixed.model.weight.item() == pytest.approx(0.999**n, rel=1e-9)
    # After 200 steps the warmup kept 5e-15 of the random start where the fixed decay keeps 82%; from
    # n = (10d − 1)/(1 − d) = 8,990 on, (1 + n)/(10 + n) ≥ d and the fixed decay takes over.
    assert warm.decay_at(8_989) < 0.999 and warm.decay_at(8_990) == 0.999


def test_weights_round_trip_with_unwrapped_keys(tmp_path):
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2))
    wrapped = nn.Module()
    wrapped.module = model  # how DDP names its child
    assert all(not k.startswith("module.") for k in unwrapped_state(wrapped))
    save_weights(wrapped, tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2))
    load_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2)), tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:50])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_weights(other, tmp_path / "cut.safetensors")


def test_the_same_weights_and_metadata_give_the_same_bytes_in_every_process(tmp_path):
    # safetensors orders the metadata by a hash map seeded per process: without sorting, 8 keys come out in the
    # same order in two processes about once in 40,320.
    script = (
        "import sys, torch\n"
        "from models.checkpoint import save_weights\n"
        "torch.manual_seed(0)\n"
        "meta = {k: f'é{k}\\n' for k in 'abcdefgh'}\n"
        "save_weights({'w': torch.randn(3, 5), 'b': torch.randn(5)}, sys.argv[1], meta)\n")
    root = Path(__file__).resolve().parents[1]
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.safetensors")], cwd=root, check=True)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert read_metadata(tmp_path / "one.safetensors") == {k: f"é{k}\n" for k in "abcdefgh"}
    torch.manual_seed(0)
    w, b = torch.randn(3, 5), torch.randn(5)
    loaded = load_file(str(tmp_path / "one.safetensors"))
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["b"], b)


def test_pruning_keeps_the_last_k_and_every_mth_checkpoint(tmp_path):
    from models.checkpoint import checkpoint_name, list_checkpoints, prune_checkpoints

    for step in range(100, 1100, 100):
        (tmp_path / "checkpoints" / checkpoint_name(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp_step_0001100").mkdir()  # a partial write is never listed
    prune_checkpoints(tmp_path, keep_last=3, keep_every=500)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [500, 800, 900, 1000]
