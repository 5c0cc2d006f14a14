"""Weights I/O: safetensors only, with unwrapped keys (no 'module.' or '_orig_mod.' prefixes)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from config import load_config
from errors import UserError, atomic_write, full_disk, on_main_process, together


def unwrapped_state(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict (or a state dict) with wrapper prefixes (DDP, torch.compile) stripped, contiguous,
    on CPU."""
    state = {}
    for key, value in (model if isinstance(model, dict) else model.state_dict()).items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        state[key] = value.detach().cpu().contiguous()
    return state


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights (or a state dict) to `path` atomically, with string `metadata` in the file's
    header. The same weights and metadata give the same bytes in every process (sort_metadata)."""

    def write(tmp: Path) -> None:
        save_file(unwrapped_state(model), str(tmp), metadata=metadata)
        sort_metadata(tmp)

    atomic_write(path, write)


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's metadata in place with its keys sorted. safetensors writes them in the order of
    a hash map seeded per process, so without this the bytes of one checkpoint differ from run to run. The header
    keeps its length (the same entries in another order); the tensors' entries and data are untouched."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # escaped otherwise than safetensors' own writer: its header stays
            return
        f.seek(8)
        f.write(text.ljust(size))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (what the data looked like: shape, classes)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"weights file {path} is not a readable safetensors file ({e})") from None


def read_weights(path: str | Path, expected: dict[str, tuple[int, ...]],
                 missing_ok: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, failing with one sentence unless they have the `expected` names and
    shapes; names that start with one of `missing_ok` may be absent."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"weights file {path} is unreadable or truncated ({e}); delete that checkpoint "
                        "folder to fall back to an earlier one") from None
    missing = {k for k in expected.keys() - state.keys() if not (missing_ok and k.startswith(missing_ok))}
    unexpected = state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        detail = ", ".join(f"{k} {what}" for what, ks in (("missing", missing), ("unexpected", unexpected),
                                                          ("has another shape", wrong)) for k in sorted(ks)[:3])
        raise UserError(f"weights file {path} does not fit the model built from the config ({detail})")
    return state


def load_weights(model: nn.Module, path: str | Path, missing_ok: tuple[str, ...] = ()) -> list[str]:
    """Load safetensors weights into `model`, failing with one sentence when they do not fit. Parameters whose
    names start with one of `missing_ok` may be absent from the file (they keep their values); returns those."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_weights(path, expected, missing_ok)
    kept = sorted(expected.keys() - state.keys())
    model.load_state_dict(state, strict=not kept)
    return kept


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: runs/NAME/checkpoints/step_0001000/{model,ema}.safetensors, config.yaml, train_state/


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first. A folder is complete once renamed to step_N."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    for path in folder.glob("step_*") if folder.is_dir() else []:
        suffix = path.name.removeprefix("step_")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor], config_yaml: str,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write checkpoints/step_N whole or not at all: everything goes into a hidden temporary folder
    that is renamed when complete, so a crash mid-write leaves the previous checkpoints as they were.
    The weights (full state dicts: accelerator.get_state_dict of the model, the EMA's state) are written by the
    main process; `metadata` (sizes derived from the data) goes into both weight files, so that sampling needs no
    data. Called on every process (accelerator.save_state writes per-process RNG state, and under FSDP each
    process's shards). A full disk on any process removes the temporary folder and stops every process with one
    line."""
    final = Path(run_dir) / "checkpoints" / checkpoint_name(step)
    tmp = final.with_name(f".tmp_{final.name}")

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with full_disk(tmp):
            tmp.mkdir(parents=True)

    def write_state() -> None:
        with full_disk(tmp / "train_state"):
            accelerator.save_state(str(tmp / "train_state"))

    def finish() -> None:
        save_weights(model_state, tmp / "model.safetensors", metadata)
        save_weights(ema_state, tmp / "ema.safetensors", metadata)
        with full_disk(tmp):
            (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # the same step saved again (a resumed run that had not moved on)
            shutil.rmtree(final)
        os.rename(tmp, final)

    on_main_process(accelerator, prepare)
    try:
        together(accelerator, write_state)  # also waits for every process's RNG state before the rename
        on_main_process(accelerator, finish)
    except UserError:
        if accelerator.is_main_process:  # nothing half-written stays behind to fill the disk
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and those at multiples of `keep_every`."""
    found = list_checkpoints(run_dir)
    removed = []
    for step, path in found[:-keep_last] if keep_last > 0 else found:
        if keep_every > 0 and step % keep_every == 0:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


RUNS_UNDER = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}  # else DDP (or one process)


def trained_under(train_state: Path) -> str:
    """Which training wrote accelerate's state folder: FSDP (sharded model and optimizer, torch.distributed
    .checkpoint), DeepSpeed (its engine's checkpoint, named by the tag in `latest`) or DDP / one process."""
    if (train_state / "pytorch_model_fsdp_0").is_dir():
        return "FSDP"
    if (train_state / "latest").is_file():
        return "DeepSpeed"
    return "DDP"


def load_checkpoint(accelerator, path: Path, ema) -> None:
    """Restore model, optimizer, scaler and RNG (accelerator.load_state, weights_only) and the EMA weights."""
    needed = [path / "ema.safetensors", path / "train_state"]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete (no {', '.join(missing)}); delete it to resume from "
                        "the previous one")
    written, now = trained_under(path / "train_state"), RUNS_UNDER.get(accelerator.distributed_type, "DDP")
    if written != now:
        raise UserError(f"checkpoint {path} holds the training state of {written} and this run uses {now}; resume it "
                        f"as it was trained (accelerate launch --config_file ...), or start a new run from its "
                        f"weights with train.init_from={path}")
    split = written == "DeepSpeed" and len(list((path / "train_state" / "pytorch_model").glob("zero_pp_rank_*")))
    if split and split != accelerator.num_processes:
        raise UserError(f"checkpoint {path} holds DeepSpeed's optimizer state split over {split} processes and this "
                        f"run has {accelerator.num_processes}; resume it on {split} (accelerate launch --num_processes "
                        f"{split}), or shard with FSDP, whose checkpoints resume on any number")
    ema.load(path / "ema.safetensors")
    try:
        accelerator.load_state(str(path / "train_state"))
    except Exception as e:  # a truncated or foreign file: name the checkpoint, not the library's internals
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be loaded ({reason}); delete it to resume from the previous "
                        "one") from None


def init_weights(model: nn.Module, path: str, time_scale: float) -> str:
    """train.init_from: a new run starts from another's weights (a checkpoint folder's EMA, or a weight file), which
    read the time through their own embedding's scale; a MeanFlow interval (or guidance) embedding the weights lack
    starts adding zero. Returns what was done, for the log."""
    init = Path(path) / "ema.safetensors" if Path(path).is_dir() else Path(path)
    if (init.parent / "config.yaml").is_file():
        scale = load_config(init.parent / "config.yaml").model.time_scale
        if scale != time_scale:
            raise UserError(f"train.init_from {init.parent} was trained with model.time_scale={scale:g}; set "
                            f"model.time_scale={scale:g} (its time embedding reads {scale:g}·t)")
    new = load_weights(model, init, missing_ok=("interval_embed.", "guidance_embed."))
    return f"initialized from {init}" + (f"; the MeanFlow interval and guidance embeddings the weights lack "
                                         f"({len(new)} tensors) start adding zero" if new else "")


def select_checkpoints(run: Path, spec: str) -> list[tuple[int, Path]]:
    """The checkpoints of a run that evaluate.py's --checkpoints names: all, last, or steps such as 5000,10000."""
    found = list_checkpoints(run)
    if not found:
        raise UserError(f"run dir {run} has no checkpoints (checkpoints/step_N); train first or give the run's folder")
    if spec == "all":
        return found
    if spec == "last":
        return found[-1:]
    try:
        wanted = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--checkpoints must be all, last or training steps such as 5000,10000; got {spec}") from None
    steps = dict(found)
    missing = [s for s in wanted if s not in steps]
    if missing:
        raise UserError(f"run dir {run} has no checkpoint at step {missing[0]}; it has {', '.join(map(str, steps))}")
    return [(s, steps[s]) for s in wanted]
