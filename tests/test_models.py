import pytest
import torch
from torch import nn

from config import Config, UserError
from models import MODELS, build_model
from models.checkpoint import load_weights, save_weights, unwrapped_state
from models.ema import EMA


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_classes", [0, 3])
def test_every_model_maps_x_t_y_to_a_velocity_of_x_shape(name, num_classes):
    cfg = Config()
    cfg.model.name, cfg.model.width = name, 16
    model = build_model(cfg, (2,), num_classes)
    x, t = torch.randn(5, 2), torch.rand(5)
    y = torch.tensor([0, 1, 2, 3, 0]) if num_classes else None  # 3 is the null class
    assert torch.equal(model(x, t, y), torch.zeros(5, 2))  # the output layer starts at zero
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    v = model(x, t, y)
    assert v.shape == x.shape
    v.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if num_classes:
        assert not torch.allclose(model(x, t, torch.zeros(5, dtype=torch.long)), model(x, t, None))
        assert torch.equal(model(x, t, None), model(x, t, torch.full((5,), num_classes)))  # None = null class


def test_mlp_rejects_image_shaped_data():
    with pytest.raises(UserError, match="takes vectors"):
        build_model(Config(), (1, 28, 28))


def test_ema_is_a_frozen_copy_moving_towards_the_model():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())
    warm = EMA(model, decay=0.999)
    assert [warm.decay_at(n) for n in (1, 80, 10_000)] == [2 / 11, 81 / 90, 0.999]


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


def test_pruning_keeps_the_last_k_and_every_mth_checkpoint(tmp_path):
    from models.checkpoint import checkpoint_name, list_checkpoints, prune_checkpoints

    for step in range(100, 1100, 100):
        (tmp_path / "checkpoints" / checkpoint_name(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp_step_0001100").mkdir()  # a partial write is never listed
    prune_checkpoints(tmp_path, keep_last=3, keep_every=500)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [500, 800, 900, 1000]
