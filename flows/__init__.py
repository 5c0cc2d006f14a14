"""Flow objectives and samplers: registries and builders.

paths.py (x_t, u_t), couplings.py (independent, minibatch OT, reflow pairs), timesteps.py (training t
densities), objective.py (per-sample loss), meanflow.py (the average-velocity objective), solvers.py (ODE
integration with exact NFE, and MeanFlow's jumps).
"""

from __future__ import annotations

from collections.abc import Callable

from config import Config
from flows.couplings import BatchShard, IndependentCoupling, MinibatchOTCoupling, PairsCoupling
from flows.meanflow import MeanFlowObjective
from flows.objective import AutoencoderObjective, FlowMatchingObjective, LossByTime, ObjectiveOutput
from flows.paths import LinearPath, PathSample
from flows.solvers import SOLVERS, SolverResult, generate, integrate
from flows.timesteps import GridTime, LogitNormalTime, ModeTime, UniformTime

PATHS = {"linear": lambda cfg: LinearPath(cfg.flow.sigma_min)}
COUPLINGS = {"independent": IndependentCoupling, "ot": MinibatchOTCoupling, "pairs": PairsCoupling}
TIME_DENSITIES = {
    "uniform": lambda cfg: UniformTime(),
    "logit_normal": lambda cfg: LogitNormalTime(cfg.flow.time_mean, cfg.flow.time_std),
    "mode": lambda cfg: ModeTime(cfg.flow.mode_scale),
    "grid": lambda cfg: GridTime(cfg.flow.grid_steps),
}


def build_objective(cfg: Config, source: Callable, num_classes: int = 0, latent_shape: tuple[int, ...] = (),
                    features: Callable | None = None, task=None) -> FlowMatchingObjective | AutoencoderObjective:
    """The training objective of cfg.flow.objective: flow matching, or an autoencoder's (which needs the
    shape of its latent); `task` (data/tasks.py) gives the null condition that flow.cond_dropout puts in."""
    f = cfg.flow
    if f.objective == "autoencoder":
        return AutoencoderObjective(f.kl_weight, latent_shape)
    common = dict(path=PATHS[f.path](cfg), coupling=COUPLINGS[f.coupling](),
                  time_density=TIME_DENSITIES[f.time_density](cfg), source=source, label_dropout=f.label_dropout,
                  num_classes=num_classes, huber_c=f.huber_c if f.loss == "pseudo_huber" else None)
    if f.objective == "meanflow":
        return MeanFlowObjective(**common, ratio=f.meanflow_ratio, power=f.meanflow_p, eps=f.meanflow_eps,
                                 cfg_scale=f.meanflow_cfg, tangent=f.meanflow_tangent)
    return FlowMatchingObjective(**common, features=features, cond_dim=cfg.latentcfm.dim if features is not None else 0,
                                 beta=cfg.latentcfm.beta, cond_dropout=f.cond_dropout,
                                 null_condition=None if task is None else task.null)


__all__ = ["AutoencoderObjective", "PATHS", "COUPLINGS", "TIME_DENSITIES", "SOLVERS", "build_objective", "BatchShard",
           "FlowMatchingObjective", "LossByTime", "ObjectiveOutput", "PathSample", "SolverResult",
           "generate", "integrate", "LinearPath", "IndependentCoupling", "MinibatchOTCoupling", "MeanFlowObjective",
           "PairsCoupling"]
