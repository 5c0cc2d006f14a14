"""Sample-quality metrics: FID and KID on image features (fid.py), W2 and MMD on points (points.py); evaluate.py's
report (report.py) and its image-conditioned task rows (tasks.py); what training shows of itself (monitor.py).

evaluate.py and train.py's `train.eval_every` share them; bits per dimension lives in flows/likelihood.py.
"""

from metrics.fid import FEATURES, Reference, build_features, frechet_distance, kernel_inception_distance
from metrics.points import mmd, w2


def check_config(cfg) -> None:
    """train.eval_features, when a run evaluates itself (train.eval_every)."""
    from errors import check_name

    if cfg.train.eval_every:
        check_name(FEATURES, cfg.train.eval_features, "train.eval_features")

__all__ = ["check_config", "FEATURES", "Reference", "build_features", "frechet_distance", "kernel_inception_distance",
           "mmd", "w2"]
