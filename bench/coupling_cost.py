"""What each coupling costs on the CIFAR-10 UNet's training step, against independent pairing: train.py as a user
runs it (the next micro-step's coupling solved in a worker thread while the current one trains), and the solve
alone on the same global batch.

    python bench/coupling_cost.py [--batch 32] [--steps 4] [--repeats 2] [--ot-reg 10] [--couplings ot entropic]

Data: random pixels in CIFAR-10's format (bench/train_throughput.py's fake_cifar), with labels, so class_ot can
pair within classes. --ot-reg is ε of the entropic and unbalanced plans in units of the squared pixel distance
(CIFAR-10 pairs are ~6,000 apart, so unbalanced OT needs ε ≳ 10 before exp(−C/ε) underflows; the entropic
plan of a small ε is solved in the log domain). Each coupling's train.py run is timed by its own samples/s over
steps [steps + 1, 2·steps]; runs alternate over the couplings --repeats times and the best is kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import fake_cifar, toolkit  # noqa: E402

from config import load_config  # noqa: E402
from flows import COUPLINGS  # noqa: E402

COUPLED = {"independent": [], "ot": ["flow.coupling=ot"], "entropic": ["flow.coupling=entropic"],
           "unbalanced": ["flow.coupling=unbalanced"], "partial": ["flow.coupling=partial"],
           "class_ot": ["flow.coupling=class_ot", "model.class_cond=true"]}


def solve_ms(name: str, batch: int, reg: float, repeats: int = 5) -> float:
    """Milliseconds of one pairing of a global batch of CIFAR-10-sized noise and data (best of `repeats`)."""
    cfg = load_config(None, [*COUPLED[name], f"flow.ot_reg={reg}"])
    coupling = COUPLINGS[cfg.flow.coupling](cfg)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=g)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        coupling.pair(x0, x1, generator=torch.Generator().manual_seed(1), y=y)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps (and as many warmup steps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ot-reg", type=float, default=10.0)
    p.add_argument("--couplings", nargs="+", choices=list(COUPLED), default=list(COUPLED),
                   help="which to time (independent, the baseline, always)")
    args = p.parse_args()
    args.mixed_precision, args.compile, args.grad_checkpoint = "no", False, False
    names = ["independent", *(name for name in args.couplings if name != "independent")]
    solve = {name: solve_ms(name, args.batch, args.ot_reg) for name in names}
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_cifar(Path(tmp) / "cifar")
        for repeat in range(args.repeats):
            for name in names:
                rate = toolkit("unet-cifar10", args, data, Path(tmp) / f"{name}_{repeat}",
                               [*COUPLED[name], f"flow.ot_reg={args.ot_reg}"])
                rates[name] = max(rates.get(name, 0.0), rate)
                print(f"repeat {repeat} {name:12s} {rate:.2f} images/s", flush=True)
    base = args.batch / rates["independent"]
    print(f"\nunet-cifar10, batch {args.batch}, fp32, ε = {args.ot_reg:g}, best of {args.repeats}:\n")
    print("| coupling | solve alone, ms | train.py step, s | step / independent step |")
    print("|---|---:|---:|---:|")
    for name in names:
        step = args.batch / rates[name]
        print(f"| {name} | {solve[name]:.1f} | {step:.3f} | {step / base:.3f} |")


if __name__ == "__main__":
    main()
