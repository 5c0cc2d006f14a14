"""The cost of a training step of each one-stage few-step objective beside a flow-matching step of the same model
and batch.

    python bench/meanflow_step.py [--models unet-cifar10 DiT-B/2] [--objectives cfm meanflow alphaflow shortcut]
        [--batch 32] [--ratio 0.75] [--steps 5] [--device cuda] [--mixed-precision bf16] [--compile]

Each step is the toolkit's own: the objective's draw and per-sample loss, backward, clipping, AdamW and EMA
(backend.update_weights). The losses: flow matching (flows.FlowMatchingObjective); MeanFlow (a forward-mode JVP of
the unwrapped network without gradient for the --ratio of the samples with s ≠ t, then the forward and backward of
the prediction; its v-loss costs the same; meanflow_central and meanflow_onesided: two forward passes without
gradient, or one from the prediction, in place of the JVP); AlphaFlow mid-curriculum (α = 0.5: one more forward
pass without gradient and no JVP; at α = 0 it is MeanFlow's step, at α = 1 flow matching's); a shortcut model
(two forward passes without gradient on its self-consistency quarter of the batch, taken by the EMA model). UNets
run on CIFAR-shaped pixels (3×32×32), DiTs on SD-VAE-shaped latents (4×32×32). The objectives take turns, in reverse
order every other repeat, --repeats times; the best seconds per step of each and its ratio to flow
matching are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import update_weights  # noqa: E402
from config import load_config  # noqa: E402
from flows import build_objective  # noqa: E402
from models import build_model  # noqa: E402
from models.ema import EMA  # noqa: E402


class _Accelerator:
    """What update_weights needs of accelerate on one device: its kind and clipping."""

    distributed_type = DistributedType.NO

    @staticmethod
    def clip_grad_norm_(params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


OBJECTIVES = {  # name: (flow.objective, further keys, the table's label)
    "cfm": ("cfm", [], "flow matching"), "meanflow": ("meanflow", [], "MeanFlow"),
    "alphaflow": ("alphaflow", [], "AlphaFlow (α 0.5)"), "shortcut": ("shortcut", [], "shortcut"),
    "meanflow_central": ("meanflow", ["flow.meanflow_derivative=central"], "MeanFlow, central difference"),
    "meanflow_onesided": ("meanflow", ["flow.meanflow_derivative=onesided"], "MeanFlow, one-sided"),
}


def step_time(name: str, objective_name: str, args, device: torch.device) -> float:
    """Best seconds per training step over --steps steps after --warmup, for one objective."""
    shape = (3, 32, 32) if name.startswith("unet") else (4, 32, 32)
    flow, keys, _ = OBJECTIVES[objective_name]
    cfg = load_config(None, [f"model.name={name}", f"flow.objective={flow}", *keys,
                             *(["model.time_scale=1", f"flow.meanflow_ratio={args.ratio}"]
                               if flow in ("meanflow", "alphaflow") else []),
                             *(["flow.alpha_steps=[0,2]", "flow.alpha_schedule=linear"]
                               if flow == "alphaflow" else [])])
    torch.manual_seed(0)
    model = build_model(cfg, shape).to(device)
    ema = EMA(model, 0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True, fused=device.type == "cuda" or None)
    net = torch.compile(model) if args.compile else model
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, *shape, generator=g, device=d))
    if flow == "shortcut":
        objective.teacher = ema.model
    params, x1 = list(model.parameters()), torch.randn(args.batch, *shape, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16) if args.mixed_precision == "bf16" \
        else contextlib.nullcontext()
    n = 0

    def step():
        nonlocal n
        n += 1
        draw = objective.draw(x1, None, torch.Generator(device).manual_seed(n))
        draw.step = 1  # AlphaFlow: α = 0.5, halfway through its [0, 2] curriculum
        with autocast:
            loss = objective.loss(net, x1, draw).loss.mean()
        loss.backward()
        update_weights(_Accelerator, params, optimizer, ema, model, n, 1.0)

    for _ in range(args.warmup):
        step()
    best = float("inf")
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["unet-cifar10", "DiT-B/2"])
    p.add_argument("--objectives", nargs="+", default=["cfm", "meanflow", "alphaflow", "shortcut"],
                   choices=list(OBJECTIVES), help="the first is the reference of the ratios (default: cfm, flow "
                   "matching); meanflow_central / meanflow_onesided: MeanFlow with d/dt u by the central difference "
                   "of two forward passes or the one-sided one from the prediction in place of the JVP "
                   "(flow.meanflow_derivative=central|onesided; onesided: fp32 without --compile only)")
    p.add_argument("--ratio", type=float, default=0.75,
                   help="MeanFlow's and AlphaFlow's fraction of samples with s ≠ t, the ones whose target takes d/dt u "
                   "(1: the derivative of every sample, what a step cost before it was taken for those alone)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{where}, batch {args.batch}, s ≠ t for {args.ratio:g} of the samples, {args.mixed_precision}"
          f"{', torch.compile' if args.compile else ''}; best "
          f"seconds per step of {args.steps} after {args.warmup}, {args.repeats} ABBA repeats")
    names = {name: label for name, (_, _, label) in OBJECTIVES.items()}
    first = args.objectives[0]
    print("| model | " + " | ".join(f"{names[o]} s/step" for o in args.objectives) + " | "
          + " | ".join(f"{names[o]} / {names[first]}" for o in args.objectives[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(args.objectives) - 1))
    for name in args.models:
        best = {o: float("inf") for o in args.objectives}
        for repeat in range(args.repeats):
            for objective in args.objectives if repeat % 2 == 0 else args.objectives[::-1]:
                best[objective] = min(best[objective], step_time(name, objective, args, device))
        print(f"| {name} | " + " | ".join(f"{best[o]:.3f}" for o in args.objectives) + " | "
              + " | ".join(f"{best[o] / best[first]:.2f}" for o in args.objectives[1:]) + " |")

if __name__ == "__main__":
    main()
