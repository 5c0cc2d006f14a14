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


def start_ranks(*args: str, world: int = 2) -> list[subprocess.Popen]:
    """Start `python SCRIPT ARGS` as `world` gloo processes side by side with RANK, WORLD_SIZE and MASTER_ADDR/PORT
    set, as a cluster scheduler (srun) starts them: no launcher watches them, so a process that waits for another
    that stopped would wait until the collective's timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Wait for started processes (killing all of them at the timeout) and return what each printed."""
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def run_ranks(*args: str, world: int = 2, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """start_ranks, then finish."""
    return finish(start_ranks(*args, world=world), timeout)


def start_script(*args: str, cwd: Path = ROOT, new_session: bool = False) -> subprocess.Popen:
    """`python SCRIPT ARGS` started in the background, its output piped (in a process group of its own with
    new_session, as a job's processes are)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def wait_for(condition, timeout: float = 120, what: str = "a condition") -> None:
    """Poll `condition()` every 50 ms until it holds."""
    import time

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def tiny():
    return list(TINY)
