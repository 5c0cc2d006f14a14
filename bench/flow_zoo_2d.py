"""Every path × prediction target and every coupling on 2-D problems, W2 against Euler NFE, beside torchcfm's
matching objective where torchcfm has one, in one run.

    python bench/flow_zoo_2d.py [--steps 1000] [--seeds 3] [--out bench/out/flow_zoo_2d]
    PYTHONPATH=/path/to/site-with-torchcfm python bench/flow_zoo_2d.py     # adds torchcfm's rows

Problems: gaussian -> moons and 8gaussians -> moons (no score target there: a score needs a Gaussian source).
Ours: train.py with each flow.path × flow.prediction (loss weight at its default, none), the bridge paths, and
each coupling on the linear path; EMA weights, its MLP. torchcfm: ConditionalFlowMatcher (σ = 0 and σ = 0.1),
VariancePreservingConditionalFlowMatcher (our cosine path), ExactOptimalTransportConditionalFlowMatcher,
SchrodingerBridgeConditionalFlowMatcher (σ = 0.2, Sinkhorn plan as ours) and its OTPlanSampler's Sinkhorn and
unbalanced plans, with torchcfm's MLP of the same width, the same data, batch, AdamW learning rate and steps, in
a bare loop. W2 as bench/toy2d_w2.py (exact OT between Euler samples and fresh data points, fixed seeds) on
--n-eval = 1,000 points, mean ± std over --seeds training seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from toy2d_w2 import NFES, PROBLEMS, add_training_arguments, run_ours, run_torchcfm, torchcfm_importable  # noqa: E402

PATHS = ["linear", "cosine", "vp", "polynomial"]
TARGETS = ["velocity", "data", "noise", "score"]
OT_REG = 0.05  # torchcfm's OTPlanSampler default
SB_SIGMA = 0.2
ICFM_SIGMA = 0.1


def rows_of(problem: str) -> dict[str, tuple[list[str], object]]:
    """Row name -> (our overrides, torchcfm's matcher factory or None)."""
    gaussian = problem.startswith("gaussian")
    rows = {}
    for path in PATHS:
        for target in TARGETS:
            if target == "score" and not gaussian:
                continue
            peer = {("linear", "velocity"): lambda: _cfm()("icfm", 0.0),
                    ("cosine", "velocity"): lambda: _cfm()("vp", 0.0)}.get((path, target))
            rows[f"{path} / {target}"] = ([f"flow.path={path}", f"flow.prediction={target}"], peer)
    rows[f"icfm σ={ICFM_SIGMA} / velocity"] = (["flow.path=icfm", f"flow.sigma={ICFM_SIGMA}"],
                                               lambda: _cfm()("icfm", ICFM_SIGMA))
    rows[f"sb σ={SB_SIGMA} / velocity"] = (["flow.path=sb", f"flow.sigma={SB_SIGMA}", "flow.coupling=entropic"],
                                           lambda: _cfm()("sb", SB_SIGMA))
    rows["coupling ot"] = (["flow.coupling=ot"], lambda: _cfm()("ot", 0.0))
    rows[f"coupling entropic ε={OT_REG}"] = (["flow.coupling=entropic", f"flow.ot_reg={OT_REG}"],
                                             lambda: _cfm()("sinkhorn", 0.0))
    rows[f"coupling unbalanced ε={OT_REG}"] = (["flow.coupling=unbalanced", f"flow.ot_reg={OT_REG}"],
                                               lambda: _cfm()("unbalanced", 0.0))
    rows["coupling partial m=0.8"] = (["flow.coupling=partial", "flow.ot_mass=0.8"], None)
    return rows


def _cfm():
    """torchcfm's matcher of a row: I-CFM (σ), VP-CFM, exact OT-CFM, SB-CFM with a Sinkhorn plan, or I-CFM whose
    pairs are drawn from OTPlanSampler's Sinkhorn or unbalanced plan (ε = OT_REG)."""
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
        SchrodingerBridgeConditionalFlowMatcher,
        VariancePreservingConditionalFlowMatcher,
    )
    from torchcfm.optimal_transport import OTPlanSampler

    class PlanMatcher(ConditionalFlowMatcher):
        def __init__(self, method: str):
            super().__init__(0.0)
            self.ot_sampler = OTPlanSampler(method=method, reg=OT_REG)

        def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
            x0, x1 = self.ot_sampler.sample_plan(x0, x1)
            return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def make(kind: str, sigma: float):
        if kind == "icfm":
            return ConditionalFlowMatcher(sigma=sigma)
        if kind == "vp":
            return VariancePreservingConditionalFlowMatcher(sigma=0.0)
        if kind == "ot":
            return ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        if kind == "sb":
            return SchrodingerBridgeConditionalFlowMatcher(sigma=sigma, ot_method="sinkhorn")
        return PlanMatcher(kind)

    return make


def summary(runs: list[dict]) -> dict:
    w2 = {n: torch.tensor([r["w2"][n] for r in runs], dtype=torch.float64) for n in NFES}
    return {"step_ms": runs[0]["step_ms"],
            "w2": {n: (w.mean().item(), w.std().item() if len(w) > 1 else 0.0) for n, w in w2.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, steps=1000, width=128)
    p.set_defaults(n_eval=1000)  # exact OT of 2,000 points takes ~10 s a W2 here, of 1,000 under 1 s
    p.add_argument("--only", help="rows whose name contains this text (e.g. 'coupling')")
    p.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides added to every row of ours (e.g. train.grad_clip=0)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "flow_zoo_2d")
    args = p.parse_args()
    peers = torchcfm_importable()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}  # an interrupted run continues
    for problem in PROBLEMS:
        for row, (overrides, peer) in rows_of(problem).items():
            if args.only and args.only not in row:
                continue
            for who in ("ours", "torchcfm"):
                key = f"{problem} | {row} | {who}"
                if key in results or (who == "torchcfm" and (peer is None or not peers)):
                    continue
                name = "_".join(o.split("=")[-1] for o in overrides).replace(".", "")
                runs = [run_ours(problem, [*overrides, *args.ours], seed, args, args.out, name) if who == "ours"
                        else run_torchcfm(problem, peer, seed, args) for seed in range(args.seeds)]
                results[key] = summary(runs)
                saved.write_text(json.dumps(results, indent=1))
                w2 = results[key]["w2"]
                print(f"{problem:18s} {row:28s} {who:8s} step {results[key]['step_ms']:.2f} ms  W2 "
                      + "  ".join(f"{n}:{w2[n][0]:.3f}±{w2[n][1]:.3f}" for n in NFES), flush=True)

    lines = [f"steps {args.steps}, batch {args.batch}, AdamW lr {args.lr}, MLP width {args.width}, W2 on {args.n_eval} "
             f"points (mean ± std over {args.seeds} training seeds), Euler", "",
             "| problem | path / target or coupling | who | step ms | "
             + " | ".join(f"W2 @ NFE {n}" for n in NFES) + " |",
             "|---|---|---|---:|" + "---:|" * len(NFES)]
    for key, r in results.items():
        problem, row, who = key.split(" | ")
        w2 = {int(n): v for n, v in r["w2"].items()}
        lines.append(f"| {problem} | {row} | {who} | {r['step_ms']:.2f} | "
                     + " | ".join(f"{w2[n][0]:.3f} ± {w2[n][1]:.3f}" for n in NFES) + " |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
