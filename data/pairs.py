"""Reflow pairs: the noise x0 and the sample x1 a teacher made from it, for training on a fixed coupling.

`sample.py --pairs` writes them (Liu et al. 2023, "Flow Straight and Fast": k-rectified flow trains the
next flow on the pairs of the previous one; distillation fits few steps to them). A pairs folder holds
shards pairs_00000.safetensors, ... of SHARD items each (x0, x1 and, for class-conditional teachers, the
labels y), item k from the teacher's noise of seed (S, k); each shard is written whole, so an
interrupted run continues, and pairs.json (written last) says what made them. The pairs do not depend
on the batch size or the number of processes that made them.

A folder is made by one teacher (its weights' SHA-256) with one sampler (solver, steps, schedule, tolerances,
guidance, seed, labels, SDE settings): pairs.started.json records them before the first shard is written, and a
command that would continue or redo the folder with anything else is refused, naming the difference.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from cluster import Stopped, StopRequest, progress
from errors import UserError, atomic_write, on_main_process

SHARD = 1024  # items per shard
STARTED = "pairs.started.json"  # the settings of a folder under way, written before its first shard


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"pairs_{k:05d}.safetensors"


def shard_count(n: int) -> int:
    return -(-n // SHARD)


def check_settings(folder: Path, settings: dict) -> bool:
    """Whether `folder` may be made or continued with `settings` (what makes the pairs: teacher, sampler, seed, ...):
    True if the folder records the same (it is under way or complete), False if it holds no pairs yet; otherwise
    one clear sentence naming each difference."""
    recorded = None
    for name in ("pairs.json", STARTED):
        if (folder / name).is_file():
            recorded = json.loads((folder / name).read_text())
            break
    if recorded is None:
        made = len(list(folder.glob("pairs_*.safetensors")))
        if made:
            raise UserError(f"pairs folder {folder} holds {made} shards but no record of what made them (an older "
                            "version cut off); remove them or choose another --save-dir")
        return False
    differ = [key for key in settings if recorded.get(key, "not recorded") != settings[key]]
    if differ:
        was = ", ".join(f"{key} {recorded.get(key, 'not recorded')!r}" for key in differ)
        now = ", ".join(f"{key} {settings[key]!r}" for key in differ)
        raise UserError(f"pairs folder {folder} was made with {was}; this command asks for {now}: give the same "
                        "settings to continue it, or choose another --save-dir")
    return True


def write_pairs(accelerator, folder: Path, settings: dict, about: dict, batch_size: int,
                make: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor | None,
                teacher: str, what: str) -> None:
    """The shards of pairs 0..n-1 (n = settings['n']) that `folder` does not hold yet, shared out over the processes
    in turn, each made by make(batch) -> (x0, x1) on the CPU (with the labels of the items) and written whole. The
    `settings` (what makes the pairs: teacher, sampler, seed, ...) are recorded before the first shard, and a folder
    begun with others is refused; pairs.json, written last, holds them with `about` (what the data look like)."""
    from safetensors.torch import save_file

    n = settings["n"]
    started = on_main_process(accelerator, partial(check_settings, folder, settings))
    if accelerator.is_main_process and not started:
        atomic_write(folder / STARTED, lambda tmp: tmp.write_text(json.dumps(settings, indent=1)))
    missing = [k for k in range(shard_count(n)) if not shard_path(folder, k).exists()]
    accelerator.wait_for_everyone()
    mine = missing[accelerator.process_index::accelerator.num_processes]
    if accelerator.is_main_process:
        print(f"{teacher}: {n} pairs in {shard_count(n)} shards ({shard_count(n) - len(missing)} already in "
              f"{folder}), {what}, {accelerator.num_processes} process(es) on {accelerator.device}")
    bar = progress(sum(min(SHARD, n - k * SHARD) for k in mine), unit="pair", desc="pairs",
                   disable=not accelerator.is_main_process)
    slots = -(-len(missing) // accelerator.num_processes)  # the same count on every process
    with StopRequest() as stop:
        for slot in range(slots):
            if slot < len(mine):
                k = mine[slot]
                items = list(range(k * SHARD, min(n, (k + 1) * SHARD)))
                x0s, x1s = [], []
                for first in range(0, len(items), batch_size):
                    x0, x1 = make(items[first: first + batch_size])
                    x0s.append(x0)
                    x1s.append(x1)
                    bar.update(len(x0))
                tensors = {"x0": torch.cat(x0s), "x1": torch.cat(x1s)}
                if labels is not None:
                    tensors["y"] = labels[items].clone()
                atomic_write(shard_path(folder, k), lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
            if stop.now(accelerator) and slot + 1 < slots:
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
        manifest = {**settings, "shard_size": SHARD, **about, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(folder / "pairs.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        (folder / STARTED).unlink(missing_ok=True)  # pairs.json says it all now
        print(f"done: {n} pairs in {folder} ({what})")


def read_manifest(folder: str | Path) -> dict:
    """pairs.json of a pairs folder: n, shape, num_classes, the teacher and how it sampled, teacher_data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"pairs folder '{folder}' does not exist; make it with sample.py --pairs --save-dir {folder}")
    manifest = folder / "pairs.json"
    if not manifest.is_file():
        made = len(list(folder.glob("pairs_*.safetensors")))
        raise UserError(f"pairs folder {folder} has no pairs.json: its generation was cut off ({made} shards "
                        "written); run the same sample.py --pairs command again to finish it")
    return json.loads(manifest.read_text())


class PairsDataset:
    """A pairs folder as a dataset: batches (x1, y, {'x0': x0}), x1 the teacher's samples (the data), x0 their
    noise."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        self.info = read_manifest(folder)
        n, shape = self.info["n"], tuple(self.info["shape"])
        parts = []
        for k in range(shard_count(n)):
            path = shard_path(folder, k)
            try:
                part = load_file(str(path))
            except (FileNotFoundError, SafetensorError, OSError) as e:
                raise UserError(f"pairs shard {path} is missing or cut off ({type(e).__name__}); run the "
                                "sample.py --pairs command that made the folder again") from None
            items = min(SHARD, n - k * SHARD)
            if tuple(part["x1"].shape) != (items, *shape) or part["x0"].shape != part["x1"].shape:
                raise UserError(f"pairs shard {path} holds {tuple(part['x1'].shape)} where {(items, *shape)} was "
                                "written; run the sample.py --pairs command that made the folder again")
            parts.append(part)
        self.x0 = torch.cat([p["x0"] for p in parts]).float()
        self.x1 = torch.cat([p["x1"] for p in parts]).float()
        self.y = torch.cat([p["y"] for p in parts]).long() if "y" in parts[0] else None
        self.shape, self.num_classes = shape, int(self.info["num_classes"])
        self.converted = ""

    def __len__(self) -> int:
        return len(self.x1)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        return self.x1[idx], None if self.y is None else self.y[idx], {"x0": self.x0[idx]}
