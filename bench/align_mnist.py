"""Representation alignment on MNIST at equal wall time: real FID after 5, 10 and 15 minutes of training.

    ../shared/tools/inception-offline .venv/bin/python        # once per machine: clean-fid's network, offline
    python bench/align_mnist.py [--minutes 15] [--methods plain,repa,dispersive,sra] [--parallel 2]
    python bench/align_mnist.py --model model.name=DiT-S/4 model.width=128 model.depth=6 model.heads=4 \
        --out bench/out/align_mnist_dit       # a small DiT in place of the UNet (at patch 2 a step costs 6× more)
    python bench/align_mnist.py --methods repa --model align.resolution=75 align.projector=conv align.weight=1 \
        --out bench/out/align_mnist_irepa75_w1   # iREPA on Inception's 7×7 grid at 75 px, λ 1 (the best here)
    python bench/align_mnist.py --compare bench/out/align_mnist:plain bench/out/align_mnist_irepa75_w1 \
        --out bench/out/align_mnist_compare   # runs of several --out folders in one plot, with the goal's lines
    python bench/align_mnist.py --minutes 7.5 --checkpoints last --methods plain --out bench/out/align_mnist_7m
        # a run of its own for a shorter budget (its cosine schedule ends at 7.5 minutes), only its end scored

Every method trains configs/mnist_icfm_unet.yaml (unet-mnist, batch 64, AdamW 2e-3, warmup 100, cosine decay, EMA
0.999) on the 10,000 MNIST test digits of ../shared/data/mnist, plus its flow.align and the ALIGN overrides below.
Runs go `--parallel` at a time, each with 1/parallel of the cores (OMP_NUM_THREADS), so that every method gets the
same machine. Each method first trains 30 steps to measure its step cost; its run then gets the number of steps
that fills `--minutes` of wall clock (REPA's feature cache, computed at the start of its run, taken out first), the
cosine schedule over them, and checkpoints at a third and two thirds. A checkpoint's wall time is read from the run's
log (seconds since the command started: the encoder, the cache, start-up and checkpoints are all counted).
FID: `evaluate.py --samplers midpoint:8:cosine` (16 NFE, the best sampler at ≤ 16 NFE in docs/benchmarks.md), 1,000
samples, EMA weights, clean-fid against ../shared/data/mnist/t10k-fid-stats-clean.npz. Prints a table and writes
OUT/fid_vs_time.png and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from errors import UserError  # noqa: E402
from flows.sampling import parse_samplers  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mnist"
ALIGN = {
    "plain": [],
    # The FID Inception network (the only pretrained image encoder on this machine), read at 139 px, where its
    # mixed_2 layer is a 15×15 grid of 288 features, resized to the UNet middle's 7×7 grid and cached once.
    "repa": ["flow.align=repa", "align.encoder=inception", "align.resolution=139"],
    "dispersive": ["flow.align=dispersive"],
    "sra": ["flow.align=sra"],
}


def train_command(run: Path, method: str, steps: int, checkpoint_every: int, cache_dir: Path,
                  model: list[str]) -> list[str]:
    extra = [*model, *([f"align.cache_dir={cache_dir}"] if method == "repa" else [])]
    return [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "mnist_icfm_unet.yaml"), "-e",
            str(run), f"data.path={SHARED}", "data.split=test", f"train.steps={steps}",
            f"train.checkpoint_every={checkpoint_every}", f"train.keep_every={checkpoint_every}",
            "train.preview_every=0", "train.log_every=10",
            "train.trackers=[]", *ALIGN[method], *extra]


def run_all(commands: list[tuple[str, list[str]]], parallel: int, log_dir: Path) -> dict[str, float]:
    """Run the commands `parallel` at a time, each with its share of the cores; returns each one's start time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    started, pending, running = {}, list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            name, command = pending.pop(0)
            started[name] = time.time()
            out = open(log_dir / f"{name}.out", "w")
            running.append((name, subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), out))
        time.sleep(1)
        for item in list(running):
            name, process, out = item
            if process.poll() is not None:
                out.close()
                running.remove(item)
                if process.returncode:
                    raise SystemExit(f"{name} failed (exit {process.returncode}); see {log_dir / (name + '.out')}")
    return started


def checkpoint_times(run: Path, started: float) -> dict[int, float]:
    """Seconds from the command's start to each checkpoint line of the run's log."""
    times = {}
    for line in (run / "log.txt").read_text().splitlines():
        if "] checkpoint: " in line:
            stamp = datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S").timestamp()
            times[int(line.rsplit("step_", 1)[1])] = stamp - started
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="wall clock of each training run")
    p.add_argument("--methods", default=",".join(ALIGN), help=f"comma-separated, of {', '.join(ALIGN)}")
    p.add_argument("--parallel", type=int, default=2, help="runs side by side (each gets cores / parallel)")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--sampler", default="midpoint:8:cosine")
    p.add_argument("--checkpoints", default="all", choices=("all", "last"),
                   help="which checkpoints evaluate.py scores: all (a third, two thirds and the end), or last (the "
                        "run's own budget only, a third of the evaluation time)")
    p.add_argument("--model", nargs="*", default=[], metavar="key=value", help="model overrides (default: the "
                   "config's unet-mnist)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "align_mnist")
    p.add_argument("--compare", nargs="+", metavar="DIR[:METHODS]",
                   help="train nothing: plot these --out folders' runs (all, or the comma-separated METHODS) in one "
                        "figure, OUT/fid_vs_time_compare.png")
    args = p.parse_args()
    if args.compare:
        return compare(args.compare, args.out, f"FID ({args.n} samples, {args.sampler})", p.error)
    try:  # checked before training, not when evaluate.py reads it after the runs
        parse_samplers([args.sampler])
    except UserError as e:
        p.error(str(e))
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.out / "feature_cache"

    # Step cost of each method, 30 steps with the cores it will have (the feature cache is made here, once).
    run_all([(f"time_{m}", train_command(args.out / f"time_{m}", m, 30, 30, cache_dir, args.model)) for m in methods],
            args.parallel, args.out)
    cost, cache_s = {}, {}
    for m in methods:
        rows = [json.loads(line) for line in (args.out / f"time_{m}" / "metrics.jsonl").read_text().splitlines()]
        cost[m] = 64 / rows[-1]["samples_per_s"]  # seconds per step of batch 64, steps 21-30
        log = (args.out / f"time_{m}" / "log.txt").read_text()
        cache_s[m] = float(log.split("computed in ")[1].split(" s")[0]) if "computed in " in log else 0.0
        print(f"{m}: {cost[m]:.3f} s per step" + (f", feature cache {cache_s[m]:.0f} s" if cache_s[m] else ""))

    # Training: the steps that fill the wall clock (start-up and checkpoints: about 5%; the cache counted in).
    plan = {}
    for m in methods:
        steps = int((args.minutes * 60 * 0.95 - cache_s[m]) / cost[m])
        steps = max(3, steps - steps % 3)  # checkpoints at exactly a third, two thirds and the end, none after
        plan[m] = (steps, max(1, steps // 3))
        if m == "repa":  # its run pays for the cache again, as a user's first run would
            for folder in cache_dir.glob("*"):
                subprocess.run(["rm", "-rf", str(folder)], check=True)
    started = run_all([(m, train_command(args.out / m, m, *plan[m], cache_dir, args.model)) for m in methods],
                      args.parallel, args.out)

    # FID of every checkpoint.
    ref = SHARED / "t10k-fid-stats-clean.npz"
    run_all([(f"eval_{m}", [sys.executable, str(ROOT / "evaluate.py"), "-e", str(args.out / m), "--checkpoints",
                            args.checkpoints, "--samplers", args.sampler, "--n-samples", str(args.n), "--ref", str(ref),
                            "--bspp", "250"]) for m in methods], args.parallel, args.out)
    results = {}
    for m in methods:
        times = checkpoint_times(args.out / m, started[m])
        report = json.loads((args.out / m / "eval" / "report.json").read_text())
        rows = report["rows"] if isinstance(report, dict) else report
        results[m] = [{"step": r["step"], "minutes": times[r["step"]] / 60, "fid": r["fid"]} for r in rows]
        results[m].sort(key=lambda r: r["step"])
        print(f"{m:<11} steps {plan[m][0]:>5}  " + "  ".join(f"{r['minutes']:.1f} min: FID {r['fid']:.2f}"
                                                               for r in results[m]))
    (args.out / "results.json").write_text(json.dumps({"cost_s": cost, "cache_s": cache_s, "plan": plan,
                                                       "results": results}, indent=1))
    title = "MNIST, " + next((o.split("=", 1)[1] for o in args.model if o.startswith("model.name=")), "unet-mnist")
    plot({m: results[m] for m in methods}, args.out / "fid_vs_time.png", title,
         f"FID ({args.n} samples, {args.sampler})")


def plot(lines: dict[str, list[dict]], path: Path, title: str, ylabel: str, plain: dict | None = None) -> None:
    """FID against wall clock, one line per entry of `lines` ({label: [{minutes, fid}, ...]}); with `plain` (the
    plain run's last checkpoint), its FID, 0.85 of it and half its minutes as the goal's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8) if plain else (5, 3.5))
    for label, rows in lines.items():
        ax.plot([r["minutes"] for r in rows], [r["fid"] for r in rows], "o-", label=label)
    if plain:
        fid, minutes = plain["fid"], plain["minutes"]
        ax.axhline(fid, ls="--", c="gray", lw=0.8, label=f"plain at {minutes:.1f} min ({fid:.2f})")
        ax.axhline(0.85 * fid, ls=":", c="gray", lw=0.8, label=f"goal: −15% ({0.85 * fid:.2f})")
        ax.axvline(minutes / 2, ls="-.", c="gray", lw=0.8, label=f"goal: plain's FID by {minutes / 2:.1f} min")
    ax.set(xlabel="training wall clock (minutes, CPU)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7 if plain else None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def compare(folders: list[str], out: Path, ylabel: str, error) -> None:
    """One plot of the runs of several --out folders (their results.json, each 'DIR' or 'DIR:METHOD,...'), with the
    plain run's FID and the goal as lines when a plain run is among them; `error` says what is wrong and exits."""
    lines, plain, models = {}, None, []
    for spec in folders:
        folder, _, pick = spec.partition(":")
        if not (Path(folder) / "results.json").is_file():
            error(f"--compare {spec}: {folder} has no results.json; name an --out folder of a finished run")
        results = json.loads((Path(folder) / "results.json").read_text())["results"]
        for m in pick.split(",") if pick else results:
            if m not in results:
                error(f"--compare {spec}: {folder} has runs of {', '.join(results)} only")
            lines[f"{Path(folder).name}: {m}"] = results[m]
            plain = results[m][-1] if m == "plain" and plain is None else plain
            config = Path(folder) / m / "config.yaml"  # the run's own model, for the title
            name = load_config(config).model.name if config.is_file() else None
            models += [name] if name and name not in models else []
    out.mkdir(parents=True, exist_ok=True)
    plot(lines, out / "fid_vs_time_compare.png", "MNIST, " + (" / ".join(models) or "unet-mnist"), ylabel, plain)


if __name__ == "__main__":
    main()
