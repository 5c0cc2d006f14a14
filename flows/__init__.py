"""Flow objectives and samplers: registries and builders.

paths.py (x_t, u_t), couplings.py (independent, minibatch OT), timesteps.py (training t densities),
objective.py (per-sample loss), solvers.py (ODE integration with exact NFE).
"""

from __future__ import annotations

from collections.abc import Callable

from config import Config
from flows.couplings import BatchShard, IndependentCoupling, MinibatchOTCoupling
from flows.objective import AutoencoderObjective, FlowMatchingObjective, LossByTime, ObjectiveOutput
from flows.paths import LinearPath, PathSample
from flows.solvers import SOLVERS, SolverResult, generate, integrate
from flows.timesteps import LogitNormalTime, ModeTime, UniformTime

PATHS = {"linear": lambda cfg: LinearPath(cfg.flow.sigma_min)}
COUPLINGS = {"independent": IndependentCoupling, "ot": MinibatchOTCoupling}
TIME_DENSITIES = {
    "uniform": lambda cfg: UniformTime(),
    "logit_normal": lambda cfg: LogitNormalTime(cfg.flow.time_mean, cfg.flow.time_std),
    "mode": lambda cfg: ModeTime(cfg.flow.mode_scale),
}


def build_objective(cfg: Config, source: Callable, num_classes: int = 0, latent_shape: tuple[int, ...] = (),
                    features: Callable | None = None) -> FlowMatchingObjective | AutoencoderObjective:
    """The training objective of cfg.flow.objective: flow matching, or an autoencoder's (which needs the
    shape of its latent)."""
    if cfg.flow.objective == "autoencoder":
        return AutoencoderObjective(cfg.flow.kl_weight, latent_shape)
    return FlowMatchingObjective(
        path=PATHS[cfg.flow.path](cfg),
        coupling=COUPLINGS[cfg.flow.coupling](),
        time_density=TIME_DENSITIES[cfg.flow.time_density](cfg),
        source=source,
        label_dropout=cfg.flow.label_dropout,
        num_classes=num_classes,
        features=features,
        cond_dim=cfg.latentcfm.dim if features is not None else 0,
        beta=cfg.latentcfm.beta,
    )


__all__ = ["AutoencoderObjective", "PATHS", "COUPLINGS", "TIME_DENSITIES", "SOLVERS", "build_objective", "BatchShard",
           "FlowMatchingObjective", "LossByTime", "ObjectiveOutput", "PathSample", "SolverResult",
           "generate", "integrate", "LinearPath", "IndependentCoupling", "MinibatchOTCoupling"]
