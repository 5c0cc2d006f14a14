"""The micro-steps of training: each one's batch (with what the data bring beside it), its conditions and encodings,
and all its training randomness, drawn from (seed, k) so that micro-step k is the same whatever the processes and
wherever training resumed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

import seeds
from data.images import random_hflip
from data.tasks import training_measurement
from flows.couplings import BatchShard


def micro_steps(loader, objective, shard: BatchShard, seed: int, first: int, device: torch.device, ahead: bool,
                labels: bool = True, hflip: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
                space=None, task=None, task_space=None, alignment=None, grad_accum: int = 1, encode_features=None):
    """Yields (x1, draw) for micro-steps first, first+1, ...: the data (with its labels when `labels`,
    randomly mirrored with `hflip`, encoded by `space` for latent flow matching; reflow pairs bring their
    noise, semantic data their label maps, REPA's cached features, in a dict as a third element), the spatial
    condition of an image-conditioned `task` (made in `task_space`, the flow's), whether the micro-step is aligned
    (`alignment`, HASTE's stop counted in optimizer steps of `grad_accum` micro-steps) with REPA's target (cached, or
    `encode_features` of the images) and all training randomness.

    Micro-step k's draws come from a generator seeded by (seed, k), the same on every process, so
    they depend neither on the number of processes nor on where training was resumed. With `ahead`
    (one process: collectives must not run from a second thread) micro-step k+1 is prepared in a
    worker thread while k trains, which hides the host time of the data and of the OT solve.
    """

    def prepare(k: int):
        x1, y, *extras = next(loader)
        extras = extras[0] if extras else {}
        x1, y = x1.to(device, non_blocking=True), None if y is None or not labels else y.to(device, non_blocking=True)
        x0 = extras["x0"].to(device, non_blocking=True) if "x0" in extras else None
        generator = seeds.generator("train", seed, k, device=device)
        if hflip:  # drawn for the global batch, like every draw, so that it does not depend on the processes
            flip = shard.local(torch.rand(x1.shape[0] * shard.world, generator=generator, device=device) < 0.5)
            x1 = random_hflip(x1, flip)
            if "label_map" in extras:
                extras["label_map"] = random_hflip(extras["label_map"][:, None].to(device), flip)[:, 0]
            if "align_mirrored" in extras:  # the cached features of the mirrored images
                mirrored = flip[:, None, None, None].cpu()
                extras["align"] = torch.where(mirrored, extras["align_mirrored"], extras["align"])
        aligning = alignment is not None and alignment.active(k // grad_accum)
        align_target = None
        if aligning and "align" in extras:
            align_target = extras["align"].to(device, non_blocking=True)
        elif aligning and encode_features is not None:  # from the pixels, before latent flow matching encodes them
            align_target = encode_features(x1)
        image_cond = None
        if task is not None:  # from the pixels, before latent flow matching encodes them
            image_cond = task.condition(training_measurement(task, x1, extras, seed, k, shard), task_space)
            image_cond = image_cond.contiguous(memory_format=memory_format)
        if space is not None:
            x1 = space.encode(x1, generator)
        x1 = x1.contiguous(memory_format=memory_format)
        draw = objective.draw(x1, y, generator, shard, x0, image_cond)
        draw.aligning, draw.align_target, draw.step = aligning, align_target, k // grad_accum
        return x1, draw

    k = first
    if not ahead:
        while True:
            yield prepare(k)
            k += 1
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, k)
        while True:
            ready = pending.result()
            k += 1
            pending = pool.submit(prepare, k)
            yield ready
