"""Training throughput of latent flow matching on MNIST: latents read from the cache vs encoded every step.

    python bench/latent_cache.py [--autoencoder runs/mnist_autoencoder/checkpoints/step_0002000 | --preset ae-cifar10]
                                 [--steps 40]

Both runs are train.py with configs/mnist_latent_unet.yaml on the MNIST test digits (../shared/data/mnist),
the same autoencoder, batch and steps; only latent.cache differs. Throughput is train.py's own samples/s
averaged over its log rows after the first (warm-up). The one-time cost of encoding the cache is printed
beside it. Without --autoencoder a randomly initialized autoencoder of --preset (default ae-mnist) is used: the
speed does not depend on the weights. The cache saves exactly the encoder's forward pass, so the speed-up
is (encoder + training step) / training step: it grows with the encoder's size relative to the flow model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config, save_config  # noqa: E402
from models import build_autoencoder  # noqa: E402
from models.checkpoint import save_weights  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"


def random_autoencoder(folder: Path, preset: str) -> Path:
    """An untrained autoencoder checkpoint folder for MNIST (weights, config, latent statistics of 1)."""
    cfg = load_config(ROOT / "configs" / "mnist_autoencoder.yaml", [f"model.name={preset}"])
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    meta = {"data_shape": "[1, 28, 28]", "kind": "image", "num_classes": "0", "latent_shape": "[4, 7, 7]",
            "latent_shift": "0.0", "latent_scale": "1.0"}
    save_weights(build_autoencoder(cfg, (1, 28, 28)), folder / "ema.safetensors", meta)
    return folder


def run(out: Path, autoencoder: Path, cache: bool, args) -> tuple[float, float]:
    """samples/s of training and the seconds the command took."""
    overrides = [f"data.path={args.data}", "data.split=test", f"latent.autoencoder={autoencoder}",
                 f"latent.cache={str(cache).lower()}", f"latent.cache_dir={out / 'cache'}",
                 f"train.steps={args.steps}", f"train.log_every={args.steps // 4}", "train.preview_every=0",
                 f"train.checkpoint_every={args.steps}", "train.trackers=[]", "train.preview_images=4"]
    run_dir = out / ("cached" if cache else "per_step")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "mnist_latent_unet.yaml"),
                    "-e", str(run_dir), *overrides], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["samples_per_s"] for r in rows) / len(rows), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", help="an autoencoder checkpoint folder (default: an untrained --preset)")
    p.add_argument("--preset", default="ae-mnist", help="the untrained autoencoder's preset, f4 (ae-mnist, ae-cifar10)")
    p.add_argument("--data", default=str(MNIST), help="folder with the MNIST idx files")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        autoencoder = Path(args.autoencoder) if args.autoencoder else random_autoencoder(out / "ae", args.preset)
        cached, cached_s = run(out, autoencoder, True, args)
        per_step, per_step_s = run(out, autoencoder, False, args)
        log = (out / "cached" / "log.txt").read_text()
        encoded = next(line for line in log.splitlines() if "latent cache:" in line)
    print(f"| latents | training samples/s | whole command (s) |\n|---|---:|---:|\n"
          f"| encoded every step | {per_step:.0f} | {per_step_s:.0f} |\n"
          f"| read from the cache | {cached:.0f} | {cached_s:.0f} (encoding included) |\n"
          f"cache speed-up {cached / per_step:.2f}x; {encoded.split('] ', 1)[-1]}")


if __name__ == "__main__":
    main()
