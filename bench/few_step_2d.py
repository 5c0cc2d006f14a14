"""Few-step generation on 2-D gaussian -> moons: W2 at NFE 1, 2, 4 of MeanFlow and of reflow + distillation,
beside the I-CFM teacher's Euler at NFE 1, 2, 4, 8, 100. Every model is made by train.py and sample.py as a
user runs them; --seeds training seeds each (the data stay fixed).

    python bench/few_step_2d.py [--seeds 3] [--out bench/out/few_step_2d] [--methods teacher meanflow ...]

Per seed (--methods chooses; the teacher always, for the ratio):
  teacher   configs/toy2d_moons_icfm.yaml (3,000 steps)
  MeanFlow  configs/toy2d_moons_meanflow.yaml (10,000 steps, from scratch)
  meanflow_v, alphaflow, shortcut: the same config, budget and jumps with improved MeanFlow's v-loss
            (flow.meanflow_loss=v, the model's tangent), AlphaFlow (α from 1 to 0 over steps 2,000-8,000, sigmoid)
            and a shortcut model (its own defaults: a quarter of self-consistency samples, finest step 1/128, EMA
            targets; the MeanFlow keys reset), from scratch
  reflow    sample.py --pairs from the teacher (Euler 100, --pairs-n pairs), then 3,000 steps of
            flow.coupling=pairs from the teacher's weights: the 2-rectified flow, sampled by Euler
  distill   pairs from the 2-rectified flow (Euler 100), then 2,000 steps at t = 0 only
            (flow.time_density=grid, grid_steps 1, pseudo-Huber loss) from its weights: one Euler jump
W2: exact optimal transport between 2,000 samples (noise seeded 123) and 2,000 fresh data points (seeded 456),
as bench/toy2d_w2.py; mean ± std over the seeds. EMA weights throughout.
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
from data import build_source  # noqa: E402
from data.toy import TOY  # noqa: E402
from flows.couplings import w2_distance  # noqa: E402
from flows.solvers import generate  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import load_weights  # noqa: E402

N_EVAL = 2000
QUIET = ["train.trackers=[]", "train.preview_every=0"]
LABELS = {"teacher": "I-CFM teacher, Euler", "meanflow": "MeanFlow from scratch, meanflow jumps",
          "reflow": "2-rectified flow (reflow of the teacher), Euler",
          "distill": "2-RF distilled to one step, Euler",
          "meanflow_v": "improved MeanFlow (v-loss) from scratch, meanflow jumps",
          "alphaflow": "AlphaFlow from scratch, meanflow jumps",
          "shortcut": "shortcut model from scratch, shortcut jumps"}
MEANFLOW = ["-c", "configs/toy2d_moons_meanflow.yaml"]
ONE_STAGE = {  # name: (train.py overrides on the MeanFlow config, jump solver)
    "meanflow_v": (["flow.meanflow_loss=v", "flow.meanflow_tangent=model"], "meanflow"),
    "alphaflow": (["flow.objective=alphaflow", "flow.alpha_steps=[2000,8000]"], "meanflow"),
    "shortcut": (["flow.objective=shortcut", "flow.meanflow_times=ordered", "flow.meanflow_ratio=0.25",
                  "flow.meanflow_p=1.0"], "shortcut"),
}


def run(script: str, *args: str) -> float:
    """One command of this toolkit, as a user runs it; its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def last_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def w2_at(run_dir: Path, solver: str, nfes: list[int]) -> dict[int, float]:
    """W2 of the run's last EMA weights sampled with `solver` at each number of steps (1 NFE per step)."""
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg, (2,))
    load_weights(model, last_checkpoint(run_dir) / "ema.safetensors")
    model.eval()
    x0 = build_source(cfg, (2,))(N_EVAL, torch.Generator().manual_seed(123), torch.device("cpu"))
    data = TOY["moons"](N_EVAL, torch.Generator().manual_seed(456), torch.device("cpu"))
    return {n: w2_distance(generate(model, x0, n, solver).x, data) for n in nfes}


def one_seed(seed: int, args) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    out = args.out / f"seed{seed}"
    teacher, meanflow, reflow, distill = (out / name for name in ("teacher", "meanflow", "reflow", "distill"))
    pairs, pairs2 = out / "pairs", out / "pairs_2rf"
    s = f"train.seed={seed}"
    wall = {"teacher": run("train.py", "-c", "configs/toy2d_moons_icfm.yaml", "-e", str(teacher), s, *QUIET)}
    w2 = {"teacher": w2_at(teacher, "euler", [1, 2, 4, 8, 100])}
    if "meanflow" in args.methods:
        wall["meanflow"] = run("train.py", *MEANFLOW, "-e", str(meanflow), s, *QUIET)
        w2["meanflow"] = w2_at(meanflow, "meanflow", [1, 2, 4])
    if {"reflow", "distill"} & set(args.methods):
        wall["reflow"] = run("sample.py", "--weights", str(last_checkpoint(teacher)), "--pairs", "--n-samples",
                             str(args.pairs_n), "--steps", "100", "--seed", str(seed), "--save-dir", str(pairs))
        on_pairs = ["data.name=pairs", "flow.coupling=pairs", "train.batch_size=256", "train.lr=1e-3", s, *QUIET]
        wall["reflow"] += run("train.py", "-e", str(reflow), f"data.path={pairs}",
                              f"train.init_from={last_checkpoint(teacher)}", "train.steps=3000", *on_pairs)
        wall["distill"] = run("sample.py", "--weights", str(last_checkpoint(reflow)), "--pairs", "--n-samples",
                              str(args.pairs_n), "--steps", "100", "--seed", str(seed + 1000), "--save-dir",
                              str(pairs2))
        wall["distill"] += run("train.py", "-e", str(distill), f"data.path={pairs2}",
                               f"train.init_from={last_checkpoint(reflow)}", "train.steps=2000",
                               "flow.time_density=grid", "flow.grid_steps=1", "flow.loss=pseudo_huber", *on_pairs)
        w2.update(reflow=w2_at(reflow, "euler", [1, 2, 4]), distill=w2_at(distill, "euler", [1, 2, 4]))
    for name, (overrides, solver) in ONE_STAGE.items():
        if name in args.methods:
            wall[name] = run("train.py", *MEANFLOW, "-e", str(out / name), s, *overrides, *QUIET)
            w2[name] = w2_at(out / name, solver, [1, 2, 4])
    return w2, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    p.add_argument("--pairs-n", type=int, default=20480, help="(noise, sample) pairs per reflow and distillation")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "few_step_2d")
    p.add_argument("--methods", nargs="+", default=["meanflow", "reflow", "distill"],
                   choices=["meanflow", "reflow", "distill", *ONE_STAGE],
                   help="what to train beside the teacher (default: MeanFlow, reflow and distillation)")
    args = p.parse_args()
    results, walls = {}, {}
    for seed in range(args.seeds):
        w2, wall = one_seed(seed, args)
        for method, row in w2.items():
            results.setdefault(method, []).append(row)
        for method, sec in wall.items():
            walls.setdefault(method, []).append(sec)
        print(f"seed {seed}: " + "; ".join(f"{m} " + " ".join(f"{n}:{v:.3f}" for n, v in r.items())
                                           for m, r in w2.items()), flush=True)
    fresh = TOY["moons"](N_EVAL, torch.Generator().manual_seed(789), torch.device("cpu"))
    floor = w2_distance(fresh, TOY["moons"](N_EVAL, torch.Generator().manual_seed(456), torch.device("cpu")))
    teacher100 = sum(r[100] for r in results["teacher"]) / args.seeds
    nfes = [1, 2, 4, 8, 100]
    lines = [f"gaussian -> moons, W2 on {N_EVAL} points, mean ± std over {args.seeds} training seeds; "
             f"noise floor (two fresh data sets) {floor:.3f}", "",
             "| method | wall s (its own commands) | " + " | ".join(f"NFE {n}" for n in nfes)
             + " | NFE 1 / teacher Euler-100 |",
             "|---|---:|" + "---:|" * (len(nfes) + 1)]
    for method, rows in results.items():
        cells = []
        for n in nfes:
            if n not in rows[0]:
                cells.append("")
                continue
            w = torch.tensor([r[n] for r in rows], dtype=torch.float64)
            cells.append(f"{w.mean():.3f} ± {w.std() if len(w) > 1 else 0:.3f}")
        ratio = sum(r[1] for r in rows) / len(rows) / teacher100
        lines.append(f"| {LABELS[method]} | {sum(walls[method]) / len(walls[method]):.0f} | " + " | ".join(cells)
                     + f" | {ratio:.2f}× |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"w2": results, "wall_s": walls, "floor": floor}, indent=1))


if __name__ == "__main__":
    main()
