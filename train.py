"""Train a flow-matching model from a YAML config.

    accelerate launch train.py -c configs/toy2d_moons_otcfm.yaml [-e runs/NAME] [-mp bf16] [key.sub=value ...]
    python train.py                          # one process (CPU included), the embedded default: moons, I-CFM

Re-running the same command resumes from the newest complete checkpoint in the run folder.
Run folder: config.yaml, log.txt, metrics.jsonl, samples/step_N.png (EMA previews),
checkpoints/step_N/{model,ema}.safetensors + config.yaml + train_state/, tensorboard/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import seeds
from cluster import STOPPED, RunLock, Stopped, StopRequest, progress, run_main
from config import Config, config_changes, load_config, save_config, to_dict, to_yaml
from data import (
    build_dataset,
    build_loader,
    build_source,
    close_loader,
    data_info,
    reference_data,
    reference_points,
)
from data.images import random_hflip, save_grid, to_uint8
from data.latents import encode_dataset
from data.tasks import cases_from_dataset, model_inputs, task_info, task_of_config, task_picture, training_measurement
from data.toy import plot_points
from errors import UserError, exit_on, full_disk, on_main_process
from flows import BatchShard, LossByTime, build_objective, generate, velocity_model
from flows.align import WithFeatures, build_alignment, build_encoder, cached_features, resized
from flows.latent import build_feature_encoder, build_space
from flows.solvers import class_labels, condition, noise
from models import build_autoencoder, build_model
from models.align import without_head
from models.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
)
from models.ema import EMA, ShardedEMA
from registries import check_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a flow-matching model. Settings come from the dataclass defaults in config.py, "
                    "then the YAML file given with -c, then key.sub=value overrides. Re-running the same "
                    "command resumes from the newest checkpoint in the run folder. SIGTERM or Ctrl-C writes a "
                    "checkpoint at the current step and exits with status 75 (a second one exits at once); "
                    "0 is done, 2 a mistake in the input said in one line.",
        epilog="examples:\n"
               "  python train.py                                   # 2-D moons, ~1 min on CPU\n"
               "  python train.py -c configs/toy2d_moons_otcfm.yaml train.steps=2000 train.lr=3e-4\n"
               "  accelerate launch --num_processes 2 train.py -c configs/toy2d_moons_otcfm.yaml -mp bf16\n"
               "  python train.py -c configs/toy2d_moons_otcfm.yaml --dry-run   # print the resolved config",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config (default: the built-in defaults of config.py)")
    p.add_argument("-e", "--exp", metavar="RUN_DIR",
                   help="run folder (default: runs/<config file name>, or runs/default)")
    p.add_argument("-mp", "--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides train.mixed_precision")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--accept-changes", action="store_true",
                   help="continue a run folder whose config.yaml differs in keys that change what is trained (the "
                        "error lists them); without it such a change is refused")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the options


def lr_at(step: int, t) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine to lr_min."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr_min + (t.lr - t.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and check that it is writable before any work is done."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run folder {run_dir} is not writable ({e.strerror}); choose another with -e") from None


def preview_solver(cfg: Config) -> str:
    """Previews and the in-training check sample with Euler, MeanFlow models with their jumps."""
    return "meanflow" if cfg.flow.objective == "meanflow" else "euler"


@torch.no_grad()
def save_preview(path: Path, ema_model, dataset, source, cfg: Config, device: torch.device, step: int,
                 num_classes: int, space) -> None:
    """Samples of the EMA model from fixed noise: 2-D points drawn over the data, or a grid of images
    (class-conditional models: one row per class shown, at most 10 classes spread over the range);
    latents are decoded by `space`."""
    t = cfg.train
    g = torch.Generator(device).manual_seed(0)
    if len(dataset.shape) == 1:
        out = generate(ema_model, source(t.preview_n, g, device), steps=t.preview_steps, solver=preview_solver(cfg))
        plot_points(out.x.cpu(), dataset.x[: t.preview_n], path,
                    title=f"{cfg.data.name}, step {step}, EMA, {preview_solver(cfg)} {out.nfe} NFE")
        return
    rows = min(num_classes, 10) or max(1, round(t.preview_images ** 0.5))
    cols = -(-t.preview_images // rows)
    y, labels = None, None
    if num_classes:
        classes = torch.linspace(0, num_classes - 1, rows).round().long()
        y, labels = classes.repeat_interleave(cols).to(device), [str(c) for c in classes.tolist()]
    x0 = source(rows * cols, g, device)
    cond = condition(ema_model, t.seed, list(range(len(x0))))  # Latent-CFM: c from the prior
    out = generate(ema_model, x0, steps=t.preview_steps, solver=preview_solver(cfg), y=y, cond=cond)
    save_grid(getattr(dataset, "to_uint8", to_uint8)(space.decode(out.x)), path, rows, row_labels=labels)


@torch.no_grad()
def save_reconstructions(path: Path, autoencoder, dataset, cfg: Config, device: torch.device) -> None:
    """A grid of fixed dataset images (odd rows) above their reconstructions from the latent means (even rows)."""
    n = min(cfg.train.preview_images, len(dataset))
    cols = max(1, round(n ** 0.5))
    rows = -(-n // cols)
    x, _ = dataset[torch.arange(rows * cols) % len(dataset)]
    reconstruction, _ = autoencoder(x.to(device))
    pairs = torch.stack([x.view(rows, cols, *x.shape[1:]), reconstruction.cpu().view(rows, cols, *x.shape[1:])], 1)
    save_grid(getattr(dataset, "to_uint8", to_uint8)(pairs.flatten(0, 2)), path, 2 * rows,
              row_labels=["data", "recon."] * rows)


@torch.no_grad()
def latent_statistics(autoencoder, dataset, device: torch.device, n: int = 1024) -> dict[str, str]:
    """The latent shape, and the shift and scale that make the latent means of up to n fixed dataset items zero
    mean and unit variance (latent flow matching trains on (z − shift) · scale), as weight-file metadata."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    z = torch.cat([autoencoder.encode(dataset[chunk][0].to(device)).mean.float().cpu() for chunk in idx.split(256)])
    return {"latent_shape": json.dumps(list(z.shape[1:])), "latent_shift": repr(z.mean().item()),
            "latent_scale": repr(1 / z.std().item())}


@torch.no_grad()
def sample_quality(ema_model, dataset, cfg: Config, device: torch.device, num_classes: int, space,
                   cache: dict) -> dict[str, float]:
    """train.eval_n samples of the EMA model (Euler, MeanFlow models' jumps, train.preview_steps steps) drawn as
    evaluate.py draws them with --seed 0 (sample k's noise, label and condition from (0, k)): FID against
    train.eval_ref (default: the dataset, its statistics computed once) for images, W2 to as many dataset points
    (data.reference_points, seed 0) for 2-D data.
    `evaluate.py -e RUN --samplers euler:STEPS --n-samples N` (meanflow:STEPS) reports the same number for that
    checkpoint.
    `cache` keeps the feature network and the reference between calls."""
    from metrics import build_features, frechet_distance, w2
    from metrics.fid import default_stats_dir, load_reference

    t, n = cfg.train, cfg.train.eval_n
    source = None if cfg.data.source == "gaussian" else build_source(cfg, space.shape)
    labels = class_labels(None, n, num_classes, 0)
    chunks = []
    for first in range(0, n, 250):
        batch = list(range(first, min(first + 250, n)))
        chunks.append(generate(ema_model, noise(0, batch, space.shape, source).to(device), steps=t.preview_steps,
                               solver=preview_solver(cfg), y=None if labels is None else labels[batch].to(device),
                               cond=condition(ema_model, 0, batch)).x)
    x = space.decode(torch.cat(chunks))
    if len(dataset.shape) == 1:
        return {"w2": w2(x.cpu(), dataset.x[reference_points(len(dataset), n, 0)])}
    if "reference" not in cache:
        cache["features"] = build_features(t.eval_features, device=device)
        cache["reference"] = load_reference(t.eval_ref or None, cache["features"], tuple(dataset.shape[-2:]),
                                            default_stats_dir(), cfg, dataset)
    features, reference = cache["features"](to_uint8(x).cpu()), cache["reference"]
    name = "fid" if t.eval_features == "inception" else f"fid_{t.eval_features}"
    return {name: frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)}


def check_task(cfg: Config, task, dataset, pairs, features) -> None:
    """What an image-conditioned task (data.task) does not go with, one line each."""
    if len(dataset.shape) != 3:
        raise UserError(f"data.task={task.name} conditions on images but {cfg.data.name} has shape {dataset.shape}; "
                        "use an image dataset or remove data.task")
    if task.name == "superres":
        task.check(dataset.shape)
    if cfg.latent.autoencoder and cfg.latent.cache:
        raise UserError(f"data.task={task.name} in latent space encodes each batch's condition as it trains; set "
                        "latent.cache=false")
    for reason, present in (("flow.objective=meanflow", cfg.flow.objective != "cfm"),
                            ("reflow pairs (data.name=pairs)", pairs is not None),
                            ("Latent-CFM (latentcfm.encoder)", features is not None),
                            ("train.eval_every (use evaluate.py --task)", cfg.train.eval_every > 0)):
        if present:
            raise UserError(f"data.task={task.name} does not go with {reason} here; remove one of them")


@torch.no_grad()
def save_task_preview(path: Path, ema_model, dataset, cfg: Config, device: torch.device, task, space) -> None:
    """A grid of fixed dataset images: per row, condition | sample of the EMA model | original, Euler with
    train.preview_steps steps, masks and noise from seed 0 as evaluate.py --task draws them."""
    rows = max(1, min(len(dataset), cfg.train.preview_images // 3, 16))
    cases = cases_from_dataset(task, dataset, rows, mask_kind=getattr(task, "mask", "mixed"))
    x1, m = cases.original(list(range(rows))).to(device), cases.measurement(list(range(rows))).to(device)
    x0 = noise(0, list(range(rows)), space.shape).to(device)
    out = generate(ema_model, x0, steps=cfg.train.preview_steps, cond={"image_cond": task.condition(m, space)})
    x = task.enforce(space.decode(out.x).float(), m)
    grid = torch.stack([task_picture(task, m, x1.shape[1]), x, x1], 1).flatten(0, 1)
    save_grid(to_uint8(grid), path, rows, row_labels=None)


def check_config_change(run_dir: Path, cfg: Config, accept: bool) -> list[str]:
    """This start's config against the one the folder was trained with, the newest checkpoint's (or, before any
    checkpoint, the folder's config.yaml): changes to RESUMABLE keys are fine; others are refused in one line naming
    each (old → new) unless `accept`. Returns the log lines that say what changed."""
    checkpoints = list_checkpoints(run_dir)
    saved = checkpoints[-1][1] / "config.yaml" if checkpoints else run_dir / "config.yaml"
    if not saved.is_file():
        return []
    try:
        old = load_config(saved)
    except UserError as e:
        raise UserError(f"{saved} cannot be read ({e}); move it away, or choose another folder with -e") from None
    allowed, forbidden = config_changes(old, cfg)

    def shown(changes: list) -> str:
        return ", ".join(f"{key} {before!r} → {after!r}" for key, before, after in changes)

    if forbidden and not checkpoints:  # nothing was trained with the old config
        return [f"config: the earlier start of this folder differed ({shown(forbidden)}) but wrote no checkpoint; "
                "starting afresh with this one"] + ([f"config: changed {shown(allowed)}"] if allowed else [])
    if forbidden and not accept:
        raise UserError(f"run folder {run_dir} was trained with another config: {shown(forbidden)}; start a new run "
                        "with another -e, or continue this one with the change on purpose with --accept-changes")
    lines = [f"config: changed {shown(allowed)}"] if allowed else []
    if forbidden:
        lines.append(f"config: changed with --accept-changes: {shown(forbidden)}")
    if any(key == "train.steps" for key, _, _ in allowed) and cfg.train.lr_schedule == "cosine":
        lines.append("config: the cosine learning-rate schedule follows the new train.steps from here on")
    return lines


def train(cfg: Config, run_dir: Path, accept_changes: bool = False) -> None:
    t = cfg.train
    torch.backends.cuda.matmul.allow_tf32 = True  # set once, here: TF32 matmuls on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True

    # Accelerator and run folder: one writer (the main process holds RUN/.lock until it ends).
    prepare_run_dir(run_dir)
    for section, key in ((cfg.latent, "autoencoder"), (cfg.latentcfm, "encoder"), (cfg.train, "init_from")):
        path = getattr(section, key)
        if path and Path(path).exists():  # saved configs must find it from anywhere; a hub id stays as it is
            setattr(section, key, str(Path(path).resolve()))
    trackers = [name for name in t.trackers if name != "wandb" or _wandb_installed()]
    # Without CUDA, accelerate runs several processes only when told to use the CPU (gloo).
    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # HASTE's stop leaves the alignment head without a gradient, which DDP must be told it may see.
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.flow.align and cfg.align.stop_step \
        else []
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              log_with=trackers or None, project_dir=str(run_dir), cpu=cpu_multiprocess,
                              kwargs_handlers=unused)
    lock = on_main_process(accelerator, RunLock(run_dir).acquire)
    try:
        with StopRequest() as stop:
            run(cfg, run_dir, accelerator, trackers, stop, accept_changes)
    finally:
        if lock is not None:
            lock.release()


def run(cfg: Config, run_dir: Path, accelerator, trackers: list[str], stop: StopRequest, accept_changes: bool):
    """Training in a locked run folder, stopping cleanly at a `stop` request."""
    t = cfg.train
    world, device = accelerator.num_processes, accelerator.device
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size {t.batch_size} must be divisible by processes × train.grad_accum "
                        f"= {world} × {t.grad_accum}")
    micro_batch = t.batch_size // t.grad_accum  # global, over processes
    log = RunLog(run_dir, accelerator.is_main_process)
    # The main process compares this config with the one the folder was trained with; the folder's config.yaml is
    # written once the run has started (a start that fails, weights that do not fit, leaves it as it was).
    changes = on_main_process(accelerator, partial(check_config_change, run_dir, cfg, accept_changes)) or []
    log(f"config:\n{to_yaml(cfg)}")
    for line in changes:
        log(line)
    if "wandb" in t.trackers and "wandb" not in trackers:
        log("wandb is not installed (pip install wandb); logging to the other trackers only")

    # Data, and the space the flow lives in: pixels, or the latents of a frozen autoencoder. Reflow trains on
    # (noise, sample) pairs; the teacher's data stay what previews and quality checks compare with.
    dataset = reference_data(cfg)
    pairs = build_dataset(cfg) if cfg.data.name == "pairs" else None
    space = build_space(cfg, dataset.shape).to(device)
    source = build_source(cfg, space.shape)
    features = build_feature_encoder(cfg, dataset.shape)  # Latent-CFM's frozen encoder, or None
    features = features.to(device) if features is not None else None
    log(f"data: {cfg.data.name}, {len(dataset)} samples of shape {dataset.shape}, {dataset.num_classes} classes; "
        f"source: {cfg.data.source}" + (f"; latents of shape {space.shape} from {cfg.latent.autoencoder}"
                                        if cfg.latent.autoencoder else "")
        + (f"; {cfg.data.path}: {dataset.converted}" if getattr(dataset, "converted", "") else "")
        + (f"; trained on {len(pairs)} reflow pairs from {pairs.info['teacher']}" if pairs is not None else ""))

    num_classes = dataset.num_classes if cfg.model.class_cond else 0
    if cfg.model.class_cond and not dataset.num_classes:
        raise UserError(f"model.class_cond is set but {cfg.data.name} has no labels; set model.class_cond=false")
    if cfg.flow.label_dropout > 0 and not num_classes:
        raise UserError("flow.label_dropout drops class labels, which an unconditional model does not have; "
                        "set model.class_cond=true or flow.label_dropout=0")
    if (pairs is not None) != (cfg.flow.coupling == "pairs"):
        raise UserError("flow.coupling=pairs trains on the noise that reflow pairs carry: use it with data.name=pairs "
                        "data.path=DIR (made by sample.py --pairs), and data.name=pairs with it")
    if pairs is not None and cfg.latent.autoencoder:
        raise UserError("reflow pairs are made and read in pixel space here; remove latent.autoencoder")
    if pairs is not None and pairs.shape != tuple(dataset.shape):
        raise UserError(f"pairs folder {cfg.data.path} holds items of shape {pairs.shape} but its teacher's data "
                        f"have shape {tuple(dataset.shape)}; make the pairs again with a teacher of these data")
    if pairs is not None and cfg.data.hflip:
        raise UserError("data.hflip would mirror a pair's sample without its noise; remove it for reflow pairs")
    if cfg.flow.objective == "meanflow" and features is not None:
        raise UserError("flow.objective=meanflow does not take Latent-CFM's condition here; remove latentcfm.encoder")
    if cfg.flow.meanflow_cfg != 1 and not (num_classes and cfg.flow.label_dropout > 0):
        raise UserError("flow.meanflow_cfg bakes classifier-free guidance into the target, which needs a "
                        "class-conditional model trained with label dropout (model.class_cond=true "
                        "flow.label_dropout=0.1)")
    task = task_of_config(cfg)  # an image-conditioned task (data.task), or None
    if task is not None:
        check_task(cfg, task, dataset, pairs, features)
    if t.eval_every and data_info(cfg, dataset)["kind"] == "field":
        raise UserError("train.eval_every measures FID of images or W2 of points; these data are fields: set "
                        "train.eval_every=0")
    if t.eval_every and len(dataset.shape) == 1 and t.eval_n > len(dataset):
        raise UserError(f"train.eval_n {t.eval_n} exceeds the {len(dataset)} points of the dataset, against as many "
                        f"of which the in-training W2 is measured; set train.eval_n ≤ {len(dataset)}")
    if cfg.data.hflip and len(dataset.shape) != 3:
        raise UserError(f"data.hflip applies to images but {cfg.data.name} has shape {dataset.shape}; remove it")

    autoencoding = cfg.flow.objective == "autoencoder"
    if autoencoding and (num_classes or t.eval_every or cfg.latent.autoencoder):
        raise UserError("an autoencoder (flow.objective=autoencoder) is trained on pixels without model.class_cond "
                        "and train.eval_every; remove them (and latent.autoencoder)")

    # Model and EMA.
    set_seed(t.seed)
    if autoencoding:
        model = build_autoencoder(cfg, dataset.shape)
    else:
        model = build_model(cfg, space.shape, num_classes, features.dim if features else 0,
                            **model_inputs(task, space.shape[0]))
    latent_shape = model.latent_shape(dataset.shape) if autoencoding else space.shape
    if t.init_from and not list_checkpoints(run_dir):  # a new run starts from another's weights
        init = Path(t.init_from) / "ema.safetensors" if Path(t.init_from).is_dir() else Path(t.init_from)
        if (init.parent / "config.yaml").is_file():  # weights read the time through their own embedding's scale
            scale = load_config(init.parent / "config.yaml").model.time_scale
            if scale != cfg.model.time_scale:
                raise UserError(f"train.init_from {init.parent} was trained with model.time_scale={scale:g}; set "
                                f"model.time_scale={scale:g} (its time embedding reads {scale:g}·t)")
        new = load_weights(model, init, missing_ok=("interval_embed.",))
        log(f"initialized from {init}" + (f"; the MeanFlow interval embedding ({len(new)} tensors) starts adding "
                                          "zero" if new else ""))
    # Representation alignment (flow.align): REPA's frozen encoder, and the projection head trained with the model
    # (it is saved in the training state, never in the weight files that sampling reads).
    sharded = accelerator.distributed_type == DistributedType.FSDP
    encoder, alignment = None, None
    if cfg.flow.align:
        if cfg.flow.align == "sra" and sharded:
            raise UserError("flow.align=sra reads the EMA model on every process, which FSDP keeps in shards; use DDP "
                            "(no FSDP config) or flow.align=repa / dispersive")
        encoder = build_encoder(cfg, dataset.shape).to(device) if cfg.flow.align == "repa" else None
        alignment = build_alignment(cfg, model, encoder)
    memory_format = torch.channels_last if t.channels_last and len(space.shape) == 3 else torch.contiguous_format
    model.to(memory_format=memory_format)
    if t.grad_checkpoint:
        if not hasattr(model, "grad_checkpoint"):
            raise UserError(f"train.grad_checkpoint recomputes the blocks of DiT and UNet models, not of "
                            f"{type(model).__name__} ({cfg.model.name}); remove it")
        model.grad_checkpoint = True
    # Under FSDP each process keeps the EMA of its own shards (the main process also a plain copy for previews);
    # otherwise every process keeps a full EMA, made from the float32 weights before DeepSpeed casts them.
    template = copy.deepcopy(model).to(device) if sharded and accelerator.is_main_process else None
    ema = None if sharded else EMA(model, t.ema_decay, t.ema_warmup)
    if ema is not None:
        ema.model.to(device)
    if alignment is not None and alignment.method == "sra":  # its teacher: the EMA model
        alignment.teacher = ema.model
    autocast = contextlib.nullcontext
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        autocast = configure_deepspeed(accelerator, t, micro_batch // world)
    # Fused AdamW on CUDA (one kernel for all tensors); on the CPU the foreach form, or torch picks a per-tensor loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        ema = ShardedEMA(accelerator.unwrap_model(model), t.ema_decay, t.ema_warmup, template)
    if t.compile:  # after DDP wrapping, as torch recommends; checkpoints strip the '_orig_mod.' prefix
        model = torch.compile(model)
    log(f"model: {cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{world} process(es) on {device}, mixed precision {t.mixed_precision}")

    data_meta = data_info(cfg, dataset)  # written into the weight files: sampling needs no data
    data_meta["label_dropout"] = repr(cfg.flow.label_dropout)  # guidance needs a trained null class
    data_meta.update(task_info(task), cond_dropout=repr(cfg.flow.cond_dropout))
    if cfg.flow.objective == "meanflow":  # guidance baked in at this scale: sampling needs no --cfg-scale
        data_meta["meanflow_cfg"] = repr(cfg.flow.meanflow_cfg)

    # Latent flow matching reads the dataset's latents from a cache, encoded once (or encodes every step).
    train_data, encode_per_step = pairs if pairs is not None else dataset, space if cfg.latent.autoencoder else None
    loop_flips = cfg.data.hflip and pairs is None and not (cfg.latent.autoencoder and cfg.latent.cache)
    if cfg.latent.autoencoder and cfg.latent.cache:
        if cfg.latent.sample_posterior:
            raise UserError("the latent cache stores posterior means; latent.sample_posterior=true needs "
                            "latent.cache=false")
        cache_dir = Path(cfg.latent.cache_dir) if cfg.latent.cache_dir else None
        train_data, encoded = encode_dataset(cfg, dataset, space, accelerator, cache_dir)
        encode_per_step = None
        log(f"latent cache: {len(train_data)} latents {'encoded' if encoded else 'reused'}"
            + (" (images and their mirrors)" if cfg.data.hflip else ""))
    if cfg.latent.autoencoder:
        data_meta["latent_shape"] = json.dumps(list(space.shape))
    if features is not None:  # sampling draws c of this size from the prior, or from reference images
        data_meta.update(feature_dim=str(features.dim), condition_dim=str(cfg.latentcfm.dim))
    encode_features = None  # REPA's encoder on each batch's images, when its features are not cached
    if alignment is not None:
        train_data, encode_features = align_data(cfg, alignment, encoder, dataset, train_data, pairs, accelerator,
                                                 log, loop_flips)

    # Objective.
    objective = build_objective(cfg, source, num_classes, latent_shape, features, task)
    objective.alignment = alignment
    shard = BatchShard.from_accelerator(accelerator)

    # Resume from the newest complete checkpoint.
    step = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        load_checkpoint(accelerator, path, ema)
        log(f"resumed from {path} at step {step}")
    if accelerator.is_main_process:
        with full_disk(run_dir / "config.yaml"):
            save_config(cfg, run_dir / "config.yaml")
    if step >= t.steps:
        log(f"nothing to do: step {step} ≥ train.steps {t.steps}")
        accelerator.end_training()
        return

    # Loop.
    loader = iter(build_loader(train_data, micro_batch, accelerator.process_index, world, seed=t.seed,
                               start=step * t.grad_accum, num_workers=cfg.data.num_workers,
                               pin_memory=device.type == "cuda"))
    # On one process, prepare the next micro-step (its batch, draws and OT solve, all host work) in a thread while
    # this one trains: on a GPU always, since the host also has to launch every kernel (unet-cifar10, batch 32,
    # H100: 392-457 images/s inline, 521-523 ahead, steps 101-300); on the CPU only for the OT solve of vector data,
    # whose network steps are as short as the solve, and then with a core of its own, or the two fight over every
    # core (train.py on 2 cores, moons: 24.8 ms per OT-CFM step inline, 17.9 sharing both cores, 15.0 with one
    # each; an I-CFM step takes 11.6). An image model's step dwarfs the solve, and a core given up halves it
    # (unet-cifar10, batch 32, 2 cores: 2.48 images/s so, 4.80 without OT; the solve takes 0.4 ms).
    ahead = world == 1 and (device.type == "cuda" or (cfg.flow.coupling == "ot" and len(space.shape) == 1))
    if ahead and device.type == "cpu" and torch.get_num_threads() > 1:
        torch.set_num_threads(torch.get_num_threads() - 1)
    batches = micro_steps(loader, objective, shard, t.seed, step * t.grad_accum, device, ahead,
                          labels=num_classes > 0, hflip=loop_flips, memory_format=memory_format, space=encode_per_step,
                          task=task, task_space=space, alignment=alignment, grad_accum=t.grad_accum,
                          encode_features=encode_features)
    # Listed once: unwrapping the model and walking its parameters cost host time on every step.
    raw_model, params = accelerator.unwrap_model(model), list(model.parameters())
    loss_by_time, eval_cache = LossByTime(t.t_bins, device), {}
    loss_sum, nonfinite = torch.zeros((), device=device), torch.zeros((), dtype=torch.bool, device=device)
    align_sums = torch.zeros(3, device=device)  # flow loss, alignment loss, aligned micro-steps
    accelerator.init_trackers("tensorboard", config=_flat(to_dict(cfg)))
    bar = progress(t.steps, initial=step, desc="training", unit="step", disable=not accelerator.is_main_process)
    # With an fp16 loss scaler an infinite gradient only skips the step; otherwise it would corrupt the weights.
    check_gradients = accelerator.scaler is None
    timer, steps_timed = time.perf_counter(), 0
    model.train()
    try:
        while step < t.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, t)
            for _ in range(t.grad_accum):
                x1, draw = next(batches)
                # Gradients are synchronized (DeepSpeed: the optimizer steps) at the last micro-step only.
                with accelerator.accumulate(model), autocast():
                    out = objective.loss(model, x1, draw)
                    loss = out.total().mean()
                    accelerator.backward(loss)  # divided by train.grad_accum (by DeepSpeed itself under DeepSpeed)
                loss_by_time.add(out)
                loss_sum += loss.detach()
                if out.align is not None:
                    align_sums += torch.stack([out.loss.detach().mean(), out.align.detach().mean(),
                                               torch.ones((), device=device)])
                nonfinite |= ~torch.isfinite(loss.detach())
            step += 1
            grad_norm = update_weights(accelerator, params, optimizer, ema, raw_model, step, t.grad_clip)
            if check_gradients:  # a finite loss can still have an infinite gradient, which makes NaN weights
                nonfinite |= ~torch.isfinite(grad_norm)
            steps_timed += 1
            bar.update(1)
            last = step == t.steps
            stopping = stop.now(accelerator) and not last  # SIGTERM / SIGINT: a checkpoint here, then exit

            if step % t.log_every == 0 or last or step % t.checkpoint_every == 0 or stopping:
                if bool(accelerator.reduce(nonfinite.float(), "sum") > 0):  # stop before a bad model is saved
                    done = [s for s, _ in list_checkpoints(run_dir)]
                    last_good = f"step {done[-1]}" if done else "none"
                    raise UserError(f"the loss or its gradient became NaN or infinite before step {step}; training "
                                    f"stopped and the last good checkpoint is {last_good}; lower train.lr or set "
                                    "train.grad_clip")
            logged = step % t.log_every == 0 or last
            if logged:
                elapsed = time.perf_counter() - timer
                metrics = {"loss": float(accelerator.reduce(loss_sum, "mean")) / (steps_timed * t.grad_accum),
                           "lr": lr_at(step - 1, t), "grad_norm": float(grad_norm),
                           "samples_per_s": steps_timed * t.batch_size / elapsed,
                           **({"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
                              if device.type == "cuda" else {}),
                           **(aligned_losses(accelerator.reduce(align_sums, "sum")) if alignment else {}),
                           **loss_by_time.read(lambda x: accelerator.reduce(x, "sum"))}
                align_sums.zero_()
                log.metrics(step, metrics)
                accelerator.log(metrics, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}")
                loss_sum.zero_()
            previewing = (t.preview_every > 0 and step % t.preview_every == 0) or last
            saving = step % t.checkpoint_every == 0 or last or stopping
            # The EMA weights as one plain module on the main process (None elsewhere; under FSDP every process
            # takes part in gathering them).
            ema_model = ema.gathered() if previewing or (saving and (autoencoding or t.eval_every)) else None
            if previewing:
                path = run_dir / "samples" / f"{checkpoint_name(step)}.png"
                on_main_process(accelerator, partial(save_reconstructions, path, ema_model, dataset, cfg, device)
                                if autoencoding else partial(save_task_preview, path, velocity_model(ema_model, cfg),
                                                             dataset, cfg, device, task, space) if task is not None
                                else partial(save_preview, path, velocity_model(ema_model, cfg), dataset, source, cfg,
                                             device, step, num_classes, space))
                log(f"preview: {path}")
            if saving:
                meta = data_meta
                if autoencoding and ema_model is not None:  # only the main process writes the weight files
                    meta = {**data_meta, **latent_statistics(ema_model, dataset, device)}
                # Full weights of the model and the EMA, for the main process to write (under FSDP every process
                # takes part in gathering them).
                model_state = without_head(accelerator.get_state_dict(model))  # the head stays in train_state/
                ema_state = ema.state() if sharded or accelerator.is_main_process else {}  # sharded: {} off main
                path = save_checkpoint(accelerator, run_dir, step, model_state, ema_state, to_yaml(cfg), meta)
                del model_state, ema_state
                if accelerator.is_main_process:
                    prune_checkpoints(run_dir, t.keep_last, t.keep_every)
                log(f"checkpoint: {path}")
                if t.eval_every and (step % t.eval_every == 0 or last):
                    # On the main process; a reference that cannot be made stops every process at once.
                    sampler = velocity_model(ema_model, cfg)
                    quality = on_main_process(accelerator, partial(sample_quality, sampler, dataset, cfg, device,
                                                                   num_classes, space, eval_cache))
                    if accelerator.is_main_process:
                        log.metrics(step, quality)
                        accelerator.log({f"eval/{k}": v for k, v in quality.items()}, step=step)
                        log(f"eval: {', '.join(f'{k} {v:.4g}' for k, v in quality.items())} ({t.eval_n} samples, "
                            f"{preview_solver(cfg)} {t.preview_steps} steps, EMA)")
            if stopping:
                log(f"stopped by {stop.name} at step {step} of {t.steps}, checkpoint {path}; run the same command "
                    "to resume")
                raise Stopped
            if logged:  # samples/s counts training alone, not previews and checkpoints
                timer, steps_timed = time.perf_counter(), 0
    finally:  # also on an error: nothing keeps running (the batch thread, loader workers, trackers) after this
        batches.close()
        close_loader(loader)
        bar.close()
        accelerator.end_training()
    log(f"done: {step} steps; preview {run_dir / 'samples' / f'{checkpoint_name(step)}.png'}")


def align_data(cfg: Config, alignment, encoder, dataset, train_data, pairs, accelerator, log, loop_flips: bool):
    """REPA's targets: the training data with the encoder's features cached beside each item (align.cache), or the
    encoder to run on each batch's images; for the other regularisers the data as they are. Returns the data and
    that function (or None)."""
    a = cfg.align
    described = f"align: {cfg.flow.align}, λ {alignment.weight:g}, block {alignment.depth}"
    if encoder is None:
        log(described + (f", target block {alignment.target_depth} of the EMA model at t + {alignment.time_gap:g}"
                         if alignment.method == "sra" else f", τ {alignment.temperature:g}")
            + (f", stops at step {alignment.stop_step}" if alignment.stop_step else ""))
        return train_data, None
    described += (f", encoder {encoder.key} ({encoder.dim} features on the {alignment.grid[0]}×{alignment.grid[1]} "
                  f"token grid)" + (f", stops at step {alignment.stop_step}" if alignment.stop_step else ""))
    if not a.cache:
        log(described + ", run on every batch")
        autocast = accelerator.autocast
        return train_data, lambda x: resized(_under(autocast, encoder, x), alignment.grid).float()
    if pairs is not None:
        raise UserError("REPA's feature cache holds the dataset's images, not reflow pairs' samples; set "
                        "align.cache=false to encode each batch")
    started = time.perf_counter()
    parts, computed, folder = cached_features(cfg, dataset, encoder, alignment.grid, accelerator)
    mirrored = parts.get("mirrored")
    features = parts["mean"] if mirrored is None or loop_flips else torch.cat([parts["mean"], mirrored])
    log(described + f"; feature cache {folder}: {len(parts['mean'])} images "
        + (f"computed in {time.perf_counter() - started:.1f} s" if computed else "reused")
        + (" (and their mirrors)" if mirrored is not None else ""))
    return WithFeatures(train_data, features, mirrored if loop_flips else None), None


def _under(autocast, encoder, x: torch.Tensor) -> torch.Tensor:
    with autocast():  # the training precision
        return encoder(x)


def aligned_losses(sums: torch.Tensor) -> dict[str, float]:
    """The flow loss and the alignment loss, means over the aligned micro-steps since the last log (none: {})."""
    flow, align, count = sums.tolist()
    return {"flow_loss": flow / count, "align_loss": align / count} if count else {}


def configure_deepspeed(accelerator, t, per_process_batch: int):
    """DeepSpeed takes the batch, the accumulation and the clipping from its config: train.py's settings. It casts
    the weights for mixed precision but not the inputs: returns the autocast that makes them fit."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise UserError("DeepSpeed ZeRO stage 3 splits the weights, which train.py's EMA and previews read whole; use "
                        "configs/accelerate/fsdp.yaml (FSDP2 full shard) to shard the weights")
    ds.update(train_micro_batch_size_per_gpu=per_process_batch, gradient_accumulation_steps=t.grad_accum,
              gradient_clipping=t.grad_clip)
    ds.pop("train_batch_size", None)  # follows from the above
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, accelerator.device.type, dtype=dtype)


def update_weights(accelerator, params, optimizer, ema: EMA, raw_model, step: int, grad_clip: float) -> torch.Tensor:
    """The step after the backward passes: clip the gradients to norm `grad_clip` (0: no clipping), step the
    optimizer, clear the gradients, update the EMA for optimizer step `step` (1-based). Returns the norm before
    clipping."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # it clipped and stepped inside backward
        norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()  # as it keeps it: no host sync
        grad_norm = torch.as_tensor(math.nan if norm is None else norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards, replicated
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(raw_model, step)
    return grad_norm


def micro_steps(loader, objective, shard: BatchShard, seed: int, first: int, device: torch.device, ahead: bool,
                labels: bool = True, hflip: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
                space=None, task=None, task_space=None, alignment=None, grad_accum: int = 1, encode_features=None):
    """Yields (x1, draw) for micro-steps first, first+1, ...: the data (with its labels when `labels`,
    randomly mirrored with `hflip`, encoded by `space` for latent flow matching; reflow pairs bring their
    noise, semantic data their label maps, REPA's cached features, in a dict as a third element), the spatial
    condition of an image-conditioned `task` (made in `task_space`, the flow's), whether the micro-step is aligned
    (`alignment`, HASTE's stop counted in optimizer steps of `grad_accum` micro-steps) with REPA's target (cached, or
    `encode_features` of the images) and all training randomness.

    Micro-step k's draws come from a generator seeded by (seed, k), the same on every process, so
    they depend neither on the number of processes nor on where training was resumed. With `ahead`
    (one process: collectives must not run from a second thread) micro-step k+1 is prepared in a
    worker thread while k trains, which hides the host time of the data and of the OT solve.
    """

    def prepare(k: int):
        x1, y, *extras = next(loader)
        extras = extras[0] if extras else {}
        x1, y = x1.to(device, non_blocking=True), None if y is None or not labels else y.to(device, non_blocking=True)
        x0 = extras["x0"].to(device, non_blocking=True) if "x0" in extras else None
        generator = seeds.generator("train", seed, k, device=device)
        if hflip:  # drawn for the global batch, like every draw, so that it does not depend on the processes
            flip = shard.local(torch.rand(x1.shape[0] * shard.world, generator=generator, device=device) < 0.5)
            x1 = random_hflip(x1, flip)
            if "label_map" in extras:
                extras["label_map"] = random_hflip(extras["label_map"][:, None].to(device), flip)[:, 0]
            if "align_mirrored" in extras:  # the cached features of the mirrored images
                mirrored = flip[:, None, None, None].cpu()
                extras["align"] = torch.where(mirrored, extras["align_mirrored"], extras["align"])
        aligning = alignment is not None and alignment.active(k // grad_accum)
        align_target = None
        if aligning and "align" in extras:
            align_target = extras["align"].to(device, non_blocking=True)
        elif aligning and encode_features is not None:  # from the pixels, before latent flow matching encodes them
            align_target = encode_features(x1)
        image_cond = None
        if task is not None:  # from the pixels, before latent flow matching encodes them
            image_cond = task.condition(training_measurement(task, x1, extras, seed, k, shard), task_space)
            image_cond = image_cond.contiguous(memory_format=memory_format)
        if space is not None:
            x1 = space.encode(x1, generator)
        x1 = x1.contiguous(memory_format=memory_format)
        draw = objective.draw(x1, y, generator, shard, x0, image_cond)
        draw.aligning, draw.align_target = aligning, align_target
        return x1, draw

    k = first
    if not ahead:
        while True:
            yield prepare(k)
            k += 1
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, k)
        while True:
            ready = pending.result()
            k += 1
            pending = pool.submit(prepare, k)
            yield ready


class RunLog:
    """log.txt (human) and metrics.jsonl (one json line per log step), written by the main process."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled

    def __call__(self, message: str) -> None:
        """Print a message (above the progress bar) and append it to log.txt."""
        if self.enabled:
            tqdm.write(message)
            self._append("log.txt", f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}")

    def metrics(self, step: int, metrics: dict) -> None:
        """A metrics.jsonl row, and for training metrics a short line in log.txt (the console has the progress
        bar)."""
        if self.enabled:
            self._append("metrics.jsonl", json.dumps({"step": step, **metrics}))
            if "loss" not in metrics:
                return
            self._append("log.txt", f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] step {step} loss {metrics['loss']:.5f} "
                                    f"lr {metrics['lr']:.3g} grad_norm {metrics['grad_norm']:.3f} "
                                    f"samples/s {metrics['samples_per_s']:.0f}")

    def _append(self, name: str, line: str) -> None:
        with full_disk(self.run_dir / name), open(self.run_dir / name, "a") as f:
            f.write(line + "\n")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, lists as strings (trackers take scalars only)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return out


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.mixed_precision:
            cfg.train.mixed_precision = args.mixed_precision
        check_names(cfg)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return
        run_dir = Path(args.exp or Path("runs") / (Path(args.config).stem if args.config else "default"))
        train(cfg, run_dir, args.accept_changes)
    except UserError as e:
        exit_on(e)
    except Stopped:
        sys.exit(STOPPED)


if __name__ == "__main__":
    run_main(main)
