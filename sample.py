"""Sample a trained checkpoint with the chosen solver, steps, time schedule and guidance.

    accelerate launch sample.py --weights runs/NAME/checkpoints/step_0400000 --n-samples 50000 --save-dir out/ \\
        [-c runs/NAME/config.yaml] [--solver heun] [--steps 50] [--schedule cosine] [--cfg-scale 1.5] [--seed 0]
    python sample.py --weights runs/default/checkpoints/step_0003000 --n-samples 2000 --save-dir out/moons

Sample k's noise (and its random class label) comes from seed (S, k): image k is the same for any
--bspp and any number of processes. Processes share the missing indices; files are named by global
index and written whole (temporary name, then rename), so an interrupted run continues where it
stopped and every sample is written exactly once. Outputs in --save-dir: images as NNNNNN.png
(uint8, rounded), fields and vectors as NNNNNN.npy; --npz also writes samples.npz (N, H, W, C
uint8, as clean-fid and the ADM evaluator read it) and 2-D data get samples.npy and scatter.png;
--grid K writes grid.png of the first K images (image-conditioned tasks: condition | sample | original per row);
info.json records what was computed (solver, steps,
NFE: velocity evaluations per sample, exact for fixed-grid solvers and the mean over the samples of this run for
adaptive ones, and forward_passes: 2·NFE under guidance; seed, weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from cluster import STOPPED, Stopped, StopRequest, progress, run_main
from config import check_range, load_config
from data import build_source, reference_data, reference_data_config, weights_info
from data.images import save_grid, to_uint8
from data.tasks import cases_from_dataset, cases_from_folder, model_inputs, task_of_meta, task_picture
from errors import UserError, atomic_write, exit_on, on_main_process
from flows import PATHS, check_sampling, sde_sampler, velocity_model
from flows.inverse import check_task_guidance
from flows.latent import build_feature_encoder, build_space
from flows.schedules import parse_schedule
from flows.solvers import (
    ADAPTIVE,
    SDE_SOLVERS,
    check_guidance,
    check_solver,
    check_tolerances,
    class_labels,
    condition,
    fixed_grid_nfe,
    generate,
    noise,
    parse_interval,
    sampler_passes,
)
from models import build_model
from models.checkpoint import load_weights
from registries import check_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample a trained flow-matching checkpoint. Options not given here come from the config's "
                    "sample section (-c, or the checkpoint's own config.yaml), then key.sub=value overrides. SIGTERM "
                    "or Ctrl-C stops after the current batch (exit status 75); the same command continues.",
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a checkpoint folder (runs/NAME/checkpoints/step_N) or a "
                                                    ".safetensors file")
    p.add_argument("-c", "--config", help="config YAML (default: config.yaml beside the weights)")
    p.add_argument("--n-samples", type=int, required=True, help="number of samples N")
    p.add_argument("--save-dir", required=True, help="output folder; re-running continues an interrupted run")
    p.add_argument("--solver", help="euler, midpoint, heun, rk4 (fixed grid) or dopri5, ... (adaptive); "
                                    "SOLVER+LAST takes LAST's step on the last interval: heun+euler never "
                                    "evaluates the velocity at t = 1; euler_maruyama or sde_heun: SDE sampling "
                                    "(affine paths from a Gaussian source)")
    p.add_argument("--diffusion", help="SDE solvers: the diffusion coefficient w(t) of dx = [v + w·score] dt + "
                                       "√(2w) dW: sigma (σ_t, default), constant, sbdm, linear, decreasing, "
                                       "increasing_decreasing (SiT's forms)")
    p.add_argument("--diffusion-norm", type=float, help="SDE solvers: the scale of w(t) (default 1)")
    p.add_argument("--last-step", choices=["mean", "tweedie", "euler"],
                   help="SDE solvers: the noiseless last step (default mean: the drift step; tweedie: E[x1|x_t])")
    p.add_argument("--cfg-interval", metavar="A,B", help="apply guidance only for t in [A, B] (Kynkäänniemi et al. "
                                                         "2024; t = 0 noise), e.g. 0.1,0.7; default 0,1")
    p.add_argument("--steps", type=int, help="intervals of the time grid (fixed-grid solvers; default 100)")
    p.add_argument("--schedule", help="time grid: linear, cosine, polynomial, inverse_cubic, inverse_exp, "
                                      "logit_normal[:mean=M,std=S], edm[:rho=R], sd3_shift[:shift=S]")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w (1: none): v_∅ + w·(v_y − v_∅); "
                                                   "Meta flow_matching's guidance scale is w − 1")
    p.add_argument("--class-labels", nargs="+", metavar="LABEL",
                   help="labels for class-conditional models, cycled over the samples, or 'random' (uniform "
                        "from (seed, k)); default: random")
    p.add_argument("--bspp", type=int, help="batch size per process (does not change the samples)")
    p.add_argument("--seed", type=int, help="base seed S in [0, 2^64): sample k's noise comes from (S, k)")
    p.add_argument("--atol", type=float, help="adaptive solvers' absolute tolerance")
    p.add_argument("--rtol", type=float, help="adaptive solvers' relative tolerance")
    p.add_argument("--raw", action="store_true", help="use the raw weights (model.safetensors), not the EMA")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (N, H, W, C uint8)")
    p.add_argument("--grid", type=int, default=0, metavar="K", help="also write grid.png of the first K samples")
    p.add_argument("--pairs", action="store_true",
                   help="write (noise, sample) pairs for reflow and distillation (data.name=pairs data.path=DIR "
                        "flow.coupling=pairs) into --save-dir, in shards of 1,024, instead of images")
    p.add_argument("--condition-images", metavar="DIR",
                   help="image-conditioned sampling (a model trained with data.task, or --task): sample k from file k "
                        "of DIR in sorted order, the original image (inpaint, superres; superres also takes the "
                        "low-resolution images themselves) or a label map (semantic); default: item k of the run's "
                        "dataset. Latent-CFM models: sample k "
                        "shares the encoder features of image k mod R of DIR (default: c from the prior)")
    p.add_argument("--task", choices=["inpaint", "superres", "semantic"],
                   help="the task to sample (default: the one the model was trained for); on an unconditional model, "
                        "inpaint or superres by a training-free --method")
    p.add_argument("--method", choices=["model", "replace", "pnp", "mean", "bicubic"],
                   help="model (a conditional model; the default for one), replace (training-free inpainting by "
                        "replacement; the default on unconditional models), pnp (PnP-Flow: inpaint or superres from "
                        "an unconditional model, Euler steps), mean or bicubic (baselines without a model)")
    p.add_argument("--masks", metavar="DIR", help="inpaint: mask images (white = missing, black = known) of the "
                                                  "images' size, case k takes mask k mod R (default: drawn per case)")
    p.add_argument("--mask", choices=["mixed", "strokes", "boxes", "center"],
                   help="inpaint without --masks: the masks drawn for case k from (seed, k) (default: the model's "
                        "training masks, or mixed)")
    p.add_argument("--factor", type=int, help="superres on an unconditional model: the downsampling factor "
                                              "(default: the config's data.factor, 4)")
    p.add_argument("--pnp-alpha", type=float, default=0.01, help="PnP-Flow: step sizes γ_n = (1 − t_n)^α")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. sample.atol=1e-6")
    return p.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace):
    """Config (flags over the config's sample section), the weights file and what the data looked like."""
    weights = Path(args.weights)
    if weights.is_dir():
        weights = weights / ("model.safetensors" if args.raw else "ema.safetensors")
    config = Path(args.config) if args.config else weights.parent / "config.yaml"
    if not weights.is_file():
        raise UserError(f"weights {weights} do not exist; give --weights a checkpoint folder or a .safetensors file")
    if not config.is_file():
        raise UserError(f"no config at {config}; give the run's config.yaml with -c")
    cfg = load_config(config, args.overrides)
    check_names(cfg)
    if cfg.flow.objective == "autoencoder":
        raise UserError(f"{weights} is an autoencoder (flow.objective=autoencoder), not a flow; train a latent flow "
                        "model on it and sample that")
    s = cfg.sample
    for key in ("solver", "steps", "schedule", "cfg_scale", "bspp", "seed", "atol", "rtol", "diffusion",
                "diffusion_norm", "last_step"):
        value = getattr(args, key)
        if value is not None:
            setattr(s, "batch_size" if key == "bspp" else key, value)
    if args.cfg_interval is not None:
        s.cfg_interval = parse_interval(args.cfg_interval)
    check_range("sample.seed", s.seed, "--seed")
    if s.steps is None and s.solver not in ADAPTIVE:
        s.steps = 100
    check_solver(s.solver, s.steps)
    check_sampling(cfg)
    if s.solver in ADAPTIVE:
        check_tolerances(s.atol, s.rtol)
    parse_schedule(s.schedule)
    if args.n_samples <= 0:
        raise UserError(f"--n-samples must be positive, got {args.n_samples}")
    if s.batch_size <= 0:
        raise UserError(f"--bspp must be positive, got {s.batch_size}")
    return cfg, weights, weights_info(weights, cfg)


def file_of(save_dir: Path, k: int, kind: str) -> Path:
    return save_dir / f"{k:06d}.{'png' if kind == 'image' else 'npy'}"


def write_sample(path: Path, x: torch.Tensor, kind: str, meta: dict[str, str]) -> None:
    """One sample, written whole: images as uint8 PNG; fields in their own units and vectors as .npy."""
    from PIL import Image

    if kind == "image":
        array = to_uint8(x).permute(1, 2, 0).numpy()
        atomic_write(path, Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save)
    else:
        if kind == "field":
            mean, std = torch.tensor(json.loads(meta["field_mean"])), torch.tensor(json.loads(meta["field_std"]))
            x = x * std[:, None, None] + mean[:, None, None]
        atomic_write(path, lambda tmp: np.save(tmp, x.numpy()))


def read_sample(path: Path) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(path)) if path.suffix == ".png" else np.load(path)


def write_npz(save_dir: Path, n: int, kind: str) -> Path:
    """samples.npz with arr_0 (N, H, W, C) uint8, streamed one image at a time (never all in memory)."""
    first = read_sample(file_of(save_dir, 0, kind))
    shape = (n, *first.shape[:2], first.shape[2] if first.ndim == 3 else 1)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive, \
                archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for k in range(n):
                f.write(read_sample(file_of(save_dir, k, kind)).astype(np.uint8).reshape(shape[1:]).tobytes())

    atomic_write(save_dir / "samples.npz", write)
    return save_dir / "samples.npz"


def reference_features(args, cfg, meta: dict, device: torch.device) -> torch.Tensor | None:
    """Features of --condition-images under the Latent-CFM model's frozen encoder (R, F), or None."""
    if not args.condition_images:
        return None
    if "feature_dim" not in meta:
        raise UserError("--condition-images conditions Latent-CFM models (trained with latentcfm.encoder); this "
                        "model is not one")
    from data.images import to_model_range
    from metrics.fid import read_image_folder

    folder, data_shape = Path(args.condition_images), tuple(json.loads(meta["data_shape"]))
    if not folder.is_dir():
        raise UserError(f"--condition-images {folder} is not a folder of images")
    images = read_image_folder(folder)
    if tuple(images.shape[1:]) != data_shape:
        raise UserError(f"--condition-images {folder} holds images of shape {tuple(images.shape[1:])} but the model "
                        f"was trained on {data_shape}; give images of the training data's size and channels")
    encoder = build_feature_encoder(cfg, data_shape).to(device)
    return encoder(to_model_range(images).to(device))


def write_pairs(args, cfg, accelerator, model, weights: Path, meta: dict, shape: tuple[int, ...], labels, source,
                dtype: torch.dtype, what: str) -> None:
    """--pairs: the noise x0 of items 0..N-1 and the teacher's samples x1 from it (and the labels), in shards of
    pairs.SHARD written whole by the processes in turn; pairs.json, written last, says what made them."""
    from safetensors.torch import save_file

    from data.latents import file_sha256
    from data.pairs import SHARD, STARTED, check_settings, shard_count, shard_path

    s, n, folder = cfg.sample, args.n_samples, Path(args.save_dir)
    if cfg.latent.autoencoder or "feature_dim" in meta:
        raise UserError("--pairs makes pixel-space pairs of an unconditioned flow; this model is a latent or a "
                        "Latent-CFM flow")
    steps = s.steps if s.solver not in ADAPTIVE else None
    # What makes the pairs: one teacher and one sampler per folder, recorded before the first shard.
    settings = {"n": n, "shape": list(shape), "teacher_sha256": file_sha256(weights).hexdigest(), "solver": s.solver,
                "steps": steps, "schedule": s.schedule if steps else None, "atol": None if steps else s.atol,
                "rtol": None if steps else s.rtol, "cfg_scale": s.cfg_scale, "cfg_interval": list(s.cfg_interval),
                "seed": s.seed, "class_labels": args.class_labels or "random",
                "sde": [s.diffusion, s.diffusion_norm, s.last_step] if s.solver in SDE_SOLVERS else None}
    started = on_main_process(accelerator, partial(check_settings, folder, settings))
    if accelerator.is_main_process and not started:
        atomic_write(folder / STARTED, lambda tmp: tmp.write_text(json.dumps(settings, indent=1)))
    missing = [k for k in range(shard_count(n)) if not shard_path(folder, k).exists()]
    accelerator.wait_for_everyone()
    mine = missing[accelerator.process_index::accelerator.num_processes]
    if accelerator.is_main_process:
        print(f"{weights}: {n} pairs in {shard_count(n)} shards ({shard_count(n) - len(missing)} already in "
              f"{folder}), {what}, {accelerator.num_processes} process(es) on {accelerator.device}")
    bar = progress(sum(min(SHARD, n - k * SHARD) for k in mine), unit="pair", desc="pairs",
                   disable=not accelerator.is_main_process)
    with StopRequest() as stop:
        for slot in range(-(-len(missing) // accelerator.num_processes)):  # the same count on every process
            if slot < len(mine):
                k = mine[slot]
                items = list(range(k * SHARD, min(n, (k + 1) * SHARD)))
                x0s, x1s = [], []
                for first in range(0, len(items), s.batch_size):
                    batch = items[first: first + s.batch_size]
                    x0 = noise(s.seed, batch, shape, source)
                    y = None if labels is None else labels[batch].to(accelerator.device)
                    out = generate(model, x0.to(accelerator.device, dtype), steps, s.solver, y=y,
                                   schedule=s.schedule, cfg_scale=s.cfg_scale, atol=s.atol, rtol=s.rtol,
                                   sde=sde_sampler(cfg, s.solver, s.seed, batch), cfg_interval=tuple(s.cfg_interval))
                    x0s.append(x0.float())
                    x1s.append(out.x.float().cpu())
                    bar.update(len(batch))
                tensors = {"x0": torch.cat(x0s), "x1": torch.cat(x1s)}
                if labels is not None:
                    tensors["y"] = labels[items].clone()
                atomic_write(shard_path(folder, k), lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
            if stop.now(accelerator) and slot + 1 < -(-len(missing) // accelerator.num_processes):
                bar.close()
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    done = sum(shard_path(folder, k).exists() for k in range(shard_count(n)))
                    print(f"stopped by {stop.name}: {done} of {shard_count(n)} shards in {folder}; run the same "
                          "command to continue", file=sys.stderr)
                raise Stopped
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The data the pairs stand for: the teacher's, or its own teacher's for k-rectified chains.
        teacher_data = dataclasses.asdict(reference_data_config(cfg))
        manifest = {**settings, "shard_size": SHARD, "num_classes": int(meta["num_classes"]), "kind": meta["kind"],
                    "teacher": str(weights.resolve()), "nfe": fixed_grid_nfe(s.solver, steps) if steps else None,
                    "teacher_data": teacher_data, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(folder / "pairs.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        (folder / STARTED).unlink(missing_ok=True)  # pairs.json says it all now
        print(f"done: {n} pairs in {folder} ({what})")


def write_missing(accelerator, save_dir: Path, n: int, kind: str, meta: dict, batch_size: int, header: str,
                  what: str, desc: str, make) -> list[float]:
    """Samples 0..n-1 that save_dir does not hold yet, shared out over the processes, made by make(batch) ->
    (samples on the CPU, velocity evaluations summed over the batch) and written whole. Every process lists what is
    missing before any writes, and runs as many batches (its last ones maybe empty), so that all agree on a stop.
    Returns [velocity evaluations, samples made], summed over the processes."""
    missing = [k for k in range(n) if not file_of(save_dir, k, kind).exists()]
    accelerator.wait_for_everyone()
    mine = missing[accelerator.process_index::accelerator.num_processes]
    if accelerator.is_main_process:
        print(f"{header} ({n - len(missing)} already in {save_dir}), {what}, {accelerator.num_processes} "
              f"process(es) on {accelerator.device}")
    bar = progress(len(mine), unit="sample", desc=desc, disable=not accelerator.is_main_process)
    nfe, start = torch.zeros(2, dtype=torch.float64, device=accelerator.device), time.perf_counter()
    share = -(-len(missing) // accelerator.num_processes)
    with StopRequest() as stop:
        for first in range(0, share, batch_size):
            batch = mine[first: first + batch_size]
            if batch:
                samples, calls = make(batch)
                nfe += torch.tensor([calls, len(batch)], dtype=torch.float64, device=accelerator.device)
                for k, x in zip(batch, samples):
                    write_sample(file_of(save_dir, k, kind), x, kind, meta)
                bar.update(len(batch))
                bar.set_postfix(samples_s=f"{bar.n / (time.perf_counter() - start):.1f}",
                                nfe=f"{calls / len(batch):g}")
            if stop.now(accelerator) and first + batch_size < share:
                bar.close()
                accelerator.wait_for_everyone()  # every process has written its batch
                if accelerator.is_main_process:
                    done = sum(file_of(save_dir, k, kind).exists() for k in range(n))
                    print(f"stopped by {stop.name}: {done} of {n} samples in {save_dir}; run the same command to "
                          "continue", file=sys.stderr)
                raise Stopped
    bar.close()
    return accelerator.reduce(nfe, "sum").tolist()


def resolve_task(args, cfg, meta: dict):
    """The image-conditioned task to sample and its method, or (None, None): the model's own task (a model trained
    with data.task), or --task on an unconditional model with a training-free method."""
    from flows.inverse import check_method, choose_task

    trained = task_of_meta(meta)
    if args.task is None and trained is None:
        for flag in ("method", "masks", "mask", "factor"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} belongs to image-conditioned sampling; give --task inpaint or superres "
                                "(or sample a model trained with data.task)")
        return None, None
    if args.pairs or "feature_dim" in meta or cfg.flow.objective != "cfm":
        raise UserError("image-conditioned sampling (--task) takes a flow-matching model of images, without --pairs, "
                        "Latent-CFM or MeanFlow")
    if meta["kind"] != "image":
        raise UserError(f"--task {args.task} needs a model of images; this one makes {meta['kind']}s")
    if args.mask and args.masks:
        raise UserError("give either --masks DIR (your masks) or --mask KIND (drawn ones), not both")
    task, method = choose_task(trained, args.task, args.method, args.mask, args.factor, cfg.data.factor,
                               tuple(json.loads(meta["data_shape"])))
    check_method(method, task, trained is not None, cfg.sample.solver, cfg.flow.path)
    return task, method


def sample_task(args, cfg, accelerator, model, weights: Path, meta: dict, task, method: str, space, save_dir: Path,
                what: str) -> None:
    """Image-conditioned samples: case k's measurement (from file k of --condition-images, its mask from --masks or
    (seed, k)) and noise (seed, k), enforced (known pixels pasted back, block means restored) and written as
    NNNNNN.png; info.json adds the task, the method and the measurement error. Resumes like plain sampling."""
    from flows.inverse import restore

    s, n = cfg.sample, args.n_samples
    image_shape = tuple(json.loads(meta["data_shape"]))
    if args.condition_images:
        cases = cases_from_folder(task, args.condition_images, image_shape, n, args.masks,
                                  getattr(task, "mask", "mixed"), s.seed)
    else:  # items 0..N-1 of the run's own dataset, as evaluate.py takes them
        cases = cases_from_dataset(task, reference_data(cfg), n, args.masks, getattr(task, "mask", "mixed"), s.seed)
    steps = s.steps if s.solver not in ADAPTIVE else None
    largest = torch.zeros(1, dtype=torch.float64, device=accelerator.device)  # measurement error, uint8 levels

    def make(batch: list[int]) -> tuple[torch.Tensor, float]:
        m = cases.measurement(batch).to(accelerator.device)
        x, nfe = restore(model, task, m, space, PATHS[cfg.flow.path](cfg), method, s.seed, batch, steps, s.solver,
                         s.schedule, s.cfg_scale, args.pnp_alpha, s.atol, s.rtol)
        x = task.enforce(x, m)
        if task.name != "semantic":
            largest.clamp_(min=task.consistency(to_uint8(x).float() / 127.5 - 1, m).max().item())
        return x.cpu(), nfe * len(batch)

    nfe, count = write_missing(accelerator, save_dir, n, "image", meta, s.batch_size, f"{weights}: {n} samples",
                               f"{task.describe()}, method {method}, {what}", task.name, make)
    error = accelerator.reduce(largest, "max").item()
    if accelerator.is_main_process:
        if args.grid:
            k = list(range(min(args.grid, n)))
            samples = torch.stack([torch.from_numpy(read_sample(file_of(save_dir, i, "image"))) for i in k])
            samples = samples[:, None] if samples.dim() == 3 else samples.permute(0, 3, 1, 2)
            m = cases.measurement(k)
            columns = [to_uint8(task_picture(task, m, image_shape[0])), samples]
            if cases.original(k) is not None:
                columns.append(to_uint8(cases.original(k)))
            save_grid(torch.stack(columns, 1).flatten(0, 1), save_dir / "grid.png", rows=len(k))
        info = {"weights": str(weights), "n_samples": n, "task": task.name, "method": method,
                "mask": getattr(task, "mask", None) if task.name == "inpaint" and not args.masks else None,
                "masks": args.masks, "factor": getattr(task, "factor", None), "condition": args.condition_images,
                "solver": s.solver, "steps": steps, "schedule": s.schedule if steps else None,
                "nfe": nfe / count if count else None, "cfg_scale": s.cfg_scale, "seed": s.seed,
                "pnp_alpha": args.pnp_alpha if method == "pnp" else None,
                "measurement_error_uint8": None if task.name == "semantic" else error,
                "processes": accelerator.num_processes, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        (save_dir / "info.json").write_text(json.dumps(info, indent=1))
        told = "" if task.name == "semantic" else f", largest measurement error {error:g} uint8 levels"
        print(f"done: {n} samples in {save_dir} ({task.describe()}, method {method}, NFE {info['nfe']:g}{told})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sample(args)
    except UserError as e:
        exit_on(e)
    except Stopped:
        sys.exit(STOPPED)


def sample(args: argparse.Namespace) -> None:
    cfg, weights, meta = resolve(args)
    s, n = cfg.sample, args.n_samples
    # The flow's state: the data, or the latents of a frozen autoencoder that `space` decodes.
    shape, num_classes, kind = tuple(json.loads(meta.get("latent_shape", meta["data_shape"]))), \
        int(meta["num_classes"]), meta["kind"]
    labels = class_labels(args.class_labels, n, num_classes, s.seed)
    task, method = resolve_task(args, cfg, meta)
    if task is None:
        check_guidance(s.cfg_scale, num_classes, float(meta.get("label_dropout", cfg.flow.label_dropout)),
                       float(meta.get("meanflow_cfg", 1)))
    else:
        check_task_guidance(s.cfg_scale, method, float(meta.get("cond_dropout", 0)))  # over the spatial condition

    # Processes and output folder.
    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu_multiprocess)
    save_dir = Path(args.save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"save dir {save_dir} is not writable ({e.strerror}); choose another --save-dir") from None
    # Model and source.
    trained_task = task_of_meta(meta)
    model = build_model(cfg, shape, num_classes, int(meta.get("feature_dim", 0)),
                        **model_inputs(trained_task, shape[0]))
    load_weights(model, weights)
    # Vectors are integrated in float64: float32 matrix products differ in the last bit with the batch size,
    # which would make sample k depend on --bspp; images are rounded to uint8, which absorbs those bits.
    dtype = torch.float64 if kind == "vector" else torch.float32
    model = velocity_model(model.to(accelerator.device, dtype).eval(), cfg)
    source = None if cfg.data.source == "gaussian" else build_source(cfg, shape)
    references = None if task is not None else reference_features(args, cfg, meta, accelerator.device)
    space = build_space(cfg, tuple(json.loads(meta["data_shape"]))).to(accelerator.device)
    steps = s.steps if s.solver not in ADAPTIVE else None
    what = (f"{s.solver}, {f'{steps} steps, {s.schedule} schedule' if steps else f'atol {s.atol}, rtol {s.rtol}'}, "
            f"cfg scale {s.cfg_scale}, seed {s.seed}"
            + (f", {s.diffusion} diffusion ×{s.diffusion_norm:g}, {s.last_step} last step" if s.solver in SDE_SOLVERS
               else "") + (f", guidance for t in {list(s.cfg_interval)}" if tuple(s.cfg_interval) != (0, 1) else ""))
    if task is not None:
        sample_task(args, cfg, accelerator, model, weights, meta, task, method, space, save_dir, what)
        accelerator.end_training()
        return
    if args.pairs:
        write_pairs(args, cfg, accelerator, model, weights, meta, shape, labels, source, dtype, what)
        accelerator.end_training()
        return

    def make(batch: list[int]) -> tuple[torch.Tensor, float]:
        x0 = noise(s.seed, batch, shape, source).to(accelerator.device, dtype)
        y = None if labels is None else labels[batch].to(accelerator.device)
        out = generate(model, x0, steps, s.solver, y=y, schedule=s.schedule, cfg_scale=s.cfg_scale,
                       atol=s.atol, rtol=s.rtol, cond=condition(model, s.seed, batch, references),
                       sde=sde_sampler(cfg, s.solver, s.seed, batch), cfg_interval=tuple(s.cfg_interval))
        calls = out.nfe * len(batch) if out.sample_nfe is None else out.sample_nfe.sum().item()
        return space.decode(out.x).float().cpu(), calls  # vectors: float64 rounded to float32

    nfe = write_missing(accelerator, save_dir, n, kind, meta, s.batch_size, f"{weights}: {n} samples", what,
                        "sampling", make)  # velocity evaluations and samples, over the processes

    # Collected outputs, from the files (the same whoever wrote them).
    if accelerator.is_main_process:
        written = [file_of(save_dir, k, kind) for k in range(n)]
        if kind == "vector":
            points = np.stack([read_sample(p) for p in written])
            np.save(save_dir / "samples.npy", points)
            from data.toy import TOY, plot_points

            data = reference_data(cfg).x[:n] if reference_data_config(cfg).name in TOY else \
                torch.empty(0, points.shape[1])
            plot_points(torch.from_numpy(points), data, save_dir / "scatter.png", title=f"{n} samples, {what}")
        if args.npz and kind == "image":
            print(f"wrote {write_npz(save_dir, n, kind)}")
        if args.grid and kind == "image":
            images = [torch.from_numpy(read_sample(p)) for p in written[: args.grid]]
            images = torch.stack([x[None] if x.dim() == 2 else x.permute(2, 0, 1) for x in images])
            save_grid(images, save_dir / "grid.png", rows=max(1, round(len(images) ** 0.5)))
        info = {"weights": str(weights), "n_samples": n, "solver": s.solver, "steps": steps,
                "schedule": s.schedule if steps else None,
                "nfe": fixed_grid_nfe(s.solver, steps) if steps else (nfe[0] / nfe[1] if nfe[1] else None),
                "cfg_scale": s.cfg_scale, "seed": s.seed, "atol": s.atol if not steps else None,
                "rtol": s.rtol if not steps else None, "class_labels": args.class_labels or "random",
                "processes": accelerator.num_processes,
                "condition": args.condition_images or ("prior" if "feature_dim" in meta else None),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        if s.solver in SDE_SOLVERS:
            info.update(diffusion=s.diffusion, diffusion_norm=s.diffusion_norm, last_step=s.last_step)
        interval = tuple(s.cfg_interval)
        if interval != (0, 1):
            info["cfg_interval"] = list(interval)
        info["forward_passes"] = None if info["nfe"] is None else \
            sampler_passes(info["nfe"], s.cfg_scale, s.solver, steps, s.schedule, interval)
        (save_dir / "info.json").write_text(json.dumps(info, indent=1))
        passes = f", {info['forward_passes']:g} forward passes" if s.cfg_scale != 1 and info["nfe"] else ""
        print(f"done: {n} samples in {save_dir} ({what}, NFE {info['nfe']}{passes})")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
