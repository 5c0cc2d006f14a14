"""Sample quality against NFE for every solver × time schedule, and sampling throughput beside torchdiffeq.

    python bench/solvers_nfe.py [-e RUN_DIR] [--out bench/out/solvers_nfe]
    python bench/solvers_nfe.py --throughput-run runs/mnist_15min     # + samples/s beside torchdiffeq's odeint

Quality: a trained 2-D run (default: the quick-start model, trained into --out if missing), EMA
weights; 2,000 samples from fixed noise; W2 (exact OT) to 2,000 fresh data points. Every fixed-grid
solver × schedule at every reachable NFE in {1, 2, 4, 8, 16, 32, 64, 100}, and dopri5 at several
tolerances. The target is Euler-100's W2 (within 5%): the combination reaching it with the fewest NFE
is named. Throughput: samples/s of `flows.generate` (Euler, fixed NFE) and of torchdiffeq's `odeint`
called directly with the same method and grid, on the same model and noise, alternated, best of 3.
Writes table.md and nfe.png into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from data.toy import TOY  # noqa: E402
from flows.couplings import w2_distance  # noqa: E402
from flows.schedules import SCHEDULES  # noqa: E402
from flows.solvers import SOLVERS, generate  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import list_checkpoints, load_weights, read_metadata  # noqa: E402

NFES = [1, 2, 4, 8, 16, 32, 64, 100]
TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5]


def load_ema(run: Path):
    _, checkpoint = list_checkpoints(run)[-1]
    cfg = load_config(checkpoint / "config.yaml")
    meta = read_metadata(checkpoint / "ema.safetensors")
    shape = tuple(json.loads(meta["data_shape"]))
    model = build_model(cfg, shape, int(meta["num_classes"]))
    load_weights(model, checkpoint / "ema.safetensors")
    return cfg, model.eval(), shape


def quality(args) -> list[str]:
    run = Path(args.exp) if args.exp else Path(args.out) / "moons_run"
    if not list_checkpoints(run):
        subprocess.run([sys.executable, str(ROOT / "train.py"), "-e", str(run), "train.trackers=[]",
                        "train.preview_every=0"], check=True)
    cfg, model, shape = load_ema(run)
    x0 = torch.randn(2000, *shape, generator=torch.Generator().manual_seed(123))
    data = TOY[cfg.data.name](2000, torch.Generator().manual_seed(456), torch.device("cpu"))
    floor = w2_distance(TOY[cfg.data.name](2000, torch.Generator().manual_seed(789), torch.device("cpu")), data)
    results: dict[tuple[str, str], dict[int, float]] = {}
    for solver, (_, evals) in SOLVERS.items():
        for schedule in SCHEDULES:
            results[solver, schedule] = {nfe: w2_distance(generate(model, x0, nfe // evals, solver,
                                                                   schedule=schedule).x, data)
                                         for nfe in NFES if nfe % evals == 0}
    adaptive = {}
    for tol in TOLERANCES:
        out = generate(model, x0, None, "dopri5", atol=tol, rtol=tol)
        adaptive[tol] = (out.nfe, w2_distance(out.x, data))
    target = results["euler", "linear"][100]
    best = min(((nfe, solver, schedule, w2) for (solver, schedule), row in results.items()
                for nfe, w2 in row.items() if w2 <= 1.05 * target), key=lambda r: (r[0], r[3]))
    lines = [f"Run {run}, EMA weights; W2 of 2,000 samples to 2,000 fresh {cfg.data.name} points "
             f"(floor, data to data: {floor:.3f}); Euler-100 target {target:.3f} (+5%: {1.05 * target:.3f}).", "",
             "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|---|" + "---:|" * len(NFES)]
    for (solver, schedule), row in results.items():
        lines.append(f"| {solver} | {schedule} | " + " | ".join(f"{row[n]:.3f}" if n in row else "" for n in NFES)
                     + " |")
    lines += ["", "| dopri5 atol = rtol | NFE | W2 |", "|---|---:|---:|"]
    lines += [f"| {tol:g} | {nfe} | {w2:.3f} |" for tol, (nfe, w2) in adaptive.items()]
    lines += ["", f"Fewest NFE within 5% of Euler-100: **{best[1]} + {best[2]} at NFE {best[0]}** (W2 {best[3]:.3f})."]
    plot(results, adaptive, target, Path(args.out) / "nfe.png")
    return lines


def plot(results, adaptive, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SOLVERS), figsize=(4 * len(SOLVERS), 4), sharey=True)
    for ax, solver in zip(axes, SOLVERS):
        for schedule in SCHEDULES:
            row = results[solver, schedule]
            ax.plot(list(row), list(row.values()), marker=".", label=schedule)
        ax.plot([nfe for nfe, _ in adaptive.values()], [w2 for _, w2 in adaptive.values()], "k*--", label="dopri5")
        ax.axhline(target, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=solver)
    axes[0].set_ylabel("W2 to data")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def throughput(args) -> list[str]:
    from torchdiffeq import odeint

    _, model, shape = load_ema(Path(args.throughput_run))
    x0 = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(0, 1, args.steps + 1)

    def ours():
        return generate(model, x0, args.steps, "euler").x

    @torch.no_grad()
    def direct():
        return odeint(lambda t, x: model(x, t.expand(x.shape[0])), x0, grid, method="euler")[-1]

    best = {"flows.generate": 0.0, "torchdiffeq.odeint": 0.0}
    for _ in range(3):
        for name, fn in (("flows.generate", ours), ("torchdiffeq.odeint", direct)):
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], args.batch / (time.perf_counter() - start))
    return ["", f"Throughput, {args.throughput_run}, Euler {args.steps} NFE, batch {args.batch}, "
                f"{torch.get_num_threads()} threads: "
            + ", ".join(f"{name} {value:.1f} samples/s" for name, value in best.items())
            + f" (ratio {best['flows.generate'] / best['torchdiffeq.odeint']:.3f})"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-e", "--exp", help="a 2-D run folder (default: train the quick-start model into --out)")
    p.add_argument("--out", default="bench/out/solvers_nfe")
    p.add_argument("--throughput-run", help="run folder of the model to time (e.g. an MNIST run)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps for the throughput comparison")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    lines = quality(args)
    if args.throughput_run:
        lines += throughput(args)
    text = "\n".join(lines)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
