"""Typed configuration: dataclass defaults -> YAML preset -> `key.sub=value` overrides.

Every knob of the toolkit is a field below with its default and a one-line comment. Loading is
strict: an unknown key fails with its dotted path and the nearest valid name, and every value is
coerced to the declared type (PyYAML reads `3e-4` as a string; `train.lr=3e-4` must be a float).
Registry names (model, path, coupling, ...) are checked where the registries live (each package's
`check_config`, all of them by registries.check_names, which the scripts call before any data is loaded):
config.py imports no package of the toolkit.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import UserError, atomic_write


@dataclass
class DataConfig:
    name: str = "moons"  # dataset, a key of data.DATASETS: toy 2-D, 'tensor_file', 'mnist', 'cifar10',
    #                      'imagefolder', 'fields' (N×C×H×W arrays)
    path: str = ""  # file or folder of the data (MNIST / CIFAR-10: where the files are, or are downloaded to)
    split: str = "train"  # MNIST / CIFAR-10 split: 'train' or 'test'
    download: bool = True  # MNIST / CIFAR-10: download into data.path when the files are not there
    resolution: int = 0  # imagefolder: resize the short side to this and center-crop a square (0: keep the size)
    class_folders: bool = False  # imagefolder: label images by their top-level subfolder (for conditional models)
    hflip: bool = False  # images: random horizontal flips during training
    source: str = "gaussian"  # source distribution x0: 'gaussian' or any toy distribution name
    size: int = 100_000  # number of points drawn once from a toy distribution to form the dataset
    seed: int = 0  # in [0, 2^32): seed of those points (the data stay fixed when the training seed changes)
    num_workers: int = 0  # DataLoader worker processes per training process
    # Image-conditioned tasks (data/tasks.py): the model reads a spatial condition made from each image.
    task: str = ""  # '' (none), 'inpaint', 'superres' or 'semantic' (label maps in data.label_maps)
    mask: str = "mixed"  # inpaint: training masks, 'mixed' (LaMa-style strokes and boxes), 'strokes', 'boxes', 'center'
    factor: int = 4  # superres: the condition is the image averaged over factor×factor blocks (28 px -> 7 px)
    label_maps: str = ""  # semantic: folder of PNG label maps (class indices), ROOT/a/b.jpg's map at MAPS/a/b.png
    label_classes: int = 0  # semantic: classes in the label maps (CelebAMask-HQ: 19)


@dataclass
class ModelConfig:
    name: str = "mlp"  # architecture, a key of models.MODELS: 'mlp', 'unet-cifar10', 'unet-mnist', 'DiT-B/2', ...
    # Changes to the named preset (empty: the preset's value).
    width: int | None = None  # MLP hidden width (256), UNet base channels, DiT hidden size
    depth: int | None = None  # MLP hidden layers (3), UNet residual blocks per level, DiT blocks
    heads: int | None = None  # DiT attention heads
    patch: int | None = None  # DiT patch size (e.g. 1 for 7x7 latents)
    dropout: float | None = None  # UNet dropout
    time_dim: int = 64  # MLP: size of the sinusoidal timestep embedding
    time_input: str | None = None  # MLP: 'sines' (the embedding of t, the preset) or 'raw' (t itself as one more
    #                                input, as torchcfm's MLP)
    activation: str | None = None  # MLP: 'silu' (the preset), 'selu' (torchcfm's MLP) or 'gelu'
    time_scale: float = 1000.0  # the timestep embedding's sines take time_scale·t (MeanFlow: 1, as MeanFlow's code)
    class_cond: bool = False  # condition on the dataset's class labels (their number is read from the data)
    latent_channels: int | None = None  # autoencoders: channels of the latent (preset: 4)


@dataclass
class FlowConfig:
    objective: str = "cfm"  # 'cfm' (flow matching); one-stage few-step models of the average velocity u(z, t, s):
    #                         'meanflow', 'alphaflow' (flow matching → MeanFlow curriculum), 'shortcut' (step size
    #                         s − t as input, self-consistency); or 'autoencoder' (a KL autoencoder for latent FM)
    kl_weight: float = 1e-3  # autoencoder: β of ‖D(z) − x‖² + β·KL, both per pixel
    path: str = "linear"  # probability path x_t = α_t·x1 + σ_t·x0 (flows/paths.py): 'linear' (rectified flow, I-CFM),
    #                       'cosine' (SiT's GVP, torchcfm's VP-CFM), 'vp' (SiT's VP), 'polynomial' (α_t = tⁿ),
    #                       'icfm' (linear + constant noise σ, torchcfm's I-CFM), 'sb' (Brownian bridge, SB-CFM)
    sigma_min: float = 0.0  # linear: noise left at t=1 (Lipman et al.'s target OT path); 0 is rectified flow
    sigma: float = 0.0  # icfm / sb: scale σ of the bridge noise (icfm: σ; sb: σ·√(t(1−t)))
    vp_beta_min: float = 0.1  # vp: β_min of the linear noise schedule
    vp_beta_max: float = 20.0  # vp: β_max
    poly_n: float = 2.0  # polynomial: the power n of α_t = tⁿ, σ_t = 1 − tⁿ
    prediction: str = "velocity"  # what the network outputs: 'velocity', 'data' (x1), 'noise' (x0) or 'score';
    #                               sampling turns it into a velocity through the path
    loss_weight: str = "none"  # weight of the squared error: 'none', 'velocity' or 'likelihood' (SiT),
    #                            'sigma_sqrt' or 'cosmap' (SD3)
    coupling: str = "independent"  # pairing of noise and data: 'independent', 'ot' (exact minibatch OT-CFM),
    #                                'entropic' (Sinkhorn plan), 'unbalanced' or 'partial' OT (POT), 'class_ot'
    #                                (exact OT within each class), 'pairs' (the noise of data.name=pairs: reflow)
    ot_reg: float = 0.0  # entropic / unbalanced OT: regularisation ε on the squared distance (0: 2·flow.sigma², SB-CFM)
    ot_mass_reg: float = 1.0  # unbalanced OT: weight of the KL penalty on the marginals (torchcfm's reg_m)
    ot_mass: float = 0.8  # partial OT: fraction of the mass transported
    time_density: str = "uniform"  # training t density, a key of flows.TIME_DENSITIES
    time_mean: float = 0.0  # logit-normal location (our convention: > 0 favours t near 1, the data)
    time_std: float = 1.0  # logit-normal scale
    mode_scale: float = 1.29  # SD3 mode density scale s (0 is uniform; −1 is U-shaped, t = cos²(πu/2): more
    #                           weight at both ends, as Lee et al. 2024's reflow density)
    grid_steps: int = 1  # time_density=grid: t on {0, 1/k, ..., (k-1)/k}, k = grid_steps (k-step distillation)
    loss: str = "l2"  # 'l2' (mean squared error) or 'pseudo_huber' (√(‖·‖² + c²) − c, Lee et al. 2024)
    huber_c: float = 0.0  # pseudo-Huber c (0: 0.00054·√D, D the data's dimension)
    meanflow_ratio: float = 0.25  # MeanFlow: fraction of samples with s ≠ t (the others train plain flow matching)
    meanflow_split: float = 0.0  # MeanFlow: fraction of the s ≠ t samples whose target is two jumps of the network
    #                              (interval splitting, SplitMeanFlow) in place of the JVP's; u-loss only
    meanflow_split_ema: bool = True  # MeanFlow: the split targets' jumps by the EMA weights (false: the online model)
    meanflow_p: float = 1.0  # MeanFlow: power p of the adaptive loss weight 1 / (‖error‖² + c)^p (0: none)
    meanflow_eps: float = 1e-3  # MeanFlow: c of that weight
    meanflow_cfg: float = 1.0  # MeanFlow: guidance scale ω baked into the target (1: none; needs label dropout)
    meanflow_cfg_range: list[float] = field(default_factory=list)  # MeanFlow: [ω_min, ω_max]: guidance as a model
    #                 input (improved MeanFlow): ω and an interval [a, b] drawn per sample, chosen at sampling
    meanflow_loss: str = "u"  # MeanFlow: 'u' (the paper's loss on u) or 'v' (improved MeanFlow's loss on the
    #                           instantaneous velocity V = u − (s − t)·sg(du/dt) against x1 − x0; needs tangent 'model')
    meanflow_derivative: str = "jvp"  # MeanFlow: d/dt u by 'jvp' (forward mode), 'central' (the central difference of
    #                                   two forward passes without gradient) or 'onesided' (one pass, from the float32
    #                                   prediction itself; not with mixed precision or compile): cheaper than the JVP
    meanflow_tangent: str = "conditional"  # MeanFlow: direction of d/dt u: 'conditional' (x1 − x0) or 'model' u(z,t,t)
    meanflow_velocity: str = "conditional"  # MeanFlow: v in the s ≠ t samples' target (and its derivative's direction):
    #                                       'conditional' (x1 − x0), 'model' u_θ(z, t, t) or 'ema' (the EMA weights')
    #                                       (self-distillation: no pairing noise in the jumps' targets; s = t: x1 − x0)
    meanflow_times: str = "ordered"  # MeanFlow's (t, s): 'ordered' (the paper's: s = t samples take the earlier of two
    #                                  draws), 'single' (py-meanflow's v1: they keep one draw) or 'length' (s − t
    #                                  drawn, t spread over [0, 1 − (s − t)]: long jumps as common as short ones)
    alpha_start: float = 1.0  # AlphaFlow: α before the curriculum (1: trajectory flow matching)
    alpha_end: float = 0.0  # AlphaFlow: α after it; must be 0 (MeanFlow), what the curriculum anneals to
    alpha_steps: list[int] = field(default_factory=lambda: [0, 1000])  # AlphaFlow: optimizer steps [first, last] over
    #                                                               which α goes from alpha_start to alpha_end
    alpha_schedule: str = "sigmoid"  # AlphaFlow: 'sigmoid' (the paper's) or 'linear' between those steps
    alpha_gamma: float = 10.0  # AlphaFlow: sharpness of the sigmoid (α = start + (end − start)·σ(γ·(progress − ½)))
    shortcut_fraction: float = 0.25  # shortcut: fraction of samples trained by self-consistency (the others: d = 0)
    shortcut_steps: int = 128  # shortcut: the finest step 1/M, M a power of 2; d is drawn from {2/M, ..., 1/2, 1}
    shortcut_ema: bool = True  # shortcut: self-consistency targets from the EMA weights (false: the online model's)
    label_dropout: float = 0.0  # probability of replacing a label by the null class (> 0 for guidance to work)
    cond_dropout: float = 0.0  # data.task: probability of replacing the spatial condition by the null one (guidance)
    align: str = ""  # a representation regulariser added to the loss (flows/align.py, settings in align:): '' (none),
    #                  'repa' (a frozen encoder's features), 'dispersive' or 'sra' (no encoder)


@dataclass
class TrainConfig:
    steps: int = 3_000  # optimizer steps
    batch_size: int = 256  # global batch per optimizer step, over all processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    lr_schedule: str = "constant"  # after warmup: 'constant', 'cosine' (to lr_min at the last step) or 'wsd'
    #                                 (warmup-stable-decay: constant, then linear to lr_min over decay_fraction)
    lr_min: float = 0.0  # final learning rate of the cosine and wsd schedules
    decay_fraction: float = 0.2  # wsd: the share of the steps after warmup over which the rate falls to lr_min
    warmup_steps: int = 0  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.999  # EMA of the weights, used for previews and sampling
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at step n: forget the initial weights fast
    seed: int = 0  # in [0, 2^32): model init, and the key of the training randomness (noise, t, order, ...)
    init_from: str = ""  # a checkpoint folder whose EMA weights start a new run (new MeanFlow inputs start at zero)
    mixed_precision: str = "no"  # 'no', 'fp16' or 'bf16' (the -mp flag overrides)
    channels_last: bool = False  # image models in channels-last memory format (faster convolutions on GPUs; on a 2-core
    #                                AVX-512 CPU 6-12% more MNIST UNet steps a second, docs/benchmarks.md)
    compile: bool = False  # torch.compile the model for training
    grad_checkpoint: bool = False  # DiT blocks / UNet levels recompute their activations in the backward pass:
    #                                less memory for ~1/3 more compute, the same gradients
    log_every: int = 100  # steps between log lines, metrics.jsonl rows and tracker points
    t_bins: int = 10  # the loss is also logged per t-bin of [0, 1]
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers; [] for none
    preview_every: int = 1_000  # steps between preview pictures from the EMA weights (0: only at the end)
    preview_n: int = 2_000  # points drawn for a preview of 2-D data
    preview_images: int = 64  # images in a preview grid (class-conditional models: one row per class shown)
    preview_steps: int = 100  # Euler steps for previews
    checkpoint_every: int = 1_000  # steps between checkpoints (the last step is always saved)
    eval_every: int = 0  # at checkpoints whose step is a multiple of this, a small-N FID (images) or W2 (2-D); 0: off
    eval_n: int = 1_000  # samples of that check (EMA weights, evaluate.py's seed-0 noise, Euler, preview_steps)
    eval_ref: str = ""  # its reference, as evaluate.py --ref (empty: the run's dataset, statistics cached once)
    eval_features: str = "inception"  # 'inception' (FID) or 'pixels' (a fast stand-in for smoke runs)
    keep_last: int = 3  # checkpoints kept besides the permanent ones
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)


@dataclass
class SampleConfig:
    solver: str = "euler"  # euler, midpoint, heun, rk4 (heun+euler: euler last); adaptive: dopri5, dopri8, ...;
    #                        SDE: euler_maruyama, sde_heun (affine paths from a Gaussian source)
    steps: int | None = None  # fixed-grid solvers: intervals of the time grid (empty: 100); adaptive: leave empty
    schedule: str = "linear"  # time grid (flows.schedules): linear, cosine, logit_normal:mean=0,std=1, edm, ...
    cfg_scale: float = 1.0  # classifier-free guidance scale w; 1 is no guidance (Meta flow_matching's w is ours − 1)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [a, b]
    guidance: str = "cfg"  # how cfg_scale guides (flows/guidance.py): cfg, auto (autoguidance), apg, cfg_zero
    guide_weights: str = ""  # guidance=auto: the weaker model's checkpoint folder or weight file, same data and inputs
    apg_eta: float = 0.0  # guidance=apg: weight η of the update's part parallel to the conditional prediction
    apg_r: float = 0.0  # guidance=apg: the update's norm cap r (0: no cap)
    apg_momentum: float = 0.0  # guidance=apg: momentum β of the update over evaluations (APG uses negative β)
    zero_steps: int = 0  # guidance=cfg_zero: the first K steps of the grid output zero velocity (zero-init)
    diffusion: str = "sigma"  # SDE samplers: diffusion coefficient w(t) (flows.solvers.DIFFUSIONS, SiT's forms)
    diffusion_norm: float = 1.0  # SDE samplers: its scale
    last_step: str = "mean"  # SDE samplers: the noiseless last step, 'mean', 'tweedie' or 'euler'
    atol: float = 1e-5  # adaptive solvers' absolute tolerance
    rtol: float = 1e-5  # adaptive solvers' relative tolerance
    batch_size: int = 256  # samples per process per batch (--bspp); does not change the samples (see README)
    seed: int = 0  # in [0, 2^64): the noise of sample k comes from the key (seed, k) (seeds.py)


@dataclass
class LatentConfig:
    autoencoder: str = ""  # latent flow matching: an autoencoder checkpoint folder (empty: the flow lives on pixels)
    scale: float = 0.0  # latents are (z - shift) * scale; 0: the scale and shift stored in the autoencoder checkpoint
    shift: float = 0.0  # used when latent.scale is set
    sample_posterior: bool = False  # encode to a sample of q(z|x) instead of its mean
    cache: bool = True  # encode the dataset once into cached shards (reused across runs) instead of every step
    cache_dir: str = ""  # where the latent caches live (empty: ~/.cache/fm-toolkit/latents)


@dataclass
class LatentCFMConfig:
    encoder: str = ""  # Latent-CFM: an autoencoder checkpoint whose frozen encoder's features condition the velocity
    dim: int = 16  # size of the stochastic condition c drawn from q(c|features)
    beta: float = 1e-3  # weight of KL(q(c|features) ‖ N(0, I)) in the loss


@dataclass
class AlignConfig:
    weight: float = 0.5  # λ of loss = flow loss + λ·alignment loss (REPA, SRA, dispersive: 0.5)
    depth: int = 0  # the block whose hidden state is aligned, 1-based (DiT: blocks; UNet: modules of the down path,
    #                 then the middle); 0: a third of a DiT's blocks, at most 8 (REPA: 8 of 28), a UNet's middle
    projector: str = "mlp"  # repa / sra: 'mlp' (REPA: 3 layers, SiLU, per token), 'conv' (iREPA: a 3×3 convolution
    #                         over the token grid, and the encoder's tokens normalized over space) or 'sepconv'
    #                         (as conv, the 3×3 as a depthwise convolution then a 1×1: a ninth of the multiply-adds)
    proj_width: int = 0  # the MLP projector's hidden width (0: REPA's 2048, at most 4× the model's hidden width)
    stop_step: int = 0  # HASTE: no alignment from this optimizer step on (0: never stop)
    encoder: str = "inception"  # repa: 'inception' (clean-fid's network, offline), 'autoencoder' (a checkpoint of
    #                             this toolkit, in align.weights) or a timm model name, e.g. vit_base_patch14_dinov2
    weights: str = ""  # repa: the encoder's weights (timm: safetensors or a timm checkpoint; autoencoder: its folder)
    download: bool = False  # repa with timm: download the pretrained weights when align.weights is empty
    layer: str = ""  # repa: which feature map is the token grid (inception: 'mixed_2' (35×35 at 299 px), ...; timm:
    #                  K, its K-th intermediate, a block or stage from 0; empty: inception mixed_2, timm the last
    #                  features, an autoencoder its latent means)
    resolution: int = 0  # repa: the encoder's input size in pixels (0: the encoder's own, timm's pretrained config)
    cache: bool = True  # repa: compute the encoder's features of the dataset once into cached shards (else every step)
    cache_dir: str = ""  # where those caches live (empty: ~/.cache/fm-toolkit/align)
    temperature: float = 0.5  # dispersive: τ of log E_ij exp(−d_ij / τ)
    pool: str = "mean"  # dispersive: z_i is sample i's tokens 'mean'-pooled (C features) or 'flatten'ed into one
    #                     vector (C·h·w), as the paper's code does
    distance: str = "l2"  # dispersive: d_ij = ‖z_i − z_j‖² / len(z) ('l2', the paper's) or −cos(z_i, z_j) ('cosine')
    target_depth: int = 0  # sra: the EMA model's block that is the target (0: the last DiT block, a UNet's middle)
    time_gap: float = 0.1  # sra: the EMA model sees x at t + time_gap (less noise; clipped at 1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    latentcfm: LatentCFMConfig = field(default_factory=LatentCFMConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


# ---------------------------------------------------------------------------------------------
# Loading.


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans, true and false only: YAML 1.1 also reads yes/no/on/off as
    booleans, so `train.mixed_precision=no` would arrive as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _parse(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing YAML file with -c")
        try:
            tree = _parse(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {type(tree).__name__}")
        _merge(cfg, tree, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key.sub=value")
        _set_dotted(cfg, key.strip(), _parse(text) if text.strip() else "")
    _validate(cfg)
    return cfg


def _merge(node: Any, tree: dict, prefix: str) -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dataclasses.is_dataclass(getattr(node, str(key), None)) and isinstance(value, dict):
            _merge(getattr(node, key), value, prefix=f"{dotted}.")
        else:
            _set_dotted(node, str(key), value, prefix=prefix)


def _set_dotted(node: Any, dotted: str, value: Any, prefix: str = "") -> None:
    *parents, leaf = dotted.split(".")
    path = prefix
    for name in parents:
        node = _child(node, name, path)
        path = f"{path}{name}."
        if not dataclasses.is_dataclass(node):
            raise UserError(f"config key {path.rstrip('.')} is a value, not a section")
    hints = typing.get_type_hints(type(node))
    current = _child(node, leaf, path)
    if dataclasses.is_dataclass(current):
        raise UserError(f"config key {path}{leaf} is a section; set one of its keys, e.g. {path}{leaf}.KEY=VALUE")
    setattr(node, leaf, _coerce(value, hints[leaf], f"{path}{leaf}"))


def _child(node: Any, name: str, path: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        section = path.rstrip(".") or "the top level"
        hint = f"; did you mean {path}{close[0]}?" if close else f"; valid keys in {section}: {', '.join(names)}"
        raise UserError(f"unknown config key {path}{name}{hint}")
    return getattr(node, name)


def _coerce(value: Any, kind: Any, dotted: str) -> Any:
    """Convert a YAML value to the declared type, or fail naming the key and the expected type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], dotted)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(_parse(v) if isinstance(v, str) else v, item, dotted) for v in value]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "on", "1"):
                return True
            if str(value).lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"config type {kind} of {dotted} is not supported")
    raise UserError(f"config key {dotted} must be {getattr(kind, '__name__', kind)}, got {value!r}")


# Ranges of the numeric keys: (low, high, low included, high included); None is unbounded.
RANGES = {
    "data.resolution": (0, None, True, True), "data.size": (0, None, False, True),
    "data.num_workers": (0, None, True, True), "data.factor": (0, None, False, True),
    "data.label_classes": (0, None, True, True), "flow.cond_dropout": (0, 1, True, False),
    "model.width": (0, None, False, True), "model.depth": (0, None, False, True),
    "model.heads": (0, None, False, True), "model.patch": (0, None, False, True),
    "model.dropout": (0, 1, True, False), "model.time_dim": (0, None, False, True),
    "model.latent_channels": (0, None, False, True), "model.time_scale": (0, None, False, True),
    "flow.kl_weight": (0, None, True, True), "flow.sigma_min": (0, 1, True, False),
    "flow.sigma": (0, None, True, True), "flow.vp_beta_min": (0, None, False, True),
    "flow.vp_beta_max": (0, None, False, True), "flow.poly_n": (0, None, False, True),
    "flow.ot_reg": (0, None, True, True), "flow.ot_mass_reg": (0, None, False, True),
    "flow.ot_mass": (0, 1, False, True),
    "flow.time_std": (0, None, False, True),
    # SD3's mode density is a bijection of [0, 1] only for -1 ≤ s ≤ 2/(π − 2).
    "flow.mode_scale": (-1, 2 / (math.pi - 2), True, True),
    "flow.label_dropout": (0, 1, True, False), "flow.grid_steps": (0, None, False, True),
    "flow.huber_c": (0, None, True, True), "flow.meanflow_ratio": (0, 1, True, True),
    "flow.meanflow_split": (0, 1, True, True),
    "flow.meanflow_p": (0, None, True, True), "flow.meanflow_eps": (0, None, False, True),
    "flow.alpha_start": (0, 1, True, True), "flow.alpha_end": (0, 1, True, True),
    "flow.alpha_gamma": (0, None, False, True), "flow.shortcut_fraction": (0, 1, True, True),
    "flow.shortcut_steps": (1, None, False, True),
    "align.weight": (0, None, True, True), "align.depth": (0, None, True, True),
    "align.proj_width": (0, None, True, True), "align.stop_step": (0, None, True, True),
    "align.resolution": (0, None, True, True), "align.temperature": (0, None, False, True),
    "align.target_depth": (0, None, True, True), "align.time_gap": (0, 1, True, True),
    "train.steps": (0, None, False, True), "train.batch_size": (0, None, False, True),
    "train.grad_accum": (0, None, False, True), "train.lr": (0, None, False, True),
    "train.lr_min": (0, None, True, True), "train.decay_fraction": (0, 1, False, True),
    "train.warmup_steps": (0, None, True, True),
    "train.weight_decay": (0, None, True, True), "train.grad_clip": (0, None, True, True),
    "train.ema_decay": (0, 1, True, False), "train.log_every": (0, None, False, True),
    "train.t_bins": (0, None, False, True), "train.preview_every": (0, None, True, True),
    "train.preview_n": (0, None, False, True), "train.preview_images": (0, None, False, True),
    "train.preview_steps": (0, None, False, True), "train.checkpoint_every": (0, None, False, True),
    "train.eval_every": (0, None, True, True), "train.eval_n": (1, None, False, True),
    "train.keep_last": (0, None, False, True), "train.keep_every": (0, None, True, True),
    "sample.steps": (0, None, False, True), "sample.atol": (0, None, True, True),
    "sample.rtol": (0, None, True, True), "sample.batch_size": (0, None, False, True),
    "sample.diffusion_norm": (0, None, True, True), "sample.apg_eta": (0, None, True, True),
    "sample.apg_r": (0, None, True, True), "sample.apg_momentum": (-1, 1, False, False),
    "sample.zero_steps": (0, None, True, True),
    "latent.scale": (0, None, True, True), "latentcfm.dim": (0, None, False, True),
    "latentcfm.beta": (0, None, True, True),
    # train.seed and data.seed also seed Python's, NumPy's and torch's global generators (model init, toy points),
    # which keep 32 bits; sample k's noise is keyed by the whole sample.seed (seeds.py).
    "train.seed": (0, 2**32 - 1, True, True), "data.seed": (0, 2**32 - 1, True, True),
    "sample.seed": (0, 2**64 - 1, True, True),
}


def _in_range(value: float, low, high, low_in: bool, high_in: bool) -> bool:
    return ((low is None or value > low or (low_in and value == low))
            and (high is None or value < high or (high_in and value == high)))


def _interval(low, high, low_in: bool, high_in: bool) -> str:
    def number(x) -> str:  # integers whole (seeds), others short
        return str(x) if isinstance(x, int) else f"{x:g}"

    if high is None:
        return f"{'≥' if low_in else '>'} {number(low)}" if low else ("≥ 0" if low_in else "positive")
    return f"in {'[' if low_in else '('}{number(low)}, {number(high)}{']' if high_in else ')'}"


def check_range(key: str, value, flag: str | None = None) -> None:
    """A value for config key `key` (given as `flag` on a command line, if so) within config.RANGES, or one clear
    sentence."""
    low, high, low_in, high_in = RANGES[key]
    if value is not None and not (math.isfinite(value) and _in_range(value, low, high, low_in, high_in)):
        raise UserError(f"{flag or f'config key {key}'} must be {_interval(low, high, low_in, high_in)}, got {value}")


def _validate(cfg: Config) -> None:
    for key in RANGES:
        section, name = key.split(".")
        check_range(key, getattr(getattr(cfg, section), name))
    t = cfg.train
    choices = {"train.lr_schedule": (t.lr_schedule, ("constant", "cosine", "wsd")),
               "train.mixed_precision": (t.mixed_precision, ("no", "fp16", "bf16"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key {key} must be one of {', '.join(allowed)}, got '{value}'")
    if cfg.data.split not in ("train", "test"):
        raise UserError(f"config key data.split must be train or test, got '{cfg.data.split}'")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise UserError(f"config key train.betas must hold two numbers in [0, 1), got {t.betas}")
    if cfg.flow.vp_beta_min > cfg.flow.vp_beta_max:
        raise UserError(f"config key flow.vp_beta_min ({cfg.flow.vp_beta_min}) must not exceed flow.vp_beta_max "
                        f"({cfg.flow.vp_beta_max})")
    if t.lr_min > t.lr:
        raise UserError(f"config key train.lr_min ({t.lr_min}) must not exceed train.lr ({t.lr})")
    if cfg.sample.atol == cfg.sample.rtol == 0:
        raise UserError("config keys sample.atol and sample.rtol must not both be 0")


# ---------------------------------------------------------------------------------------------
# Resuming: which keys may change between restarts of one run.

# What may change when a run folder is trained again: how long, how often to log, preview, checkpoint and evaluate,
# how much to keep, where to log, data loading workers, speed switches that compute the same training, and the
# sample section (sampling defaults). Any other change would train another run on top of this one's checkpoints.
RESUMABLE = ("train.steps", "train.log_every", "train.t_bins", "train.trackers", "train.preview_every",
             "train.preview_n", "train.preview_images", "train.preview_steps", "train.checkpoint_every",
             "train.eval_every", "train.eval_n", "train.eval_ref", "train.eval_features", "train.keep_last",
             "train.keep_every", "train.compile", "train.channels_last", "train.grad_checkpoint", "data.num_workers",
             "data.download", "latent.cache_dir", "align.cache_dir", "sample.")


def config_changes(old: Config, new: Config) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """The keys whose values differ, as (key, old, new): those in RESUMABLE, and the others."""
    def flat(tree: dict, prefix: str = "") -> dict:
        return {k: v for key, value in tree.items()
                for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
                             else [(f"{prefix}{key}", value)])}

    before, after = flat(to_dict(old)), flat(to_dict(new))
    changed = [(key, before[key], after[key]) for key in after if before[key] != after[key]]
    allowed = [c for c in changed if c[0].startswith(RESUMABLE)]
    return allowed, [c for c in changed if c not in allowed]


# ---------------------------------------------------------------------------------------------
# Saving.


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    atomic_write(path, lambda tmp: tmp.write_text(to_yaml(cfg)))
