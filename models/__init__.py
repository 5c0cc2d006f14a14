"""Velocity-field models: the MODELS registry and build_model.

Every model has one signature: `model(x, t, y=None) -> velocity` of x's shape, t (N,) in [0, 1],
y (N,) class labels (the null class is `num_classes`) or None. Image-conditioned models (data.task) also take
`image_cond=` (N, C_c, H, W), the task's spatial condition at x's resolution. MeanFlow models (flow.objective=meanflow)
take a second time, `model(x, t, y, s=s)`: the average velocity over [t, s].
"""

from __future__ import annotations

from torch import nn

from config import Config
from errors import UserError, check_name
from models import autoencoder, dit, mlp, unet

# name -> (model class, preset arguments)
MODELS = {
    "mlp": (mlp.MLP, dict(width=256, depth=3)),
    **{name: (unet.UNet, kwargs) for name, kwargs in unet.PRESETS.items()},
    **{name: (dit.DiT, kwargs) for name, kwargs in dit.PRESETS.items()},
}

# Autoencoders for latent flow matching (trained with flow.objective=autoencoder): name -> preset arguments.
AUTOENCODERS = autoencoder.PRESETS

# Config keys that change a preset -> the argument they set, per model class.
_OVERRIDES = {
    autoencoder.AutoencoderKL: dict(width="channels", depth="num_res_blocks", latent_channels="latent_channels"),
    mlp.MLP: dict(width="width", depth="depth", time_dim="time_dim", activation="activation", time_input="time_input"),
    unet.UNet: dict(width="channels", depth="num_res_blocks", dropout="dropout"),
    dit.DiT: dict(width="width", depth="depth", heads="heads", patch="patch"),
}


def check_config(cfg: Config) -> None:
    """model.name in the registry of what the objective trains: a flow's velocity field or an autoencoder."""
    check_name(AUTOENCODERS if cfg.flow.objective == "autoencoder" else MODELS, cfg.model.name, "model.name")
    if cfg.model.activation is not None:
        check_name(mlp.ACTIVATIONS, cfg.model.activation, "model.activation")
    if cfg.model.time_input is not None:
        check_name(mlp.TIME_INPUTS, cfg.model.time_input, "model.time_input")
        if cfg.model.time_input == "raw" and cfg.flow.objective in ("meanflow", "alphaflow", "shortcut"):
            raise UserError(f"model.time_input=raw gives the MLP no second time input, which flow.objective="
                            f"{cfg.flow.objective} needs; use model.time_input=sines")
        if cfg.model.time_input == "raw" and cfg.model.time_scale != 1000.0:
            raise UserError("model.time_scale scales the sines of t, which model.time_input=raw does not use; "
                            "remove model.time_scale")


def model_arguments(cfg: Config) -> tuple[type[nn.Module], dict]:
    """The class of cfg.model.name and its arguments: the preset, changed by the model.* keys that are set."""
    if cfg.model.name in AUTOENCODERS:
        cls, kwargs = autoencoder.AutoencoderKL, dict(AUTOENCODERS[cfg.model.name])
    else:
        cls, kwargs = MODELS[cfg.model.name]
        kwargs = dict(kwargs)
    for key, argument in _OVERRIDES[cls].items():
        value = getattr(cfg.model, key)
        if value is not None:
            kwargs[argument] = value
    ignored = [key for key in ("width", "depth", "heads", "dropout", "latent_channels", "patch", "activation",
                               "time_input")
               if getattr(cfg.model, key) is not None and key not in _OVERRIDES[cls]]
    if ignored:
        raise UserError(f"config key model.{ignored[0]} does not apply to model.name '{cfg.model.name}'; remove it")
    return cls, kwargs


def build_model(cfg: Config, data_shape: tuple[int, ...], num_classes: int = 0, feature_dim: int = 0,
                cond_channels: int = 0, cond_classes: int = 0) -> nn.Module:
    """The model named by cfg.model.name, sized from the data (shape without batch, number of classes); with
    feature_dim, a Latent-CFM model conditioned on encoder features of that size (cfg.latentcfm); with
    cond_channels, an image-conditioned model (data.task) taking that many condition channels beside x (a semantic
    map's cond_classes one-hot channels projected to them)."""
    cls, kwargs = model_arguments(cfg)
    if cond_channels:
        if cls is mlp.MLP:
            raise UserError(f"data.task={cfg.data.task} conditions image models (UNet, DiT), not the MLP")
        kwargs.update(cond_channels=cond_channels, cond_classes=cond_classes)
    if cfg.flow.objective in ("meanflow", "alphaflow", "shortcut"):  # the average velocity over [t, s]: a second
        #                                                              time input (shortcut models: the step size)
        kwargs.update(mean_flow=True)
    if cfg.flow.meanflow_cfg_range:  # guidance (ω, a, b) as an input (improved MeanFlow)
        kwargs.update(guidance_input=True)
    if cfg.model.time_scale != 1000.0:
        kwargs.update(time_scale=cfg.model.time_scale)
    if feature_dim:
        if cls is mlp.MLP:
            raise UserError("Latent-CFM (latentcfm.encoder) conditions image models (UNet, DiT), not the MLP")
        kwargs.update(feature_dim=feature_dim, cond_dim=cfg.latentcfm.dim)
    if cls is mlp.MLP:
        if len(data_shape) != 1:
            raise UserError(f"model.name '{cfg.model.name}' takes vectors (N, D) but the data have shape "
                            f"{data_shape}; choose an image model such as unet-cifar10 or DiT-S/2")
        return mlp.MLP(data_shape[0], num_classes=num_classes, **kwargs)
    if len(data_shape) != 3:
        raise UserError(f"model.name '{cfg.model.name}' takes images (N, C, H, W) but the data have shape "
                        f"{data_shape}; choose model.name=mlp")
    channels, height, width = data_shape
    try:
        if cls is unet.UNet:
            return unet.UNet(channels, min(height, width), num_classes=num_classes, **kwargs)
        return dit.DiT(channels, (height, width), num_classes=num_classes, **kwargs)
    except ValueError as e:  # sizes that do not fit the architecture, e.g. a side not divisible by the patch
        raise UserError(f"model.name '{cfg.model.name}' does not fit data of shape {data_shape}: {e}") from None


def build_autoencoder(cfg: Config, data_shape: tuple[int, ...]) -> autoencoder.AutoencoderKL:
    """The autoencoder named by cfg.model.name (a key of AUTOENCODERS) for images of `data_shape`."""
    if len(data_shape) != 3:
        raise UserError(f"an autoencoder takes images (N, C, H, W) but the data have shape {data_shape}")
    cls, kwargs = model_arguments(cfg)
    model = cls(data_shape[0], **kwargs)
    if data_shape[1] % model.factor or data_shape[2] % model.factor:
        raise UserError(f"model.name '{cfg.model.name}' downsamples by {model.factor} but the images are "
                        f"{data_shape[1]}x{data_shape[2]}; choose a resolution divisible by {model.factor}")
    return model
