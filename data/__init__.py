"""Datasets: the DATASETS registry, source distributions, and a resumable sharded loader.

A dataset is a map-style dataset indexed by a list of indices, returning a batch (x1, y) with
y None for unlabelled data, or (x1, y, extras) with a dict of what travels with the data (reflow pairs' noise
'x0', semantic tasks' 'label_map'), and telling its `shape` (without batch) and `num_classes` (0 if none):
sizes that follow from data are read from it, never typed twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

import seeds
from config import Config
from data.images import IMAGE_DATASETS
from data.pairs import PairsDataset, read_manifest
from data.toy import TOY, load_tensor_file
from errors import UserError, check_name


class PointDataset:
    """In-memory vectors x (N, D) with optional integer labels y (N,); `converted` says how a file's values were
    converted to float32 ('' when they were floats)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, converted: str = ""):
        self.x, self.y, self.converted = x, y, converted
        self.shape = tuple(x.shape[1:])
        self.num_classes = int(y.max()) + 1 if y is not None else 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.x[idx], None if self.y is None else self.y[idx]


def _toy_dataset(name: str) -> Callable[[Config], PointDataset]:
    def build(cfg: Config) -> PointDataset:
        g = torch.Generator().manual_seed(cfg.data.seed)
        return PointDataset(TOY[name](cfg.data.size, g, torch.device("cpu")))
    return build


DATASETS: dict[str, Callable[[Config], Any]] = {
    **{name: _toy_dataset(name) for name in TOY},
    "tensor_file": lambda cfg: PointDataset(*load_tensor_file(cfg.data.path)),
    **IMAGE_DATASETS,
    "pairs": lambda cfg: PairsDataset(cfg.data.path),  # reflow: (noise, sample) pairs made by sample.py --pairs
}

# Source distributions of x0: name -> (data shape) -> sampler(n, generator, device).
def _gaussian_source(shape: tuple[int, ...]) -> Callable:
    return lambda n, g, device: torch.randn(n, *shape, generator=g, device=device)


def _toy_source(name: str) -> Callable:
    return lambda shape: TOY[name]


SOURCES: dict[str, Callable] = {"gaussian": _gaussian_source, **{name: _toy_source(name) for name in TOY}}


def check_config(cfg: Config) -> None:
    """The data section's registry names, before any data is loaded."""
    check_name(DATASETS, cfg.data.name, "data.name")
    check_name(SOURCES, cfg.data.source, "data.source")
    if cfg.data.task:
        from data.tasks import MASKS, TASKS

        check_name(TASKS, cfg.data.task, "data.task")
        check_name(MASKS, cfg.data.mask, "data.mask")
        if cfg.data.task == "semantic" and cfg.data.label_classes <= 0:
            raise UserError("data.task=semantic needs data.label_classes, the number of classes in the label maps "
                            "(CelebAMask-HQ: 19)")


def build_dataset(cfg: Config) -> PointDataset:
    if cfg.data.size <= 0 and cfg.data.name in TOY:
        raise UserError(f"config key data.size must be positive, got {cfg.data.size}")
    if cfg.data.task == "semantic":
        from data.tasks import SemanticFolderDataset

        if cfg.data.name != "imagefolder":
            raise UserError(f"data.task=semantic reads label maps beside an image folder; set data.name=imagefolder "
                            f"(got '{cfg.data.name}')")
        return SemanticFolderDataset(cfg.data.path, cfg.data.label_maps, cfg.data.label_classes, cfg.data.resolution,
                                     cfg.data.class_folders)
    return DATASETS[cfg.data.name](cfg)


def reference_data_config(cfg: Config):
    """The data section that a run's samples are compared with: its own, or for a run on reflow pairs that of the
    first teacher in the chain (each pairs.json records its teacher's data settings)."""
    if cfg.data.name != "pairs":
        return cfg.data
    import dataclasses

    return dataclasses.replace(cfg.data, **read_manifest(cfg.data.path)["teacher_data"])


def reference_points(n_items: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the dataset points that samples of base seed `seed` are compared with (W2, MMD): the first n of a
    permutation of range(n_items) keyed by ('reference', seed), for evaluate.py and the in-training check alike."""
    return torch.randperm(n_items, generator=seeds.generator("reference", seed))[:n]


def reference_data(cfg: Config):
    """The dataset of reference_data_config: the run's own data, or its reflow pairs' teacher's."""
    if cfg.data.name != "pairs":
        return build_dataset(cfg)
    import copy

    teacher = copy.deepcopy(cfg)
    teacher.data = reference_data_config(cfg)
    return build_dataset(teacher)


def data_info(cfg: Config, dataset) -> dict[str, str]:
    """What sampling needs to know of the data, as strings for a weight file's metadata: the shape,
    the number of classes the model is conditioned on, the kind of sample, and a field's units."""
    import json

    from data.images import FieldDataset

    kind = "vector" if len(dataset.shape) == 1 else "field" if isinstance(dataset, FieldDataset) else "image"
    info = {"data_shape": json.dumps(list(dataset.shape)), "kind": kind,
            "num_classes": str(dataset.num_classes if cfg.model.class_cond else 0)}
    if kind == "field":
        info.update(field_mean=json.dumps(dataset.mean.tolist()), field_std=json.dumps(dataset.std.tolist()))
    return info


def weights_info(weights, cfg: Config) -> dict[str, str]:
    """What sampling needs to know of the data (data_info), from the weight file's metadata. Weights without it
    (made outside train.py) get it from the config's dataset, read from disk as training saw it, never downloaded."""
    import copy

    from models.checkpoint import read_metadata

    meta = read_metadata(weights)
    if "data_shape" in meta:
        return meta
    local = copy.deepcopy(cfg)
    local.data.download = False
    try:
        return data_info(local, build_dataset(local))
    except UserError as e:
        raise UserError(f"{weights} records no data shape (weights made outside train.py?) and the config's data, "
                        f"which would tell it, cannot be read: {e}") from None


def build_source(cfg: Config, shape: tuple[int, ...]) -> Callable:
    """The sampler of x0 for data of `shape`: (n, generator, device) -> (n, *shape)."""
    if cfg.data.source != "gaussian" and shape != (2,):
        raise UserError(f"data.source '{cfg.data.source}' is a 2-D distribution but the data have shape "
                        f"{shape}; use data.source=gaussian")
    return SOURCES[cfg.data.source](shape)


class ShardedBatchSampler(Sampler):
    """An endless, resumable stream of this process's index batches.

    Epoch e is a permutation of range(N) seeded by (seed, e); epochs are laid end to end and the
    k-th global batch is positions [k·G, (k+1)·G) of that stream. Process `rank` of `world` takes
    its contiguous share of each global batch. Batch k depends only on (seed, k), so training that
    starts at batch `start` sees exactly the data it would have seen without stopping.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start = seed, start
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=seeds.generator("order", self.seed, epoch))
        return self._perm

    def batch(self, k: int) -> torch.Tensor:
        share = self.global_batch // self.world
        first = k * self.global_batch + self.rank * share
        pos = torch.arange(first, first + share)
        epoch = pos // self.n
        out = torch.empty(share, dtype=torch.long)
        for e in epoch.unique().tolist():  # a batch spans at most a few epochs
            here = epoch == e
            out[here] = self._permutation(e)[pos[here] % self.n]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


def build_loader(dataset, global_batch: int, rank: int, world: int, seed: int, start: int,
                 num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """An endless loader of this process's micro-batches, starting at micro-batch `start`."""
    sampler = ShardedBatchSampler(len(dataset), global_batch, rank, world, seed, start)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_ignore_stop_signals if num_workers else None)


def close_loader(batches) -> None:
    """End the worker processes of a loader's iterator now, by message: they ignore the SIGTERM that the
    interpreter's exit would otherwise send them (and wait for)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean shutdown of the workers
    if shutdown is not None:
        shutdown()


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the training process (a scheduler signals every process of the
    job, Ctrl-C the whole process group), which stops cleanly and then ends them with close_loader; they also exit
    on their own when it dies."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
