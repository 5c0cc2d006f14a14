"""Image-conditioned tasks on MNIST, every method on the same fixed cases: real FID, PSNR, SSIM, measurement error,
NFE and seconds per image, through evaluate.py (one report, one table per task setting).

    python bench/mnist_tasks.py --inpaint runs/mnist_inpaint --superres runs/mnist_superres \\
        --uncond runs/mnist_15min --n 1000 --ref ../shared/data/mnist/t10k-fid-stats-clean.npz

Rows: inpainting with the mixed masks and with the centred 14×14 box, and super-resolution ×4 (7 → 28 px); for each,
the trained conditional model (Euler 100 and 20 steps), the training-free samplers on the unconditional model
(replacement for inpainting, PnP-Flow for both; 100 steps) and the baseline (the holes filled with the image's mean;
bicubic upsampling). Rows already in the report are kept (evaluate.py resumes), so an interrupted run continues.
Real FID needs clean-fid's Inception (../shared/tools/inception-offline here); --features pixels is a fast stand-in.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inpaint", required=True, help="run trained with data.task=inpaint")
    p.add_argument("--superres", required=True, help="run trained with data.task=superres")
    p.add_argument("--uncond", required=True, help="unconditional run for the training-free samplers")
    p.add_argument("--n", type=int, default=1000, help="cases per row (items 0..n-1 of the runs' dataset)")
    p.add_argument("--ref", required=True, help="FID reference (evaluate.py --ref)")
    p.add_argument("--features", default="inception", help="inception (FID) or pixels (a fast stand-in)")
    p.add_argument("--steps", type=int, default=100, help="steps of the samplers (the trained models also at 20)")
    p.add_argument("--pnp-alpha", type=float, default=0.01, help="PnP-Flow step-size exponent")
    p.add_argument("--out", default="bench/out/mnist_tasks", help="report folder")
    p.add_argument("--figures", metavar="DIR", help="only draw the figures: per setting, 10 cases through every method "
                                                    "(sample.py) as columns condition | methods | original, into DIR")
    args = p.parse_args()
    if args.figures:
        figures(args)
        return

    common = ["--checkpoints", "last", "--n-samples", str(args.n), "--ref", args.ref, "--features", args.features,
              "--out", args.out, "--bspp", "250", "--pnp-alpha", str(args.pnp_alpha)]
    trained = f"euler:{args.steps},euler:20"
    runs = []
    for mask in ("mixed", "center"):
        runs.append(["-e", args.inpaint, "--mask", mask, "--samplers", trained])
        runs += [["-e", args.uncond, "--task", "inpaint", "--mask", mask, "--method", method,
                  "--samplers", f"euler:{args.steps}"] for method in ("replace", "pnp")]
        runs.append(["-e", args.uncond, "--task", "inpaint", "--mask", mask, "--method", "mean"])
    runs += [["-e", args.superres, "--samplers", trained],
             ["-e", args.uncond, "--task", "superres", "--method", "pnp", "--samplers", f"euler:{args.steps}"],
             ["-e", args.uncond, "--task", "superres", "--method", "bicubic"]]
    for extra in runs:
        command = [sys.executable, "evaluate.py", *extra, *common]
        print("$", " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode:
            sys.exit(done.returncode)
    print((Path(args.out) / "report.md").read_text())


def figures(args) -> None:
    """Per setting, one PNG: a row per case (items 0-9), columns condition | every method | original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    out = Path(args.figures)
    settings = {"inpaint_mixed": ("inpaint", ["--mask", "mixed"]), "inpaint_center": ("inpaint", ["--mask", "center"]),
                "superres_x4": ("superres", [])}
    for name, (task, extra) in settings.items():
        trained = args.inpaint if task == "inpaint" else args.superres
        free = ["replace", "pnp"] if task == "inpaint" else ["pnp"]
        methods = [("trained, Euler 100", trained, []),
                   *[(f"{m}, 100 steps", args.uncond, ["--method", m]) for m in free],
                   ("mean fill" if task == "inpaint" else "bicubic", args.uncond,
                    ["--method", "mean" if task == "inpaint" else "bicubic"])]
        columns, titles = [], []
        for title, run, method in methods:
            folder = Path("/tmp") / f"mnist_tasks_{name}_{len(columns)}"
            command = [sys.executable, "sample.py", "--weights", str(Path(run) / "checkpoints" / "step_0001000"),
                       "--save-dir", str(folder), "--n-samples", "10", "--steps", str(args.steps), "--grid", "10",
                       "--pnp-alpha", str(args.pnp_alpha), *extra, *method]
            if run == args.uncond:
                command += ["--task", task]
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            grid = np.array(Image.open(ROOT / folder / "grid.png"))  # rows: condition | sample | original
            third = grid.shape[1] // 3
            if not columns:
                columns.append(grid[:, :third])
                titles.append("condition")
            columns.append(grid[:, third: 2 * third])
            titles.append(title)
        columns.append(grid[:, 2 * third:])
        titles.append("original")
        fig, axes = plt.subplots(1, len(columns), figsize=(1.3 * len(columns), 9))
        for ax, column, title in zip(axes, columns, titles):
            ax.imshow(column, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"mnist_{name}.png", dpi=110)
        plt.close(fig)
        print(f"wrote {out / f'mnist_{name}.png'}")


if __name__ == "__main__":
    main()
