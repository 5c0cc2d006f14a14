"""Sharded training on CPU processes: FSDP2 and DeepSpeed ZeRO-2 beside DDP, resumed, and on another number of
processes (train.py through accelerate, tests/sharded_on_cpu.py lifting accelerate's accelerator-only check).

    python bench/sharded_cpu.py [--steps 4] [--out bench/out/sharded_cpu]
    PYTHONPATH=<folder with deepspeed and transformers> DS_ACCELERATOR=cpu python bench/sharded_cpu.py   # + DeepSpeed

A small DiT (DiT-S/4, width 32, depth 2) on 64 MNIST digits (../shared/data/mnist, else random strokes), batch 12
in 2 micro-steps, warmup over 3 steps. Prints, for each backend, the largest difference of the model and EMA weights
from DDP's after --steps steps, whether a run stopped halfway and resumed ends bitwise equal to one straight through,
and what resuming on 3 processes does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_images import mnist_subset  # noqa: E402
from test_scale import DDP, TINY_DIT, sharded  # noqa: E402

from models.checkpoint import checkpoint_name  # noqa: E402


def train(launcher: list[str], run: Path, common: list[str], steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "train.py", "-e", str(run), *common, f"train.steps={steps}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def largest_difference(a: Path, b: Path, step: int, name: str) -> float:
    wa, wb = (load_file(str(r / "checkpoints" / checkpoint_name(step) / f"{name}.safetensors")) for r in (a, b))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (even: the resumed run stops at half)")
    p.add_argument("--out", default="bench/out/sharded_cpu")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = [f"data.path={mnist_subset(out / 'mnist')}", *TINY_DIT]
    done = train(DDP, out / "ddp", common, args.steps)
    if done.returncode:
        raise SystemExit(f"DDP failed:\n{done.stderr[-2000:]}")
    backends = ["fsdp"] + (["deepspeed_zero2"] if importlib.util.find_spec("deepspeed") else [])
    print(f"{args.steps} steps, 2 CPU processes (gloo), torch {torch.__version__}; differences from DDP's weights:")
    for backend in backends:
        straight, resumed, three = (out / f"{backend}_{kind}" for kind in ("straight", "resumed", "three"))
        for run, steps in ((straight, args.steps), (resumed, args.steps // 2), (resumed, args.steps)):
            done = train(sharded(backend, 2), run, common, steps)
            if done.returncode:
                raise SystemExit(f"{backend} failed:\n{done.stderr[-2000:]}")
        shutil.copytree(resumed, three)
        shutil.rmtree(three / "checkpoints" / checkpoint_name(args.steps))
        done = train(sharded(backend, 3), three, common, args.steps)
        on_three = ("resumed; weights differ from 2 processes' by at most "
                    f"{largest_difference(straight, three, args.steps, 'model'):.2e}" if done.returncode == 0 else
                    "refused: " + next((line for line in done.stderr.splitlines() if line.startswith("error:")), "?"))
        bitwise = all(largest_difference(straight, resumed, args.steps, name) == 0 for name in ("model", "ema"))
        print(f"  {backend}: model {largest_difference(straight, out / 'ddp', args.steps, 'model'):.2e}, EMA "
              f"{largest_difference(straight, out / 'ddp', args.steps, 'ema'):.2e}; resumed at step {args.steps // 2}: "
              f"{'bitwise equal' if bitwise else 'DIFFERENT'}; on 3 processes: {on_three}", flush=True)


if __name__ == "__main__":
    main()
