"""FID report of a run: every checkpoint × sampler (solver, steps, schedule) × guidance scale, protocol recorded.

    accelerate launch evaluate.py -e runs/NAME [--checkpoints all|last|STEP,...] [--samplers euler:10,heun:25,dopri5]
        [--n-samples 50000] [--ref NAME[:SPLIT]|FOLDER|FILE.npz] [--mode clean] [--kid] [--pr] [--bpd] [--seed 0]
        [--bspp 256]
    python evaluate.py -e runs/mnist --samplers euler:10,rk4:2,midpoint:8:cosine --n-samples 1000 \\
        --ref ../shared/data/mnist/t10k-fid-stats-clean.npz
    python evaluate.py --folder samples/ --ref cifar10:train             # images made elsewhere

For each row, N samples are generated in memory with the same `generate` and per-sample noise as
sample.py (sample k from seed (S, k), shared out over the processes), turned into uint8 images and
scored with clean-fid's Inception features against the reference: clean-fid's precomputed statistics
by name (cifar10:train, ffhq, ... downloaded on first use), a folder of images or an .npz (statistics
mu/sigma, or images arr_0), or by default the run's own dataset, whose statistics are computed once
and cached in --stats-dir. 2-D runs get W2 (exact OT) and MMD to N dataset points instead.

A sampler is SOLVER[:STEPS][:SCHEDULE]: euler:10, heun:25:cosine, rk4:4:logit_normal:mean=0,std=1,
dopri5 (adaptive: no steps; tolerances from --atol/--rtol). NFE is exact for fixed-grid solvers and
the mean number of model calls per batch for adaptive ones.

Results go to RUN/eval/: report.json (one row per protocol, with every setting, NFE, seconds and
library versions), report.csv, report.md (a table per protocol, best row marked) and fid.png (metric
against training step per sampler, and against NFE per checkpoint). A row already in report.json is
not recomputed (ask for --kid, --pr or --bpd and rows without them are); each row is added when done, so an
interrupted evaluation continues where it stopped; the report is written under a lock and atomically.

Offline: clean-fid's Inception network is read from /tmp/inception-2015-12-05.pt (clean-fid's own
location); without network copy the file there first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import cluster
from cluster import STOPPED, Stopped, StopRequest, run_main
from config import load_config
from data import build_source, reference_data, reference_data_config, reference_points, weights_info
from data.images import read_image_folder, to_uint8
from errors import UserError, exit_on, on_main_process
from flows.latent import build_space
from flows.likelihood import bits_per_dim
from flows.sampling import (
    check_model_guidance,
    guidance_flags,
    guidance_for,
    guidance_of,
    parse_samplers,
    passes_of,
    sample_row,
    sampling_key,
    sampling_model,
    settle,
    skipped,
)
from flows.solvers import ADAPTIVE, class_labels
from metrics import build_features, fid, mmd, w2
from metrics.fid import CLEANFID_NAMES, MODES, image_metrics
from metrics.report import Report, key_of, metric_of, sampling_protocol, versions
from metrics.tasks import evaluate_task
from models.checkpoint import select_checkpoints

__all__ = ["Report", "parse_samplers"]  # read from here by tests (and users) who script evaluations


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FID (or, for 2-D data, W2 and MMD) of every checkpoint of a run for every sampler setting, as a "
                    "report in RUN/eval/ that records the whole protocol. SIGTERM or Ctrl-C stops after the current "
                    "batch with the finished rows kept (exit status 75); the same command continues.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--exp", help="run folder (with checkpoints/step_N)")
    p.add_argument("--folder", help="score the images in this folder instead of a run (needs --ref)")
    p.add_argument("--checkpoints", default="all", help="all, last, or training steps: 5000,10000 (default: all)")
    p.add_argument("--samplers", nargs="+", help="SOLVER[:STEPS][:SCHEDULE], comma-separated or several; "
                                                 "SOLVER+LAST ends with LAST's step, e.g. heun+euler:8:cosine "
                                                 "(default: the config's sample section)")
    p.add_argument("--cfg-scale", dest="cfg_scales", metavar="CFG_SCALE", type=float, nargs="+",
                   help="guidance scales (class-conditional models; default 1)")
    p.add_argument("--cfg-interval", metavar="A,B", help="guidance only for t in [A, B] (default: the config's, 0,1)")
    p.add_argument("--diffusion", help="SDE samplers (euler_maruyama, sde_heun): the diffusion coefficient "
                                       "(default: the config's sample.diffusion, sigma)")
    p.add_argument("--diffusion-norm", type=float, help="SDE samplers: its scale (default: the config's, 1)")
    p.add_argument("--last-step", choices=["mean", "tweedie", "euler"], help="SDE samplers: the noiseless last "
                                                                             "step (default: the config's, mean)")
    p.add_argument("--weights", choices=("ema", "raw", "both"), default="ema", help="EMA weights (default) or raw")
    p.add_argument("--n-samples", type=int, default=50_000, help="samples per row (default 50000)")
    p.add_argument("--ref", help="clean-fid dataset NAME[:SPLIT] (" + ", ".join(CLEANFID_NAMES) + "), a folder of "
                                 "images or an .npz (mu/sigma or arr_0 images); default: the run's dataset")
    p.add_argument("--mode", default="clean", choices=MODES, help="clean-fid mode (default clean)")
    p.add_argument("--features", default="inception", help="inception (FID) or pixels (a fast stand-in for tests)")
    p.add_argument("--kid", action="store_true", help="also kernel inception distance (mean ± std over subsets)")
    p.add_argument("--pr", action="store_true", help="also precision and recall (Kynkäänniemi et al. 2019, k = 3, "
                                                     "against as many reference images as samples): fidelity and "
                                                     "diversity; needs the reference's features")
    p.add_argument("--bpd", action="store_true", help="also bits per dimension of --bpd-n dataset items")
    p.add_argument("--bpd-n", type=int, default=1000, help="data items for --bpd (default 1000)")
    p.add_argument("--bpd-tol", type=float, default=1e-5, help="dopri5 tolerance of --bpd (default 1e-5)")
    p.add_argument("--seed", type=int, default=0, help="base seed S in [0, 2^64): sample k's noise comes from (S, k)")
    p.add_argument("--bspp", type=int, default=256, help="batch size per process (does not change fixed-grid samples)")
    p.add_argument("--atol", type=float, help="adaptive solvers' absolute tolerance (default: the config's)")
    p.add_argument("--rtol", type=float, help="adaptive solvers' relative tolerance (default: the config's)")
    p.add_argument("--stats-dir", default=str(fid.default_stats_dir()), help="cache of reference statistics "
                                                                         "(default %(default)s)")
    p.add_argument("--out", help="report folder (default RUN/eval)")
    task = p.add_argument_group("image-conditioned tasks", "score a task on the first N items of the run's dataset "
                                "(fixed cases: case k's mask and noise from (seed, k)): FID of the outputs against "
                                "--ref, PSNR and SSIM against the originals, the measurement error, NFE and seconds "
                                "per image")
    task.add_argument("--task", choices=["inpaint", "superres", "semantic"],
                      help="the task (default: the one the run's model was trained for, if any)")
    task.add_argument("--method", default=None, choices=["model", "replace", "pnp", "mean", "bicubic"],
                      help="model (a conditional run's), replace or pnp (training-free, on an unconditional run), "
                           "mean or bicubic (baselines: one row, no checkpoint)")
    task.add_argument("--mask", choices=["mixed", "strokes", "boxes", "center"],
                      help="inpaint: the masks of the cases (default: the model's training masks, or mixed)")
    task.add_argument("--factor", type=int, help="superres: the downsampling factor (default: the run's data.factor)")
    task.add_argument("--pnp-alpha", type=float, default=0.01, help="PnP-Flow: step sizes (1 − t_n)^α (default 0.01)")
    guidance_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    versions()  # the commit and libraries this evaluation starts with, recorded in each of its rows
    try:
        if args.folder:
            score_folder(args)
        else:
            with StopRequest() as stop:
                evaluate(args, stop)
    except UserError as e:
        exit_on(e)
    except Stopped:
        sys.exit(STOPPED)


def score_folder(args: argparse.Namespace) -> None:
    """FID (and KID) of images made elsewhere against --ref, printed; with --out also added to a report."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"--folder {folder} is not a folder of images")
    if not args.ref:
        raise UserError("--folder needs --ref: a clean-fid dataset name, a folder of images or an .npz")
    start = time.perf_counter()
    images = read_image_folder(folder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_features(args.features, args.mode, device)
    reference = fid.load_reference(args.ref, extractor, tuple(images.shape[-2:]), Path(args.stats_dir),
                                   need_features=args.kid or args.pr)
    features = extractor(images)
    row = {"step": None, "weights": None, "solver": str(folder), "steps": None, "schedule": None, "atol": None,
           "rtol": None, "cfg_scale": 1.0, "nfe": None, "n_samples": len(images), "seed": None,
           "reference": reference.name, "mode": args.mode, "features": extractor.key}
    row.update(image_metrics(features, reference, args.kid, args.seed, args.pr))
    row.update(seconds=time.perf_counter() - start, versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
               protocol=f"{len(images)} images of {folder}, {extractor.description}")
    kid = f", KID {row['kid']:.5f} ± {row['kid_std']:.5f}" if args.kid else ""
    pr = f", precision {row['precision']:.3f}, recall {row['recall']:.3f}" if args.pr else ""
    print(f"{folder}: {len(images)} images, FID {row['fid']:.3f}{kid}{pr} against {reference.name}")
    if args.out:
        Report(Path(args.out)).add(row)


def open_run(args: argparse.Namespace):
    """The run, its checkpoints, the newest one's config (its sample section settled with the flags), the samplers
    and the newest weights' metadata."""
    if not args.exp:
        raise UserError("give a run folder with -e RUN_DIR, or images with --folder DIR --ref REFERENCE")
    run = Path(args.exp)
    if not run.is_dir():
        raise UserError(f"run dir {run} does not exist; give the folder train.py wrote (-e)")
    checkpoints = select_checkpoints(run, args.checkpoints)
    if args.n_samples < 2 or args.bspp <= 0 or args.bpd_n <= 0:
        raise UserError("--n-samples must be at least 2, and --bspp and --bpd-n positive")
    cfg = load_config(checkpoints[-1][1] / "config.yaml")
    if cfg.flow.objective == "autoencoder":
        raise UserError(f"run {run} trained an autoencoder (flow.objective=autoencoder), not a flow; train a latent "
                        "flow model on it and evaluate that")
    s = cfg.sample
    samplers = settle(cfg, args, args.samplers or [s.solver if s.solver in ADAPTIVE else
                                                   f"{s.solver}:{s.steps or 100}:{s.schedule}"])
    return run, checkpoints, cfg, samplers, weights_info(checkpoints[-1][1] / "ema.safetensors", cfg)


def evaluate(args: argparse.Namespace, stop: StopRequest | None = None) -> None:
    """The rows of args' report; a `stop` request ends it after the current batch, the finished rows kept."""
    stop = stop or StopRequest()
    # Run, checkpoints and samplers (flags over the config's sample section, checked once).
    run, checkpoints, cfg, samplers, meta = open_run(args)
    s, weights_kinds = cfg.sample, ["ema", "raw"] if args.weights == "both" else [args.weights]
    if args.task or "task" in meta:
        return evaluate_task(args, stop, run, checkpoints, cfg, meta, samplers, weights_kinds)
    if args.method or args.mask or args.factor:
        raise UserError("--method, --mask and --factor score image-conditioned tasks; give --task inpaint or superres "
                        "(or evaluate a run trained with data.task)")

    # Processes, data and what the samples look like: the flow's state (data or latents), the images that `space`
    # decodes it to.
    accelerator = cluster.accelerator()
    device, main_process = accelerator.device, accelerator.is_main_process
    dataset = None
    if args.ref is None or args.bpd or meta["kind"] == "vector":
        dataset = reference_data(cfg)  # reflow runs: their teacher's data, not the pairs
    shape, num_classes, kind = tuple(json.loads(meta.get("latent_shape", meta["data_shape"]))), \
        int(meta["num_classes"]), meta["kind"]
    image_shape = tuple(json.loads(meta["data_shape"]))
    space = build_space(cfg, image_shape).to(device)
    if args.bpd and cfg.latent.autoencoder:
        raise UserError("--bpd of a latent flow would measure the latents, not the images; leave --bpd out")
    if kind == "field":
        raise UserError("FID needs images; this run's data are fields (data.name=fields), which have no Inception "
                        "reference; use sample.py and compare the fields directly")
    cfg_scales = args.cfg_scales or [s.cfg_scale]
    rules = sorted({guidance_of(cfg, sampler) for sampler in samplers} - {"auto"})  # those that take v(x, t, ∅)
    for scale in cfg_scales if rules else []:
        check_model_guidance(cfg, meta, scale, "cfg" if "cfg" in rules else ", ".join(rules))
    labels = class_labels(None, args.n_samples, num_classes, args.seed)
    source = None if cfg.data.source == "gaussian" else build_source(cfg, shape)

    # Reference: Inception statistics of images (the main process computes and caches what the others then read;
    # its error stops them all), or dataset points for 2-D data.
    extractor, reference, points, mode, features_key = None, None, None, None, None
    if kind == "image":
        extractor = build_features(args.features, args.mode, device)

        def load_reference():
            return fid.load_reference(args.ref, extractor, image_shape[-2:], Path(args.stats_dir), cfg, dataset,
                                      args.kid or args.pr)

        reference = on_main_process(accelerator, load_reference) or load_reference()
        reference_name, mode, features_key = reference.name, args.mode, extractor.key
    else:
        if args.n_samples > len(dataset):
            raise UserError(f"--n-samples {args.n_samples} exceeds the {len(dataset)} points of the dataset")
        points = dataset[reference_points(len(dataset), args.n_samples, args.seed)][0].double()
        reference_name = f"{reference_data_config(cfg).name} ({args.n_samples} dataset points)"
    if args.bpd and cfg.data.source != "gaussian":
        raise UserError(f"--bpd needs the standard normal source; this run starts from data.source="
                        f"{cfg.data.source}, whose density is not known")
    protocol = sampling_protocol(args.n_samples, args.seed, extractor, reference_name, args.kid,
                                 args.bpd_n if args.bpd else 0, args.bpd_tol, "feature_dim" in meta, args.pr)
    report = Report(Path(args.out) if args.out else run / "eval")
    dtype = torch.float64 if kind == "vector" else torch.float32

    def reduce(x: torch.Tensor) -> torch.Tensor:  # a batch of samples, as the report measures them
        x = space.decode(x).cpu()
        return torch.from_numpy(extractor(to_uint8(x.float()))) if kind == "image" else x.double()

    # Rows: checkpoints × weights × samplers × guidance scales, each added to the report when done.
    rows = [(step, path, w, sampler, scale) for step, path in checkpoints for w in weights_kinds
            for sampler in samplers for scale in cfg_scales]
    if main_process:
        print(f"{run}: {len(rows)} rows ({len(checkpoints)} checkpoints × {len(weights_kinds)} weights × "
              f"{len(samplers)} samplers × {len(cfg_scales)} cfg scales), {args.n_samples} samples each, "
              f"{accelerator.num_processes} process(es) on {device}; report in {report.folder}")
    wanted = ["fid" if kind == "image" else "w2"] + (["kid"] if args.kid and kind == "image" else []) \
        + (["precision"] if args.pr and kind == "image" else []) + (["bpd"] if args.bpd else [])
    loaded, bpd_of, guide = None, {}, None
    try:
        for step, path, w, sampler, scale in rows:
            adaptive = sampler.steps is None
            row = {"step": step, "weights": w, "solver": sampler.solver, "steps": sampler.steps,
                   "schedule": None if adaptive else sampler.schedule, "atol": s.atol if adaptive else None,
                   "rtol": s.rtol if adaptive else None, "cfg_scale": float(scale), "n_samples": args.n_samples,
                   "seed": args.seed, "reference": reference_name, "mode": mode, "features": features_key,
                   **sampling_key(cfg, sampler, scale)}
            done = report.find(key_of(row))
            if done is not None and all(done.get(k) is not None for k in wanted):
                if main_process:
                    print(f"  step {step} {w} {sampler.label} cfg {scale:g}: already in the report "
                          f"({metric_of([done]).upper()} {done[metric_of([done])]:.4g})")
                continue
            accelerator.wait_for_everyone()  # every process has read the report before any row is added
            if loaded != (step, w):
                weights = path / ("ema.safetensors" if w == "ema" else "model.safetensors")
                model = sampling_model(load_config(path / "config.yaml"), weights, meta, device)
                loaded = (step, w)
            guidance, guide_cost = guidance_for(cfg, sampler, scale, meta, model, device, dtype, guide)
            guide = getattr(guidance, "guide", None) or guide  # loaded once, for every row that needs it
            start = time.perf_counter()
            values, nfe = sample_row(accelerator, model, sampler, cfg, args.seed, args.n_samples, shape, dtype,
                                     reduce, (extractor.dim,) if kind == "image" else shape, args.bspp, source,
                                     labels, scale, row["cfg_interval"] or (0.0, 1.0), stop,
                                     f"step {step} {sampler.label}", guidance)
            if kind == "image":
                metrics = image_metrics(values.numpy(), reference, args.kid, args.seed, args.pr)
            else:
                metrics = {"w2": w2(values, points), "mmd": mmd(values, points)}
            if args.bpd:  # a property of the checkpoint, not of the sampler: computed once per weights
                if (step, w) not in bpd_of:
                    bpd_of[(step, w)] = bits_per_dim(accelerator, model, dataset, kind, cfg, args.bpd_n, args.seed,
                                                     args.bspp, args.bpd_tol, stop)
                metrics["bpd"] = bpd_of[(step, w)]
            row.update(nfe=nfe, **metrics)
            row.update(forward_passes=passes_of(row, sampler, skipped(cfg, sampler, scale),
                                                "meanflow_cfg_range" in meta), guide_cost=guide_cost,
                       bspp=args.bspp, processes=accelerator.num_processes,
                       device=str(device), checkpoint=str(path), seconds=time.perf_counter() - start,
                       versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"), protocol=protocol)
            if main_process:
                report.add(row)
                shown = ", ".join(f"{k.upper()} {v:.4g}" for k, v in metrics.items() if k != "kid_std")
                passes = f", {row['forward_passes']:g} forward passes" if scale != 1 else ""
                print(f"  step {step} {w} {sampler.label} cfg {scale:g}: {shown} (NFE {nfe:g}{passes}, "
                      f"{row['seconds']:.0f} s)")
            accelerator.wait_for_everyone()
    except Stopped:
        if main_process:
            print(f"stopped by {stop.name}: the rows finished are in the report, the one under way is dropped; run "
                  "the same command to continue", file=sys.stderr)
        raise
    if main_process:
        if not report.path.is_file():
            report.render(report.rows())
        print(f"report: {report.folder / 'report.md'}, {report.folder / 'fid.png'}")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
