"""The scores of image-conditioned tasks (inpaint, superres, semantic) on fixed cases, as evaluate.py --task reports
them: FID of the outputs, PSNR and SSIM against the originals, the measurement error before and after it is
enforced, NFE and seconds per image."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import cluster
from cluster import Stopped, StopRequest, gather_indexed, progress
from config import load_config
from data import reference_data, reference_data_config
from data.images import to_uint8
from data.tasks import cases_from_dataset, task_of_meta
from errors import UserError, on_main_process
from flows import PATHS
from flows.inverse import check_method, check_task_guidance, choose_task
from flows.latent import build_space
from flows.sampling import Sampler, sampling_model
from flows.solvers import forward_passes
from metrics import build_features, fid
from metrics.fid import image_metrics
from metrics.report import Report, key_of, versions


def task_protocol(task, n: int, data, seed: int, extractor, reference) -> str:
    """How a task's rows are measured, in words, for the report."""
    if task.name == "inpaint":
        measured = (f"{task.mask} masks drawn for case k from ({seed}, k), the known pixels pasted back into every "
                    "output")
    elif task.name == "superres":
        measured = (f"the {task.factor}×{task.factor} block means, restored in every output (each block shifted by "
                    "the constant that gives its clipped pixels the low-resolution mean)")
    else:
        measured = "the label maps of the items"
    return (f"{task.describe()}: {n} fixed cases, items 0..{n - 1} of {data.name} ({data.split} split) as "
            f"originals; {measured}; noise of case k from ({seed}, k); uint8 outputs; FID: "
            f"{extractor.description} features, Fréchet distance to {reference.name}; PSNR over uint8 pixels "
            "(peak 255) and SSIM (torchmetrics, 11×11 Gaussian window, σ 1.5, data range 255), each averaged over "
            "the cases; NFE: velocity evaluations per sample; s / image: generation (no scoring) over all "
            "processes, per image")


def task_row(accelerator, model, task, cases, space, row: dict, extractor, batch_size: int, pnp_alpha: float, stop,
             path) -> dict:
    """This process's share of the cases (indices rank, rank + W, ... in batches of `batch_size`) restored (on the
    model's `path`), enforced and scored; features, PSNR, SSIM and measurement errors gathered over the processes.
    `stop`: a StopRequest, honoured after each batch."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from flows.inverse import restore

    n = row["n_samples"]
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    values, nfe, seconds = [], 0.0, 0.0
    bar = progress(n, unit="case", disable=not accelerator.is_main_process, leave=False,
                   desc=f"{task.name} {row['method']}")
    for first in range(0, -(-n // accelerator.num_processes), batch_size):
        batch = mine[first: first + batch_size]
        if batch:
            m = cases.measurement(batch).to(accelerator.device)
            start = time.perf_counter()
            x, calls = restore(model, task, m, space, path, row["method"], row["seed"], batch, row["steps"],
                               row["solver"] or "euler", row["schedule"] or "linear", row["cfg_scale"],
                               pnp_alpha, row["atol"] or 0.0, row["rtol"] or 0.0)
            enforced = task.enforce(x, m)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            nfe += calls * len(batch)
            images = to_uint8(enforced).cpu()
            original = to_uint8(cases.original(batch)).cpu().float()
            mse = (images.float() - original).square().flatten(1).mean(1)
            psnr = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
            ssim = structural_similarity_index_measure(images.float(), original, data_range=255.0, reduction="none")
            if task.name == "semantic":
                error = raw = torch.zeros(len(batch))
            else:
                error = task.consistency(images.float().to(accelerator.device) / 127.5 - 1, m).cpu()
                raw = task.consistency(x.clamp(-1, 1), m).cpu()
            features = torch.from_numpy(extractor(images)).double()
            values.append(torch.cat([features, torch.stack([psnr, ssim, error, raw], 1).double()], 1))
            bar.update(len(batch) * accelerator.num_processes)
        if stop.now(accelerator):
            bar.close()
            raise Stopped
    bar.close()
    local = torch.cat(values) if values else torch.zeros(0, extractor.dim + 4, dtype=torch.float64)
    everything = gather_indexed(accelerator, local, n)
    totals = accelerator.reduce(torch.tensor([nfe, seconds], dtype=torch.float64, device=accelerator.device), "sum")
    psnr, ssim, error, raw = everything[:, -4:].T
    return {"features": everything[:, :-4], "psnr": psnr.mean().item(), "ssim": ssim.mean().item(),
            "measurement_error": error.max().item(), "raw_measurement_error": raw.mean().item(),
            "nfe": totals[0].item() / n, "seconds_per_image": totals[1].item() / n}


def evaluate_task(args, stop: StopRequest, run: Path, checkpoints, cfg, meta: dict, samplers: list[Sampler],
                  weights_kinds: list[str]) -> None:
    """evaluate.py --task: the rows of an image-conditioned task, the first --n-samples items of the run's dataset as
    fixed cases, every checkpoint × weights × sampler × guidance scale with the method (a baseline: one row without a
    checkpoint); `args` are evaluate.py's, cfg.sample is settled and `meta` is the newest checkpoint's."""
    accelerator = cluster.accelerator()
    device, main_process, s, n = accelerator.device, accelerator.is_main_process, cfg.sample, args.n_samples
    if meta["kind"] != "image" or cfg.flow.objective != "cfm" or "feature_dim" in meta:
        raise UserError(f"--task {args.task} scores a flow-matching model of images (not MeanFlow or Latent-CFM); "
                        f"run {run} is not one")
    if any((sampler.guidance or s.guidance) != "cfg" for sampler in samplers):
        raise UserError("image-conditioned tasks are guided with --guidance cfg only (over the spatial condition); "
                        "remove the other rule")
    trained, image_shape = task_of_meta(meta), tuple(json.loads(meta["data_shape"]))
    task, method = choose_task(trained, args.task, args.method, args.mask, args.factor, cfg.data.factor, image_shape)
    baseline = method in ("mean", "bicubic")
    for sampler in samplers:
        check_method(method, task, trained is not None, sampler.solver, cfg.flow.path)
    cfg_scales = [1.0] if baseline else args.cfg_scales or [s.cfg_scale]
    for scale in cfg_scales:
        check_task_guidance(scale, method, float(meta.get("cond_dropout", 0)))
    space = build_space(cfg, image_shape).to(device)
    flow_path = PATHS[cfg.flow.path](cfg)  # where replacement pastes the known pixels, and PnP-Flow interpolates

    # The cases (items 0..N-1 of the run's dataset, masks and noise from (seed, k)) and the reference.
    dataset = reference_data(cfg)
    cases = cases_from_dataset(task, dataset, n, None, getattr(task, "mask", "mixed"), args.seed)
    extractor = build_features(args.features, args.mode, device)

    def load_reference():
        return fid.load_reference(args.ref, extractor, image_shape[-2:], Path(args.stats_dir), cfg, dataset, False)

    reference = on_main_process(accelerator, load_reference) or load_reference()
    protocol = task_protocol(task, n, reference_data_config(cfg), args.seed, extractor, reference)
    report = Report(Path(args.out) if args.out else run / "eval")

    # Rows.
    rows = [(None, None, None, None, 1.0)] if baseline else \
        [(step, path, w, sampler, scale) for step, path in checkpoints for w in weights_kinds for sampler in samplers
         for scale in cfg_scales]
    if main_process:
        print(f"{run}: {task.describe()}, method {method}, {len(rows)} rows, {n} cases each, "
              f"{accelerator.num_processes} process(es) on {device}; report in {report.folder}")
    loaded, model = None, None
    try:
        for step, path, w, sampler, scale in rows:
            adaptive = sampler is not None and sampler.steps is None
            row = {"step": step, "weights": w, "solver": sampler.solver if sampler else "",
                   "steps": sampler.steps if sampler else None,
                   "schedule": sampler.schedule if sampler and not adaptive else None,
                   "atol": s.atol if adaptive else None, "rtol": s.rtol if adaptive else None,
                   "cfg_scale": float(scale), "n_samples": n, "seed": args.seed, "reference": reference.name,
                   "mode": args.mode, "features": extractor.key, "task": task.name,
                   "mask": getattr(task, "mask", None) if task.name == "inpaint" else None,
                   "factor": getattr(task, "factor", None), "method": method,
                   "pnp_alpha": args.pnp_alpha if method == "pnp" else None}
            done = report.find(key_of(row))
            if done is not None and done.get("fid") is not None:
                if main_process:
                    print(f"  {method} step {step} {sampler.label if sampler else ''}: already in the report "
                          f"(FID {done['fid']:.4g})")
                continue
            accelerator.wait_for_everyone()
            if not baseline and loaded != (step, w):
                weights = path / ("ema.safetensors" if w == "ema" else "model.safetensors")
                model = sampling_model(load_config(path / "config.yaml"), weights, meta, device)
                loaded = (step, w)
            start = time.perf_counter()
            out = task_row(accelerator, model, task, cases, space, row, extractor, args.bspp, args.pnp_alpha, stop,
                           flow_path)
            metrics = image_metrics(out["features"].numpy(), reference, False, args.seed)
            metrics.update({k: out[k] for k in ("psnr", "ssim", "measurement_error", "raw_measurement_error")})
            row.update(nfe=out["nfe"], forward_passes=forward_passes(out["nfe"], scale), **metrics,
                       seconds_per_image=out["seconds_per_image"], bspp=args.bspp,
                       processes=accelerator.num_processes, device=str(device),
                       checkpoint=None if path is None else str(path), seconds=time.perf_counter() - start,
                       versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"), protocol=protocol)
            if main_process:
                report.add(row)
                print(f"  {method} step {step} {sampler.label if sampler else ''} cfg {scale:g}: FID {row['fid']:.4g}, "
                      f"PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.4f}, measurement error "
                      f"{row['measurement_error']:.3g} (raw {row['raw_measurement_error']:.3g}), NFE {out['nfe']:g}, "
                      f"{row['seconds_per_image']:.3f} s/image")
            accelerator.wait_for_everyone()
    except Stopped:
        if main_process:
            print(f"stopped by {stop.name}: the rows finished are in the report; run the same command to continue",
                  file=sys.stderr)
        raise
    if main_process:
        print(f"report: {report.folder / 'report.md'}")
    accelerator.end_training()
