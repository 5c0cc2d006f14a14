"""A dataset encoded once by a frozen autoencoder, cached as safetensors shards, for latent flow matching.

The cache folder is keyed by a hash of the autoencoder's weights (their bytes), the dataset (name, location,
split, resolution, size) and the transform (flips): the same data and autoencoder reuse it across runs;
another autoencoder gets a new folder. Shards of SHARD items are encoded by all processes in parallel
(shard k by process k mod W), each written to a temporary name and renamed when complete, and
manifest.json is written last: an interrupted encoding leaves only complete shards, which the next run
reuses, and nothing is read before the manifest exists. With data.hflip the mirrored images are encoded
too and the dataset has 2N items (the flip is chosen by sampling, as the latent of a mirrored image is not
the mirrored latent). Items are the posterior means E(x), normalized as the latent space says.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cluster import progress
from config import Config
from errors import atomic_write

SHARD = 2048  # items per shard


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fm-toolkit" / "latents"


def file_sha256(path: Path):
    """The SHA-256 object of a file's bytes (weights: read in blocks), to read with hexdigest() or extend."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h


def cache_key(cfg: Config, dataset, weights: Path) -> str:
    """Changes with the autoencoder's weights, the dataset and the transform, and nothing else."""
    # a hub id's files live in the hub's cache: its name stands for them
    h = file_sha256(weights) if weights.is_file() else hashlib.sha256(str(weights).encode())
    d = cfg.data
    location = str(Path(d.path).resolve()) if d.path else ""
    h.update(json.dumps([d.name, location, d.split, d.resolution, d.class_folders, len(dataset), d.hflip]).encode())
    return h.hexdigest()[:16]


class LatentDataset:
    """Cached latents (normalized) with the dataset's labels; items N..2N−1 are the mirrored images."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor | None, num_classes: int, shift: float,
                 scale: float):
        self.latents, self.labels, self.num_classes = latents, labels, num_classes
        self.shift, self.scale = shift, scale
        self.shape = tuple(latents.shape[1:])

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = (self.latents[idx].float() - self.shift) * self.scale
        return z, None if self.labels is None else self.labels[idx % len(self.labels)]


def _labels(dataset) -> torch.Tensor | None:
    labels = getattr(dataset, "labels", None)
    return None if labels is None else torch.as_tensor(labels)


@torch.no_grad()
def encode_dataset(cfg: Config, dataset, space, accelerator=None, cache_dir: Path | None = None,
                   batch_size: int = 256) -> tuple[LatentDataset, bool]:
    """The cached latents of `dataset` under `space` (a LatentSpace), encoding the missing shards first.
    Returns the dataset and whether anything was encoded."""
    folder = (cache_dir or default_cache_dir()) / cache_key(cfg, dataset, Path(space.name))
    parts, encoded = cached_encoding(folder, dataset, lambda x: space.autoencoder.encode(x).mean.float(),
                                     cfg.data.hflip, accelerator, f"encoding {cfg.data.name} to latents",
                                     {"autoencoder": space.name, "data": cfg.data.name, "split": cfg.data.split},
                                     batch_size)
    latents = torch.cat([parts["mean"]] + ([parts["mirrored"]] if cfg.data.hflip else []))
    return LatentDataset(latents, _labels(dataset), dataset.num_classes, space.shift, space.scale), encoded


@torch.no_grad()
def cached_encoding(folder: Path, dataset, encode, flips: bool, accelerator=None, desc: str = "encoding",
                    info: dict | None = None, batch_size: int = 256) -> tuple[dict[str, torch.Tensor], bool]:
    """encode(images) of every item of `dataset`, in order, as {"mean": (N, ...)} (with `flips` also
    "mirrored", of the mirrored images), from the shards in `folder`, encoding the missing ones first (all processes
    in parallel, then manifest.json with `info`). Returns the tensors and whether anything was encoded."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    n = len(dataset)
    shards = [(first, min(first + SHARD, n)) for first in range(0, n, SHARD)]
    manifest = folder / "manifest.json"
    encoded = False
    if not manifest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        mine = [k for k in range(len(shards)) if k % world == rank and not (folder / f"shard_{k:05d}.safetensors")
                .is_file()]
        bar = progress(sum(shards[k][1] - shards[k][0] for k in mine) * world, unit="image", desc=desc,
                       disable=rank != 0 or not mine)
        for k in mine:
            first, last = shards[k]
            means, mirrored = [], []
            for start in range(first, last, batch_size):
                x = dataset[torch.arange(start, min(start + batch_size, last))][0].to(device)
                means.append(encode(x).cpu())
                if flips:
                    mirrored.append(encode(x.flip(-1)).cpu())
                bar.update(len(x) * world)
            tensors = {"mean": torch.cat(means)} | ({"mirrored": torch.cat(mirrored)} if flips else {})
            tensors = {name: t.contiguous() for name, t in tensors.items()}  # diffusers' means are strided views
            atomic_write(folder / f"shard_{k:05d}.safetensors", partial(_save_shard, tensors))
            encoded = True
        bar.close()
        if accelerator:
            accelerator.wait_for_everyone()
        if rank == 0:
            text = json.dumps({"items": n, "shards": len(shards), "flips": flips, **(info or {})})
            atomic_write(manifest, lambda tmp: tmp.write_text(text))
            for leftover in folder.glob(".tmp_*"):  # from an interrupted encoding
                leftover.unlink(missing_ok=True)
        if accelerator:
            accelerator.wait_for_everyone()
    parts = [load_file(str(folder / f"shard_{k:05d}.safetensors")) for k in range(len(shards))]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}, encoded


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
