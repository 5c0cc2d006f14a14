"""Exponential moving average of the weights: an explicit frozen copy, updated after optimizer.step(); under FSDP,
one shard of it per process."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.align import HEAD, without_head
from models.checkpoint import load_weights, read_weights, unwrapped_state


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ on every parameter and floating buffer.

    With `warmup`, the decay at update n (1-based) is d_n = min(decay, (1 + n) / (10 + n)), so the
    average forgets the random initial weights quickly instead of carrying e^(−n(1−decay)) of them
    (5% after 3,000 steps at 0.999); the fixed decay takes over from step (10·decay − 1) / (1 − decay)
    (8,990 at 0.999).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if getattr(self.model, HEAD, None) is not None:  # an alignment head is no part of the velocity field
            setattr(self.model, HEAD, None)
        # (source model, its tensors, ours), listed at the first update: walking the module tree costs
        # milliseconds of host time per step, and training and loading weights update the tensors in place.
        self._pairs: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        """The tensors averaged, in the order of the averages (an alignment head's left out)."""
        head = [id(t) for t in getattr(model, HEAD).parameters()] if getattr(model, HEAD, None) is not None else []
        return [*(p for p in model.parameters() if id(p) not in head),
                *(b for b in model.buffers() if b.is_floating_point())]

    def _averages(self) -> list[torch.Tensor]:
        return self._tensors(self.model)

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """Update n (1-based: the optimizer step just taken)."""
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, self._tensors(model), self._averages())
            if len(self._pairs[1]) != len(self._pairs[2]):
                raise ValueError("the EMA is updated from a model with other tensors than the one it was made from")
        _, source, ours = self._pairs
        if source and source[0].dtype != ours[0].dtype:  # DeepSpeed's mixed precision: the weights in bf16/fp16
            source = [s.to(o.dtype) for s, o in zip(source, ours)]
        torch._foreach_lerp_(ours, source, 1.0 - self.decay_at(n))

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged weights, unwrapped, on the CPU: what ema.safetensors holds."""
        return unwrapped_state(self.model)

    def load(self, path: str | Path) -> None:
        """Continue from the averaged weights in a safetensors file."""
        load_weights(self.model, path)

    def gathered(self) -> nn.Module | None:
        """A plain module with the averaged weights, for previews and samples."""
        return self.model


class ShardedEMA(EMA):
    """The EMA of a model sharded by FSDP (its parameters DTensors split over the processes): each process keeps
    and updates the average of its own shards only, as the optimizer does its moments, so no process holds a
    full copy while training. Buffers, which FSDP does not shard, are averaged whole.

    `template`: a plain copy of the model (on the main process; None elsewhere) into which `gathered` loads the
    full averaged weights for previews and samples. `state` and `gathered` gather the shards: every process
    calls them.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, template: nn.Module | None = None):
        self.decay, self.warmup = decay, warmup
        keys = without_head(model.state_dict()).keys()  # an alignment head is no part of the velocity field
        named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n in keys]
        self.names = [n for n, t in named if t.is_floating_point()]
        self.shards = [t.detach().clone() for n, t in named if t.is_floating_point()]
        self.fixed = {n: t for n, t in named if not t.is_floating_point()}  # integer buffers: not averaged
        self.model = template.eval().requires_grad_(False) if template is not None else None
        if getattr(self.model, HEAD, None) is not None:
            setattr(self.model, HEAD, None)
        self._pairs = None

    def _tensors(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict([*model.named_parameters(), *model.named_buffers()])
        return [named[name] for name in self.names]

    def _averages(self) -> list[torch.Tensor]:
        return self.shards

    def _full(self):
        """(name, full tensor) of every average, gathered from the shards: every process takes part."""
        for name, t in zip(self.names, self.shards):
            yield name, t.full_tensor() if isinstance(t, DTensor) else t

    def state(self) -> dict[str, torch.Tensor]:
        """The full averaged weights on the CPU on the main process (the one that writes them), {} elsewhere."""
        main = self.model is not None
        state = {n: t.cpu() for n, t in self._full() if main}  # every process gathers; the main one keeps
        return {**state, **{n: t.cpu() for n, t in self.fixed.items()}} if main else {}

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Every process reads the full file and keeps its own shards (on any number of processes)."""
        expected = {n: tuple(t.shape) for n, t in [*zip(self.names, self.shards), *self.fixed.items()]}
        state = read_weights(path, expected)
        for name, ours in [*zip(self.names, self.shards), *self.fixed.items()]:
            full = state[name].to(ours.device, ours.dtype)
            if isinstance(ours, DTensor):  # each process cuts its own shard from its copy: no communication
                full = distribute_tensor(full, ours.device_mesh, ours.placements, src_data_rank=None)
            ours.copy_(full)

    @torch.no_grad()
    def gathered(self) -> nn.Module | None:
        """The template with the full averaged weights, copied on the device (main process; None elsewhere)."""
        targets = self.model.state_dict() if self.model is not None else {}
        for name, full in self._full():
            if name in targets:
                targets[name].copy_(full)
        return self.model
