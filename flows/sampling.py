"""One sampler specification for sample.py, evaluate.py and the benches, parsed and checked once, and the batch of
samples it draws.

A sampler is SOLVER[:STEPS][:SCHEDULE] (euler:10, heun:25:cosine, rk4:4:logit_normal:mean=0,std=1, dopri5); the
rest of the specification is the config's sample section (guidance scale and interval, tolerances, SDE diffusion
and last step, seed, batch per process), which the scripts' flags override. Sample k's noise, label and condition
come from (seed, k) (flows/solvers.py), so a sample does not depend on the batch or on the number of processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster import Stopped, gather_indexed, progress
from config import Config, check_range, load_config
from data.tasks import model_inputs, task_of_meta
from errors import UserError, check_name
from flows import PATHS, SDE_SOLVERS, check_sampling, sde_sampler, velocity_model
from flows.guidance import GUIDANCE, check_settings
from flows.schedules import parse_schedule
from flows.solvers import (
    ADAPTIVE,
    SolverResult,
    check_guidance,
    check_solver,
    check_tolerances,
    condition,
    fixed_grid_nfe,
    generate,
    noise,
    parse_interval,
    sampler_passes,
)
from models import build_model
from models.checkpoint import load_weights

# The flags of sample.py and evaluate.py that override the config's sample section: flag → key.
FLAGS = {"solver": "solver", "steps": "steps", "schedule": "schedule", "cfg_scale": "cfg_scale",
         "cfg_interval": "cfg_interval", "bspp": "batch_size", "seed": "seed", "atol": "atol", "rtol": "rtol",
         "diffusion": "diffusion", "diffusion_norm": "diffusion_norm", "last_step": "last_step",
         "guidance": "guidance", "guide_weights": "guide_weights", "apg_eta": "apg_eta", "apg_r": "apg_r",
         "apg_momentum": "apg_momentum", "zero_steps": "zero_steps"}


@dataclass(frozen=True)
class Sampler:
    """A solver, its number of steps (None: adaptive), its time schedule and its guidance rule (None: the config's
    sample.guidance)."""

    solver: str
    steps: int | None
    schedule: str
    guidance: str | None = None

    @property
    def label(self) -> str:
        guidance = f"@{self.guidance}" if self.guidance else ""
        if self.steps is None:
            return self.solver + guidance
        return f"{self.solver}:{self.steps}" + ("" if self.schedule == "linear" else f":{self.schedule}") + guidance


def parse_samplers(texts: list[str]) -> list[Sampler]:
    """'euler:10,heun:25:cosine' (and schedule parameters such as logit_normal:mean=0,std=1; a guidance rule after
    '@': euler:32@auto) -> samplers."""
    pieces = [piece for text in texts for piece in text.split(",") if piece]
    specs: list[str] = []
    for piece in pieces:  # 'std=1' after 'logit_normal:mean=0' continues the previous sampler's schedule
        if specs and "=" in piece.split(":")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    samplers = []
    for spec in specs:
        spec, _, guidance = spec.partition("@")
        if guidance:
            check_name(GUIDANCE, guidance, f"the guidance of sampler '{spec}@{guidance}'")
        solver, _, rest = spec.partition(":")
        steps_text, _, schedule = rest.partition(":")
        steps = None
        if steps_text:
            try:
                steps = int(steps_text)
            except ValueError:
                raise UserError(f"sampler '{spec}': steps must be an integer (SOLVER[:STEPS][:SCHEDULE], "
                                "e.g. euler:10 or heun:25:cosine)") from None
        if steps is None and solver not in ADAPTIVE:
            steps = 100
        check_solver(solver, steps)
        parse_schedule(schedule or "linear")
        samplers.append(Sampler(solver, steps, schedule or "linear", guidance or None))
    return samplers


def sampling_key(cfg, sampler: Sampler, scale: float) -> dict:
    """The row's SDE setting ('DIFFUSION:NORM:LAST_STEP', SDE samplers only), guidance interval (when guided and not
    [0, 1]) and guidance rule (when guided by another than CFG): None otherwise, as in reports written before they
    existed."""
    s, interval = cfg.sample, list(cfg.sample.cfg_interval)
    return {"sde": f"{s.diffusion}:{s.diffusion_norm:g}:{s.last_step}" if sampler.solver in SDE_SOLVERS else None,
            "cfg_interval": interval if scale != 1 and interval != [0, 1] else None,
            "guidance": guidance_key(cfg, sampler) if scale != 1 else None}


def guidance_of(cfg: Config, sampler: Sampler) -> str:
    """The sampler's guidance rule: its own (evaluate.py's SAMPLER@RULE), or the config's."""
    return sampler.guidance or cfg.sample.guidance


def guidance_key(cfg: Config, sampler: Sampler) -> str | None:
    """The guidance rule and its knobs in a few words (None for CFG), as rows and info.json record them."""
    s, name = cfg.sample, guidance_of(cfg, sampler)
    guide = Path(s.guide_weights).resolve() if s.guide_weights else ""  # one key however the path is spelled
    return {"cfg": None, "auto": f"auto:{guide}", "cfg_zero": f"cfg_zero:zero_steps={s.zero_steps}",
            "apg": f"apg:eta={s.apg_eta:g},r={s.apg_r:g},momentum={s.apg_momentum:g}"}[name]


def skipped(cfg: Config, sampler: Sampler, scale: float) -> int:
    """The steps of the grid that CFG-Zero*'s zero-init skips (0 unless guided by cfg_zero)."""
    return cfg.sample.zero_steps if scale != 1 and guidance_of(cfg, sampler) == "cfg_zero" else 0


def make_guidance(cfg: Config, sampler: Sampler, scale: float, interval, guide=None):
    """The sampler's guidance at weight `scale` for t in `interval` (None for CFG, which generate does itself);
    autoguidance's `guide` is the weaker model (load_guide)."""
    from flows.guidance import Guidance

    s, name = cfg.sample, guidance_of(cfg, sampler)
    if name == "cfg":
        return None
    if name == "apg":
        return Guidance(name, scale, tuple(interval), eta=s.apg_eta, r=s.apg_r, momentum=s.apg_momentum,
                        path=PATHS[cfg.flow.path](cfg))
    return Guidance(name, scale, tuple(interval), guide=guide, zero_steps=s.zero_steps if name == "cfg_zero" else 0)


def guidance_for(cfg: Config, sampler: Sampler, scale: float, meta: dict[str, str], model, device: torch.device,
                 dtype: torch.dtype, guide=None):
    """make_guidance for the model of weight-file metadata `meta`, autoguidance's guide loaded (or `guide`, loaded
    before); returns the guidance and the guide's cost per pass relative to the model's (None without a guide)."""
    if guidance_of(cfg, sampler) != "auto" or scale == 1:
        return make_guidance(cfg, sampler, scale, cfg.sample.cfg_interval), None
    guide = guide or load_guide(cfg, meta, device, dtype)
    shape = tuple(json.loads(meta.get("latent_shape", meta["data_shape"])))
    cost = relative_cost(guide, model, shape, int(meta["num_classes"]), device, dtype)
    return make_guidance(cfg, sampler, scale, cfg.sample.cfg_interval, guide), cost


def check_model_guidance(cfg: Config, meta: dict[str, str], scale: float, rule: str = "cfg") -> None:
    """check_guidance for the model of weight-file metadata `meta`: its classes, label dropout, the guidance baked in
    (MeanFlow's ω) and the range it takes as input; `rule` names the guidance in the message."""
    check_guidance(scale, int(meta["num_classes"]), float(meta.get("label_dropout", cfg.flow.label_dropout)),
                   float(meta.get("meanflow_cfg", 1)), json.loads(meta.get("meanflow_cfg_range", "[]")), rule)


def passes_of(row: dict, sampler: Sampler, skip: int = 0, guidance_input: bool = False) -> float | None:
    """The network's forward passes per sample of a row (guidance doubles those inside its interval; autoguidance's
    second pass is the guide's; a model that takes guidance as an input guides in one pass)."""
    if row["nfe"] is None:
        return None
    return sampler_passes(row["nfe"], 1 if guidance_input else row["cfg_scale"], sampler.solver, sampler.steps,
                          sampler.schedule, tuple(row["cfg_interval"] or (0.0, 1.0)), skip)


def load_guide(cfg: Config, meta: dict[str, str], device: torch.device, dtype: torch.dtype):
    """Autoguidance's guide, sample.guide_weights (a checkpoint folder's EMA weights, or a weight file with its
    config.yaml beside it), as a velocity model; it must take the main model's data, latents, classes and inputs.
    Returns the model and its cost per forward pass relative to the main model's (FLOPs of one sample)."""
    from data import weights_info

    if not cfg.sample.guide_weights:  # evaluate.py's --cfg-scale may guide where the config's scale does not
        raise UserError("--guidance auto guides with a weaker model of the same task: give its checkpoint with "
                        "--guide-weights (an early checkpoint of this run, or a smaller run on the same data)")
    path = Path(cfg.sample.guide_weights)
    path = path / "ema.safetensors" if path.is_dir() else path
    if not path.is_file() or not (path.parent / "config.yaml").is_file():
        raise UserError(f"--guide-weights {cfg.sample.guide_weights} is no checkpoint (a folder with ema.safetensors "
                        "and config.yaml, or a weight file beside its config.yaml); give an early checkpoint of this "
                        "run or a smaller run on the same data")
    guide_cfg = load_config(path.parent / "config.yaml")
    guide_meta = weights_info(path, guide_cfg)
    for key in ("kind", "data_shape", "latent_shape", "num_classes", "task", "feature_dim"):
        if guide_meta.get(key) != meta.get(key):
            raise UserError(f"--guide-weights {path} was trained with {key} {guide_meta.get(key)}, the model with "
                            f"{meta.get(key)}; guide with a run on the same data and inputs")
    if guide_cfg.latent.autoencoder != cfg.latent.autoencoder or guide_cfg.flow.path != cfg.flow.path:
        raise UserError(f"--guide-weights {path} lives in another space or on another path (latent.autoencoder, "
                        "flow.path) than the model; guide with a run of the same flow")
    return sampling_model(guide_cfg, path, guide_meta, device).to(dtype)


def relative_cost(guide, model, shape: tuple[int, ...], num_classes: int, device: torch.device,
                  dtype: torch.dtype) -> float:
    """FLOPs of one forward pass of `guide` over those of `model` (one sample; torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.zeros(1, *shape, device=device, dtype=dtype), torch.full((1,), 0.5, device=device, dtype=dtype)
    y = torch.zeros(1, dtype=torch.long, device=device) if num_classes else None
    counts = []
    for net in (guide, model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x, t, y)
        counts.append(counter.get_total_flops())
    return counts[0] / max(counts[1], 1)


def settle(cfg: Config, flags, specs: list[str] | None = None) -> list[Sampler]:
    """The sampler specification, checked once: the flags that are given (not None; FLAGS, the guidance interval as
    'A,B') over cfg.sample, then the samplers of `specs` (evaluate.py's list) or the section's own. One clear sentence
    for anything that cannot be honoured."""
    s = cfg.sample
    for flag, key in FLAGS.items():
        value = getattr(flags, flag, None)
        if value is not None:
            setattr(s, key, parse_interval(value) if flag == "cfg_interval" else value)
    check_range("sample.seed", s.seed, "--seed")
    if s.steps is None and s.solver not in ADAPTIVE:
        s.steps = 100
    if specs:
        samplers = parse_samplers(specs)
    else:
        check_solver(s.solver, s.steps)
        parse_schedule(s.schedule)
        samplers = [Sampler(s.solver, None if s.solver in ADAPTIVE else s.steps, s.schedule)]
    check_sampling(cfg, [sampler.solver for sampler in samplers])
    check_settings(s, samplers)
    if any(sampler.steps is None for sampler in samplers):
        check_tolerances(s.atol, s.rtol)
    if s.batch_size <= 0:
        raise UserError(f"--bspp must be positive, got {s.batch_size}")
    return samplers


def guidance_flags(parser) -> None:
    """The guidance flags of sample.py and evaluate.py (each overrides its key of the config's sample section)."""
    g = parser.add_argument_group("guidance beyond CFG", "the rule that --cfg-scale w guides with (flows/guidance.py); "
                                  "w = 1 is no guidance")
    g.add_argument("--guidance", choices=list(GUIDANCE),
                   help="cfg (classifier-free, the default), auto (autoguidance: a weaker model of the same task, "
                        "--guide-weights; unconditional models too), apg (adaptive projected guidance), cfg_zero "
                        "(CFG-Zero*: optimized scale, zero-init steps)")
    g.add_argument("--guide-weights", metavar="CKPT", help="auto: the guide, a checkpoint folder (its EMA weights) or "
                                                         "weight file of a run on the same data and inputs: an early "
                                                         "checkpoint of this run, or a smaller model")
    g.add_argument("--apg-eta", type=float, help="apg: weight η of the update's part parallel to the conditional "
                                                "prediction (default 0)")
    g.add_argument("--apg-r", type=float, help="apg: cap r on the update's norm, per sample (default 0: none)")
    g.add_argument("--apg-momentum", type=float, help="apg: momentum β over evaluations (default 0; APG uses "
                                                      "negative values such as -0.5)")
    g.add_argument("--zero-steps", type=int, help="cfg_zero: the first K steps output zero velocity, so the "
                                                  "integration starts at the grid's K-th time (default 0)")


def describe(cfg: Config) -> str:
    """The section's sampler in words, as the scripts print it."""
    s = cfg.sample
    steps = s.steps if s.solver not in ADAPTIVE else None
    rule = guidance_key(cfg, Sampler(s.solver, steps, s.schedule)) if s.cfg_scale != 1 else None
    return (f"{s.solver}, {f'{steps} steps, {s.schedule} schedule' if steps else f'atol {s.atol}, rtol {s.rtol}'}, "
            f"cfg scale {s.cfg_scale}, seed {s.seed}"
            + (f", {s.diffusion} diffusion ×{s.diffusion_norm:g}, {s.last_step} last step" if s.solver in SDE_SOLVERS
               else "") + (f", guidance for t in {list(s.cfg_interval)}" if tuple(s.cfg_interval) != (0, 1) else "")
            + (f", guidance {rule}" if rule else ""))


def sampling_model(cfg: Config, weights: Path, meta: dict[str, str], device: torch.device) -> torch.nn.Module:
    """The velocity field of a weight file (its metadata `meta`) for the samplers, in eval mode on `device`. Vectors
    are integrated in float64: float32 matrix products differ in the last bit with the batch size, which would make
    sample k depend on --bspp; images are rounded to uint8, which absorbs those bits."""
    shape = tuple(json.loads(meta.get("latent_shape", meta["data_shape"])))
    model = build_model(cfg, shape, int(meta["num_classes"]), int(meta.get("feature_dim", 0)),
                        **model_inputs(task_of_meta(meta), shape[0]))
    load_weights(model, weights)
    dtype = torch.float64 if meta["kind"] == "vector" else torch.float32
    return velocity_model(model.to(device, dtype).eval(), cfg)


def draw(model, sampler: Sampler, cfg: Config, seed: int, batch: list[int], shape: tuple[int, ...],
         device: torch.device, dtype: torch.dtype, source=None, labels: torch.Tensor | None = None,
         cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0), features: torch.Tensor | None = None,
         guidance=None) -> tuple[torch.Tensor, SolverResult]:
    """Samples `batch` (global indices) of base seed `seed`: their noise x0 as drawn (on the CPU; standard normal,
    or from `source`), and the solver's result from it, with the labels of these indices (of all samples' `labels`),
    guidance `cfg_scale` for t in `cfg_interval`, Latent-CFM's condition (from the prior, or the `features` of
    reference images) and the tolerances and SDE settings of cfg.sample, integrated in `dtype`; `guidance`
    (make_guidance) replaces cfg_scale and cfg_interval."""
    s = cfg.sample
    x0 = noise(seed, batch, shape, source)
    y = None if labels is None else labels[batch].to(device)
    out = generate(model, x0.to(device, dtype), sampler.steps, sampler.solver, y=y,
                   schedule=sampler.schedule, cfg_scale=cfg_scale, atol=s.atol, rtol=s.rtol,
                   cond=condition(model, seed, batch, features), sde=sde_sampler(cfg, sampler.solver, seed, batch),
                   cfg_interval=tuple(cfg_interval), guidance=guidance)
    return x0, out


def evaluations(out: SolverResult, n: int) -> float:
    """Velocity evaluations summed over a batch of n samples (adaptive solvers count each sample's own)."""
    return out.nfe * n if out.sample_nfe is None else out.sample_nfe.sum().item()


def sample_row(accelerator, model, sampler: Sampler, cfg: Config, seed: int, n: int, shape: tuple[int, ...],
               dtype: torch.dtype, reduce, width: tuple[int, ...], batch_size: int, source=None,
               labels: torch.Tensor | None = None, cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0), stop=None,
               desc: str = "sampling", guidance=None) -> tuple[torch.Tensor, float]:
    """The samples of one evaluation row: samples 0..n-1 shared out over the processes (process r draws r, r + W,
    ..., in batches of `batch_size`), each batch kept as reduce(x) on the CPU (Inception features, points; rows of
    `width` where a process has none), all of them gathered back in index order; and the NFE per sample (adaptive
    solvers: the mean over the samples, each of which controls its own steps, so it does not depend on the batch).
    `stop`: a StopRequest, honoured after each batch."""
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    values, nfe = [], 0.0
    bar = progress(n, unit="sample", disable=not accelerator.is_main_process, leave=False, desc=desc)
    start = time.perf_counter()
    for first in range(0, -(-n // accelerator.num_processes), batch_size):  # as many batches on every process
        batch = mine[first: first + batch_size]
        if batch:
            _, out = draw(model, sampler, cfg, seed, batch, shape, accelerator.device, dtype, source, labels, cfg_scale,
                          cfg_interval, guidance=guidance)
            nfe += evaluations(out, len(batch))
            values.append(reduce(out.x))
            bar.update(len(batch) * accelerator.num_processes)
            bar.set_postfix(samples_s=f"{bar.n / (time.perf_counter() - start):.1f}", nfe=out.nfe)
        if stop is not None and stop.now(accelerator):
            bar.close()
            raise Stopped
    bar.close()
    local = torch.cat(values) if values else torch.zeros(0, *width, dtype=torch.float64)
    total = accelerator.reduce(torch.tensor([nfe], dtype=torch.float64, device=accelerator.device), "sum").item()
    skip = guidance.zero_steps if guidance is not None and guidance.active else 0
    mean_nfe = total / n if sampler.steps is None else fixed_grid_nfe(sampler.solver, sampler.steps - skip)
    return gather_indexed(accelerator, local, n), mean_nfe
