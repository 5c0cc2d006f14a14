"""The run folder of train.py: made writable, its config compared with the one it was trained with, and what the run
records there (log.txt, metrics.jsonl, the trackers) with the training metrics that go into them.

    runs/NAME/config.yaml  log.txt  metrics.jsonl  samples/  checkpoints/step_N/  tensorboard/
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from config import Config, config_changes, load_config, to_dict
from errors import UserError, full_disk, writable_folder
from flows import LossByTime
from models.checkpoint import list_checkpoints


def absolute_paths(cfg: Config) -> None:
    """The config's paths of other runs' files, made absolute: the saved config must find them from anywhere (a hub
    id, which is no path here, stays as it is)."""
    for section, key in ((cfg.latent, "autoencoder"), (cfg.latentcfm, "encoder"), (cfg.train, "init_from")):
        path = getattr(section, key)
        if path and Path(path).exists():
            setattr(section, key, str(Path(path).resolve()))


def trackers(cfg: Config) -> list[str]:
    """train.trackers that can run here (wandb only when installed)."""
    return [name for name in cfg.train.trackers if name != "wandb" or importlib.util.find_spec("wandb") is not None]


def tracker_config(cfg: Config) -> dict:
    """The config as the trackers take it: flat keys, scalars only ({'train': {'lr': 1}} -> {'train.lr': 1})."""
    return _flat(to_dict(cfg))


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and check that it is writable before any work is done."""
    writable_folder(run_dir, "run folder", "choose another with -e")
    (run_dir / "checkpoints").mkdir(exist_ok=True)


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


class TrainingMeter:
    """The training metrics between two log steps, kept on the device (no host sync per step) and read out, reduced
    over the processes, at log steps: the loss, the flow and alignment losses of aligned micro-steps, the loss per
    t-bin, whether any loss or gradient was not finite, samples/s of the training steps alone, and the objective's
    settings of the last micro-step (AlphaFlow's α)."""

    def __init__(self, accelerator, bins: int):
        self.accelerator, device = accelerator, accelerator.device
        self.loss_by_time = LossByTime(bins, device)
        self.loss_sum, self.nonfinite = torch.zeros((), device=device), torch.zeros((), dtype=torch.bool, device=device)
        self.align_sums = torch.zeros(3, device=device)  # flow loss, alignment loss, aligned micro-steps
        # With an fp16 loss scaler an infinite gradient only skips the step; otherwise it would corrupt the weights.
        self.check_gradients = accelerator.scaler is None
        self.settings = {}  # the objective's settings of the last micro-step (AlphaFlow's α)
        self.restart()

    def restart(self) -> None:
        """Start timing the training steps anew (after a log step's previews and checkpoint)."""
        self.timer, self.steps = time.perf_counter(), 0

    def add(self, out, loss: torch.Tensor) -> None:
        """A micro-step's objective output and its loss."""
        self.loss_by_time.add(out)
        self.loss_sum += loss.detach()
        if out.align is not None:
            self.align_sums += torch.stack([out.loss.detach().mean(), out.align.detach().mean(),
                                            torch.ones((), device=self.loss_sum.device)])
        self.nonfinite |= ~torch.isfinite(loss.detach())
        self.settings = out.settings

    def step(self, grad_norm: torch.Tensor) -> None:
        """An optimizer step and the gradient norm before clipping (a finite loss can still have an infinite
        gradient, which makes NaN weights)."""
        self.steps += 1
        if self.check_gradients:
            self.nonfinite |= ~torch.isfinite(grad_norm)

    def finite(self) -> bool:
        """Whether every loss and gradient since the start was finite, on every process."""
        return not bool(self.accelerator.reduce(self.nonfinite.float(), "sum") > 0)

    def read(self, lr: float, grad_norm: torch.Tensor, batch_size: int, grad_accum: int, aligned: bool) -> dict:
        """The metrics since the last read (loss: the mean over the micro-steps of every process), then reset."""
        reduce, device = self.accelerator.reduce, self.loss_sum.device
        metrics = {"loss": float(reduce(self.loss_sum, "mean")) / (self.steps * grad_accum), "lr": lr,
                   "grad_norm": float(grad_norm),
                   "samples_per_s": self.steps * batch_size / (time.perf_counter() - self.timer),
                   **({"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
                      if device.type == "cuda" else {}),
                   **(_aligned_losses(reduce(self.align_sums, "sum")) if aligned else {}), **self.settings,
                   **self.loss_by_time.read(lambda x: reduce(x, "sum"))}
        self.align_sums.zero_()
        self.loss_sum.zero_()
        return metrics


def _aligned_losses(sums: torch.Tensor) -> dict[str, float]:
    """The flow loss and the alignment loss, means over the aligned micro-steps since the last log (none: {})."""
    flow, align, count = sums.tolist()
    return {"flow_loss": flow / count, "align_loss": align / count} if count else {}
