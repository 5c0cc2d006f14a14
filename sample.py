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
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cluster
from cluster import STOPPED, Stopped, run_main
from config import load_config
from data import build_source, reference_data, reference_data_config, weights_info
from data.images import save_grid, to_uint8
from data.pairs import write_pairs
from data.samples import file_of, read_images, read_sample, write_missing, write_npz
from data.tasks import cases_from_dataset, cases_from_folder, task_of_meta, task_picture
from errors import UserError, exit_on, writable_folder
from flows import PATHS, SDE_SOLVERS
from flows.inverse import check_task_guidance
from flows.latent import build_space, reference_features
from flows.sampling import (
    check_model_guidance,
    describe,
    draw,
    evaluations,
    guidance_flags,
    guidance_for,
    guidance_key,
    sampling_model,
    settle,
    skipped,
)
from flows.solvers import ADAPTIVE, class_labels, fixed_grid_nfe, sampler_passes
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
                                    "(affine paths from a Gaussian source); meanflow (MeanFlow, AlphaFlow) or "
                                    "shortcut (shortcut models): one jump per step, --steps N network calls")
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
    guidance_flags(p)
    return p.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace):
    """Config (flags over the config's sample section, checked), the weights file and what the data looked like."""
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
    sampler = settle(cfg, args)[0]
    if args.n_samples <= 0:
        raise UserError(f"--n-samples must be positive, got {args.n_samples}")
    return cfg, sampler, weights, weights_info(weights, cfg)


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
            m = cases.measurement(k)
            columns = [to_uint8(task_picture(task, m, image_shape[0])), read_images(save_dir, k)]
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
    # Checkpoint, sampler and what the samples are: the flow's state is the data, or the latents of a frozen
    # autoencoder that `space` decodes.
    cfg, sampler, weights, meta = resolve(args)
    s, n = cfg.sample, args.n_samples
    shape, num_classes, kind = tuple(json.loads(meta.get("latent_shape", meta["data_shape"]))), \
        int(meta["num_classes"]), meta["kind"]
    labels = class_labels(args.class_labels, n, num_classes, s.seed)
    task, method = resolve_task(args, cfg, meta)
    if task is not None and s.guidance != "cfg":
        raise UserError(f"--guidance {s.guidance} is not offered for image-conditioned sampling; guide over the "
                        "spatial condition with --guidance cfg")
    if task is not None:
        check_task_guidance(s.cfg_scale, method, float(meta.get("cond_dropout", 0)))  # over the spatial condition
    elif s.guidance != "auto":  # the rules that take the model's own unconditional velocity
        check_model_guidance(cfg, meta, s.cfg_scale, s.guidance)

    # Processes and output folder.
    accelerator = cluster.accelerator()
    device, save_dir = accelerator.device, Path(args.save_dir)
    writable_folder(save_dir, "save dir", "choose another --save-dir")

    # Model, source and condition.
    model = sampling_model(cfg, weights, meta, device)
    dtype = torch.float64 if kind == "vector" else torch.float32
    source = None if cfg.data.source == "gaussian" else build_source(cfg, shape)
    references = None if task is not None else reference_features(args.condition_images, cfg, meta, device)
    space = build_space(cfg, tuple(json.loads(meta["data_shape"]))).to(device)
    steps, what, skip = sampler.steps, describe(cfg), skipped(cfg, sampler, s.cfg_scale)
    # Guidance, with autoguidance's weaker model and its FLOPs per pass over the model's.
    guidance, guide_cost = guidance_for(cfg, sampler, s.cfg_scale, meta, model, device, dtype)

    # Samples: image-conditioned, reflow pairs, or plain, each written whole and continued where a run stopped.
    if task is not None:
        sample_task(args, cfg, accelerator, model, weights, meta, task, method, space, save_dir, what)
        accelerator.end_training()
        return
    if args.pairs:
        if cfg.latent.autoencoder or "feature_dim" in meta:
            raise UserError("--pairs makes pixel-space pairs of an unconditioned flow; this model is a latent or a "
                            "Latent-CFM flow")
        from data.latents import file_sha256

        # What makes the pairs: one teacher and one sampler per folder, recorded before the first shard.
        settings = {"n": n, "shape": list(shape), "teacher_sha256": file_sha256(weights).hexdigest(),
                    "solver": s.solver, "steps": steps, "schedule": s.schedule if steps else None,
                    "atol": None if steps else s.atol, "rtol": None if steps else s.rtol, "cfg_scale": s.cfg_scale,
                    "cfg_interval": list(s.cfg_interval), "seed": s.seed, "class_labels": args.class_labels or "random",
                    "sde": [s.diffusion, s.diffusion_norm, s.last_step] if s.solver in SDE_SOLVERS else None}
        if guidance is not None:  # recorded only when another rule than CFG guides (folders made before agree)
            settings["guidance"] = guidance_key(cfg, sampler)
        # The data the pairs stand for: the teacher's, or its own teacher's for k-rectified chains.
        about = {"num_classes": num_classes, "kind": kind, "teacher": str(weights.resolve()),
                 "nfe": fixed_grid_nfe(s.solver, steps - skip) if steps else None,
                 "teacher_data": dataclasses.asdict(reference_data_config(cfg))}

        def pair(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x0, out = draw(model, sampler, cfg, s.seed, batch, shape, device, dtype, source, labels, s.cfg_scale,
                           s.cfg_interval, guidance=guidance)
            return x0.float(), out.x.float().cpu()

        write_pairs(accelerator, save_dir, settings, about, s.batch_size, pair, labels, str(weights), what)
        accelerator.end_training()
        return

    def make(batch: list[int]) -> tuple[torch.Tensor, float]:
        _, out = draw(model, sampler, cfg, s.seed, batch, shape, device, dtype, source, labels, s.cfg_scale,
                      s.cfg_interval, references, guidance)
        return space.decode(out.x).float().cpu(), evaluations(out, len(batch))  # vectors: float64 to float32

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
            images = read_images(save_dir, list(range(min(args.grid, n))))
            save_grid(images, save_dir / "grid.png", rows=max(1, round(len(images) ** 0.5)))
        info = {"weights": str(weights), "n_samples": n, "solver": s.solver, "steps": steps,
                "schedule": s.schedule if steps else None,
                "nfe": fixed_grid_nfe(s.solver, steps - skip) if steps else (nfe[0] / nfe[1] if nfe[1] else None),
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
            sampler_passes(info["nfe"], 1 if "meanflow_cfg_range" in meta else s.cfg_scale, s.solver, steps,
                           s.schedule, interval, skip)  # guidance as an input: one pass per evaluation
        if guidance is not None:
            info["guidance"] = guidance_key(cfg, sampler)
        if guide_cost is not None and info["nfe"]:  # the guide's passes, each costing guide_cost of the model's
            info.update(guide_cost=guide_cost, main_pass_equivalents=info["nfe"] + (info["forward_passes"]
                                                                                  - info["nfe"]) * guide_cost)
        (save_dir / "info.json").write_text(json.dumps(info, indent=1))
        passes = f", {info['forward_passes']:g} forward passes" if s.cfg_scale != 1 and info["nfe"] else ""
        print(f"done: {n} samples in {save_dir} ({what}, NFE {info['nfe']}{passes})")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
