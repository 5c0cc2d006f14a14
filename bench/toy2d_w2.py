"""W2 to fresh data against Euler NFE on 2-D problems: this toolkit beside torchcfm, in one run.

    python bench/toy2d_w2.py [--steps 3000] [--out bench/out/toy2d_w2]
    PYTHONPATH=/path/to/site-with-torchcfm python bench/toy2d_w2.py     # adds torchcfm's columns

Problems: gaussian -> moons and 8gaussians -> moons. Ours: train.py (I-CFM and OT-CFM, EMA weights,
its default MLP). torchcfm: ConditionalFlowMatcher and ExactOptimalTransportConditionalFlowMatcher
with torchcfm's MLP of the same width, the same data, batch, AdamW learning rate and steps, in a
bare loop. W2: exact OT between 2,000 generated points and 2,000 fresh data points (fixed seeds).
Every method is trained with --seeds seeds (model init and training randomness; the data stay
fixed) and W2 is reported as mean ± std over them. Noise floor: W2 between two fresh data sets.
Step cost: ms per optimizer step, from the first seed (ours from train.py's samples/s with
everything it does: EMA, logging, gradient clipping, checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from data import build_dataset, build_source  # noqa: E402
from data.toy import TOY  # noqa: E402
from flows import integrate, velocity_model  # noqa: E402
from flows.couplings import w2_distance  # noqa: E402
from flows.solvers import uniform_grid  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import checkpoint_name, load_weights  # noqa: E402

NFES = [1, 2, 4, 8, 100]
PROBLEMS = {"gaussian->moons": ("moons", "gaussian"), "8gaussians->moons": ("moons", "8gaussians")}
N_EVAL = 2000


def evaluate(velocity, source, data_name, n: int = N_EVAL, nfes: list[int] = NFES) -> dict[int, float]:
    """W2 between n Euler samples at each NFE and n fresh data points, with fixed seeds."""
    x0 = source(n, torch.Generator().manual_seed(123), torch.device("cpu"))
    data = TOY[data_name](n, torch.Generator().manual_seed(456), torch.device("cpu"))
    return {nfe: w2_distance(integrate(velocity, x0, uniform_grid(nfe), "euler").x, data) for nfe in nfes}


def run_ours(problem: str, flow: list[str], seed: int, args, out: Path, name: str, probe=None) -> dict:
    """train.py on the problem with the `flow` overrides (run folder OUT/ours_SOURCE_NAME_seedS), then W2 of its
    EMA weights read as a velocity (flows.velocity_model) and its ms per step; with `probe`, a function of the
    velocity v(x, t) that returns more figures, those too."""
    data_name, source_name = PROBLEMS[problem]
    run = out / f"ours_{source_name}_{name}_seed{seed}"
    overrides = [f"train.seed={seed}", f"data.name={data_name}", f"data.source={source_name}", *flow,
                 f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
                 f"model.width={args.width}", "train.trackers=[]", "train.preview_every=0",
                 f"train.checkpoint_every={args.steps}", f"train.log_every={args.steps // 10}"]
    import train  # in this process: a run of a few seconds would otherwise pay a new interpreter and torch import

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        train.main(["-e", str(run), *overrides])
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg, (2,))
    load_weights(model, run / "checkpoints" / checkpoint_name(args.steps) / "ema.safetensors")
    model = velocity_model(model, cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
    step_ms = 1000 * args.batch / (sum(r["samples_per_s"] for r in rows) / len(rows))
    source = build_source(cfg, (2,))
    return {"w2": evaluate(model, source, data_name, args.n_eval), "step_ms": step_ms,
            **(probe(model) if probe else {})}


def run_torchcfm(problem: str, matcher, seed: int, args, probe=None) -> dict:
    """torchcfm's matcher (a factory of a ConditionalFlowMatcher) in a bare loop with torchcfm's MLP; `probe` as
    run_ours's."""
    from torchcfm.models.models import MLP

    data_name, source_name = PROBLEMS[problem]
    cfg = load_config(None, [f"data.name={data_name}", f"data.source={source_name}"])
    dataset, source = build_dataset(cfg), build_source(cfg, (2,))
    torch.manual_seed(seed)  # torchcfm draws t from torch's global RNG
    np.random.seed(seed)  # and samples its OT plan with numpy's
    net = MLP(dim=2, w=args.width, time_varying=True)
    fm = matcher()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = None
    for step in range(args.steps):
        if step == args.steps // 10:
            start = time.perf_counter()
        x1 = dataset.x[torch.randint(0, len(dataset), (args.batch,), generator=g)]
        x0 = source(args.batch, g, torch.device("cpu"))
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = (net(torch.cat([xt, t[:, None]], -1)) - ut).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step_ms = 1000 * (time.perf_counter() - start) / (args.steps - args.steps // 10)
    velocity = lambda x, t: net(torch.cat([x, t[:, None]], -1))  # noqa: E731
    with torch.no_grad():
        return {"w2": evaluate(velocity, source, data_name, args.n_eval), "step_ms": step_ms,
                **(probe(velocity) if probe else {})}


def add_training_arguments(p: argparse.ArgumentParser, steps: int, width: int) -> None:
    """The settings both sides train with: steps, batch, AdamW learning rate, MLP width, seeds."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    p.add_argument("--n-eval", type=int, default=N_EVAL, help=f"points in each W2 (default {N_EVAL})")


def torchcfm_importable() -> bool:
    try:
        import torchcfm  # noqa: F401
    except ImportError:
        print("torchcfm is not importable: measuring this toolkit alone", file=sys.stderr)
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, steps=3000, width=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "toy2d_w2")
    args = p.parse_args()
    peers = torchcfm_importable()
    args.out.mkdir(parents=True, exist_ok=True)
    runners = {"ours": lambda p, c, seed: run_ours(p, [f"flow.coupling={c}"], seed, args, args.out, c)}
    if peers:
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )

        matchers = {"independent": lambda: ConditionalFlowMatcher(sigma=0.0),
                    "ot": lambda: ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)}
        runners["torchcfm"] = lambda p, c, seed: run_torchcfm(p, matchers[c], seed, args)
    results = {}
    for problem in PROBLEMS:
        for coupling, label in (("independent", "I-CFM"), ("ot", "OT-CFM")):
            for who, run in runners.items():
                runs = [run(problem, coupling, seed) for seed in range(args.seeds)]
                w2 = {n: torch.tensor([r["w2"][n] for r in runs], dtype=torch.float64) for n in NFES}
                w2 = {n: (w.mean().item(), w.std().item() if len(w) > 1 else 0.0) for n, w in w2.items()}
                results[(problem, f"{who} {label}")] = {"step_ms": runs[0]["step_ms"], "w2": w2}
                print(f"{problem:18s} {who:8s} {label:7s} step {runs[0]['step_ms']:.2f} ms  W2 "
                      + "  ".join(f"{n}:{m:.3f}±{sd:.3f}" for n, (m, sd) in w2.items()), flush=True)
    floors = {}
    for problem, (data_name, _) in PROBLEMS.items():
        fresh = TOY[data_name](args.n_eval, torch.Generator().manual_seed(789), torch.device("cpu"))
        reference = TOY[data_name](args.n_eval, torch.Generator().manual_seed(456), torch.device("cpu"))
        floors[problem] = w2_distance(fresh, reference)

    lines = [f"steps {args.steps}, batch {args.batch}, AdamW lr {args.lr}, MLP width {args.width}, "
             f"W2 on {args.n_eval} points (mean ± std over {args.seeds} training seeds), Euler", "",
             "| problem | method | step ms | " + " | ".join(f"W2 @ NFE {n}" for n in NFES) + " |",
             "|---|---|---:|" + "---:|" * len(NFES)]
    for (problem, method), r in results.items():
        lines.append(f"| {problem} | {method} | {r['step_ms']:.2f} | "
                     + " | ".join(f"{r['w2'][n][0]:.3f} ± {r['w2'][n][1]:.3f}" for n in NFES) + " |")
    for problem, floor in floors.items():
        lines.append(f"| {problem} | data vs data (noise floor) | | " + " | ".join(f"{floor:.3f}" for _ in NFES) + " |")
    for who in runners:
        for problem in PROBLEMS:
            ratio = results[(problem, f"{who} OT-CFM")]["step_ms"] / results[(problem, f"{who} I-CFM")]["step_ms"]
            lines.append(f"\n{who}, {problem}: OT-CFM step / I-CFM step = {ratio:.2f}×")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
