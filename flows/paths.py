"""Probability paths between noise and data, and what the network predicts on them.

Conventions, used everywhere in the toolkit:
- Time t ∈ [0, 1]; t = 0 is noise (x0), t = 1 is data (x1).
- An affine path is x_t = α_t·x1 + σ_t·x0 with the target velocity u_t = α̇_t·x1 + σ̇_t·x0 (Lipman et al.
  2024, "Flow Matching Guide and Code", §4.8). A bridge path adds Gaussian noise of scale g_t:
  x_t = α_t·x1 + σ_t·x0 + g_t·ε and u_t = α̇_t·x1 + σ̇_t·x0 + ġ_t·ε, ε ~ N(0, I) (Tong et al. 2024, eq. 14).
- I-CFM / rectified flow (Lipman et al. 2023, eq. 20; Liu et al. 2023): α_t = t, σ_t = 1 − (1 − σ_min)·t,
  so u_t = x1 − (1 − σ_min)·x0. σ_min = 0 is rectified flow; σ_min > 0 is Lipman et al.'s (target) OT path.
- A model maps (x, t, y) to a velocity of x's shape: `model(x, t, y=None) -> v`, t of shape (N,). A model trained
  to predict the data x1, the noise x0 or the score (flow.prediction) is read as a velocity through its path by
  `Prediction`, so every solver and schedule works with every target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Predictions other than the velocity divide by α_t or σ_t, which vanish at the ends of most paths (the noise
# prediction cannot tell the velocity at t = 0, where x_t is pure noise and the velocity needs the data's mean).
# Like SiT (Ma et al. 2024, its sample_eps and train_eps), they are evaluated for t in [T_EPS, 1 − T_EPS], and so
# are the loss weights that divide by α_t or σ_t.
T_EPS = 1e-3


@dataclass
class PathSample:
    """A point on the path: t (N,), endpoints x0 and x1, x_t and the target velocity u_t (N, ...); eps, the
    bridge noise ε of a bridge path (None on an affine path)."""

    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    x_t: torch.Tensor
    u_t: torch.Tensor
    eps: torch.Tensor | None = None


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View t (N,) as (N, 1, ..., 1) so that it broadcasts against x (N, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class AffinePath:
    """x_t = α_t·x1 + σ_t·x0. Subclasses give α_t, σ_t and their derivatives (tensors of t's shape); `bridge`
    paths also the noise scale g_t and its derivative."""

    bridge = False

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor | None = None) -> PathSample:
        """x_t and u_t for noise x0 and data x1 (N, ...) at t (N,); eps: a bridge path's noise ε."""
        tt = expand_like(t, x1)
        x_t = self.alpha(tt) * x1 + self.sigma(tt) * x0
        u_t = self.d_alpha(tt) * x1 + self.d_sigma(tt) * x0
        return PathSample(t=t, x0=x0, x1=x1, x_t=x_t, u_t=u_t)

    def determinant(self, t: torch.Tensor) -> torch.Tensor:
        """D_t = σ_t·α̇_t − α_t·σ̇_t, the determinant that turns (x_t, u_t) back into (x1, x0): positive on every
        path here (the data's share of x_t grows with t)."""
        return self.sigma(t) * self.d_alpha(t) - self.alpha(t) * self.d_sigma(t)


class LinearPath(AffinePath):
    """Straight line from x0 to x1 with σ_min noise left at t = 1 (I-CFM; rectified flow when 0; Lipman et al.'s
    target OT path when σ_min > 0)."""

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = sigma_min

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - (1 - self.sigma_min) * t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return torch.full_like(t, -(1 - self.sigma_min))


class CosinePath(AffinePath):
    """α_t = sin(πt/2), σ_t = cos(πt/2): SiT's GVP path, and torchcfm's VariancePreservingConditionalFlowMatcher
    (Albergo & Vanden-Eijnden 2023). α_t² + σ_t² = 1 for every t."""

    def alpha(self, t):
        return torch.sin(math.pi / 2 * t)

    def sigma(self, t):
        return torch.cos(math.pi / 2 * t)

    def d_alpha(self, t):
        return math.pi / 2 * torch.cos(math.pi / 2 * t)

    def d_sigma(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * t)


class VPPath(AffinePath):
    """The variance-preserving path of score-based diffusion (Song et al. 2021, eq. 29) with a linear β between
    β_min and β_max, as SiT's VP: α_t = exp(−¼(1 − t)²(β_max − β_min) − ½(1 − t)β_min), σ_t = √(1 − α_t²).
    α_0 = e^{−5.025} for the defaults, not 0: a trace of data is left at t = 0. σ̇_t grows like 1/√(1 − t) near
    t = 1, so the coefficients are evaluated for t ≤ 1 − T_EPS (SiT's train_eps and sample_eps)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t):
        s = 1 - t.clamp(max=1 - T_EPS)
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def _d_log_alpha(self, t):
        s = 1 - t.clamp(max=1 - T_EPS)
        return 0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        return self._log_alpha(t).exp()

    def sigma(self, t):
        return (-torch.expm1(2 * self._log_alpha(t))).sqrt()

    def d_alpha(self, t):
        return self.alpha(t) * self._d_log_alpha(t)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


class PolynomialPath(AffinePath):
    """α_t = tⁿ, σ_t = 1 − tⁿ: Meta flow_matching's PolynomialConvexScheduler (n = 1 is rectified flow)."""

    def __init__(self, n: float = 2.0):
        self.n = n

    def alpha(self, t):
        return t**self.n

    def sigma(self, t):
        return 1 - t**self.n

    def d_alpha(self, t):
        return self.n * t ** (self.n - 1)

    def d_sigma(self, t):
        return -self.n * t ** (self.n - 1)


class BridgePath(LinearPath):
    """The straight line x_t = t·x1 + (1 − t)·x0 plus Gaussian noise g_t·ε (Tong et al. 2024): 'constant' g_t = σ
    is torchcfm's ConditionalFlowMatcher (I-CFM with σ > 0); 'brownian' g_t = σ·√(t(1 − t)) is its
    SchrodingerBridgeConditionalFlowMatcher (SB-CFM, eq. 20 and Proposition 3.4, with the entropic OT coupling of
    regularisation 2σ²). Trained with velocity prediction only; sampled with its ODE."""

    bridge = True

    def __init__(self, noise: float, kind: str):
        super().__init__(0.0)
        self.noise, self.kind = noise, kind

    def g(self, t):
        if self.kind == "constant":
            return torch.full_like(t, self.noise)
        return self.noise * (t * (1 - t)).clamp_min(0).sqrt()

    def d_g(self, t):
        if self.kind == "constant":
            return torch.zeros_like(t)
        # σ(1 − 2t) / (2√(t(1 − t))), unbounded at the ends; t = 0 or 1 exactly has probability ~2⁻²⁴.
        return self.noise * (1 - 2 * t) / (2 * (t * (1 - t)).clamp_min(1e-12).sqrt())

    def sample(self, x0, x1, t, eps=None):
        if eps is None:
            raise ValueError("a bridge path needs its noise eps")
        tt = expand_like(t, x1)
        x_t = tt * x1 + (1 - tt) * x0 + self.g(tt) * eps
        u_t = x1 - x0 + self.d_g(tt) * eps
        return PathSample(t=t, x0=x0, x1=x1, x_t=x_t, u_t=u_t, eps=eps)


# ---------------------------------------------------------------------------------------------
# What the network predicts (flow.prediction), and the loss weight of each (flow.loss_weight).

PREDICTIONS = {
    "velocity": "the velocity u_t (flow matching)",
    "data": "the data x1 (x-prediction)",
    "noise": "the noise x0 (ε-prediction)",
    "score": "the score ∇log p_t(x) = −E[x0 | x_t]/σ_t of a Gaussian source (SiT's score model)",
}
LOSS_WEIGHTS = {
    "none": "the squared error of the prediction, unweighted",
    "velocity": "the squared error turned into the velocity's (SiT's velocity weight)",
    "likelihood": "noise and score predictions: D_t/(α_t·σ_t), score matching's maximum-likelihood weight (SiT)",
    "sigma_sqrt": "(1 − t)^−2, SD3's sigma_sqrt (its σ is our 1 − t)",
    "cosmap": "2 / (π(1 − 2s + 2s²)), s = 1 − t, SD3's cosmap",
}


class Prediction:
    """The network's output kind on an affine path: its training target, the velocity it stands for, and its
    loss weight.

    With D_t = σ_t·α̇_t − α_t·σ̇_t, a velocity v at x_t is the pair E[x1|x_t] = (σ_t·v − σ̇_t·x_t)/D_t and
    E[x0|x_t] = (α̇_t·x_t − α_t·v)/D_t; so the data prediction x̂1 is v = (D_t·x̂1 + σ̇_t·x_t)/σ_t, the noise
    prediction x̂0 is v = (α̇_t·x_t − D_t·x̂0)/α_t, and the score ŝ = −x̂0/σ_t is v = (α̇_t·x_t + D_t·σ_t·ŝ)/α_t
    (Lipman et al. 2024, §4.8.1). The score is trained on the noise's scale, ‖σ_t·ŝ + x0‖², as SiT does.
    """

    def __init__(self, path: AffinePath, kind: str = "velocity", weight: str = "none"):
        self.path, self.kind, self.weight = path, kind, weight

    def target(self, sample: PathSample) -> torch.Tensor:
        """What the network is trained to output at sample.x_t (the score: its noise-scale stand-in, see loss)."""
        return {"velocity": sample.u_t, "data": sample.x1, "noise": sample.x0, "score": sample.x0}[self.kind]

    def output(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output on the target's scale: σ_t·ŝ for a score (compared with −x0), else as it is."""
        if self.kind != "score":
            return out
        return -self.path.sigma(expand_like(t.clamp(T_EPS, 1 - T_EPS), out)) * out

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity that the output `out` at (x_t, t) stands for; t must already lie in [T_EPS, 1 − T_EPS]
        for predictions other than the velocity (see `time`)."""
        if self.kind == "velocity":
            return out
        p, tt = self.path, expand_like(t, x_t)
        det = p.determinant(tt)
        if self.kind == "data":
            return (det * out + p.d_sigma(tt) * x_t) / p.sigma(tt)
        noise = out if self.kind == "noise" else -p.sigma(tt) * out
        return (p.d_alpha(tt) * x_t - det * noise) / p.alpha(tt)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """The time at which the network is evaluated for sampling: t itself for the velocity, else within
        [T_EPS, 1 − T_EPS], where dividing by α_t and σ_t stays finite."""
        return t if self.kind == "velocity" else t.clamp(T_EPS, 1 - T_EPS)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """The weight (N,) of each sample's squared error at times t (N,), or None for 'none'."""
        if self.weight == "none":
            return None
        if self.weight in ("sigma_sqrt", "cosmap"):
            s = (1 - t).clamp_min(T_EPS)
            return s**-2 if self.weight == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s * s))
        p, tc = self.path, t.clamp(T_EPS, 1 - T_EPS)
        det = p.determinant(tc)
        if self.weight == "likelihood":  # SiT: drift_var / σ_t² with drift_var = σ_t·D_t / α_t
            return det / (p.alpha(tc) * p.sigma(tc))
        # velocity: the square of d(velocity)/d(output) from `velocity`
        factor = {"velocity": torch.ones_like(tc), "data": det / p.sigma(tc)}.get(self.kind, det / p.alpha(tc))
        return factor.square()


class PredictedVelocity:
    """A network trained with another prediction, read as a velocity model: `model(x, t, y, **cond)` returns the
    velocity its output stands for. Attributes (label_embed, feature_cond, ...) are the network's."""

    def __init__(self, net, prediction: Prediction):
        self.net, self.prediction = net, prediction

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None, **cond) -> torch.Tensor:
        t = self.prediction.time(t)
        return self.prediction.velocity(self.net(x, t, y, **cond), x, t)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["net"], name)


def score_from_velocity(path: AffinePath, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇log p_t(x_t) of a Gaussian source N(0, I), from the marginal velocity: −E[x0|x_t]/σ_t
    = (α_t·v − α̇_t·x_t)/(σ_t·D_t), finite for σ_t > 0 (at t = 0 of rectified flow it is −x)."""
    tt = expand_like(t, x_t)
    return (path.alpha(tt) * v - path.d_alpha(tt) * x_t) / (path.sigma(tt) * path.determinant(tt))


def data_from_velocity(path: AffinePath, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1|x_t] = (σ_t·v − σ̇_t·x_t)/D_t, the denoised estimate (Tweedie's formula in velocity form)."""
    tt = expand_like(t, x_t)
    return (path.sigma(tt) * v - path.d_sigma(tt) * x_t) / path.determinant(tt)
