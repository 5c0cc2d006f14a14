"""Image-conditioned sampling: a trained conditional model, or a training-free sampler on an unconditional one.

Every method takes the measurement of N cases (data/tasks.py) and returns images in [-1, 1] before the measurement
is enforced (the caller pastes known pixels back, or restores the block means), and the velocity evaluations per
sample:

    model     the conditional velocity v(x, t | c) of a model trained with data.task, any solver; guidance with
              --cfg-scale over the condition (its null: nothing known), as over labels
    replace   inpainting by replacement (RePaint, Lugmayr et al. 2022, without its resampling): after each solver step
              to t, the known region is set to where the model's path puts the known data, x_t = α_t·y + σ_t·x0
              with the sample's own noise x0 (plus g_t·ε on a bridge path, ε drawn once per sample), so the model
              fills the holes around it; any fixed-grid solver
    pnp       PnP-Flow (Martin et al. 2025, Algorithm 1, written there for the straight path), for any linear
              measurement A (inpainting, super-resolution): at t_n = n/N, n = 0..N−1, a gradient step on the data
              fidelity z = x − γ_n ∇½‖W(A x − y)‖², with γ_n = (1 − t_n)^α; the path's point at t_n between fresh
              noise ε and z, z̃ = α_t·z + σ_t·ε; the flow's estimate of the data x = E[x1 | z̃] =
              (σ_t·v − σ̇_t·z̃)/D_t (flows/paths.py; on rectified flow z̃ + (1 − t_n)·v(z̃, t_n), the paper's). One
              evaluation per step; ε of sample k comes from its own generator (seed, k), so samples do not depend on
              the batch. W = (A·Aᵀ)^(−1/2) (1 for a mask, f for f×f block means) makes the step at γ = 1 a
              projection onto A x = y, so α alone sets the schedule. A bridge path's velocity does not give E[x1 | z̃]
              (its noise g_t·ε is not recoverable from it), so PnP-Flow is refused there.
    mean, bicubic   baselines without a model: the holes filled with the image's mean, bicubic upsampling.

In latent space (latent.autoencoder) the flow's state is z and the measurement is taken of the decoded image D(z):
replacement replaces the latent positions whose pixels are all known with the encoded known image, and PnP-Flow's
gradient goes through the decoder by autograd, so each of its steps costs a decoder forward and backward pass besides
the velocity evaluation (docs/benchmarks.md gives the figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.tasks import Measurement, build_task
from errors import UserError
from flows.paths import T_EPS, AffinePath, data_from_velocity
from flows.solvers import ADAPTIVE, _Counted, generate, guided, noise, per_sample_normal, sample_generators

METHODS = ("model", "replace", "pnp", "mean", "bicubic")


def check_method(method: str, task, conditional: bool, solver: str, path_name: str = "linear") -> None:
    """A method that fits the task and the model (trained on flow.path=`path_name`), or one clear sentence."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (valid: {', '.join(METHODS)})")
    if method == "model" and not conditional:
        raise UserError(f"--method model needs a model trained with data.task={task.name}; this one is unconditional: "
                        "use --method replace (inpainting) or pnp")
    if method in ("replace", "pnp") and conditional:
        raise UserError(f"--method {method} is training-free, for unconditional models; this one was trained for "
                        f"{task.name}: use --method model")
    if method == "replace" and task.name != "inpaint":
        raise UserError(f"--method replace inpaints; for {task.name} use --method pnp")
    if method in ("replace", "pnp") and task.name == "semantic":
        raise UserError("semantic-to-image needs a model trained with data.task=semantic (--method model)")
    if method == "mean" and task.name != "inpaint" or method == "bicubic" and task.name != "superres":
        raise UserError(f"--method {method} is the baseline of {'inpaint' if method == 'mean' else 'superres'}, "
                        f"not of {task.name}")
    if method == "pnp" and solver != "euler":
        raise UserError(f"--method pnp takes one velocity evaluation per step (its own scheme); give --solver euler, "
                        f"not {solver}")
    if method == "replace" and solver in ADAPTIVE:
        raise UserError(f"--method replace needs a fixed-grid solver (euler, midpoint, heun, rk4), not {solver}")
    if method == "pnp" and path_name in ("icfm", "sb"):
        raise UserError(f"--method pnp needs the denoised estimate E[x1 | x_t], which the velocity of flow.path="
                        f"{path_name} does not give (its bridge noise is not recoverable from it); use --method "
                        "replace (inpainting)")


def choose_task(trained, name: str | None, method: str | None, mask: str | None, factor: int | None,
                default_factor: int, data_shape: tuple[int, ...]):
    """The task and method of a sampling or evaluation run: the model's own task (trained with data.task), or `name`
    on an unconditional model; --mask and --factor applied; the default method: the model's, else replacement for
    inpainting and PnP-Flow for super-resolution."""
    if trained is not None and name is not None and name != trained.name:
        raise UserError(f"--task {name}: this model was trained for {trained.name} (data.task={trained.name}); give "
                        f"--task {trained.name} or leave --task out")
    if trained is not None:
        task = trained
        if factor is not None and factor != getattr(task, "factor", factor):
            raise UserError(f"--factor {factor}: this model was trained for ×{task.factor}; leave --factor out")
    else:
        task = build_task(name, "mixed", factor or default_factor, 0)
        if task.name == "superres":
            task.check(data_shape)
    if task.name == "inpaint" and mask:
        task.mask = mask
    method = method or ("model" if trained is not None else "replace" if task.name == "inpaint" else "pnp")
    return task, method


def check_task_guidance(cfg_scale: float, method: str, cond_dropout: float) -> None:
    """Guidance over a spatial condition needs its unconditional velocity, learned with flow.cond_dropout."""
    if cfg_scale == 1:
        return
    if method != "model":
        raise UserError(f"--cfg-scale {cfg_scale} guides a conditional model; --method {method} takes no guidance; "
                        "leave --cfg-scale 1")
    if cond_dropout <= 0:
        raise UserError(f"--cfg-scale {cfg_scale} needs the unconditional velocity, which this model never learned "
                        "(trained with flow.cond_dropout=0); leave --cfg-scale 1 or train with flow.cond_dropout=0.1")


def restore(model, task, m: Measurement, space, path: AffinePath, method: str, seed: int, indices: list[int],
            steps: int | None = 100, solver: str = "euler", schedule: str = "linear", cfg_scale: float = 1.0,
            pnp_alpha: float = 0.01, atol: float = 1e-5, rtol: float = 1e-5) -> tuple[torch.Tensor, float]:
    """Images (N, C, H, W) in [-1, 1] for the measurement `m` of cases `indices` (sample k's noise from (seed, k)),
    before the measurement is enforced, and the velocity evaluations per sample. `path`: the one the model was
    trained on (flows.PATHS[cfg.flow.path](cfg)), where replacement puts the known pixels and PnP-Flow
    interpolates."""
    if method == "mean" or method == "bicubic":
        return task.baseline(m), 0.0
    device = m.y.device
    x0 = noise(seed, indices, space.shape).to(device)
    if method == "model":
        c = task.condition(m, space)
        out = generate(model, x0, steps, solver, schedule=schedule, cfg_scale=cfg_scale, atol=atol, rtol=rtol,
                       cond={"image_cond": c}, null_cond={"image_cond": task.null(c)})
        nfe = out.nfe if out.sample_nfe is None else out.sample_nfe.float().mean().item()
        return space.decode(out.x).float(), nfe
    if method == "replace":
        known = space.encode(m.y)
        hole = F.adaptive_max_pool2d(m.mask, known.shape[-2:]) if known.shape[-2:] != m.mask.shape[-2:] else m.mask
        eps = per_sample_normal(sample_generators(seed, indices, 3), x0.shape[1:]).to(device) if path.bridge else None

        def replace(x: torch.Tensor, t: float) -> torch.Tensor:
            on_path = path.sample(x0, known, torch.full((len(x),), t, device=device), eps).x_t.to(x.dtype)
            return hole * x + (1 - hole) * on_path

        out = generate(model, x0, steps, solver, schedule=schedule, after_step=replace)
        return space.decode(out.x).float(), out.nfe
    return pnp_flow(model, task, m, space, path, x0, steps, seed, indices, pnp_alpha)


def pnp_flow(model, task, m: Measurement, space, path: AffinePath, x0: torch.Tensor, steps: int, seed: int,
             indices: list[int], alpha: float = 0.01) -> tuple[torch.Tensor, float]:
    """PnP-Flow (see the module docstring) on the model's affine `path` over N = steps uniform times; returns the
    decoded images and NFE."""
    if path.bridge:
        raise UserError("PnP-Flow needs the denoised estimate E[x1 | x_t], which a bridge path's velocity does not "
                        "give; use --method replace")
    v = _Counted(guided(model, None))
    generators = sample_generators(seed, indices, 3)
    x = x0.float()
    for n in range(steps):
        t = n / steps
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            residual = task.weight * (task.operator(space.decode(z).float(), m) - m.y)
            (grad,) = torch.autograd.grad(0.5 * residual.square().sum(), z)
        z = x - (1 - t) ** alpha * grad
        eps = per_sample_normal(generators, x.shape[1:]).to(x.device, x.dtype)
        # Where D_t vanishes (a polynomial path at t = 0: its velocity is 0 there whatever the data), E[x1 | z] cannot
        # be read from the velocity: that step is taken at T_EPS.
        if float(path.determinant(torch.tensor([t], dtype=torch.float64))) <= 0:
            t = T_EPS
        times = torch.full((len(x),), t, dtype=x.dtype, device=x.device)
        z = path.sample(eps, z, times).x_t  # α_t·z + σ_t·ε
        with torch.no_grad():
            x = data_from_velocity(path, v(z, t), z, times)  # E[x1 | z]
    return space.decode(x).float(), float(v.calls)
