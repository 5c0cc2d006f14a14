"""Sample-quality metrics: FID and KID on image features (fid.py), W2 and MMD on points (points.py).

evaluate.py and train.py's `train.eval_every` share them; bits per dimension lives in flows/likelihood.py.
"""

from metrics.fid import FEATURES, Reference, build_features, frechet_distance, kernel_inception_distance
from metrics.points import mmd, w2

__all__ = ["FEATURES", "Reference", "build_features", "frechet_distance", "kernel_inception_distance", "mmd", "w2"]
