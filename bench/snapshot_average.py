r"""Average a run's kept EMA snapshots into a checkpoint evaluate.py reads: would a longer average of the weights
than the run's EMA sample better? (issue 34: at one jump the EMA's weights and the raw ones differ by 67 FID.)

    python bench/snapshot_average.py RUN --steps 1800,1900,2000,2100,2200,2300 --out bench/out/avg/RUN_1800-2300
    python bench/snapshot_average.py RUN --half-life 700 --out bench/out/avg/RUN_hl700   # a post-hoc EMA
    python evaluate.py -e bench/out/avg/RUN_1800-2300 --checkpoints last --samplers meanflow:1 --n-samples 1000 \
        --ref ../shared/data/mnist/t10k-fid-stats-clean.npz

The average is the plain mean of the EMA weights of the named checkpoints (RUN/checkpoints/step_N/ema.safetensors,
kept by train.keep_every), in float64, stored in the weights' own dtype with their metadata. With --half-life H
in place of --steps it is an exponential moving average computed after the run from every kept checkpoint's raw
weights (model.safetensors): the snapshot at step n weighs (n − the step before it) · 0.5^((last − n) / H), so
snapshots kept every 100 steps stand for their 100 steps each. OUT gets the run's config.yaml and one checkpoint
named by the last step, whose ema.safetensors and model.safetensors both hold the average (so --weights raw and ema
read the same); nothing of RUN is changed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from errors import UserError, exit_on  # noqa: E402
from models.checkpoint import checkpoint_name, list_checkpoints  # noqa: E402


def snapshot(run: Path, step: int, name: str = "ema.safetensors") -> Path:
    path = run / "checkpoints" / checkpoint_name(step) / name
    if not path.is_file():
        raise UserError(f"{path} does not exist; average checkpoints the run kept (train.keep_every) whole, "
                        "not sharded")
    return path


def main() -> None:
    try:
        average_snapshots()
    except UserError as e:
        exit_on(e)


def average_snapshots() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training run's folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--steps", help="comma-separated steps of kept checkpoints, e.g. 2200,2300: their EMA's mean")
    which.add_argument("--half-life", type=float, help="steps: an exponential average of every kept raw snapshot")
    p.add_argument("--out", type=Path, required=True, help="new run folder for the averaged checkpoint")
    args = p.parse_args()
    if args.half_life is not None and args.half_life <= 0:
        p.error(f"--half-life must be a positive number of steps, not {args.half_life:g}")
    if args.out.resolve() == args.run.resolve():
        raise UserError("--out must be a new folder, not the run itself")
    if args.steps:
        steps = sorted(int(step) for step in args.steps.split(","))
        paths, weights = [snapshot(args.run, step) for step in steps], [1.0] * len(steps)
    else:
        steps = [step for step, _ in list_checkpoints(args.run)]
        if not steps:
            raise UserError(f"{args.run / 'checkpoints'} holds no checkpoint")
        paths = [snapshot(args.run, step, "model.safetensors") for step in steps]
        weights = [(step - before) * 0.5 ** ((steps[-1] - step) / args.half_life)
                   for before, step in zip([0, *steps], steps)]
    total, dtypes = {}, {}
    for path, weight in zip(paths, weights):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                dtypes[key] = tensor.dtype
                total[key] = total.get(key, 0) + weight * tensor.double()
    average = {key: (value / sum(weights)).to(dtypes[key]) for key, value in total.items()}
    checkpoint = args.out / "checkpoints" / checkpoint_name(steps[-1])
    checkpoint.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "config.yaml", args.out / "config.yaml")
    for name in ("ema.safetensors", "model.safetensors"):
        save_file(average, checkpoint / name, metadata=metadata)
    what = f"the mean of {len(paths)} EMA snapshots" if args.steps else \
        f"the average of {len(paths)} raw snapshots with half-life {args.half_life:g} steps"
    print(f"{checkpoint}: {what}, steps {steps[0]}-{steps[-1]}")


if __name__ == "__main__":
    main()
