"""Train a flow-matching model from a YAML config.

    accelerate launch train.py -c configs/toy2d_moons_otcfm.yaml [-e runs/NAME] [-mp bf16] [key.sub=value ...]
    python train.py                          # one process (CPU included), the embedded default: moons, I-CFM

Re-running the same command resumes from the newest complete checkpoint in the run folder.
Run folder: config.yaml, log.txt, metrics.jsonl, samples/step_N.png (EMA previews),
checkpoints/step_N/{model,ema}.safetensors + config.yaml + train_state/, tensorboard/.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

import backend
from cluster import STOPPED, RunLock, Stopped, StopRequest, progress, run_main
from config import Config, load_config, save_config, to_yaml
from data import build_dataset, build_loader, build_source, close_loader, reference_data
from data.tasks import model_inputs, task_of_config
from errors import UserError, exit_on, full_disk, on_main_process
from flows import BatchShard, build_objective, check_data, weights_meta
from flows.align import align_data, build_alignment, build_encoder
from flows.batches import micro_steps
from flows.latent import build_feature_encoder, build_space, training_data
from metrics.monitor import Monitor, preview_solver
from models import build_autoencoder, build_model
from models.autoencoder import latent_statistics
from models.checkpoint import checkpoint_name, init_weights, list_checkpoints, load_checkpoint
from registries import check_names
from runs import RunLog, TrainingMeter, absolute_paths, check_config_change, prepare_run_dir, tracker_config, trackers


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
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant, cosine to lr_min, or
    constant and then linear to lr_min over the last decay_fraction of the steps after warmup (wsd)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr_min + (t.lr - t.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    if t.lr_schedule == "wsd":
        decay = max(1, round(t.decay_fraction * (t.steps - t.warmup_steps)))
        return t.lr_min + (t.lr - t.lr_min) * min(1.0, (t.steps - step) / decay)
    return t.lr


def ema_targets(cfg: Config) -> tuple[str, str] | None:
    """What takes its training targets from the EMA model (the objective's `teacher`), and the setting that turns
    that off: the shortcut model's half jumps, MeanFlow's interval splitting and its jumps' velocity; None when
    nothing does."""
    f = cfg.flow
    if f.objective == "shortcut" and f.shortcut_ema:
        return "flow.objective=shortcut takes its targets' half jumps", "flow.shortcut_ema=false"
    if f.objective in ("meanflow", "alphaflow") and f.meanflow_split > 0 and f.meanflow_split_ema:
        return "flow.meanflow_split takes its targets' jumps", "flow.meanflow_split_ema=false"
    if f.objective in ("meanflow", "alphaflow") and f.meanflow_velocity == "ema":
        return "flow.meanflow_velocity=ema takes its targets' velocity", "flow.meanflow_velocity=conditional"
    return None


def train(cfg: Config, run_dir: Path, accept_changes: bool = False) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # set once, here: TF32 matmuls on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True

    # Accelerator and run folder: one writer (the main process holds RUN/.lock until it ends).
    prepare_run_dir(run_dir)
    absolute_paths(cfg)
    accelerator = backend.make_accelerator(cfg, run_dir, trackers(cfg))
    lock = on_main_process(accelerator, RunLock(run_dir).acquire)
    try:
        with StopRequest() as stop:
            run(cfg, run_dir, accelerator, stop, accept_changes)
    finally:
        if lock is not None:
            lock.release()


def run(cfg: Config, run_dir: Path, accelerator, stop: StopRequest, accept_changes: bool) -> None:
    """Training in a locked run folder, stopping cleanly at a `stop` request."""
    t = cfg.train
    world, device = accelerator.num_processes, accelerator.device
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size {t.batch_size} must be divisible by processes × train.grad_accum "
                        f"= {world} × {t.grad_accum}")
    log = RunLog(run_dir, accelerator.is_main_process)
    # The main process compares this config with the one the folder was trained with; the folder's config.yaml is
    # written once the run has started (a start that fails, weights that do not fit, leaves it as it was).
    changes = on_main_process(accelerator, partial(check_config_change, run_dir, cfg, accept_changes)) or []
    log(f"config:\n{to_yaml(cfg)}")
    for line in changes:
        log(line)
    if "wandb" in t.trackers and "wandb" not in trackers(cfg):
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
    task = task_of_config(cfg)  # an image-conditioned task (data.task), or None
    check_data(cfg, dataset, pairs, features, task)
    num_classes = dataset.num_classes if cfg.model.class_cond else 0
    autoencoding = cfg.flow.objective == "autoencoder"

    # Model and EMA, with representation alignment's frozen encoder and projection head (flow.align; the head is
    # trained with the model and saved in the training state, never in the weight files that sampling reads).
    set_seed(t.seed)
    if autoencoding:
        model = build_autoencoder(cfg, dataset.shape)
    else:
        model = build_model(cfg, space.shape, num_classes, features.dim if features else 0,
                            **model_inputs(task, space.shape[0]))
    latent_shape = model.latent_shape(dataset.shape) if autoencoding else space.shape
    if t.init_from and not list_checkpoints(run_dir):  # a new run starts from another's weights
        log(init_weights(model, t.init_from, cfg.model.time_scale))
    teacher = ema_targets(cfg)
    if teacher and accelerator.distributed_type == DistributedType.FSDP:
        what, key = teacher
        raise UserError(f"{what} with the EMA model on every process, which FSDP keeps in shards; use DDP (no FSDP "
                        f"config) or {key}")
    encoder, alignment = None, None
    if cfg.flow.align:
        if cfg.flow.align == "sra" and accelerator.distributed_type == DistributedType.FSDP:
            raise UserError("flow.align=sra reads the EMA model on every process, which FSDP keeps in shards; use DDP "
                            "(no FSDP config) or flow.align=repa / dispersive")
        encoder = build_encoder(cfg, dataset.shape).to(device) if cfg.flow.align == "repa" else None
        alignment = build_alignment(cfg, model, encoder)
    memory_format = torch.channels_last if t.channels_last and len(space.shape) == 3 else torch.contiguous_format
    model.to(memory_format=memory_format)
    micro_batch = t.batch_size // t.grad_accum  # global, over processes
    p = backend.prepare(cfg, model, accelerator, micro_batch)
    if alignment is not None and alignment.method == "sra":  # its teacher: the EMA model
        alignment.teacher = p.ema.model
    log(f"model: {cfg.model.name}, {sum(x.numel() for x in p.model.parameters()):,} parameters; "
        f"{world} process(es) on {device}, mixed precision {t.mixed_precision}")

    # What the loop reads: the data (latents encoded once into a cache, REPA's features beside them) and the
    # metadata that sampling needs without the data.
    meta = weights_meta(cfg, dataset, task, space, features)
    train_data, encode_per_step, loop_flips = training_data(cfg, dataset, pairs, space, accelerator, log)
    encode_features = None  # REPA's encoder on each batch's images, when its features are not cached
    if alignment is not None:
        train_data, encode_features = align_data(cfg, alignment, encoder, dataset, train_data, pairs, accelerator,
                                                 log, loop_flips)

    # Objective.
    objective = build_objective(cfg, source, num_classes, latent_shape, features, task)
    objective.alignment = alignment
    if teacher:  # the targets' jumps: the EMA model's
        objective.teacher = p.ema.model

    # Resume from the newest complete checkpoint.
    step = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        load_checkpoint(accelerator, path, p.ema)
        log(f"resumed from {path} at step {step}")
    if accelerator.is_main_process:
        with full_disk(run_dir / "config.yaml"):
            save_config(cfg, run_dir / "config.yaml")
    if step >= t.steps:
        log(f"nothing to do: step {step} ≥ train.steps {t.steps}")
        accelerator.end_training()
        return

    # Batches: micro-step k's data and draws from (seed, k). On one process, the next micro-step (its batch, draws
    # and OT solve, all host work) is prepared in a thread while this one trains: on a GPU always, since the host also
    # has to launch every kernel (unet-cifar10, batch 32, H100: 392-457 images/s inline, 521-523 ahead, steps
    # 101-300); on the CPU only for the OT solve of vector data, whose network steps are as short as the solve, and
    # then with a core of its own, or the two fight over every core (train.py on 2 cores, moons: 24.8 ms per OT-CFM
    # step inline, 17.9 sharing both cores, 15.0 with one each; an I-CFM step takes 11.6). An image model's step
    # dwarfs the solve, and a core given up halves it (unet-cifar10, batch 32, 2 cores: 2.48 images/s so, 4.80
    # without OT; the solve takes 0.4 ms).
    loader = iter(build_loader(train_data, micro_batch, accelerator.process_index, world, seed=t.seed,
                               start=step * t.grad_accum, num_workers=cfg.data.num_workers,
                               pin_memory=device.type == "cuda"))
    ahead = world == 1 and (device.type == "cuda" or (cfg.flow.coupling == "ot" and len(space.shape) == 1))
    if ahead and device.type == "cpu" and torch.get_num_threads() > 1:
        torch.set_num_threads(torch.get_num_threads() - 1)
    batches = micro_steps(loader, objective, BatchShard.from_accelerator(accelerator), t.seed, step * t.grad_accum,
                          device, ahead, labels=num_classes > 0, hflip=loop_flips, memory_format=memory_format,
                          space=encode_per_step, task=task, task_space=space, alignment=alignment,
                          grad_accum=t.grad_accum, encode_features=encode_features)
    monitor = Monitor(cfg, dataset, source, space, task, num_classes, device)
    try:
        loop(cfg, run_dir, accelerator, p, objective, batches, step, monitor, meta, log, stop, alignment is not None)
    finally:  # also on an error: nothing keeps running (the batch thread, loader workers, trackers) after this
        batches.close()
        close_loader(loader)
        accelerator.end_training()


def loop(cfg: Config, run_dir: Path, accelerator, p: backend.Prepared, objective, batches, step: int,
         monitor: Monitor, meta: dict[str, str], log: RunLog, stop: StopRequest, aligned: bool) -> None:
    """The training loop from optimizer step `step` to train.steps: micro-steps (loss, backward), the optimizer step
    and EMA, then at their steps the log, previews, checkpoints and the in-training quality check."""
    t, device, autoencoding = cfg.train, accelerator.device, cfg.flow.objective == "autoencoder"
    meter = TrainingMeter(accelerator, t.t_bins)
    accelerator.init_trackers("tensorboard", config=tracker_config(cfg))
    bar = progress(t.steps, initial=step, desc="training", unit="step", disable=not accelerator.is_main_process)
    p.model.train()
    try:
        while step < t.steps:
            for group in p.optimizer.param_groups:
                group["lr"] = lr_at(step, t)
            for _ in range(t.grad_accum):
                x1, draw = next(batches)
                # Gradients are synchronized (DeepSpeed: the optimizer steps) at the last micro-step only.
                with accelerator.accumulate(p.model), p.autocast():
                    out = objective.loss(p.model, x1, draw)
                    loss = out.total().mean()
                    accelerator.backward(loss)  # divided by train.grad_accum (by DeepSpeed itself under DeepSpeed)
                meter.add(out, loss)
            step += 1
            grad_norm = backend.update_weights(accelerator, p.params, p.optimizer, p.ema, p.raw_model, step,
                                               t.grad_clip)
            meter.step(grad_norm)
            bar.update(1)
            last = step == t.steps
            stopping = stop.now(accelerator) and not last  # SIGTERM / SIGINT: a checkpoint here, then exit
            logged = step % t.log_every == 0 or last
            saving = step % t.checkpoint_every == 0 or last or stopping
            if (logged or saving) and not meter.finite():  # stop before a bad model is saved
                done = [s for s, _ in list_checkpoints(run_dir)]
                raise UserError(f"the loss or its gradient became NaN or infinite before step {step}; training "
                                f"stopped and the last good checkpoint is {f'step {done[-1]}' if done else 'none'}; "
                                "lower train.lr or set train.grad_clip")
            if logged:
                metrics = meter.read(lr_at(step - 1, t), grad_norm, t.batch_size, t.grad_accum, aligned)
                log.metrics(step, metrics)
                accelerator.log(metrics, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}")
            previewing = (t.preview_every > 0 and step % t.preview_every == 0) or last
            evaluating = saving and t.eval_every and (step % t.eval_every == 0 or last)
            # The EMA weights as one plain module on the main process (None elsewhere; under FSDP every process
            # takes part in gathering them).
            ema_model = p.ema.gathered() if previewing or (saving and (autoencoding or t.eval_every)) else None
            if previewing:
                path = run_dir / "samples" / f"{checkpoint_name(step)}.png"
                on_main_process(accelerator, partial(monitor.preview, path, ema_model, step))
                log(f"preview: {path}")
            if saving:
                written = meta  # only the main process writes the weight files
                if autoencoding and ema_model is not None:
                    written = {**meta, **latent_statistics(ema_model, monitor.dataset, device)}
                path = backend.save(accelerator, run_dir, step, p, cfg, written)
                log(f"checkpoint: {path}")
            if evaluating:  # on the main process; a reference that cannot be made stops every process at once
                quality = on_main_process(accelerator, partial(monitor.quality, ema_model))
                if accelerator.is_main_process:
                    log.metrics(step, quality)
                    accelerator.log({f"eval/{k}": v for k, v in quality.items()}, step=step)
                    log(f"eval: {', '.join(f'{k} {v:.4g}' for k, v in quality.items())} ({t.eval_n} samples, "
                        f"{preview_solver(cfg)} {t.preview_steps} steps, EMA)")
            if stopping:
                log(f"stopped by {stop.name} at step {step} of {t.steps}, checkpoint {path}; run the same command to "
                    "resume")
                raise Stopped
            if logged:  # samples/s counts training alone, not previews and checkpoints
                meter.restart()
    finally:
        bar.close()
    log(f"done: {step} steps; preview {run_dir / 'samples' / f'{checkpoint_name(step)}.png'}")


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
