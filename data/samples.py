"""A folder of samples, one file per global index, each written whole: what sample.py writes and continues.

Images are NNNNNN.png (uint8, rounded), fields and vectors NNNNNN.npy. A file appears whole or not at all
(temporary name, then rename), so an interrupted run continues with the indices whose files are missing, and every
sample is written exactly once whatever the number of processes.
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from cluster import Stopped, StopRequest, progress
from data.images import to_uint8
from errors import atomic_write


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


def read_images(save_dir: Path, indices: list[int]) -> torch.Tensor:
    """The images of the given indices, read back from their files, as uint8 (K, C, H, W)."""
    images = [torch.from_numpy(read_sample(file_of(save_dir, k, "image"))) for k in indices]
    return torch.stack([x[None] if x.dim() == 2 else x.permute(2, 0, 1) for x in images])


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
