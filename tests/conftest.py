"""Shared helpers: run the toolkit's scripts as a user would, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A tiny, fast configuration for end-to-end runs: a small MLP, small batches, no tensorboard.
TINY = ["model.width=32", "model.depth=2", "model.time_dim=16", "train.batch_size=32", "data.size=512",
        "train.log_every=5", "train.preview_n=64", "train.preview_steps=4", "train.trackers=[]"]


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 300, launcher: list[str] | None = None):
    """Run `python SCRIPT ARGS` (or LAUNCHER SCRIPT ARGS) and return the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or [sys.executable]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny():
    return list(TINY)
