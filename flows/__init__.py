"""Flow objectives and samplers: registries, builders, and the check of the flow section's names.

paths.py (x_t, u_t; prediction targets and loss weights), couplings.py (independent, minibatch OT, OT plans, class
OT, reflow pairs), timesteps.py (training t densities), objective.py (per-sample loss), meanflow.py (the
average-velocity objective), solvers.py (ODE integration with exact NFE, MeanFlow's jumps, SDE sampling), align.py
(REPA, dispersive and SRA regularisers added to the loss).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from config import Config
from errors import UserError, check_name
from flows import align
from flows.alphaflow import AlphaFlowObjective, alpha_at
from flows.couplings import (
    BatchShard,
    ClassOTCoupling,
    IndependentCoupling,
    MinibatchOTCoupling,
    PairsCoupling,
    PlanCoupling,
)
from flows.meanflow import MeanFlowObjective
from flows.objective import AutoencoderObjective, FlowMatchingObjective, LossByTime, ObjectiveOutput
from flows.paths import (
    LOSS_WEIGHTS,
    PREDICTIONS,
    BridgePath,
    CosinePath,
    LinearPath,
    PathSample,
    PolynomialPath,
    PredictedVelocity,
    Prediction,
    VPPath,
)
from flows.shortcut import ShortcutObjective
from flows.solvers import (
    DIFFUSIONS,
    LAST_STEPS,
    SDE,
    SDE_SOLVERS,
    SOLVERS,
    SolverResult,
    check_interval,
    generate,
    integrate,
    sample_generators,
)
from flows.timesteps import GridTime, LogitNormalTime, ModeTime, UniformTime

PATHS = {
    "linear": lambda cfg: LinearPath(cfg.flow.sigma_min),  # rectified flow, I-CFM; Lipman's OT path with σ_min > 0
    "cosine": lambda cfg: CosinePath(),  # SiT's GVP, torchcfm's VP-CFM
    "vp": lambda cfg: VPPath(cfg.flow.vp_beta_min, cfg.flow.vp_beta_max),  # SiT's VP (score-based diffusion's)
    "polynomial": lambda cfg: PolynomialPath(cfg.flow.poly_n),  # Meta flow_matching's PolynomialConvexScheduler
    "icfm": lambda cfg: BridgePath(cfg.flow.sigma, "constant"),  # torchcfm's ConditionalFlowMatcher(σ)
    "sb": lambda cfg: BridgePath(cfg.flow.sigma, "brownian"),  # torchcfm's SchrodingerBridgeConditionalFlowMatcher
}


def _ot_reg(cfg: Config) -> float:
    """The entropic regularisation ε: flow.ot_reg, or SB-CFM's 2σ² when it is 0 (Tong et al. 2024, §3.3)."""
    return cfg.flow.ot_reg or 2 * cfg.flow.sigma**2


COUPLINGS = {
    "independent": lambda cfg: IndependentCoupling(),
    "ot": lambda cfg: MinibatchOTCoupling(),  # exact, scipy's assignment
    "entropic": lambda cfg: PlanCoupling("entropic", _ot_reg(cfg)),
    "unbalanced": lambda cfg: PlanCoupling("unbalanced", _ot_reg(cfg), mass_reg=cfg.flow.ot_mass_reg),
    "partial": lambda cfg: PlanCoupling("partial", mass=cfg.flow.ot_mass),
    "class_ot": lambda cfg: ClassOTCoupling(),  # exact OT within each class
    "pairs": lambda cfg: PairsCoupling(),  # reflow and distillation pairs (data.name=pairs)
}
TIME_DENSITIES = {
    "uniform": lambda cfg: UniformTime(),
    "logit_normal": lambda cfg: LogitNormalTime(cfg.flow.time_mean, cfg.flow.time_std),
    "mode": lambda cfg: ModeTime(cfg.flow.mode_scale),
    "grid": lambda cfg: GridTime(cfg.flow.grid_steps),
}


def _meanflow(cfg: Config) -> dict:
    f = cfg.flow
    return dict(ratio=f.meanflow_ratio, power=f.meanflow_p, eps=f.meanflow_eps, cfg_scale=f.meanflow_cfg,
                tangent=f.meanflow_tangent, times=f.meanflow_times, loss=f.meanflow_loss,
                cfg_range=f.meanflow_cfg_range, split=f.meanflow_split, velocity=f.meanflow_velocity,
                derivative=f.meanflow_derivative)


def _alpha(cfg: Config) -> Callable[[int], float]:
    f = cfg.flow
    return lambda step: alpha_at(step, f.alpha_start, f.alpha_end, tuple(f.alpha_steps), f.alpha_schedule,
                                 f.alpha_gamma)


# The one-stage few-step objectives: a network of the average velocity u(z, t, s), sampled in jumps.
AVERAGE_VELOCITY = {
    "meanflow": lambda cfg, common: MeanFlowObjective(**common, **_meanflow(cfg)),
    "alphaflow": lambda cfg, common: AlphaFlowObjective(**common, **_meanflow(cfg), alpha=_alpha(cfg)),
    "shortcut": lambda cfg, common: ShortcutObjective(**common, fraction=cfg.flow.shortcut_fraction,
                                                      steps=cfg.flow.shortcut_steps),
}


def build_objective(cfg: Config, source: Callable, num_classes: int = 0, latent_shape: tuple[int, ...] = (),
                    features: Callable | None = None, task=None) -> FlowMatchingObjective | AutoencoderObjective:
    """The training objective of cfg.flow.objective: flow matching, or an autoencoder's (which needs the
    shape of its latent); `task` (data/tasks.py) gives the null condition that flow.cond_dropout puts in."""
    f = cfg.flow
    if f.objective == "autoencoder":
        return AutoencoderObjective(f.kl_weight, latent_shape)
    path = PATHS[f.path](cfg)
    common = dict(path=path, coupling=COUPLINGS[f.coupling](cfg),
                  time_density=TIME_DENSITIES[f.time_density](cfg), source=source, label_dropout=f.label_dropout,
                  num_classes=num_classes, huber_c=f.huber_c if f.loss == "pseudo_huber" else None)
    if f.objective in AVERAGE_VELOCITY:
        return AVERAGE_VELOCITY[f.objective](cfg, common)
    return FlowMatchingObjective(**common, features=features, cond_dim=cfg.latentcfm.dim if features is not None else 0,
                                 beta=cfg.latentcfm.beta, cond_dropout=f.cond_dropout,
                                 null_condition=None if task is None else task.null,
                                 prediction=Prediction(path, f.prediction, f.loss_weight))


def velocity_model(model: Callable, cfg: Config) -> Callable:
    """The model as a velocity field for the samplers: itself, or, for a network trained to predict the data, the
    noise or the score (flow.prediction), a wrapper that turns its output into the velocity through the path."""
    if cfg.flow.prediction == "velocity":
        return model
    return PredictedVelocity(model, Prediction(PATHS[cfg.flow.path](cfg), cfg.flow.prediction))


def has_score(cfg: Config) -> bool:
    """Whether the path defines the score that SDE sampling needs: affine paths (no bridge noise) from a standard
    Gaussian source, where the score follows from the velocity (flows/paths.py, score_from_velocity)."""
    return cfg.flow.path not in ("icfm", "sb") and cfg.data.source == "gaussian"


def sde_sampler(cfg: Config, solver: str, seed: int, indices: list[int]) -> SDE | None:
    """What an SDE solver needs for the samples `indices` of base seed `seed`: the path, the diffusion coefficient
    and last step of cfg.sample, and each sample's generator of step noise; None for the ODE solvers."""
    s = cfg.sample
    if solver not in SDE_SOLVERS:
        return None
    return SDE(PATHS[cfg.flow.path](cfg), sample_generators(seed, indices, 4), s.diffusion, s.diffusion_norm,
               s.last_step)


def check_sampling(cfg: Config, solvers: list[str] | None = None) -> None:
    """The sample section's names, and an SDE solver (cfg.sample.solver, or any of `solvers`) only where the path
    defines the score it needs."""
    from flows.guidance import GUIDANCE

    s = cfg.sample
    check_name(DIFFUSIONS, s.diffusion, "sample.diffusion")
    check_name(GUIDANCE, s.guidance, "sample.guidance")
    check_name(LAST_STEPS, s.last_step, "sample.last_step")
    if len(s.cfg_interval) != 2:
        raise UserError(f"config key sample.cfg_interval must hold two times [a, b], got {s.cfg_interval}")
    for solver in solvers or [s.solver]:
        check_interval(tuple(s.cfg_interval), solver)
    sde = next((solver for solver in solvers or [s.solver] if solver in SDE_SOLVERS), None)
    if sde and not has_score(cfg):
        why = (f"flow.path={cfg.flow.path} adds bridge noise" if cfg.flow.path in ("icfm", "sb")
               else f"data.source={cfg.data.source} is not a standard Gaussian")
        raise UserError(f"solver {sde} needs the score, which the velocity gives only on an affine path from a "
                        f"Gaussian source; {why}: sample this model with an ODE solver (euler, heun, dopri5, ...)")


def check_data(cfg: Config, dataset, pairs, features, task) -> None:
    """What the config asks of the data once they are read (the teacher's data and the reflow `pairs`, Latent-CFM's
    `features` encoder, the image-conditioned `task`), one clear sentence for each mismatch."""
    from data import data_info
    from data.tasks import check_task

    t, num_classes = cfg.train, dataset.num_classes if cfg.model.class_cond else 0
    if cfg.model.class_cond and not dataset.num_classes:
        raise UserError(f"model.class_cond is set but {cfg.data.name} has no labels; set model.class_cond=false")
    if cfg.flow.label_dropout > 0 and not num_classes:
        raise UserError("flow.label_dropout drops class labels, which an unconditional model does not have; "
                        "set model.class_cond=true or flow.label_dropout=0")
    if (pairs is not None) != (cfg.flow.coupling == "pairs"):
        raise UserError("flow.coupling=pairs trains on the noise that reflow pairs carry: use it with data.name=pairs "
                        "data.path=DIR (made by sample.py --pairs), and data.name=pairs with it")
    if pairs is not None and cfg.latent.autoencoder:
        raise UserError("reflow pairs are made and read in pixel space here; remove latent.autoencoder")
    if pairs is not None and pairs.shape != tuple(dataset.shape):
        raise UserError(f"pairs folder {cfg.data.path} holds items of shape {pairs.shape} but its teacher's data "
                        f"have shape {tuple(dataset.shape)}; make the pairs again with a teacher of these data")
    if pairs is not None and cfg.data.hflip:
        raise UserError("data.hflip would mirror a pair's sample without its noise; remove it for reflow pairs")
    if cfg.flow.objective in AVERAGE_VELOCITY and features is not None:
        raise UserError(f"flow.objective={cfg.flow.objective} does not take Latent-CFM's condition here; remove "
                        "latentcfm.encoder")
    if cfg.flow.meanflow_cfg != 1 and not (num_classes and cfg.flow.label_dropout > 0):
        raise UserError("flow.meanflow_cfg bakes classifier-free guidance into the target, which needs a "
                        "class-conditional model trained with label dropout (model.class_cond=true "
                        "flow.label_dropout=0.1)")
    if cfg.flow.meanflow_cfg_range and not (num_classes and cfg.flow.label_dropout > 0):
        raise UserError("flow.meanflow_cfg_range trains classifier-free guidance as an input, which needs a "
                        "class-conditional model trained with label dropout (model.class_cond=true "
                        "flow.label_dropout=0.1)")
    if task is not None:
        check_task(cfg, task, dataset, pairs, features)
    if t.eval_every and data_info(cfg, dataset)["kind"] == "field":
        raise UserError("train.eval_every measures FID of images or W2 of points; these data are fields: set "
                        "train.eval_every=0")
    if t.eval_every and len(dataset.shape) == 1 and t.eval_n > len(dataset):
        raise UserError(f"train.eval_n {t.eval_n} exceeds the {len(dataset)} points of the dataset, against as many "
                        f"of which the in-training W2 is measured; set train.eval_n ≤ {len(dataset)}")
    if cfg.data.hflip and len(dataset.shape) != 3:
        raise UserError(f"data.hflip applies to images but {cfg.data.name} has shape {dataset.shape}; remove it")
    if cfg.flow.objective == "autoencoder" and (num_classes or t.eval_every or cfg.latent.autoencoder):
        raise UserError("an autoencoder (flow.objective=autoencoder) is trained on pixels without model.class_cond "
                        "and train.eval_every; remove them (and latent.autoencoder)")


def weights_meta(cfg: Config, dataset, task, space, features) -> dict[str, str]:
    """What sampling needs to know without the data, written into the weight files: the data's kind, shape and
    classes, the trained null class and condition dropout, the task, MeanFlow's baked guidance, the latent shape,
    Latent-CFM's feature and condition sizes."""
    from data import data_info
    from data.tasks import task_info

    meta = data_info(cfg, dataset)
    meta["label_dropout"] = repr(cfg.flow.label_dropout)  # guidance needs a trained null class
    meta.update(task_info(task), cond_dropout=repr(cfg.flow.cond_dropout))
    if cfg.flow.objective in ("meanflow", "alphaflow"):  # guidance baked in at this scale: sampling needs none
        meta["meanflow_cfg"] = repr(cfg.flow.meanflow_cfg)
        if cfg.flow.meanflow_cfg_range:  # guidance is an input: sampling chooses ω within this range
            meta["meanflow_cfg_range"] = json.dumps(list(cfg.flow.meanflow_cfg_range))
    if cfg.latent.autoencoder:
        meta["latent_shape"] = json.dumps(list(space.shape))
    if features is not None:  # sampling draws c of this size from the prior, or from reference images
        meta.update(feature_dim=str(features.dim), condition_dim=str(cfg.latentcfm.dim))
    return meta


# Settings read by one choice of another key only: set with another choice, they would be accepted and ignored.
# (flow.sigma and flow.sigma_min, label and condition dropout are checked with their own reasons.)
READ_ONLY_WITH = {
    "kl_weight": ("objective", ("autoencoder",)), "vp_beta_min": ("path", ("vp",)), "vp_beta_max": ("path", ("vp",)),
    "poly_n": ("path", ("polynomial",)), "ot_reg": ("coupling", ("entropic", "unbalanced")),
    "ot_mass_reg": ("coupling", ("unbalanced",)), "ot_mass": ("coupling", ("partial",)),
    "time_mean": ("time_density", ("logit_normal",)), "time_std": ("time_density", ("logit_normal",)),
    "mode_scale": ("time_density", ("mode",)), "grid_steps": ("time_density", ("grid",)),
    "huber_c": ("loss", ("pseudo_huber",)),
    **{key: ("objective", ("meanflow", "alphaflow")) for key in (
        "meanflow_ratio", "meanflow_split", "meanflow_split_ema", "meanflow_p", "meanflow_eps", "meanflow_cfg",
        "meanflow_tangent", "meanflow_velocity", "meanflow_times", "meanflow_loss", "meanflow_cfg_range",
        "meanflow_derivative")},
    **{key: ("objective", ("alphaflow",)) for key in ("alpha_start", "alpha_end", "alpha_steps", "alpha_schedule",
                                                      "alpha_gamma")},
    **{key: ("objective", ("shortcut",)) for key in ("shortcut_fraction", "shortcut_steps", "shortcut_ema")},
}


def check_alphaflow(f) -> None:
    """AlphaFlow's curriculum: a schedule name, a window of two steps, and an end at α = 0 (MeanFlow)."""
    check_name(("sigmoid", "linear"), f.alpha_schedule, "flow.alpha_schedule")
    steps = f.alpha_steps
    if len(steps) != 2 or not all(isinstance(k, int) and k >= 0 for k in steps) or steps[0] >= steps[1]:
        raise UserError(f"flow.alpha_steps must be two optimizer steps [first, last], 0 ≤ first < last, over which α "
                        f"goes from flow.alpha_start to flow.alpha_end; got {steps}")
    if f.alpha_end != 0:
        raise UserError(f"flow.alpha_end={f.alpha_end:g}: AlphaFlow's curriculum must end at α = 0 (MeanFlow), whose "
                        "average velocity the jump samplers need; set flow.alpha_end=0")


def check_config(cfg: Config) -> None:
    """The flow section's names, and the combinations that cannot train or would ignore a setting, each refused with
    the reason."""
    f = cfg.flow
    default = type(f)()
    for key, (owner, choices) in READ_ONLY_WITH.items():
        if getattr(f, key) != getattr(default, key) and getattr(f, owner) not in choices:
            raise UserError(f"flow.{key}={getattr(f, key)} is read only with flow.{owner}={' or '.join(choices)}, and "
                            f"this config has flow.{owner}={getattr(f, owner)}: remove flow.{key} or change "
                            f"flow.{owner}")
    check_name(("cfm", *AVERAGE_VELOCITY, "autoencoder"), f.objective, "flow.objective")
    check_name(("l2", "pseudo_huber"), f.loss, "flow.loss")
    check_name(PATHS, f.path, "flow.path")
    check_name(COUPLINGS, f.coupling, "flow.coupling")
    check_name(TIME_DENSITIES, f.time_density, "flow.time_density")
    check_name(PREDICTIONS, f.prediction, "flow.prediction")
    check_name(LOSS_WEIGHTS, f.loss_weight, "flow.loss_weight")
    if f.cond_dropout > 0 and not cfg.data.task:
        raise UserError("flow.cond_dropout drops the spatial condition of data.task, which is not set; set data.task "
                        "or flow.cond_dropout=0")
    bridge = f.path in ("icfm", "sb")
    if bridge and f.prediction != "velocity":
        raise UserError(f"flow.prediction={f.prediction} needs an affine path to turn it into a velocity; "
                        f"flow.path={f.path} adds bridge noise, so predict the velocity (flow.prediction=velocity)")
    if bridge and f.sigma <= 0:
        raise UserError(f"flow.path={f.path} adds Gaussian noise of scale flow.sigma, which is {f.sigma}; set "
                        "flow.sigma > 0 (e.g. 0.1) or use flow.path=linear")
    if f.sigma > 0 and not bridge:
        raise UserError(f"flow.sigma is the bridge noise of flow.path=icfm or sb, not of {f.path}; remove it (the "
                        "linear path's noise left at t = 1 is flow.sigma_min)")
    if f.sigma_min > 0 and f.path != "linear":
        raise UserError(f"flow.sigma_min belongs to flow.path=linear, not {f.path}; remove it")
    if f.prediction == "score" and cfg.data.source != "gaussian":
        raise UserError(f"flow.prediction=score is the score of a Gaussian source; data.source={cfg.data.source} "
                        "has none that the path defines: predict the velocity or the data")
    if f.loss_weight == "likelihood" and f.prediction not in ("noise", "score"):
        raise UserError(f"flow.loss_weight=likelihood weights the noise or score error (SiT); with "
                        f"flow.prediction={f.prediction} it is unbounded at an end of t: use flow.prediction=noise "
                        "or score, or another weight")
    if f.path == "sb" and f.coupling != "entropic":
        raise UserError(f"flow.path=sb is SB-CFM, whose bridge noise goes with the entropic OT coupling; set "
                        f"flow.coupling=entropic (ε = 2·flow.sigma² unless flow.ot_reg is set), not {f.coupling}")
    if f.coupling in ("entropic", "unbalanced") and _ot_reg(cfg) <= 0:
        raise UserError(f"flow.coupling={f.coupling} needs its regularisation: set flow.ot_reg > 0 (torchcfm's "
                        "default 0.05, in units of the squared distance)")
    if f.coupling == "class_ot" and not cfg.model.class_cond:
        raise UserError("flow.coupling=class_ot pairs noise and data within a class, for class-conditional models; "
                        "set model.class_cond=true or use flow.coupling=ot")
    check_name(("conditional", "model"), f.meanflow_tangent, "flow.meanflow_tangent")
    check_name(("conditional", "model", "ema"), f.meanflow_velocity, "flow.meanflow_velocity")
    check_name(("ordered", "single", "length"), f.meanflow_times, "flow.meanflow_times")
    check_name(("u", "v"), f.meanflow_loss, "flow.meanflow_loss")
    check_name(("jvp", "central", "onesided"), f.meanflow_derivative, "flow.meanflow_derivative")
    if f.meanflow_derivative == "onesided" and (cfg.train.mixed_precision != "no" or cfg.train.compile):
        raise UserError("flow.meanflow_derivative=onesided starts the difference from the prediction, which must be "
                        "plain float32: with train.mixed_precision or train.compile use flow.meanflow_derivative="
                        "central (or jvp)")
    if f.objective in AVERAGE_VELOCITY and (bridge or f.prediction != "velocity" or f.loss_weight != "none"):
        raise UserError(f"flow.objective={f.objective} trains the average velocity on an affine path: use "
                        "flow.prediction=velocity, flow.loss_weight=none and a path without bridge noise")
    if f.objective in ("meanflow", "alphaflow") and f.loss != "l2":
        raise UserError(f"flow.loss={f.loss} does not apply to flow.objective={f.objective}, whose loss is the squared "
                        "error under its adaptive weight (at flow.meanflow_p=0.5 its gradient is the pseudo-Huber "
                        "loss's); use flow.loss=l2 and set flow.meanflow_p")
    if f.meanflow_loss == "v" and f.meanflow_split:
        raise UserError("flow.meanflow_split replaces the u-loss's target by two jumps of the network; it has no "
                        "v-loss form: use flow.meanflow_loss=u or flow.meanflow_split=0")
    if f.meanflow_loss == "v" and f.meanflow_tangent != "model":
        raise UserError("flow.meanflow_loss=v regresses V = u − (s − t)·du/dt onto x1 − x0, so the derivative follows "
                        "the model's own velocity: set flow.meanflow_tangent=model too")
    if f.meanflow_velocity != "conditional" and (f.meanflow_cfg != 1 or f.meanflow_cfg_range):
        raise UserError(f"flow.meanflow_velocity={f.meanflow_velocity} takes the jumps' velocity from the network "
                        "without guidance, so guidance cannot be baked into their target: use "
                        "flow.meanflow_velocity=conditional with flow.meanflow_cfg or flow.meanflow_cfg_range")
    if f.meanflow_velocity == "ema" and f.meanflow_split and not f.meanflow_split_ema:
        raise UserError("flow.meanflow_velocity=ema gives the objective the EMA model, whose jumps the split targets "
                        "then take too: set flow.meanflow_split_ema=true, or flow.meanflow_velocity=model")
    check_alphaflow(f)
    if f.meanflow_cfg_range:
        low_high = f.meanflow_cfg_range
        if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1]:
            raise UserError(f"flow.meanflow_cfg_range must be [ω_min, ω_max], 0 ≤ ω_min < ω_max (e.g. [1, 4]): the "
                            f"guidance scales the model is trained to take as input; got {low_high}")
        if f.meanflow_cfg != 1:
            raise UserError("flow.meanflow_cfg bakes one guidance scale in and flow.meanflow_cfg_range makes the "
                            "scale an input; set one of them (flow.meanflow_cfg=1 with the range)")
    if f.shortcut_steps < 2 or f.shortcut_steps & (f.shortcut_steps - 1):
        raise UserError(f"flow.shortcut_steps is M of the finest step 1/M, a power of 2 ≥ 2 (the paper: 128); got "
                        f"{f.shortcut_steps}")
    align.check_config(cfg)
    check_sampling(cfg)


__all__ = ["check_config", "check_sampling", "sde_sampler", "velocity_model", "has_score", "Prediction",
           "PredictedVelocity", "AutoencoderObjective", "PATHS", "COUPLINGS", "TIME_DENSITIES", "SOLVERS",
           "build_objective", "BatchShard", "FlowMatchingObjective", "LossByTime", "ObjectiveOutput", "PathSample",
           "SolverResult", "generate", "integrate", "LinearPath", "IndependentCoupling", "MinibatchOTCoupling",
           "MeanFlowObjective", "PairsCoupling", "ClassOTCoupling", "PlanCoupling", "CosinePath", "VPPath",
           "PolynomialPath", "BridgePath", "LOSS_WEIGHTS", "PREDICTIONS", "SDE", "SDE_SOLVERS", "DIFFUSIONS",
           "LAST_STEPS"]
