"""One-stage few-step models on MNIST, CPU, real FID: MeanFlow (u-loss, v-loss), AlphaFlow and shortcut models,
each fine-tuned from the I-CFM teacher for --minutes and trained from scratch for the teacher's time + --minutes,
at 1, 2 and 4 network calls, beside the teacher's solvers at those NFE (issue 34).

    ../shared/tools/inception-offline .venv/bin/python        # once per machine: clean-fid's network, offline
    python bench/few_step_mnist.py [--minutes 15] [--methods meanflow_u,meanflow_v,alphaflow,alphaflow_short,shortcut]
        [--scratch | --scratch-only] [--out bench/out/few_step_mnist]
    python bench/few_step_mnist.py --methods alphaflow_cosine --scratch-only   # AlphaFlow with a cosine decay
    python bench/few_step_mnist.py --methods alphaflow_uniform --scratch-only  # AlphaFlow, (t, s) uniform
    python bench/few_step_mnist.py --methods meanflow_u_uniform                # MeanFlow fine-tuned, (t, s) uniform

Teacher: configs/mnist_icfm_unet.yaml on the 10,000 test digits with model.time_scale=1 (MeanFlow's time input;
the JVP of sines of 1000·t is a thousand times larger), its 1,000 steps. Fine-tuning: train.init_from the teacher,
the method's config, a constant learning rate 5e-4 without warmup, stopped by SIGTERM after --minutes (train.py
saves a checkpoint and exits), checkpoints every 100 steps for the curve of FID against minutes. From scratch
(--scratch): the same without init_from, at the recipe's 2e-3, for the teacher's wall time + --minutes. Every run
is alone on the machine, one after the other. FID: evaluate.py, 1,000 samples (seed 0), EMA weights, clean-fid
against ../shared/data/mnist/t10k-fid-stats-clean.npz; the jumps over the uniform grid at 1, 2 and 4 NFE
(meanflow, or shortcut for shortcut models); the curve at 1 NFE at a third, two thirds and the end of the run.
Reruns reuse finished runs and report rows. Prints a table and writes OUT/results.md and OUT/fid_vs_minutes.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist"
STATS = SHARED / "t10k-fid-stats-clean.npz"
DATA = [f"data.path={SHARED}", "data.split=test", "train.trackers=[]", "train.preview_every=0"]
MEANFLOW = ["-c", "configs/mnist_meanflow_unet.yaml"]
ALPHAFLOW = [*MEANFLOW, "flow.objective=alphaflow"]
CURRICULUM = [*ALPHAFLOW, "flow.alpha_steps=[0,600]"]  # α from 1 to 0 over the first 600 steps
UNIFORM = ["flow.time_density=uniform", "flow.time_mean=0", "flow.time_std=1"]  # logit-normal keys reset
RECIPE = [*CURRICULUM, *UNIFORM, "flow.meanflow_ratio=0.25"]  # mnist_alphaflow_unet.yaml's keys but its OT pairs
OT = ["flow.coupling=ot", "train.steps=2300"]  # minibatch OT pairs, for the steps of the runs they are compared with
OT_PAIRS = [*CURRICULUM, *UNIFORM, *OT]  # the best one jump, minibatch OT pairs
UNIFORM_OT_ONESIDED = [*UNIFORM, "flow.coupling=ot", "flow.meanflow_derivative=onesided"]  # d/dt u in one pass
ONESIDED = [*CURRICULUM, *UNIFORM_OT_ONESIDED]
ONESIDED_CL = [*ONESIDED, "train.channels_last=true"]  # the same in channels-last memory: more steps a second on CPU


def budget(keys: list[str], seed: int = 0, steps: int = 4877) -> list[str]:
    """`keys` for training seed `seed` and the steps a budget run held on 2026-12-07's machine (by default the
    one-sided run's 4,877)."""
    return [*keys, f"train.seed={seed}", f"train.steps={steps}"]


IREPA = ["flow.align=repa", "align.encoder=inception", "align.resolution=75", "align.projector=conv",
         "align.weight=1"]  # issue 31's best alignment on the MNIST UNet (bench/align_mnist.py)
RESET = ["flow.meanflow_times=ordered", "flow.meanflow_ratio=0.25", "flow.meanflow_p=1.0"]  # keys shortcut lacks
METHODS = {  # name: (train.py arguments, after the bench's own so that they win; jump solver)
    "meanflow_u": ([*MEANFLOW], "meanflow"),
    "meanflow_v": ([*MEANFLOW, "flow.meanflow_loss=v", "flow.meanflow_tangent=model"], "meanflow"),
    "alphaflow": (CURRICULUM, "meanflow"),
    # the curriculum shortened for fine-tuning: the teacher already is the α = 1 end
    "alphaflow_short": ([*ALPHAFLOW, "flow.alpha_steps=[0,200]"], "meanflow"),
    "shortcut": ([*MEANFLOW, "flow.objective=shortcut", *RESET], "shortcut"),
    # a shallower hierarchy for a CPU budget: 4 levels of jumps (1 down to 1/8) in place of 7, each trained on
    # 1/8 of the batch in place of 1/28 (half the batch by self-consistency)
    "shortcut_coarse": ([*MEANFLOW, "flow.objective=shortcut", *RESET, "flow.shortcut_steps=16",
                         "flow.shortcut_fraction=0.5"], "shortcut"),
    # with --scratch-only: a cosine decay to lr_min in place of the constant rate, over the 2,202 steps that AlphaFlow
    # from scratch took in its 20.2 minutes here (2026-12-05); on a slower machine the run ends before the decay does
    "alphaflow_cosine": ([*CURRICULUM, "train.steps=2200", "train.lr_schedule=cosine"], "meanflow"),
    # with --scratch-only: (t, s) from the uniform density in place of the recipe's logit-normal(2, 2), which puts
    # few jumps near the noise end (the first jump of every sample); the 2-D recipe's density
    "alphaflow_uniform": ([*CURRICULUM, *UNIFORM], "meanflow"),
    # and a quarter of the samples with s ≠ t in place of three quarters (the paper's ImageNet ablation's best)
    "alphaflow_uniform_r25": (RECIPE, "meanflow"),
    # and every sample with s ≠ t (the trend of the quarter against three quarters at one jump, carried on)
    "alphaflow_uniform_r100": ([*CURRICULUM, *UNIFORM, "flow.meanflow_ratio=1.0"], "meanflow"),
    # the logit-normal(0, 2) density: more of (t, s) near both ends than uniform, so more long jumps like 0 → 1
    "alphaflow_ends": ([*CURRICULUM, "flow.time_mean=0", "flow.time_std=2"], "meanflow"),
    # configs/mnist_alphaflow_unet.yaml's recipe (alphaflow_uniform_r25) and the best one jump (alphaflow_uniform)
    # with another training seed: their spread
    "alphaflow_uniform_r25_seed1": ([*RECIPE, "train.seed=1"], "meanflow"),
    "alphaflow_uniform_seed1": ([*CURRICULUM, *UNIFORM, "train.seed=1"], "meanflow"),
    # the best one jump (alphaflow_uniform) with the jump's length drawn (flow.meanflow_times=length): a tenth of
    # the jumps longer than 0.9 in place of a hundredth, so the one jump (0, 1) is trained about ten times as often
    "alphaflow_length": ([*CURRICULUM, *UNIFORM, "flow.meanflow_times=length"], "meanflow"),
    # the best one jump (alphaflow_uniform) with half of its s ≠ t samples trained by interval splitting (two jumps
    # of the EMA weights as the target, no pairing noise in it) once α reaches 0; and with the online network's jumps
    "alphaflow_split": ([*CURRICULUM, *UNIFORM, "flow.meanflow_split=0.5"], "meanflow"),
    "alphaflow_split_online": ([*CURRICULUM, *UNIFORM, "flow.meanflow_split=0.5", "flow.meanflow_split_ema=false"],
                               "meanflow"),
    # the best one jump (alphaflow_uniform) with noise and data paired by exact minibatch OT (OT-CFM's coupling:
    # straighter paths, so a long jump's average velocity is closer to the instantaneous one), for 2,300 steps
    # (alphaflow_uniform's in its 20.1 minutes on 2026-12-06's machine; the OT solve adds 2 ms to a 0.6 s step);
    # and with the second training seed
    "alphaflow_uniform_ot": (OT_PAIRS, "meanflow"),
    "alphaflow_uniform_ot_seed1": ([*OT_PAIRS, "train.seed=1"], "meanflow"),
    # the OT pairs' best one jump with self-distillation: the s ≠ t samples' target from the network's own velocity
    # u(z, t, t), online (broke: noise by step 1,000) or the EMA weights' (no pairing noise in it; one more forward
    # pass a step, so 2,300 steps take more minutes than alphaflow_uniform_ot's); and the OT pairs with the config's
    # quarter of the samples s ≠ t (configs/mnist_alphaflow_unet.yaml's training keys since it pairs by OT), two seeds
    "alphaflow_uniform_ot_self_online": ([*OT_PAIRS, "flow.meanflow_velocity=model"], "meanflow"),
    "alphaflow_uniform_ot_ema_self": ([*OT_PAIRS, "flow.meanflow_velocity=ema"], "meanflow"),
    "alphaflow_uniform_r25_ot": ([*RECIPE, *OT], "meanflow"),
    "alphaflow_uniform_r25_ot_seed1": ([*RECIPE, *OT, "train.seed=1"], "meanflow"),
    # the OT pairs' best one jump with issue 31's best alignment (iREPA: Inception's 7×7 grid at 75 px, the conv
    # head, λ 1; the feature cache is computed by the first of them, under align.cache_dir's default, and read by the
    # second), to the end and with HASTE's stop at 2/3 of the steps
    "alphaflow_uniform_ot_irepa": ([*OT_PAIRS, *IREPA], "meanflow"),
    "alphaflow_uniform_ot_irepa_stop": ([*OT_PAIRS, *IREPA, "align.stop_step=1530"], "meanflow"),
    # the OT pairs' best one jump for 5,200 steps (about 45 minutes at its rate alone on 2026-12-06's machine, past the
    # budget's teacher + 15 minutes; the bench stops a run at the teacher's time + --minutes, so run it alone with
    # --scratch-only --minutes 45: train.steps ends it), for the curve of FID against minutes; and with the adaptive
    # weight's p at 0.5 in place of 0.75, which weighs the long jumps' large errors more (p = 0.5 gave MeanFlow
    # fine-tuning a better one jump, 141.9 against 148.0, with 16% more steps)
    "alphaflow_uniform_ot_long": ([*OT_PAIRS, "train.steps=5200"], "meanflow"),
    "alphaflow_uniform_ot_p05": ([*OT_PAIRS, "flow.meanflow_p=0.5"], "meanflow"),
    # the best one jump (alphaflow_uniform) with its constant rate decayed linearly to lr_min (1e-4) over the last
    # fifth of 2,300 steps (warmup-stable-decay); on a slower machine the run ends before the decay does
    "alphaflow_uniform_wsd": ([*CURRICULUM, *UNIFORM, "train.steps=2300", "train.lr_schedule=wsd",
                               "train.decay_fraction=0.2"], "meanflow"),
    # with --scratch-only: the OT pairs' best one jump stopped by the budget (the teacher's time + --minutes) in place
    # of 2,300 steps, and the same with d/dt u by a difference of forward passes in place of the JVP: central (two
    # passes) and one-sided from the prediction (one pass); 37% and more steps a minute once α reaches 0 (2026-12-07)
    "alphaflow_uniform_ot_budget": ([*CURRICULUM, *UNIFORM, "flow.coupling=ot"], "meanflow"),
    "alphaflow_uniform_ot_central": ([*CURRICULUM, *UNIFORM, "flow.coupling=ot", "flow.meanflow_derivative=central"],
                                     "meanflow"),
    "alphaflow_uniform_ot_onesided": (ONESIDED, "meanflow"),
    # and its second and third training seeds for the steps the first took in the budget on 2026-12-07's machine
    **{f"alphaflow_uniform_ot_onesided_seed{seed}": (budget(ONESIDED, seed), "meanflow") for seed in (1, 2)},
    # tries at its one jump's margin, each for the same steps (2026-12-07, later): the adaptive weight's p = 1 (the
    # toolkit's default) in place of 0.75, Adam's β2 0.95 in place of 0.999, no gradient clipping (the norm, 2-11,
    # was clipped to 1 on every step), and MeanFlow itself without AlphaFlow's curriculum (whose steps at α > 0 cost
    # what a one-sided step does: one more forward pass)
    **{f"alphaflow_uniform_ot_onesided_p1_seed{seed}": (budget([*ONESIDED, "flow.meanflow_p=1.0"], seed), "meanflow")
       for seed in (0, 2)},
    "alphaflow_uniform_ot_onesided_b095_seed0": (budget([*ONESIDED, "train.betas=[0.9,0.95]"]), "meanflow"),
    "alphaflow_uniform_ot_onesided_noclip_seed0": (budget([*ONESIDED, "train.grad_clip=0"]), "meanflow"),
    **{"meanflow_uniform_ot_onesided" + (f"_seed{seed}" if seed else ""): (budget([*MEANFLOW, *UNIFORM_OT_ONESIDED],
                                                                                   seed), "meanflow")
       for seed in (0, 1, 2)},
    # the budget run's learning rate: 3e-3 in place of the recipe's 2e-3 (2026-12-07, third session; a decay lost to
    # the constant rate at these lengths, which says the model still learns fastest at the full rate)
    **{f"alphaflow_uniform_ot_onesided_lr3e3_seed{seed}": (budget([*ONESIDED, "train.lr=3e-3"], seed), "meanflow")
       for seed in (0, 1, 2)},
    "alphaflow_uniform_ot_onesided_lr4e3_seed0": (budget([*ONESIDED, "train.lr=4e-3"]), "meanflow"),
    # with --scratch-only: the budget run in channels-last memory format (`train.channels_last=true`: 8-12% more steps
    # a second on this CPU in 400-step timings, the same training otherwise), stopped by the budget
    "alphaflow_uniform_ot_onesided_cl": (ONESIDED_CL, "meanflow"),
    # and its second to fifth training seeds for the 5,201 steps the first took in the budget (seeds 3 and 4 added on
    # 2026-12-07, sixth session, to narrow the mean's standard error to √(3/5) of three seeds', whatever they gave)
    **{f"alphaflow_uniform_ot_onesided_cl_seed{seed}": (budget(ONESIDED_CL, seed, 5201), "meanflow")
       for seed in (1, 2, 3, 4)},
    # with --scratch-only: the same with a batch of 32 in place of 64, stopped by the budget (7.1 steps a second
    # against 4.8 in 400-step timings on 2026-12-07's machine: half the samples a step for 1.48x the steps)
    "alphaflow_uniform_ot_onesided_cl_b32": ([*ONESIDED_CL, "train.batch_size=32"], "meanflow"),
    # with --scratch-only: nine tenths of the samples with s ≠ t in place of three quarters, stopped by the budget
    # (on 2026-12-07 the machine slowed during it, so it was resumed with train.steps=5201 and compared by steps)
    "alphaflow_uniform_ot_onesided_cl_r09": ([*ONESIDED_CL, "flow.meanflow_ratio=0.9"], "meanflow"),
    # the curriculum over the first 1,200 steps in place of 600, by the budget's steps (two training seeds)
    **{f"alphaflow_uniform_ot_onesided_cl_a1200_seed{seed}": (budget([*ONESIDED_CL, "flow.alpha_steps=[0,1200]"],
                                                                     seed, 5201), "meanflow") for seed in (0, 2)},
    # fine-tuning (no --scratch-only): MeanFlow's u-loss from the teacher with (t, s) uniform
    "meanflow_u_uniform": ([*MEANFLOW, *UNIFORM], "meanflow"),
}
TEACHER_SAMPLERS = ("euler:1,euler:2,euler:4,euler:100,midpoint:1,midpoint:2:cosine,midpoint:2:inverse_exp,"
                    "heun:2:cosine")


def run(args: list[str], log: Path, seconds: float | None = None) -> float:
    """A toolkit command (stopped by SIGTERM after `seconds`, if given); its wall time."""
    command = [sys.executable, *args]
    if seconds is not None:
        command = ["timeout", "-s", "TERM", str(int(seconds)), *command]
    start = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code not in (0, 75, 124):  # 75: train.py stopped by the signal with a checkpoint; 124: timeout's own
        sys.exit(f"{' '.join(args[:3])} failed ({code}); see {log}")
    return time.perf_counter() - start


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def fid_rows(run_dir: Path, samplers: str, steps: list[int], log: Path) -> dict[tuple[int, str], float]:
    """FID of the run's checkpoints `steps` with each sampler: {(step, label): FID}."""
    run(["evaluate.py", "-e", str(run_dir), "--checkpoints", ",".join(map(str, steps)), "--samplers", samplers,
         "--n-samples", "1000", "--ref", str(STATS), "--bspp", "250"], log)
    rows = json.loads((run_dir / "eval" / "report.json").read_text())["rows"]
    return {(r["step"], f"{r['solver']}:{r['steps']}" + (f":{r['schedule']}" if r["schedule"] != "linear" else "")):
            r["fid"] for r in rows if r["n_samples"] == 1000 and r["step"] in steps}


def last_rows(rows: dict[tuple[int, str], float]) -> dict[str, float]:
    """fid_rows of one checkpoint as {label: FID}, the form results.json keeps."""
    return {label: fid for (_, label), fid in rows.items()}


def minutes_of(run_dir: Path) -> dict[int, float]:
    """Minutes from the run's first log line to each checkpoint line of its log (start-up counted)."""
    lines = (run_dir / "log.txt").read_text().splitlines()
    start = datetime.strptime(lines[0][1:20], "%Y-%m-%d %H:%M:%S").timestamp()
    return {int(line.rsplit("step_", 1)[1]): (datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S").timestamp() - start)
            / 60 for line in lines if "] checkpoint: " in line}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--methods", default="meanflow_u,meanflow_v,alphaflow,alphaflow_short,shortcut",
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--scratch", action="store_true", help="also train each method from scratch")
    p.add_argument("--scratch-only", action="store_true", help="train each method from scratch only")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "few_step_mnist")
    args = p.parse_args()
    out, log = args.out, args.out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    print("teacher ...", flush=True)
    walls = json.loads((out / "walls.json").read_text()) if (out / "walls.json").is_file() else {}
    if "teacher" not in walls:
        walls["teacher"] = run(["train.py", "-c", "configs/mnist_icfm_unet.yaml", "-e", str(teacher), *DATA,
                                "model.time_scale=1"], log)
    last = checkpoints(teacher)[-1]
    results = out / "results.json"  # rows and curves of earlier runs of other --methods stay in the report and plot
    saved = json.loads(results.read_text()) if results.is_file() else {}
    table = {**saved.get("table", {}), "teacher": last_rows(fid_rows(teacher, TEACHER_SAMPLERS, [last], log))}
    curves = saved.get("curves", {})
    init = teacher / "checkpoints" / f"step_{last:07d}"
    for name in args.methods.split(","):
        extra, solver = METHODS[name]
        kinds = [] if args.scratch_only else [("fine-tuned", [f"train.init_from={init}", "train.lr=5e-4",
                                                               "train.warmup_steps=0"], args.minutes * 60)]
        if args.scratch or args.scratch_only:
            kinds.append(("scratch", [], walls["teacher"] + args.minutes * 60))
        for kind, how, seconds in kinds:
            key = f"{name} {kind}"
            run_dir = out / f"{name}_{kind}"
            print(f"{key}: {seconds / 60:.1f} min ...", flush=True)
            if key not in walls:
                walls[key] = run(["train.py", "-e", str(run_dir), *DATA, *how, "train.steps=100000",
                                  "train.lr_schedule=constant", "train.checkpoint_every=100",
                                  "train.keep_every=100", *extra], log, seconds)
                (out / "walls.json").write_text(json.dumps(walls, indent=1))
            steps = checkpoints(run_dir)
            table[key] = last_rows(fid_rows(run_dir, f"{solver}:1,{solver}:2,{solver}:4", [steps[-1]], log))
            if kind == "fine-tuned":  # the curve: FID at 1 NFE against minutes
                picked = sorted({steps[len(steps) * k // 3] for k in range(1, 3)} | {steps[-1]})
                fids = fid_rows(run_dir, f"{solver}:1", picked, log)
                when = minutes_of(run_dir)
                curves[name] = [(when.get(s, float("nan")), fids[(s, f"{solver}:1")]) for s in picked]
    (out / "walls.json").write_text(json.dumps(walls, indent=1))
    report(out, table, curves, walls, args)


def report(out: Path, table: dict, curves: dict, walls: dict, args) -> None:
    teacher = table["teacher"]
    best = {n: min((fid, label) for label, fid in teacher.items()
                   if label.split(":")[0] in ("euler", "heun", "midpoint")
                   and int(label.split(":")[1]) * (2 if label.startswith(("midpoint", "heun")) else 1) == n)
            for n in (1, 2, 4)}
    lines = ["| model | minutes | NFE 1 | NFE 2 | NFE 4 | NFE 1 / teacher Euler-100 | NFE 2 / teacher Euler-100 |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| I-CFM teacher, Euler | {walls['teacher'] / 60:.1f} | {teacher['euler:1']:.1f} | "
             f"{teacher['euler:2']:.1f} | {teacher['euler:4']:.1f} | | |",
             "| teacher's best solver at that NFE | | "
             + " | ".join(f"{best[n][0]:.1f} ({best[n][1]})" for n in (1, 2, 4)) + " | | |"]
    e100 = teacher["euler:100"]
    for key, rows in table.items():
        if key == "teacher":
            continue
        fids = {label.split(":")[1]: fid for label, fid in rows.items()}
        lines.append(f"| {key} | {walls[key] / 60:.1f} | {fids['1']:.1f} | {fids['2']:.1f} | {fids['4']:.1f} | "
                     f"{fids['1'] / e100:.2f}× | {fids['2'] / e100:.2f}× |")
    lines.append(f"\nTeacher Euler-100: {e100:.2f}; goal: 1 NFE ≤ {1.5 * e100:.1f} (1.5×), 2 NFE ≤ {1.25 * e100:.1f} "
                 "(1.25×).")
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"table": table, "curves": curves}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        ax.plot([m for m, _ in points], [f for _, f in points], "o-", label=name)
    ax.axhline(1.5 * e100, ls="--", c="gray", label="goal at 1 NFE (1.5× teacher Euler-100)")
    ax.set(xlabel="fine-tuning minutes", ylabel="FID at 1 NFE (1,000 samples)", title="MNIST one-stage few-step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_minutes.png", dpi=110)


if __name__ == "__main__":
    main()
