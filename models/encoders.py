"""Frozen pretrained encoders whose patch features are REPA's targets (flows/align.py).

Each takes images (N, C, H, W) in the data's range [−1, 1] (1 or 3 channels; gray is replicated) and returns
its features as a map (N, D, h, w): one D-vector per patch token on an h×w grid. Each runs in eval mode, with no
gradient, in the dtype of its weights (the training precision through autocast), and has a `key` that names
what it computes (the feature cache is keyed by it and by the bytes of its weights).

- `InceptionEncoder`: the FID Inception-v3 network (the 2015 TensorFlow graph as TorchScript, which clean-fid
  uses), read up to one of its mixed layers; on a machine without network `../shared/tools/inception-offline`
  puts it in place.
- `TimmEncoder`: any timm model (DINOv2 ViT-B/14 is REPA's choice), weights from a local file or, when allowed,
  timm's download; ViTs give their patch tokens, CNNs their last feature map, or with `layer` K the K-th of
  timm's intermediates (a ViT's blocks, a CNN's stages, counted from 0).
- `AutoencoderEncoder`: the encoder of an autoencoder of this toolkit: the means of q(z|x).
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError

INCEPTION_FILE = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid loads (and downloads) the FID network
# The FID network's layers in order, and the mixed layers a token grid can be read from (at 299 px: mixed..mixed_2
# are Inception's 35×35 blocks 5b-5d, mixed_3..mixed_7 the 17×17 blocks 6a-6e, mixed_8..mixed_10 the 8×8 ones).
INCEPTION_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", *(
    f"mixed_{k}" for k in range(1, 11)))


def _gray_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionEncoder(nn.Module):
    """The FID Inception-v3 up to `layer`, on images resized to `resolution` (299: the network's own)."""

    def __init__(self, layer: str = "mixed_2", resolution: int = 299, path: Path = INCEPTION_FILE):
        super().__init__()
        if layer not in INCEPTION_LAYERS:
            raise UserError(f"align.layer '{layer}' is not a layer of the Inception network; choose one of "
                            f"{', '.join(INCEPTION_LAYERS[7:])}")
        if not path.is_file():
            raise UserError(f"align.encoder=inception needs the FID Inception network at {path}; on a machine "
                            "without network put it there with ../shared/tools/inception-offline PYTHON (or run "
                            "evaluate.py once with network)")
        layers = torch.jit.load(str(path), map_location="cpu").layers
        self.layers = nn.ModuleList([getattr(layers, name) for name in INCEPTION_LAYERS[:INCEPTION_LAYERS.index(
            layer) + 1]])
        self.resolution, self.key = resolution, f"inception:{layer}:{resolution}"
        self.weights_file = path
        self.eval().requires_grad_(False)
        with torch.no_grad():
            self.dim = self(torch.zeros(1, 3, 8, 8)).shape[1]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        x = F.interpolate(_gray_to_rgb(x).to(dtype), size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        # The network reads pixel values p in [0, 255] as (p − 128) / 128; the data's x is p / 127.5 − 1.
        x = ((x + 1) * 127.5 - 128) / 128
        for layer in self.layers:
            x = layer(x)
        return x


def timm_input(x: torch.Tensor, resolution: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] (1 or 3 channels) as a timm model reads them: bicubic to `resolution`, its normalization."""
    x = F.interpolate(_gray_to_rgb(x), size=(resolution,) * 2, mode="bicubic", align_corners=False)
    return ((x + 1) / 2 - mean) / std


class TimmEncoder(nn.Module):
    """A timm model as an encoder: its pretrained config's normalization and input size (or `resolution`); its
    last features, or with `layer` the output of that intermediate (timm's forward_intermediates, from 0)."""

    def __init__(self, name: str, weights: str = "", download: bool = False, resolution: int = 0,
                 layer: int | None = None):
        super().__init__()
        import timm

        if not timm.is_model(name):
            near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
            raise UserError(f"align.encoder '{name}' is not a timm model" + (
                f"; did you mean {', '.join(near)}?" if near else " (timm.list_models() lists them)"))
        if not weights and not download:
            raise UserError(f"align.encoder {name} needs its pretrained weights: put them in a file (safetensors or "
                            "a timm checkpoint) and set align.weights=PATH, or allow the download with "
                            "align.download=true")
        kwargs = {"img_size": resolution} if resolution and _takes_img_size(name) else {}
        try:
            self.net = timm.create_model(name, pretrained=download and not weights, num_classes=0, **kwargs)
        except Exception as e:  # a failed download, an argument the model does not take
            raise UserError(f"align.encoder {name} could not be built ({type(e).__name__}: {e})") from None
        if weights:
            self._load(weights, name)
        config = self.net.pretrained_cfg
        self.resolution = resolution or config["input_size"][-1]
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.layer = layer
        if layer is not None:
            self._check_layer(name, layer)
        self.key = f"timm:{name}:{self.resolution}" + ("" if layer is None else f":{layer}")
        self.weights_file = Path(weights) if weights else None
        self.eval().requires_grad_(False)
        with torch.no_grad():
            self.dim = self(torch.zeros(1, 3, self.resolution, self.resolution)).shape[1]

    def _load(self, weights: str, name: str) -> None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"align.weights {weights} does not exist; put the weights of {name} there (safetensors "
                            "or a timm checkpoint)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
                for key in ("state_dict", "model", "module"):  # training checkpoints wrap the weights
                    if isinstance(state, dict) and isinstance(state.get(key), dict):
                        state = state[key]
            module = importlib.import_module(type(self.net).__module__)
            if hasattr(module, "checkpoint_filter_fn"):  # timm's own conversion (original layouts, resized positions)
                state = module.checkpoint_filter_fn(state, self.net)
            classifier = self.net.pretrained_cfg.get("classifier") or "head"
            state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise UserError(f"align.weights {weights} are not weights of {name} ({str(e).splitlines()[0][:200]})") \
                from None
        if missing or unexpected:
            raise UserError(f"align.weights {weights} are not weights of {name} (" + ", ".join(
                [f"{k} missing" for k in missing[:2]] + [f"{k} unexpected" for k in unexpected[:2]]) + ")")

    def _check_layer(self, name: str, layer: int) -> None:
        if not hasattr(self.net, "forward_intermediates"):
            raise UserError(f"align.layer: timm's {name} does not give its intermediate features; remove align.layer "
                            "to align with its last features")
        with torch.no_grad():
            count = len(self.net.forward_intermediates(torch.zeros(1, 3, self.resolution, self.resolution),
                                                       intermediates_only=True))
        if not 0 <= layer < count:
            raise UserError(f"align.layer {layer} is beyond the {count} intermediates of {name} (its blocks or "
                            f"stages); choose 0 to {count - 1}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = timm_input(x.to(self.mean.dtype), self.resolution, self.mean, self.std)
        if self.layer is not None:  # (N, C, h, w) for CNNs and ViTs alike (a ViT's patch tokens on their grid)
            return self.net.forward_intermediates(x, indices=[self.layer], intermediates_only=True,
                                                  stop_early=True)[0]  # the later blocks are not run
        features = self.net.forward_features(x)
        if features.ndim == 4:  # a CNN: (N, C, h, w)
            return features
        tokens = features[:, getattr(self.net, "num_prefix_tokens", 0):]  # a ViT: the patch tokens, row by row
        h, w = self.net.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w)


def _takes_img_size(name: str) -> bool:
    """Whether timm's model `name` is a ViT-style model that takes img_size (and resizes its positions)."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    return config is not None and any(family in config.architecture for family in ("vit", "deit", "eva"))


class AutoencoderEncoder(nn.Module):
    """An autoencoder of this toolkit as an encoder: the means of q(z|x) (N, C_z, H/f, W/f)."""

    def __init__(self, autoencoder: nn.Module, weights_file: Path):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.key, self.weights_file = "autoencoder", weights_file
        self.dim = autoencoder.latent_channels

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x.to(next(self.autoencoder.parameters()).dtype)).mean
