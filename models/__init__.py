"""Velocity-field models: the MODELS registry and build_model.

Every model has one signature: `model(x, t, y=None) -> velocity` of x's shape, t (N,) in [0, 1],
y (N,) class labels (the null class is `num_classes`) or None.
"""

from __future__ import annotations

from torch import nn

from config import Config, UserError
from models import mlp

MODELS = {**mlp.PRESETS}


def build_model(cfg: Config, data_shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
    """The model named by cfg.model.name, sized from the data (shape without batch, number of classes)."""
    m = cfg.model
    if m.name in mlp.PRESETS:
        if len(data_shape) != 1:
            raise UserError(f"model.name '{m.name}' takes vectors (N, D) but the data have shape {data_shape}; "
                            "choose an image model")
        return mlp.PRESETS[m.name](data_shape[0], m.width, m.depth, m.time_dim, num_classes)
    raise KeyError(m.name)
