"""Sample quality against NFE for every solver × time schedule, and sampling throughput beside torchdiffeq.

    python bench/solvers_nfe.py [-e RUN_DIR] [--out bench/out/solvers_nfe]                     # 2-D, W2
    python bench/solvers_nfe.py --mnist-run runs/mnist_15min [--device cuda] [--n 1000]        # MNIST, FID
    python bench/solvers_nfe.py --from-report runs/mnist_15min/eval/report.json --out DIR  # from evaluate.py rows
    python bench/solvers_nfe.py ... --throughput[-only]         # + samples/s beside torchdiffeq's odeint

Quality, 2-D: a trained 2-D run (default: the quick-start model, trained into --out if missing), EMA
weights; --n samples from fixed noise; W2 (exact OT) to --n fresh data points.
Quality, MNIST: an MNIST run's newest checkpoint, EMA weights; --n samples from fixed noise; FID with
clean-fid's Inception network (mode "clean") against the 10,000 MNIST test digits (the statistics file
in ../shared/data/mnist, or --mnist-data computed in memory the same way).
Every fixed-grid solver × schedule at every reachable NFE in {1, 2, 4, 8, 16, 32, 64, 100}
(heun+euler and rk4+euler, whose last step is Euler's, with the steps of heun and rk4 at that NFE:
1 and 3 NFE fewer), and dopri5 at several tolerances. The target is Euler-100's quality (within 5%):
the combination reaching it with the fewest NFE is named. Throughput: samples/s of `flows.generate`
(Euler, fixed NFE) and of torchdiffeq's `odeint` called directly with the same method and grid, on
the same model and noise, alternated in pairs (ABBA), the median ratio of --repeats pairs; and dopri5
with per-sample step control beside odeint's one step size for the whole batch (calls, NFE per sample,
samples/s) at each --tolerances value.
Writes table.md and nfe.png into --out, and for MNIST each FID into --out/scores.json as it is measured: run
again with the same --out, a sweep cut off (a time limit, a crash) goes on where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from config import load_config  # noqa: E402
from data.images import load_mnist, to_uint8  # noqa: E402
from data.toy import TOY  # noqa: E402
from errors import UserError  # noqa: E402
from flows.couplings import w2_distance  # noqa: E402
from flows.schedules import SCHEDULES, parse_schedule  # noqa: E402
from flows.solvers import ADAPTIVE, SOLVERS, check_solver, generate  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import list_checkpoints, load_weights, read_metadata  # noqa: E402

NFES = [1, 2, 4, 8, 16, 32, 64, 100]
SWEPT = [*SOLVERS, "heun+euler", "rk4+euler"]
TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def toy_run(args) -> Path:
    """The 2-D run to measure: -e, or the quick-start model, trained into --out the first time."""
    run = Path(args.exp) if args.exp else Path(args.out) / "moons_run"
    if not args.exp and not list_checkpoints(run):
        subprocess.run([sys.executable, str(ROOT / "train.py"), "-e", str(run), "train.trackers=[]",
                        "train.preview_every=0"], check=True)
    return run


def device_name(device: torch.device, threads: bool = True) -> str:
    """The GPU's name, or on the CPU "N CPU threads" ("cpu" with threads=False)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads" if threads else "cpu"


def load_ema(run: Path, device: torch.device):
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise UserError(f"{run} has no checkpoint (checkpoints/step_N); give the folder of a training run")
    _, checkpoint = checkpoints[-1]
    cfg = load_config(checkpoint / "config.yaml")
    meta = read_metadata(checkpoint / "ema.safetensors")
    shape = tuple(json.loads(meta["data_shape"]))
    model = build_model(cfg, shape, int(meta["num_classes"]))
    load_weights(model, checkpoint / "ema.safetensors")
    return cfg, model.to(device).eval(), shape, checkpoint


class Scores:
    """Scores measured so far, {"solver:steps:schedule" or "dopri5:tol": [NFE, score]}, kept in PATH after each
    one when a path is given, so that a sweep cut off (a time limit, a crash) goes on where it stopped. The file
    holds the protocol it was measured under; another protocol in the same file is an error, never a mix."""

    def __init__(self, path: Path | None, protocol: dict):
        self.path, self.protocol, self.values = path, protocol, {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved["protocol"] != protocol:
                raise UserError(f"{path} holds scores of another protocol ({saved['protocol']}, not {protocol}); "
                                "give another --out or delete the file")
            self.values = saved["scores"]
            print(f"  {len(self.values)} scores from {path}", flush=True)

    def get(self, key: str, run) -> tuple[int, float]:
        """[NFE, score] of `key`, measured by run() -> (NFE, score) unless already known."""
        if key not in self.values:
            self.values[key] = list(run())
            if self.path is not None:
                part = self.path.with_suffix(".part")
                part.write_text(json.dumps({"protocol": self.protocol, "scores": self.values}, indent=1))
                part.replace(self.path)
        nfe, value = self.values[key]
        return int(nfe), float(value)


def sweep(model, x0: torch.Tensor, score, args, scores: Scores | None = None) -> tuple[dict, dict, float]:
    """score(samples) for every solver × schedule × reachable NFE column of the grid the arguments choose, as
    {column: (true NFE, score)}; (NFE, score) for dopri5 at each tolerance; the target, Euler-100's score."""
    scores = scores or Scores(None, {})

    def measure(key: str, steps: int | None, solver: str, schedule: str = "linear", tol: float | None = None):
        def run():
            out = generate(model, x0, steps, solver, schedule=schedule, **({"atol": tol, "rtol": tol} if tol else {}))
            # Adaptive solvers: the evaluations a sample needed, on average (each controls its own steps).
            return out.nfe if out.sample_nfe is None else round(out.sample_nfe.float().mean().item()), score(out.x)
        return scores.get(key, run)

    target = measure("euler:100:linear", 100, "euler")[1]
    print(f"  euler-100 {target:.3f}", flush=True)
    results: dict[tuple[str, str], dict[int, tuple[int, float]]] = {}
    for solver in args.solvers:
        evals = SOLVERS[solver.partition("+")[0]][1]
        for schedule in args.schedules:
            results[solver, schedule] = {
                nfe: measure(f"{solver}:{nfe // evals}:{schedule}", nfe // evals, solver, schedule)
                for nfe in args.nfes if nfe % evals == 0}
            print(f"  {solver:10s} {schedule:13s} "
                  + " ".join(f"{v:8.3f}" for _, v in results[solver, schedule].values()), flush=True)
    adaptive = {tol: measure(f"dopri5:{tol:g}", None, "dopri5", tol=tol) for tol in args.tolerances}
    return results, adaptive, target


def table(results, adaptive, target: float, metric: str, header: str, nfes: list[int]) -> list[str]:
    reached = [(nfe, solver, schedule, value) for (solver, schedule), row in results.items()
               for nfe, value in row.values() if value <= 1.05 * target]
    lines = [header + f" Euler-100 target {target:.3f} (+5%: {1.05 * target:.3f}).", "",
             "| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for (solver, schedule), row in results.items():
        cells = [(f"{row[n][1]:.3f}" + ("" if row[n][0] == n else f" ({row[n][0]})")) if n in row else ""
                 for n in nfes]
        lines.append(f"| {solver} | {schedule} | " + " | ".join(cells) + " |")
    lines += ["", "A figure in brackets is the true NFE where it differs from the column's (SOLVER+euler ends "
                  "with one Euler step)."]
    if adaptive:
        lines += ["", f"| dopri5 atol = rtol | NFE | {metric} |", "|---|---:|---:|"]
        lines += [f"| {tol:g} | {nfe} | {value:.3f} |" for tol, (nfe, value) in adaptive.items()]
    if reached:
        nfe, solver, schedule, value = min(reached, key=lambda r: (r[0], r[3]))
        lines += ["", f"Fewest NFE within 5% of Euler-100: **{solver} + {schedule} at NFE {nfe}** "
                      f"({metric} {value:.3f})."]
    else:
        lines += ["", "No combination of this grid came within 5% of Euler-100."]
    return lines


def quality_2d(args) -> list[str]:
    run = toy_run(args)
    cfg, model, shape, _ = load_ema(run, torch.device("cpu"))
    x0 = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(123))
    data = TOY[cfg.data.name](args.n, torch.Generator().manual_seed(456), torch.device("cpu"))
    floor = w2_distance(TOY[cfg.data.name](args.n, torch.Generator().manual_seed(789), torch.device("cpu")), data)
    results, adaptive, target = sweep(model, x0, lambda x: w2_distance(x, data), args)
    header = (f"Run {run}, EMA weights; W2 of {args.n} samples to {args.n} fresh {cfg.data.name} points (floor, "
              f"data to data: {floor:.3f});")
    lines = table(results, adaptive, target, "W2", header, args.nfes)
    plot(results, adaptive, target, "W2 to data", Path(args.out) / "nfe.png")
    return lines


def quality_mnist(args) -> list[str]:
    from mnist_fid import FrechetReference, frechet, inception_features, statistics

    device = torch.device(args.device)
    _, model, shape, checkpoint = load_ema(Path(args.mnist_run), device)
    if (Path(args.mnist_data) / "t10k-fid-stats-clean.npz").exists():
        ref = np.load(Path(args.mnist_data) / "t10k-fid-stats-clean.npz")
        mu, sigma, source = ref["mu"], ref["sigma"], "t10k-fid-stats-clean.npz"
    else:
        real = load_mnist(Path(args.mnist_data), "test", download=False).images
        mu, sigma = statistics(inception_features(real, device, num_workers=args.workers))
        source = "computed here from the 10,000 test digits"
        np.savez(Path(args.out) / "t10k-mu.npz", mu=mu, sigma_diag=np.diag(sigma))
    reference = FrechetReference(mu, sigma, device)
    x0 = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    timings = {"seconds": 0.0}

    def score(x: torch.Tensor) -> float:
        start = time.perf_counter()
        value = frechet(inception_features(to_uint8(x.cpu()), device, num_workers=args.workers), reference)
        timings["seconds"] += time.perf_counter() - start
        return value

    digest = hashlib.sha256((checkpoint / "ema.safetensors").read_bytes()).hexdigest()[:16]
    protocol = {"checkpoint": f"{checkpoint.name}, ema.safetensors sha256 {digest}", "n": args.n, "noise seed": 0,
                "reference": source, "device": device_name(device, threads=False)}
    start = time.perf_counter()
    results, adaptive, target = sweep(model, x0, score, args, Scores(Path(args.out) / "scores.json", protocol))
    elapsed = time.perf_counter() - start
    lines = table(results, adaptive, target, "FID", f"{checkpoint}, EMA weights; FID (clean-fid, clean mode) of "
                          f"{args.n} samples to the 10,000 MNIST test digits ({source}); {device_name(device)}, "
                          f"{elapsed:.0f} s in all, {timings['seconds']:.0f} s of it Inception.", args.nfes)
    plot(results, adaptive, target, f"FID ({args.n} samples)", Path(args.out) / "nfe.png")
    return lines


def quality_report(args) -> list[str]:
    """The table and plot from the rows of an evaluate.py report (RUN/eval/report.json): FID per solver × schedule
    at the NFE that were evaluated, of one checkpoint and protocol (the newest step's EMA rows, guidance off)."""
    path = Path(args.from_report)
    if not path.is_file():
        raise UserError(f"--from-report {path} does not exist; give the report.json evaluate.py wrote in RUN/eval/")
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("fid") is not None and r["cfg_scale"] == 1.0
            and r["weights"] == "ema"]
    rows = [r for r in rows if r["step"] == max(r["step"] for r in rows)]
    protocols = {(r["n_samples"], r["seed"], r["reference"], r["mode"]) for r in rows}
    if len(protocols) != 1:
        raise UserError(f"{path} mixes protocols {sorted(protocols)}; evaluate one protocol into its own --out")
    results: dict[tuple[str, str], dict[int, tuple[int, float]]] = {}
    adaptive = {}
    for r in rows:
        if r["solver"] in ADAPTIVE:
            adaptive[r["atol"]] = (int(r["nfe"]), r["fid"])
        else:  # the column is the NFE of the solver's own steps; the true NFE differs for SOLVER+euler
            column = SOLVERS[r["solver"].partition("+")[0]][1] * r["steps"]
            results.setdefault((r["solver"], r["schedule"]), {})[column] = (r["nfe"], r["fid"])
    if 100 not in results.get(("euler", "linear"), {}):
        raise UserError(f"{path} has no euler:100 row (the target); run evaluate.py --samplers euler:100 first")
    order = {name: i for i, name in enumerate([*SWEPT, *SCHEDULES])}
    keys = sorted(results, key=lambda key: (order.get(key[0], 99), order.get(key[1], 99)))
    results = {key: dict(sorted(results[key].items())) for key in keys}
    adaptive = dict(sorted(adaptive.items(), reverse=True))
    nfes = sorted({n for row in results.values() for n in row})
    n, seed, reference, _ = protocols.pop()
    header = (f"{rows[0]['checkpoint']}, EMA weights; FID (clean-fid, clean mode) of {n} samples (seeds ({seed}, k)) "
              f"to {reference}, rows of {path};")
    lines = table(results, adaptive, results["euler", "linear"][100][1], "FID", header, nfes)
    plot(results, adaptive, results["euler", "linear"][100][1], f"FID ({n} samples)", Path(args.out) / "nfe.png")
    return lines


def plot(results, adaptive, target: float, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = list(dict.fromkeys(solver for solver, _ in results))
    schedules = list(dict.fromkeys(schedule for _, schedule in results))
    colour = {schedule: f"C{i}" for i, schedule in enumerate(schedules)}  # the same in every panel
    cols = min(3, len(solvers))
    rows = -(-len(solvers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, solver in zip(axes.flat, solvers):
        for schedule in schedules:
            if results.get((solver, schedule)):
                nfes, values = zip(*results[solver, schedule].values())
                ax.plot(nfes, values, marker="o", ms=3, color=colour[schedule], label=schedule)
        ax.plot([nfe for nfe, _ in adaptive.values()], [v for _, v in adaptive.values()], "k*--", label="dopri5")
        ax.axhline(target, color="gray", lw=0.8, label="Euler-100")
        ax.set(xscale="log", yscale="log", title=solver)
    for ax in axes.flat[len(solvers):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("NFE")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 10), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def throughput(args) -> list[str]:
    from torchdiffeq import odeint

    device = torch.device(args.device)
    run = Path(args.mnist_run) if args.mnist_run else toy_run(args)
    _, model, shape, _ = load_ema(run, device)
    x0 = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    grid = torch.linspace(0, 1, args.steps + 1, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        return generate(model, x0, args.steps, "euler").x

    @torch.no_grad()
    def direct():
        return odeint(lambda t, x: model(x, t.expand(x.shape[0])), x0, grid, method="euler")[-1]

    runs = {"flows.generate": [], "torchdiffeq.odeint": []}
    for repeat in range(args.repeats):
        pair = [("flows.generate", ours), ("torchdiffeq.odeint", direct)]
        for name, fn in pair if repeat % 2 == 0 else pair[::-1]:  # ABBA order: drift cancels out
            sync()
            start = time.perf_counter()
            fn()
            sync()
            runs[name].append(args.batch / (time.perf_counter() - start))
    ratios = np.array(runs["flows.generate"]) / np.array(runs["torchdiffeq.odeint"])
    return ["", f"Throughput, {run}, Euler {args.steps} NFE, batch {args.batch}, {device_name(device)}, "
            f"{args.repeats} runs each: "
            + ", ".join(f"{name} median {np.median(v):.1f} (best {max(v):.1f}) samples/s" for name, v in runs.items())
            + f"; ratio per pair: median {np.median(ratios):.3f}, quartiles {np.quantile(ratios, 0.25):.3f}"
            f"-{np.quantile(ratios, 0.75):.3f}, {np.mean(ratios >= 1):.0%} of pairs ≥ 1"] \
        + adaptive_control(args, model, x0, device)


def adaptive_control(args, model, x0: torch.Tensor, device: torch.device) -> list[str]:
    """dopri5 with the step size controlled per sample (flows.generate: a sample's steps do not depend on its batch
    neighbours) beside torchdiffeq's odeint, whose one step size serves the whole batch (its error norm spans it):
    velocity calls, evaluations per sample and samples/s at each --tolerances value."""
    from torchdiffeq import odeint

    exact = generate(model, x0, 2000, "rk4").x  # the reference solution: 8,000 NFE of rk4
    lines = ["", f"dopri5, batch {args.batch}, {device_name(device)}: per-sample step control (flows.generate) "
             "beside one step size for the batch (torchdiffeq.odeint); error: the largest distance of a sample from "
             "rk4 with 2,000 steps", "",
             "| atol = rtol | calls (ours) | NFE per sample, mean (ours) | samples/s (ours) | max error (ours) | "
             "calls (odeint) | samples/s (odeint) | max error (odeint) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ends = torch.tensor([0.0, 1.0], device=device)
    for tol in args.tolerances:
        calls = 0

        def counted(t, x):
            nonlocal calls
            calls += 1
            return model(x, t.expand(x.shape[0]))

        start = time.perf_counter()
        ours = generate(model, x0, None, "dopri5", atol=tol, rtol=tol)
        ours_rate = len(x0) / (time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            shared = odeint(counted, x0, ends, method="dopri5", atol=tol, rtol=tol)[-1]
        shared_rate = len(x0) / (time.perf_counter() - start)
        error = [(x - exact).flatten(1).norm(dim=1).max().item() for x in (ours.x, shared)]
        lines.append(f"| {tol:g} | {ours.nfe} | {ours.sample_nfe.float().mean():.1f} | {ours_rate:.0f} | "
                     f"{error[0]:.2g} | {calls} | {shared_rate:.0f} | {error[1]:.2g} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-e", "--exp", help="a 2-D run folder (default: train the quick-start model into --out)")
    p.add_argument("--mnist-run", help="an MNIST run folder: FID instead of the 2-D W2")
    p.add_argument("--mnist-data", default=str(MNIST), help="folder with the MNIST test files (and its FID stats)")
    p.add_argument("--from-report", help="make the table and plot from the rows of an evaluate.py report.json "
                   "instead of sampling (the MNIST grid on a CPU, a row at a time)")
    p.add_argument("--n", type=int, default=1000, help="samples per W2 or FID")
    p.add_argument("--workers", type=int, default=0, help="data loader workers for the Inception resizing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/out/solvers_nfe")
    p.add_argument("--solvers", type=lambda s: s.split(","), default=SWEPT, help="fixed-grid solvers to sweep, "
                   f"comma-separated (default: {','.join(SWEPT)})")
    p.add_argument("--schedules", type=lambda s: s.split(","), default=list(SCHEDULES),
                   help="time schedules to sweep (default: all)")
    p.add_argument("--nfes", type=lambda s: [int(n) for n in s.split(",")], default=NFES,
                   help=f"NFE columns (default: {','.join(map(str, NFES))})")
    p.add_argument("--tolerances", type=lambda s: [float(v) for v in s.split(",") if v], default=TOLERANCES,
                   help="dopri5 atol = rtol values ('' for none; default: 1e-2,1e-3,1e-4,1e-5)")
    p.add_argument("--throughput", action="store_true", help="also time flows.generate beside torchdiffeq's odeint")
    p.add_argument("--throughput-only", action="store_true", help="only the throughput, no quality sweep")
    p.add_argument("--steps", type=int, default=20, help="Euler steps for the throughput comparison")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs of each, alternated in pairs; the median ratio of the pairs counts")
    args = p.parse_args()
    try:
        for solver in args.solvers:
            check_solver(solver, 1)
        for schedule in args.schedules:
            parse_schedule(schedule)
    except UserError as e:
        p.error(str(e))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        lines = ([] if args.throughput_only else quality_report(args) if args.from_report
                 else quality_mnist(args) if args.mnist_run else quality_2d(args))
        if args.throughput or args.throughput_only:
            lines += throughput(args)
    except UserError as e:
        p.error(str(e))
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
