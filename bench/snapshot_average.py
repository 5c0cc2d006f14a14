"""Average a run's kept EMA snapshots into a checkpoint evaluate.py reads: would a longer average of the weights
than the run's EMA sample better? (issue 34: at one jump the EMA's weights and the raw ones differ by 67 FID.)

    python bench/snapshot_average.py RUN --steps 1800,1900,2000,2100,2200,2300 --out bench/out/avg/RUN_1800-2300
    python evaluate.py -e bench/out/avg/RUN_1800-2300 --checkpoints last --samplers meanflow:1 --n-samples 1000 \
        --ref ../shared/data/mnist/t10k-fid-stats-clean.npz

The average is the plain mean of the EMA weights of the named checkpoints (RUN/checkpoints/step_N/ema.safetensors,
kept by train.keep_every), in float64, stored in the weights' own dtype with their metadata. OUT gets the run's
config.yaml and one checkpoint named by the last step, whose ema.safetensors and model.safetensors both hold the
average (so --weights raw and ema read the same); nothing of RUN is changed.
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

from models.checkpoint import checkpoint_name  # noqa: E402


def snapshot(run: Path, step: int) -> Path:
    path = run / "checkpoints" / checkpoint_name(step) / "ema.safetensors"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist; --steps must name checkpoints the run kept (train.keep_every)")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training run's folder")
    p.add_argument("--steps", required=True, help="comma-separated steps of kept checkpoints, e.g. 2200,2300")
    p.add_argument("--out", type=Path, required=True, help="new run folder for the averaged checkpoint")
    args = p.parse_args()
    steps = sorted(int(step) for step in args.steps.split(","))
    paths = [snapshot(args.run, step) for step in steps]
    if args.out.resolve() == args.run.resolve():
        sys.exit("error: --out must be a new folder, not the run itself")
    total, dtypes = {}, {}
    for path in paths:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                dtypes[key] = tensor.dtype
                total[key] = total.get(key, 0) + tensor.double()
    average = {key: (value / len(paths)).to(dtypes[key]) for key, value in total.items()}
    checkpoint = args.out / "checkpoints" / checkpoint_name(steps[-1])
    checkpoint.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "config.yaml", args.out / "config.yaml")
    for name in ("ema.safetensors", "model.safetensors"):
        save_file(average, checkpoint / name, metadata=metadata)
    print(f"{checkpoint}: the mean of {len(paths)} EMA snapshots, steps {steps[0]}-{steps[-1]}")


if __name__ == "__main__":
    main()
