"""Guidance beyond CFG on MNIST, CPU, real FID: every rule against CFG at equal forward passes (issue 33).

    python bench/guidance_mnist.py [--out bench/out/guidance_mnist] [--n 1000] [--nfe 16 32]

Trains (once; reruns reuse the runs and the rows already in their reports):
- `cond`: configs/mnist_icfm_unet.yaml with model.class_cond=true flow.label_dropout=0.1, --steps steps (checkpoint
  at --steps/2 kept: the early-checkpoint guide);
- `cond_small`, `uncond_small`: the same UNet at half the channels (model.width=8: 0.25 of its FLOPs per pass),
  --steps/4 steps: the smaller guides;
- the unconditional main model is --uncond (default: the 15-minute plain run of bench/align_mnist.py, its early
  checkpoint the one at about 10 minutes).
Then evaluate.py rows, FID of --n samples against the 10,000 test digits (midpoint on the cosine grid: 16 NFE is
midpoint:8:cosine, the toolkit's best sampler at ≤ 16 NFE): no guidance, CFG at three scales, CFG with an interval,
APG (three caps r), CFG-Zero* (K = 1 and 0), autoguidance with the early guide (with and without the interval) and
the small guide, and autoguidance of the unconditional model.
Prints one table (FID, NFE, forward passes, main-pass equivalents; with --pr precision and recall against the
test digits' features) and writes OUT/table.md and OUT/fid_vs_passes.png (the best w of each row at each cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist"
DATA = [f"data.path={SHARED}", "data.split=test"]


def run(args: list[str], log: Path) -> None:
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{' '.join(args[:3])} failed ({code}); see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "guidance_mnist")
    p.add_argument("--uncond", type=Path, default=ROOT / "bench" / "out" / "align_mnist" / "plain",
                   help="the unconditional main run (its last checkpoint; the early guide: the one kept before it)")
    p.add_argument("--steps", type=int, default=1600, help="steps of the class-conditional main run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[16], help="midpoint on the cosine grid: NFE / 2 steps")
    p.add_argument("--rows", default="all", help="comma-separated row names to run (default all)")
    p.add_argument("--pr", action="store_true", help="also precision and recall; the reference is then the test "
                                                     "digits themselves (their features, computed once and cached), "
                                                     "not their statistics file: the same FID")
    p.add_argument("--table-only", action="store_true",
                   help="train and evaluate nothing: the table and plot of the --rows already in OUT's reports")
    args = p.parse_args()
    out = args.out
    ref = ["--pr"] if args.pr else ["--ref", str(SHARED / "t10k-fid-stats-clean.npz")]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    base = ["train.py", "-c", "configs/mnist_icfm_unet.yaml", *DATA, "train.trackers=[]", "train.preview_every=0"]
    cond = ["model.class_cond=true", "flow.label_dropout=0.1"]
    half = args.steps // 2
    trainings = {"cond": [*cond, f"train.steps={args.steps}", f"train.checkpoint_every={half}"],
                 "cond_small": [*cond, "model.width=8", f"train.steps={args.steps // 4}"],
                 "uncond_small": ["model.width=8", f"train.steps={args.steps // 4}"]}
    for name, overrides in ({} if args.table_only else trainings).items():
        print(f"training {name} ...", flush=True)
        run([*base, "-e", str(out / name), *overrides], log)

    def checkpoint(run_dir: Path, early: bool = False) -> Path:
        """The run's last checkpoint, or with early=True the one kept before it (the early-checkpoint guide)."""
        steps = sorted((run_dir / "checkpoints").glob("step_*"))
        if len(steps) < 1 + early:
            sys.exit(f"{run_dir} has {len(steps)} checkpoints, {1 + early} needed: train it first (the bench without "
                     f"--table-only, or --uncond RUN with checkpoints kept along the way)")
        return steps[-2] if early else steps[-1]

    early, small = checkpoint(out / "cond", early=True), checkpoint(out / "cond_small")
    u_early, u_small = checkpoint(args.uncond, early=True), checkpoint(out / "uncond_small")
    rows = {  # name: (run, sampler suffix, cfg scales, extra flags)
        "none": (out / "cond", "", ["1"], []),
        "cfg": (out / "cond", "", ["1.5", "2", "3"], []),
        "cfg_interval": (out / "cond", "", ["2.5", "3", "4"], ["--cfg-interval", "0.2,0.8"]),
        "cfg_interval_01": (out / "cond", "", ["3"], ["--cfg-interval", "0.1,0.8"]),  # where CFG's interval starts
        "cfg_interval_03": (out / "cond", "", ["3"], ["--cfg-interval", "0.3,0.8"]),
        "apg": (out / "cond", "@apg", ["3"], ["--apg-momentum", "-0.5", "--apg-r", "20"]),
        # r caps the update's norm: the cond model's is about 6 at t < 0.1, 2.8 at t = 0.23, 1.2 at t = 0.4
        "apg_r2": (out / "cond", "@apg", ["3", "5"], ["--apg-momentum", "-0.5", "--apg-r", "2"]),
        "apg_r1": (out / "cond", "@apg", ["3", "5"], ["--apg-momentum", "-0.5", "--apg-r", "1"]),
        "cfg_zero": (out / "cond", "@cfg_zero", ["2"], ["--zero-steps", "1"]),
        "cfg_zero_k0": (out / "cond", "@cfg_zero", ["2"], ["--zero-steps", "0"]),
        "auto_early": (out / "cond", "@auto", ["1.5", "2", "2.5", "3", "4", "5"], ["--guide-weights", str(early)]),
        "auto_early_interval": (out / "cond", "@auto", ["3", "4", "5", "6", "7"],
                                ["--guide-weights", str(early), "--cfg-interval", "0.2,0.8"]),
        "auto_small": (out / "cond", "@auto", ["2"], ["--guide-weights", str(small)]),
        "uncond_none": (args.uncond, "", ["1"], []),
        "uncond_auto_early": (args.uncond, "@auto", ["2", "3"], ["--guide-weights", str(u_early)]),
        "uncond_auto_early_interval": (args.uncond, "@auto", ["5"],
                                       ["--guide-weights", str(u_early), "--cfg-interval", "0.2,0.8"]),
        "uncond_auto_small": (args.uncond, "@auto", ["2", "3"], ["--guide-weights", str(u_small)]),
    }
    wanted = rows if args.rows == "all" else {k: rows[k] for k in args.rows.split(",")}
    for name, (run_dir, suffix, scales, extra) in ({} if args.table_only else wanted).items():
        for nfe in args.nfe:
            print(f"row {name} at {nfe} NFE ...", flush=True)
            run(["evaluate.py", "-e", str(run_dir), "--checkpoints", "last", "--samplers",
                 f"midpoint:{nfe // 2}:cosine{suffix}", "--cfg-scale", *scales, "--n-samples", str(args.n), *ref,
                 "--out", str(out / f"eval_{name}"), *extra], log)
    table(out, wanted, args)


def table(out: Path, rows: dict, args) -> None:
    pr = " precision | recall |" if args.pr else ""
    lines = [f"| row | model | guidance | w | NFE | forward passes | main-pass equivalents | FID |{pr}",
             "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * pr.count("|")]
    best, seen = {}, set()  # name -> {cost: best FID over the row's scales}; rows listed once
    for name in rows:
        report = out / f"eval_{name}" / "report.json"
        if not report.is_file():
            continue
        for r in json.loads(report.read_text())["rows"]:
            if (r.get("precision") is None) == args.pr:  # one reference per table: the statistics, or the digits
                continue
            key = (name, r.get("guidance"), r["cfg_scale"], r["nfe"], r["forward_passes"])
            if key in seen:  # scored twice: the same statistics file spelled two ways before evaluate.py resolved it
                continue
            seen.add(key)
            cost = r["forward_passes"] if r.get("guide_cost") is None else \
                r["nfe"] + (r["forward_passes"] - r["nfe"]) * r["guide_cost"]
            model = "unconditional" if name.startswith("uncond") else "class-conditional"
            extra = f" {r['precision']:.3f} | {r['recall']:.3f} |" if args.pr else ""
            lines.append(f"| {name} | {model} | {r.get('guidance') or ('cfg' if r['cfg_scale'] != 1 else '')} | "
                         f"{r['cfg_scale']:g} | {r['nfe']:g} | {r['forward_passes']:g} | {cost:.1f} | "
                         f"{r['fid']:.2f} |{extra}")
            points = best.setdefault(name, {})
            points[cost] = min(points.get(cost, float("inf")), r["fid"])
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.get_cmap("tab20").colors  # one colour per row: the default cycle repeats after 10
    for i, (name, points) in enumerate(best.items()):
        costs = sorted(points)
        ax.plot(costs, [points[c] for c in costs], "o" + ("--" if name.startswith("uncond") else "-"), label=name,
                color=colors[i % len(colors)])
    nfe = "/".join(str(n) for n in args.nfe)
    ax.set(xlabel="forward passes per sample (main-model equivalents)", ylabel=f"FID ({args.n} samples)",
           title=f"MNIST, guidance rules at {nfe} NFE (midpoint, cosine grid; best w per row)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes, not over the points
    fig.tight_layout()
    fig.savefig(out / "fid_vs_passes.png", dpi=110)


if __name__ == "__main__":
    main()
