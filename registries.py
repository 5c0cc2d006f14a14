"""Every registry's name check, before any data or GPU work: each package checks its own section (data, model,
flow, metrics), and this runs them all in the order a run builds its parts. config.py imports no package of the
toolkit; the packages import config, and this module sits above them all."""

from __future__ import annotations

import data
import flows
import metrics
import models
from config import Config


def check_names(cfg: Config) -> None:
    """Fail with one clear sentence at the first unknown name or combination that cannot train."""
    data.check_config(cfg)
    models.check_config(cfg)
    flows.check_config(cfg)
    metrics.check_config(cfg)
