"""accelerate's training backends (one process, DDP, FSDP, DeepSpeed) behind the few calls train.py makes: the
Accelerator, the model prepared with its optimizer and the EMA that fits the backend, one optimizer step, and a
checkpoint of the full weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch.distributed.tensor import DTensor

import cluster
from config import Config, to_yaml
from errors import UserError
from models.align import without_head
from models.checkpoint import prune_checkpoints, save_checkpoint
from models.ema import EMA, ShardedEMA


def make_accelerator(cfg: Config, run_dir: Path, trackers: list[str]):
    """The Accelerator of a training run: mixed precision, gradient accumulation, the trackers (logging into the run
    folder)."""
    # HASTE's stop leaves the alignment head without a gradient, which DDP must be told it may see.
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.flow.align and cfg.align.stop_step \
        else []
    return cluster.accelerator(mixed_precision=cfg.train.mixed_precision,
                               gradient_accumulation_steps=cfg.train.grad_accum, log_with=trackers or None,
                               project_dir=str(run_dir), kwargs_handlers=unused)


@dataclass
class Prepared:
    """The model as the backend wraps it for training (DDP, FSDP, DeepSpeed, compiled), its optimizer, its EMA, the
    autocast the loss runs under, and `raw_model` and `params` listed once (unwrapping the model and walking its
    parameters cost host time on every step)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | ShardedEMA
    autocast: object
    raw_model: torch.nn.Module
    params: list[torch.nn.Parameter]
    sharded: bool


def prepare(cfg: Config, model: torch.nn.Module, accelerator, micro_batch: int) -> Prepared:
    """The model (on its memory format, with activation checkpointing if asked) wrapped by the backend with a fused
    AdamW and an EMA. Under FSDP each process keeps the EMA of its own shards (the main process also a plain copy for
    previews); otherwise every process keeps a full EMA, made from the float32 weights before DeepSpeed casts them."""
    t, device = cfg.train, accelerator.device
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if t.grad_checkpoint:
        if not hasattr(model, "grad_checkpoint"):
            raise UserError(f"train.grad_checkpoint recomputes the blocks of DiT and UNet models, not of "
                            f"{type(model).__name__} ({cfg.model.name}); remove it")
        model.grad_checkpoint = True
    template = copy.deepcopy(model).to(device) if sharded and accelerator.is_main_process else None
    ema = None if sharded else EMA(model, t.ema_decay, t.ema_warmup)
    if ema is not None:
        ema.model.to(device)
    autocast = contextlib.nullcontext
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        autocast = configure_deepspeed(accelerator, t, micro_batch // accelerator.num_processes)
    # Fused AdamW on CUDA (one kernel for all tensors); on the CPU the foreach form, or torch picks a per-tensor loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        ema = ShardedEMA(accelerator.unwrap_model(model), t.ema_decay, t.ema_warmup, template)
    if t.compile:  # after DDP wrapping, as torch recommends; checkpoints strip the '_orig_mod.' prefix
        model = torch.compile(model)
    return Prepared(model, optimizer, ema, autocast, accelerator.unwrap_model(model), list(model.parameters()),
                    sharded)


def save(accelerator, run_dir: Path, step: int, p: Prepared, cfg: Config, meta: dict[str, str]) -> Path:
    """A checkpoint of step `step`: the full weights of the model and the EMA (under FSDP every process takes part in
    gathering them; the main process writes them, with `meta`), the config and the training state; the alignment
    head stays in the training state. Older checkpoints beyond train.keep_last / keep_every are removed."""
    model_state = without_head(accelerator.get_state_dict(p.model))
    ema_state = p.ema.state() if p.sharded or accelerator.is_main_process else {}  # sharded: {} off main
    path = save_checkpoint(accelerator, run_dir, step, model_state, ema_state, to_yaml(cfg), meta)
    del model_state, ema_state
    if accelerator.is_main_process:
        prune_checkpoints(run_dir, cfg.train.keep_last, cfg.train.keep_every)
    return path


def configure_deepspeed(accelerator, t, per_process_batch: int):
    """DeepSpeed takes the batch, the accumulation and the clipping from its config: train.py's settings. It casts
    the weights for mixed precision but not the inputs: returns the autocast that makes them fit."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise UserError("DeepSpeed ZeRO stage 3 splits the weights, which train.py's EMA and previews read whole; use "
                        "configs/accelerate/fsdp.yaml (FSDP2 full shard) to shard the weights")
    ds.update(train_micro_batch_size_per_gpu=per_process_batch, gradient_accumulation_steps=t.grad_accum,
              gradient_clipping=t.grad_clip)
    ds.pop("train_batch_size", None)  # follows from the above
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, accelerator.device.type, dtype=dtype)


def update_weights(accelerator, params, optimizer, ema: EMA, raw_model, step: int, grad_clip: float
                   ) -> torch.Tensor:
    """The step after the backward passes: clip the gradients to norm `grad_clip` (0: no clipping), step the
    optimizer, clear the gradients, update the EMA for optimizer step `step` (1-based). Returns the norm before
    clipping."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # it clipped and stepped inside backward
        norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()  # as it keeps it: no host sync
        grad_norm = torch.as_tensor(math.nan if norm is None else norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards, replicated
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(raw_model, step)
    return grad_norm
