"""FID report of a run: every checkpoint × sampler (solver, steps, schedule) × guidance scale, protocol recorded.

    accelerate launch evaluate.py -e runs/NAME [--checkpoints all|last|STEP,...] [--samplers euler:10,heun:25,dopri5]
        [--n-samples 50000] [--ref NAME[:SPLIT]|FOLDER|FILE.npz] [--mode clean] [--kid] [--bpd] [--seed 0] [--bspp 256]
    python evaluate.py -e runs/mnist --samplers euler:10,rk4:2,midpoint:8:cosine --n-samples 1000 \\
        --ref ../shared/data/mnist/t10k-fid-stats-clean.npz
    python evaluate.py --folder samples/ --ref cifar10:train             # images made elsewhere

For each row, N samples are generated in memory with the same `generate` and per-sample noise as
sample.py (sample k from seed (S, k), shared out over the processes), turned into uint8 images and
scored with clean-fid's Inception features against the reference: clean-fid's precomputed statistics
by name (cifar10:train, ffhq, ... downloaded on first use), a folder of images or an .npz (statistics
mu/sigma, or images arr_0), or by default the run's own dataset, whose statistics are computed once
and cached in --stats-dir. 2-D runs get W2 (exact OT) and MMD to N dataset points instead.

A sampler is SOLVER[:STEPS][:SCHEDULE]: euler:10, heun:25:cosine, rk4:4:logit_normal:mean=0,std=1,
dopri5 (adaptive: no steps; tolerances from --atol/--rtol). NFE is exact for fixed-grid solvers and
the mean number of model calls per batch for adaptive ones.

Results go to RUN/eval/: report.json (one row per protocol, with every setting, NFE, seconds and
library versions), report.csv, report.md (a table per protocol, best row marked) and fid.png (metric
against training step per sampler, and against NFE per checkpoint). A row already in report.json is
not recomputed (ask for --kid or --bpd and rows without them are); each row is added when done, so an
interrupted evaluation continues where it stopped; the report is written under a lock and atomically.

Offline: clean-fid's Inception network is read from /tmp/inception-2015-12-05.pt (clean-fid's own
location); without network copy the file there first.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import functools
import io
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

import seeds
from cluster import STOPPED, Stopped, StopRequest, progress, run_main
from config import check_range, load_config
from data import build_source, reference_data, reference_data_config, reference_points, weights_info
from data.images import to_uint8
from errors import UserError, atomic_write, exit_on, on_main_process
from flows import PATHS, SDE_SOLVERS, check_sampling, sde_sampler, velocity_model
from flows.latent import build_feature_encoder, build_space
from flows.likelihood import log_likelihood
from flows.schedules import parse_schedule
from flows.solvers import (
    ADAPTIVE,
    check_guidance,
    check_solver,
    check_tolerances,
    class_labels,
    condition,
    fixed_grid_nfe,
    forward_passes,
    generate,
    noise,
    parse_interval,
    sampler_passes,
)
from metrics import build_features, fid, frechet_distance, kernel_inception_distance, mmd, w2
from metrics.fid import CLEANFID_NAMES, MODES, Reference
from models import build_model
from models.checkpoint import list_checkpoints, load_weights

# The settings that define a row: a row with the same values is the same measurement.
KEY = ("step", "weights", "solver", "steps", "schedule", "atol", "rtol", "cfg_scale", "n_samples", "seed",
       "reference", "mode", "features", "task", "mask", "factor", "method", "pnp_alpha", "sde", "cfg_interval")
# Columns of report.csv and report.md, in order.
COLUMNS = ("step", "weights", "solver", "steps", "schedule", "sde", "cfg_scale", "cfg_interval", "nfe",
           "forward_passes", "fid", "kid", "kid_std", "w2", "mmd", "bpd", "n_samples", "seed", "reference", "mode",
           "features", "seconds", "task", "mask", "factor", "method", "psnr", "ssim", "measurement_error",
           "raw_measurement_error", "seconds_per_image")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FID (or, for 2-D data, W2 and MMD) of every checkpoint of a run for every sampler setting, as a "
                    "report in RUN/eval/ that records the whole protocol. SIGTERM or Ctrl-C stops after the current "
                    "batch with the finished rows kept (exit status 75); the same command continues.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--exp", help="run folder (with checkpoints/step_N)")
    p.add_argument("--folder", help="score the images in this folder instead of a run (needs --ref)")
    p.add_argument("--checkpoints", default="all", help="all, last, or training steps: 5000,10000 (default: all)")
    p.add_argument("--samplers", nargs="+", help="SOLVER[:STEPS][:SCHEDULE], comma-separated or several; "
                                                 "SOLVER+LAST ends with LAST's step, e.g. heun+euler:8:cosine "
                                                 "(default: the config's sample section)")
    p.add_argument("--cfg-scale", type=float, nargs="+", help="guidance scales (class-conditional models; default 1)")
    p.add_argument("--cfg-interval", metavar="A,B", help="guidance only for t in [A, B] (default: the config's, 0,1)")
    p.add_argument("--diffusion", help="SDE samplers (euler_maruyama, sde_heun): the diffusion coefficient "
                                       "(default: the config's sample.diffusion, sigma)")
    p.add_argument("--diffusion-norm", type=float, help="SDE samplers: its scale (default: the config's, 1)")
    p.add_argument("--last-step", choices=["mean", "tweedie", "euler"], help="SDE samplers: the noiseless last "
                                                                             "step (default: the config's, mean)")
    p.add_argument("--weights", choices=("ema", "raw", "both"), default="ema", help="EMA weights (default) or raw")
    p.add_argument("--n-samples", type=int, default=50_000, help="samples per row (default 50000)")
    p.add_argument("--ref", help="clean-fid dataset NAME[:SPLIT] (" + ", ".join(CLEANFID_NAMES) + "), a folder of "
                                 "images or an .npz (mu/sigma or arr_0 images); default: the run's dataset")
    p.add_argument("--mode", default="clean", choices=MODES, help="clean-fid mode (default clean)")
    p.add_argument("--features", default="inception", help="inception (FID) or pixels (a fast stand-in for tests)")
    p.add_argument("--kid", action="store_true", help="also kernel inception distance (mean ± std over subsets)")
    p.add_argument("--bpd", action="store_true", help="also bits per dimension of --bpd-n dataset items")
    p.add_argument("--bpd-n", type=int, default=1000, help="data items for --bpd (default 1000)")
    p.add_argument("--bpd-tol", type=float, default=1e-5, help="dopri5 tolerance of --bpd (default 1e-5)")
    p.add_argument("--seed", type=int, default=0, help="base seed S in [0, 2^64): sample k's noise comes from (S, k)")
    p.add_argument("--bspp", type=int, default=256, help="batch size per process (does not change fixed-grid samples)")
    p.add_argument("--atol", type=float, help="adaptive solvers' absolute tolerance (default: the config's)")
    p.add_argument("--rtol", type=float, help="adaptive solvers' relative tolerance (default: the config's)")
    p.add_argument("--stats-dir", default=str(fid.default_stats_dir()), help="cache of reference statistics "
                                                                         "(default %(default)s)")
    p.add_argument("--out", help="report folder (default RUN/eval)")
    task = p.add_argument_group("image-conditioned tasks", "score a task on the first N items of the run's dataset "
                                "(fixed cases: case k's mask and noise from (seed, k)): FID of the outputs against "
                                "--ref, PSNR and SSIM against the originals, the measurement error, NFE and seconds "
                                "per image")
    task.add_argument("--task", choices=["inpaint", "superres", "semantic"],
                      help="the task (default: the one the run's model was trained for, if any)")
    task.add_argument("--method", default=None, choices=["model", "replace", "pnp", "mean", "bicubic"],
                      help="model (a conditional run's), replace or pnp (training-free, on an unconditional run), "
                           "mean or bicubic (baselines: one row, no checkpoint)")
    task.add_argument("--mask", choices=["mixed", "strokes", "boxes", "center"],
                      help="inpaint: the masks of the cases (default: the model's training masks, or mixed)")
    task.add_argument("--factor", type=int, help="superres: the downsampling factor (default: the run's data.factor)")
    task.add_argument("--pnp-alpha", type=float, default=0.01, help="PnP-Flow: step sizes (1 − t_n)^α (default 0.01)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Sampler:
    solver: str
    steps: int | None
    schedule: str

    @property
    def label(self) -> str:
        if self.steps is None:
            return self.solver
        return f"{self.solver}:{self.steps}" + ("" if self.schedule == "linear" else f":{self.schedule}")


def parse_samplers(texts: list[str]) -> list[Sampler]:
    """'euler:10,heun:25:cosine' (and schedule parameters such as logit_normal:mean=0,std=1) -> samplers."""
    pieces = [piece for text in texts for piece in text.split(",") if piece]
    specs: list[str] = []
    for piece in pieces:  # 'std=1' after 'logit_normal:mean=0' continues the previous sampler's schedule
        if specs and "=" in piece.split(":")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    samplers = []
    for spec in specs:
        solver, _, rest = spec.partition(":")
        steps_text, _, schedule = rest.partition(":")
        steps = None
        if steps_text:
            try:
                steps = int(steps_text)
            except ValueError:
                raise UserError(f"sampler '{spec}': steps must be an integer (SOLVER[:STEPS][:SCHEDULE], "
                                "e.g. euler:10 or heun:25:cosine)") from None
        if steps is None and solver not in ADAPTIVE:
            steps = 100
        check_solver(solver, steps)
        parse_schedule(schedule or "linear")
        samplers.append(Sampler(solver, steps, schedule or "linear"))
    return samplers


def select_checkpoints(run: Path, spec: str) -> list[tuple[int, Path]]:
    found = list_checkpoints(run)
    if not found:
        raise UserError(f"run dir {run} has no checkpoints (checkpoints/step_N); train first or give the run's folder")
    if spec == "all":
        return found
    if spec == "last":
        return found[-1:]
    try:
        wanted = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--checkpoints must be all, last or training steps such as 5000,10000; got {spec}") from None
    steps = dict(found)
    missing = [s for s in wanted if s not in steps]
    if missing:
        raise UserError(f"run dir {run} has no checkpoint at step {missing[0]}; it has {', '.join(map(str, steps))}")
    return [(s, steps[s]) for s in wanted]


# Report: one row per protocol in report.json; csv, md and png made from it.


def key_of(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k)) for k in KEY)


class Report:
    """RUN/eval/report.json and the files made from it; every change is made under a lock and written atomically."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / "report.json"

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            return json.loads(self.path.read_text())["rows"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{self.path} is not a report written by evaluate.py; move it away to start a new "
                            "one") from None

    def find(self, key: tuple) -> dict | None:
        return next((r for r in self.rows() if key_of(r) == key), None)

    @contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, row: dict) -> None:
        with self._locked():  # another evaluation may have added rows since we read: merge, then replace
            rows = [r for r in self.rows() if key_of(r) != key_of(row)] + [row]
            rows.sort(key=lambda r: (r.get("task") or "", r["step"] or 0, r["weights"] or "", r["solver"],
                                     r["nfe"] or 0, r["cfg_scale"]))
            _write(self.path, json.dumps({"rows": rows}, indent=1))
            self.render(rows)

    def render(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _write(self.folder / "report.csv", buffer.getvalue())
        _write(self.folder / "report.md", markdown(rows))
        if any(not r.get("task") for r in rows):  # tasks are compared in the table, between methods
            plot([r for r in rows if not r.get("task")], self.folder / "fid.png")


def _write(path: Path, text: str | bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode() if isinstance(text, str) else text))


def metric_of(rows: list[dict]) -> str:
    return "fid" if any(r.get("fid") is not None for r in rows) else "w2"


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows comparable with one another: same number of samples, seed, reference, mode and features."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["n_samples"], r["seed"], r["reference"], r["mode"], r["features"]), []).append(r)
    return groups


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["# Evaluation report", ""]
    for (n, seed, reference, mode, features), group in _groups([r for r in rows if not r.get("task")]).items():
        metric = metric_of(group)
        best = min(group, key=lambda r: r[metric])
        lines += [f"## {n} samples, seed {seed}, against {reference}" + (f" ({features})" if mode else ""),
                  "", f"Lower is better; ★ marks the best row by {metric.upper()}.", ""]
        extra = [c for c in ("kid", "mmd", "bpd") if any(r.get(c) is not None for r in group)]
        guided = any(r["cfg_scale"] != 1 for r in group)  # then the network's forward passes differ from NFE
        head = ["step", "weights", "sampler", "cfg", "NFE", *(["forward passes"] if guided else []), metric.upper(),
                *[c.upper() for c in extra], "seconds"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
        for r in group:
            sampler = Sampler(r["solver"], r["steps"], r["schedule"] or "linear").label
            if r["steps"] is None:
                sampler += f" (atol {r['atol']:g}, rtol {r['rtol']:g})"
            if r.get("sde"):
                sampler += f" ({r['sde']})"
            if r.get("cfg_interval"):
                sampler += f", guided in {r['cfg_interval']}"
            cells = [str(r["step"]), r["weights"] or "", sampler, _fmt(r["cfg_scale"], 1), _fmt(r["nfe"], 1),
                     *([_fmt(r.get("forward_passes") or (r["nfe"] and forward_passes(r["nfe"], r["cfg_scale"])), 1)]
                       if guided else []),
                     _fmt(r[metric], 2 if metric == "fid" else 4)]
            for c in extra:
                if c == "kid" and r.get("kid") is not None:
                    cells.append(f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} (×10⁻³)")
                else:
                    cells.append(_fmt(r.get(c), 4 if c == "mmd" else 3))
            cells.append(f"{r['seconds']:.0f}")
            if r is best:
                cells = [f"**{c}**" if c else c for c in cells]
                cells[0] = "★ " + cells[0]
            lines.append("| " + " | ".join(cells) + " |")
        first = group[0]
        lines += ["", f"Protocol: {first['protocol']}", ""]
        if guided:
            lines += ["NFE counts velocity evaluations per sample, a guided one as one; forward passes count the "
                      "network's rows, two per guided evaluation.", ""]
    return "\n".join(lines + task_markdown([r for r in rows if r.get("task")]))


def task_markdown(rows: list[dict]) -> list[str]:
    """A table per task setting (task, masks or factor, cases, seed, reference): every method's row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["mask"], r["factor"], r["n_samples"], r["seed"], r["reference"]), []).append(r)
    lines = []
    for (task, mask, factor, n, seed, reference), group in groups.items():
        setting = f"{mask} masks" if task == "inpaint" else f"×{factor}" if task == "superres" else ""
        lines += [f"## {task} ({setting}), {n} fixed cases, seed {seed}, FID against {reference}", "",
                  "FID: lower is better; PSNR (dB) and SSIM against the originals: higher is better. Measurement "
                  "error: the largest change of a known pixel (inpaint) or of a block mean (superres) in uint8 "
                  "levels, after the measurement is enforced (before it, in brackets: the mean over cases).", "",
                  "| method | step | sampler | cfg | NFE | FID | PSNR | SSIM | measurement error | s / image |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(group, key=lambda r: r["fid"]):
            sampler = "" if r["method"] in ("mean", "bicubic") else \
                Sampler(r["solver"], r["steps"], r["schedule"] or "linear").label
            method = r["method"] + (f" (α {r['pnp_alpha']:g})" if r["method"] == "pnp" else "")
            lines.append(f"| {method} | {'' if r['step'] is None else r['step']} | {sampler} | "
                         f"{_fmt(r['cfg_scale'], 1)} | {_fmt(r['nfe'], 0)} | {r['fid']:.2f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.4f} | {r['measurement_error']:.2f} ({r['raw_measurement_error']:.2f}) | "
                         f"{r['seconds_per_image']:.3f} |")
        lines += ["", f"Protocol: {group[0]['protocol']}", ""]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Metric against training step (a line per sampler) and against NFE (a colour per checkpoint, a line per
    solver and schedule), for the largest group of comparable rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = max(_groups(rows).values(), key=len)
    metric = metric_of(group)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_sampler: dict[str, list[dict]] = {}
    by_checkpoint: dict[str, dict[str, list[dict]]] = {}
    for r in group:
        label = Sampler(r["solver"], r["steps"], r["schedule"] or "linear").label
        cfg = f", cfg {r['cfg_scale']:g}" if r["cfg_scale"] != 1 else ""
        by_sampler.setdefault(label + cfg + (f" ({r['weights']})" if r["weights"] != "ema" else ""), []).append(r)
        family = r["solver"] + (f" {r['schedule']}" if r["schedule"] not in (None, "linear") else "") + cfg
        by_checkpoint.setdefault(f"step {r['step']} ({r['weights']})", {}).setdefault(family, []).append(r)
    for label, rs in by_sampler.items():
        rs = sorted(rs, key=lambda r: r["step"])
        left.plot([r["step"] for r in rs], [r[metric] for r in rs], "o-", label=label)
    # One colour per checkpoint, one marker per solver and schedule; a line joins the step counts of one of them.
    markers = {}
    for colour, (checkpoint, families) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10,
                                              by_checkpoint.items()):
        for family, rs in families.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            marker = markers.setdefault(family, "osD^v<>pPX*h"[len(markers) % 12])
            right.plot([r["nfe"] for r in rs], [r[metric] for r in rs], marker=marker, linestyle="-", color=colour,
                       label=f"{checkpoint}, {family}")
    n, reference, features = group[0]["n_samples"], group[0]["reference"], group[0]["features"]
    name = metric.upper() + (f" ({features})" if features and not features.startswith("inception") else "")
    left.set(xlabel="training step", ylabel=name, title=f"{name} against training step, per sampler")
    right.set(xlabel="NFE (velocity evaluations)", ylabel=name, xscale="log",
              title=f"{name} against NFE, per checkpoint and solver")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{n} samples against {reference}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    _write(path, buffer.getvalue())


@functools.cache
def versions() -> dict[str, str]:
    """Library versions and the toolkit's git commit ("+dirty" with uncommitted changes to tracked files).
    Read once per process, so the rows of a long evaluation record the code it started with."""
    found = {"python": platform.python_version()}
    for name in ("torch", "accelerate", "clean-fid", "torchdiffeq", "numpy", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    root = Path(__file__).resolve().parent
    if (root / ".git").exists():
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        found["toolkit"] = (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
                            if commit else "unknown")
    return found


# Work shared by the processes.


def gather_indexed(accelerator: Accelerator, local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows that process r computed for indices r, r + W, r + 2W, ... gathered back into index order (n, ...)."""
    world = accelerator.num_processes
    m = -(-n // world)
    padded = torch.zeros(m, *local.shape[1:], dtype=local.dtype, device=accelerator.device)
    padded[: len(local)] = local.to(accelerator.device)
    everything = accelerator.gather(padded).cpu().reshape(world, m, *local.shape[1:])
    return everything.transpose(0, 1).reshape(world * m, *local.shape[1:])[:n]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    versions()  # the commit and libraries this evaluation starts with, recorded in each of its rows
    try:
        if args.folder:
            score_folder(args)
        else:
            with StopRequest() as stop:
                evaluate(args, stop)
    except UserError as e:
        exit_on(e)
    except Stopped:
        sys.exit(STOPPED)


def score_folder(args: argparse.Namespace) -> None:
    """FID (and KID) of images made elsewhere against --ref, printed; with --out also added to a report."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"--folder {folder} is not a folder of images")
    if not args.ref:
        raise UserError("--folder needs --ref: a clean-fid dataset name, a folder of images or an .npz")
    start = time.perf_counter()
    images = fid.read_image_folder(folder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_features(args.features, args.mode, device)
    reference = fid.load_reference(args.ref, extractor, tuple(images.shape[-2:]), Path(args.stats_dir),
                                   need_features=args.kid)
    features = extractor(images)
    row = {"step": None, "weights": None, "solver": str(folder), "steps": None, "schedule": None, "atol": None,
           "rtol": None, "cfg_scale": 1.0, "nfe": None, "n_samples": len(images), "seed": None,
           "reference": reference.name, "mode": args.mode, "features": extractor.key}
    row.update(image_metrics(features, reference, args.kid, args.seed))
    row.update(seconds=time.perf_counter() - start, versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
               protocol=f"{len(images)} images of {folder}, {extractor.description}")
    kid = f", KID {row['kid']:.5f} ± {row['kid_std']:.5f}" if args.kid else ""
    print(f"{folder}: {len(images)} images, FID {row['fid']:.3f}{kid} against {reference.name}")
    if args.out:
        Report(Path(args.out)).add(row)


def image_metrics(features: np.ndarray, reference: Reference, kid: bool, seed: int) -> dict:
    out = {"fid": frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)}
    if kid:
        out["kid"], out["kid_std"] = kernel_inception_distance(features, reference.features, seed=seed)
    return out


def evaluate(args: argparse.Namespace, stop: StopRequest | None = None) -> None:
    """The rows of args' report; a `stop` request ends it after the current batch, the finished rows kept."""
    stop = stop or StopRequest()
    if not args.exp:
        raise UserError("give a run folder with -e RUN_DIR, or images with --folder DIR --ref REFERENCE")
    run = Path(args.exp)
    if not run.is_dir():
        raise UserError(f"run dir {run} does not exist; give the folder train.py wrote (-e)")
    checkpoints = select_checkpoints(run, args.checkpoints)
    if args.n_samples < 2 or args.bspp <= 0 or args.bpd_n <= 0:
        raise UserError("--n-samples must be at least 2, and --bspp and --bpd-n positive")
    check_range("sample.seed", args.seed, "--seed")
    cfg = load_config(checkpoints[-1][1] / "config.yaml")
    if cfg.flow.objective == "autoencoder":
        raise UserError(f"run {run} trained an autoencoder (flow.objective=autoencoder), not a flow; train a latent "
                        "flow model on it and evaluate that")
    s = cfg.sample
    default = s.solver if s.solver in ADAPTIVE else f"{s.solver}:{s.steps or 100}:{s.schedule}"
    samplers = parse_samplers(args.samplers or [default])
    for key in ("diffusion", "diffusion_norm", "last_step"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.cfg_interval is not None:
        s.cfg_interval = parse_interval(args.cfg_interval)
    check_sampling(cfg, [sampler.solver for sampler in samplers])
    atol = s.atol if args.atol is None else args.atol  # 0 is a tolerance too
    rtol = s.rtol if args.rtol is None else args.rtol
    if any(sampler.steps is None for sampler in samplers):
        check_tolerances(atol, rtol)
    weights_kinds = ["ema", "raw"] if args.weights == "both" else [args.weights]
    if args.task or "task" in weights_info(checkpoints[-1][1] / "ema.safetensors", cfg):
        return evaluate_task(args, stop, run, checkpoints, cfg, samplers, weights_kinds, atol, rtol)
    if args.method or args.mask or args.factor:
        raise UserError("--method, --mask and --factor score image-conditioned tasks; give --task inpaint or superres "
                        "(or evaluate a run trained with data.task)")

    # Processes, data and what the samples look like.
    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu_multiprocess)
    main_process = accelerator.is_main_process
    meta = weights_info(checkpoints[-1][1] / "ema.safetensors", cfg)
    dataset = None
    if args.ref is None or args.bpd or meta["kind"] == "vector":
        dataset = reference_data(cfg)  # reflow runs: their teacher's data, not the pairs
    # The flow's state (data or latents) and the images that `space` decodes it to.
    shape, num_classes, kind = tuple(json.loads(meta.get("latent_shape", meta["data_shape"]))), \
        int(meta["num_classes"]), meta["kind"]
    image_shape = tuple(json.loads(meta["data_shape"]))
    space = build_space(cfg, image_shape).to(accelerator.device)
    if args.bpd and cfg.latent.autoencoder:
        raise UserError("--bpd of a latent flow would measure the latents, not the images; leave --bpd out")
    if kind == "field":
        raise UserError("FID needs images; this run's data are fields (data.name=fields), which have no Inception "
                        "reference; use sample.py and compare the fields directly")
    cfg_scales = args.cfg_scale or [s.cfg_scale]
    for scale in cfg_scales:
        check_guidance(scale, num_classes, float(meta.get("label_dropout", cfg.flow.label_dropout)),
                       float(meta.get("meanflow_cfg", 1)))
    labels = class_labels(None, args.n_samples, num_classes, args.seed)
    source = None if cfg.data.source == "gaussian" else build_source(cfg, shape)

    # Reference.
    extractor, reference, points = None, None, None
    if kind == "image":
        extractor = build_features(args.features, args.mode, accelerator.device)

        def load_reference():
            return fid.load_reference(args.ref, extractor, image_shape[-2:], Path(args.stats_dir), cfg, dataset,
                                      args.kid)

        # The main process computes (and caches) what the others then read; its error stops them all.
        reference = on_main_process(accelerator, load_reference) or load_reference()
        reference_name, mode, features_key = reference.name, args.mode, extractor.key
        protocol = (f"{args.n_samples} samples per row from noise seeded by ({args.seed}, k), "
                    f"uint8 images, {extractor.description} features, Fréchet distance to {reference.name}"
                    + ("; KID: unbiased MMD² with the cubic kernel over 100 subsets of up to 1000" if args.kid else ""))
    else:
        if args.n_samples > len(dataset):
            raise UserError(f"--n-samples {args.n_samples} exceeds the {len(dataset)} points of the dataset")
        pick = reference_points(len(dataset), args.n_samples, args.seed)
        points = dataset[pick][0].double()
        reference_name = f"{reference_data_config(cfg).name} ({args.n_samples} dataset points)"
        mode, features_key = None, None
        protocol = (f"{args.n_samples} samples per row from noise seeded by ({args.seed}, k), W2 by exact optimal "
                    f"assignment and MMD² (Gaussian kernels, bandwidths 0.1-5) to {args.n_samples} points of the "
                    f"dataset drawn with seed {args.seed}")
    if args.bpd and cfg.data.source != "gaussian":
        raise UserError(f"--bpd needs the standard normal source; this run starts from data.source="
                        f"{cfg.data.source}, whose density is not known")
    protocol += ("; NFE: velocity evaluations per sample (adaptive solvers: the mean over the samples, each "
                 "controlling its own steps); forward passes: 2·NFE under guidance (conditional and unconditional "
                 "rows)")
    if args.bpd:
        protocol += (f"; bits/dim of {args.bpd_n} dataset items by the instantaneous change of variables "
                     f"(dopri5, atol = rtol = {args.bpd_tol:g}), "
                     + ("uniform dequantization onto bins of width 2/255 centred on the training values, Hutchinson "
                        "divergence" if kind == "image" else "exact divergence")
                     + ("; Latent-CFM: the upper bound E_q[−log p(x|c)] + KL(q(c|x) ‖ N(0, I)), one c per item"
                        if "feature_dim" in meta else ""))
    report = Report(Path(args.out) if args.out else run / "eval")

    # Rows.
    rows = [(step, path, w, sampler, scale) for step, path in checkpoints for w in weights_kinds
            for sampler in samplers for scale in cfg_scales]
    if main_process:
        print(f"{run}: {len(rows)} rows ({len(checkpoints)} checkpoints × {len(weights_kinds)} weights × "
              f"{len(samplers)} samplers × {len(cfg_scales)} cfg scales), {args.n_samples} samples each, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}; report in {report.folder}")
    loaded, bpd_of = None, {}
    try:
        for step, path, w, sampler, scale in rows:
            adaptive = sampler.steps is None
            row = {"step": step, "weights": w, "solver": sampler.solver, "steps": sampler.steps,
                   "schedule": None if adaptive else sampler.schedule, "atol": atol if adaptive else None,
                   "rtol": rtol if adaptive else None, "cfg_scale": float(scale), "n_samples": args.n_samples,
                   "seed": args.seed, "reference": reference_name, "mode": mode, "features": features_key,
                   **sampling_key(cfg, sampler, scale)}
            done = report.find(key_of(row))
            wanted = ["fid" if kind == "image" else "w2"] + (["kid"] if args.kid and kind == "image" else []) \
                + (["bpd"] if args.bpd else [])
            if done is not None and all(done.get(k) is not None for k in wanted):
                if main_process:
                    print(f"  step {step} {w} {sampler.label} cfg {scale:g}: already in the report "
                          f"({metric_of([done]).upper()} {done[metric_of([done])]:.4g})")
                continue
            accelerator.wait_for_everyone()  # every process has read the report before any row is added

            if loaded != (step, w):
                model_cfg = load_config(path / "config.yaml")
                model = build_model(model_cfg, shape, num_classes, int(meta.get("feature_dim", 0)))
                load_weights(model, path / ("ema.safetensors" if w == "ema" else "model.safetensors"))
                dtype = torch.float64 if kind == "vector" else torch.float32
                model = velocity_model(model.to(accelerator.device, dtype).eval(), model_cfg)
                loaded = (step, w)
            start = time.perf_counter()
            out = sample_row(accelerator, model, row, sampler, shape, kind, labels, extractor, args.bspp, dtype,
                             source, space, stop, cfg)
            if kind == "image":
                metrics = image_metrics(out["values"].numpy(), reference, args.kid, args.seed)
            else:
                metrics = {"w2": w2(out["values"], points), "mmd": mmd(out["values"], points)}
            if args.bpd:  # a property of the checkpoint, not of the sampler: computed once per weights
                if (step, w) not in bpd_of:
                    bpd_of[(step, w)] = bits_per_dim(accelerator, model, dataset, kind, args, cfg, stop)
                metrics["bpd"] = bpd_of[(step, w)]
            row.update(nfe=out["nfe"], **metrics)
            row.update(forward_passes=passes_of(row, sampler))
            row.update(bspp=args.bspp, processes=accelerator.num_processes, device=str(accelerator.device),
                       checkpoint=str(path), seconds=time.perf_counter() - start, versions=versions(),
                       date=time.strftime("%Y-%m-%d %H:%M:%S"), protocol=protocol)
            if main_process:
                report.add(row)
                shown = ", ".join(f"{k.upper()} {v:.4g}" for k, v in metrics.items() if k != "kid_std")
                passes = f", {row['forward_passes']:g} forward passes" if scale != 1 else ""
                print(f"  step {step} {w} {sampler.label} cfg {scale:g}: {shown} (NFE {out['nfe']:g}{passes}, "
                      f"{row['seconds']:.0f} s)")
            accelerator.wait_for_everyone()
    except Stopped:
        if main_process:
            print(f"stopped by {stop.name}: the rows finished are in the report, the one under way is dropped; run "
                  "the same command to continue", file=sys.stderr)
        raise
    if main_process:
        if not report.path.is_file():
            report.render(report.rows())
        print(f"report: {report.folder / 'report.md'}, {report.folder / 'fid.png'}")
    accelerator.end_training()


def evaluate_task(args, stop: StopRequest, run: Path, checkpoints, cfg, samplers: list[Sampler], weights_kinds,
                  atol: float, rtol: float) -> None:
    """The rows of an image-conditioned task: the first --n-samples items of the run's dataset as fixed cases, every
    checkpoint × weights × sampler × guidance scale with the method (a baseline: one row without a checkpoint)."""
    from data.tasks import cases_from_dataset, model_inputs, task_of_meta
    from flows.inverse import check_method, check_task_guidance, choose_task

    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu_multiprocess)
    main_process = accelerator.is_main_process
    meta = weights_info(checkpoints[-1][1] / "ema.safetensors", cfg)
    if meta["kind"] != "image" or cfg.flow.objective != "cfm" or "feature_dim" in meta:
        raise UserError(f"--task {args.task} scores a flow-matching model of images (not MeanFlow or Latent-CFM); "
                        f"run {run} is not one")
    trained = task_of_meta(meta)
    image_shape = tuple(json.loads(meta["data_shape"]))
    task, method = choose_task(trained, args.task, args.method, args.mask, args.factor, cfg.data.factor, image_shape)
    baseline = method in ("mean", "bicubic")
    for sampler in samplers:
        check_method(method, task, trained is not None, sampler.solver, cfg.flow.path)
    cfg_scales = [1.0] if baseline else args.cfg_scale or [cfg.sample.cfg_scale]
    for scale in cfg_scales:
        check_task_guidance(scale, method, float(meta.get("cond_dropout", 0)))
    shape = tuple(json.loads(meta.get("latent_shape", meta["data_shape"])))
    space = build_space(cfg, image_shape).to(accelerator.device)
    flow_path = PATHS[cfg.flow.path](cfg)  # where replacement pastes the known pixels, and PnP-Flow interpolates

    # The cases: items 0..N-1 of the run's dataset, masks and noise from (seed, k).
    dataset = reference_data(cfg)
    n = args.n_samples
    cases = cases_from_dataset(task, dataset, n, None, getattr(task, "mask", "mixed"), args.seed)

    extractor = build_features(args.features, args.mode, accelerator.device)

    def load_reference():
        return fid.load_reference(args.ref, extractor, image_shape[-2:], Path(args.stats_dir), cfg, dataset, False)

    reference = on_main_process(accelerator, load_reference) or load_reference()
    data = reference_data_config(cfg)
    if task.name == "inpaint":
        measured = (f"{task.mask} masks drawn for case k from ({args.seed}, k), the known pixels pasted back into "
                    "every output")
    elif task.name == "superres":
        measured = (f"the {task.factor}×{task.factor} block means, restored in every output (each block shifted by "
                    "the constant that gives its clipped pixels the low-resolution mean)")
    else:
        measured = "the label maps of the items"
    protocol = (f"{task.describe()}: {n} fixed cases, items 0..{n - 1} of {data.name} ({data.split} split) as "
                f"originals; {measured}; noise of case k from ({args.seed}, k); uint8 outputs; FID: "
                f"{extractor.description} features, Fréchet distance to {reference.name}; PSNR over uint8 pixels "
                "(peak 255) and SSIM (torchmetrics, 11×11 Gaussian window, σ 1.5, data range 255), each averaged over "
                "the cases; NFE: velocity evaluations per sample; s / image: generation (no scoring) over all "
                "processes, per image")
    report = Report(Path(args.out) if args.out else run / "eval")
    rows = [(None, None, None, None, 1.0)] if baseline else \
        [(step, path, w, sampler, scale) for step, path in checkpoints for w in weights_kinds for sampler in samplers
         for scale in cfg_scales]
    if main_process:
        print(f"{run}: {task.describe()}, method {method}, {len(rows)} rows, {n} cases each, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}; report in {report.folder}")
    loaded, model = None, None
    try:
        for step, path, w, sampler, scale in rows:
            adaptive = sampler is not None and sampler.steps is None
            row = {"step": step, "weights": w, "solver": sampler.solver if sampler else "",
                   "steps": sampler.steps if sampler else None,
                   "schedule": sampler.schedule if sampler and not adaptive else None,
                   "atol": atol if adaptive else None, "rtol": rtol if adaptive else None, "cfg_scale": float(scale),
                   "n_samples": n, "seed": args.seed, "reference": reference.name, "mode": args.mode,
                   "features": extractor.key, "task": task.name, "mask": getattr(task, "mask", None)
                   if task.name == "inpaint" else None, "factor": getattr(task, "factor", None), "method": method,
                   "pnp_alpha": args.pnp_alpha if method == "pnp" else None}
            done = report.find(key_of(row))
            if done is not None and done.get("fid") is not None:
                if main_process:
                    print(f"  {method} step {step} {sampler.label if sampler else ''}: already in the report "
                          f"(FID {done['fid']:.4g})")
                continue
            accelerator.wait_for_everyone()
            if not baseline and loaded != (step, w):
                model_cfg = load_config(path / "config.yaml")
                model = build_model(model_cfg, shape, int(meta["num_classes"]), **model_inputs(trained, shape[0]))
                load_weights(model, path / ("ema.safetensors" if w == "ema" else "model.safetensors"))
                model = velocity_model(model.to(accelerator.device).eval(), model_cfg)
                loaded = (step, w)
            start = time.perf_counter()
            out = task_row(accelerator, model, task, cases, space, row, extractor, args, stop, flow_path)
            metrics = image_metrics(out["features"].numpy(), reference, False, args.seed)
            metrics.update({k: out[k] for k in ("psnr", "ssim", "measurement_error", "raw_measurement_error")})
            row.update(nfe=out["nfe"], forward_passes=forward_passes(out["nfe"], scale), **metrics,
                       seconds_per_image=out["seconds_per_image"], bspp=args.bspp,
                       processes=accelerator.num_processes, device=str(accelerator.device),
                       checkpoint=None if path is None else str(path), seconds=time.perf_counter() - start,
                       versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"), protocol=protocol)
            if main_process:
                report.add(row)
                print(f"  {method} step {step} {sampler.label if sampler else ''} cfg {scale:g}: FID {row['fid']:.4g}, "
                      f"PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.4f}, measurement error "
                      f"{row['measurement_error']:.3g} (raw {row['raw_measurement_error']:.3g}), NFE {out['nfe']:g}, "
                      f"{row['seconds_per_image']:.3f} s/image")
            accelerator.wait_for_everyone()
    except Stopped:
        if main_process:
            print(f"stopped by {stop.name}: the rows finished are in the report; run the same command to continue",
                  file=sys.stderr)
        raise
    if main_process:
        print(f"report: {report.folder / 'report.md'}")
    accelerator.end_training()


def task_row(accelerator, model, task, cases, space, row: dict, extractor, args, stop: StopRequest, path) -> dict:
    """This process's share of the cases (indices rank, rank + W, ...) restored (on the model's `path`), enforced
    and scored; features, PSNR, SSIM and measurement errors gathered over the processes."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from flows.inverse import restore

    n = row["n_samples"]
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    values, nfe, seconds = [], 0.0, 0.0
    bar = progress(n, unit="case", disable=not accelerator.is_main_process, leave=False,
                   desc=f"{task.name} {row['method']}")
    for first in range(0, -(-n // accelerator.num_processes), args.bspp):
        batch = mine[first: first + args.bspp]
        if batch:
            m = cases.measurement(batch).to(accelerator.device)
            start = time.perf_counter()
            x, calls = restore(model, task, m, space, path, row["method"], row["seed"], batch, row["steps"],
                               row["solver"] or "euler", row["schedule"] or "linear", row["cfg_scale"],
                               args.pnp_alpha, row["atol"] or 0.0, row["rtol"] or 0.0)
            enforced = task.enforce(x, m)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            nfe += calls * len(batch)
            images = to_uint8(enforced).cpu()
            original = to_uint8(cases.original(batch)).cpu().float()
            mse = (images.float() - original).square().flatten(1).mean(1)
            psnr = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
            ssim = structural_similarity_index_measure(images.float(), original, data_range=255.0, reduction="none")
            if task.name == "semantic":
                error = raw = torch.zeros(len(batch))
            else:
                error = task.consistency(images.float().to(accelerator.device) / 127.5 - 1, m).cpu()
                raw = task.consistency(x.clamp(-1, 1), m).cpu()
            features = torch.from_numpy(extractor(images)).double()
            values.append(torch.cat([features, torch.stack([psnr, ssim, error, raw], 1).double()], 1))
            bar.update(len(batch) * accelerator.num_processes)
        if stop.now(accelerator):
            bar.close()
            raise Stopped
    bar.close()
    local = torch.cat(values) if values else torch.zeros(0, extractor.dim + 4, dtype=torch.float64)
    everything = gather_indexed(accelerator, local, n)
    totals = accelerator.reduce(torch.tensor([nfe, seconds], dtype=torch.float64, device=accelerator.device), "sum")
    psnr, ssim, error, raw = everything[:, -4:].T
    return {"features": everything[:, :-4], "psnr": psnr.mean().item(), "ssim": ssim.mean().item(),
            "measurement_error": error.max().item(), "raw_measurement_error": raw.mean().item(),
            "nfe": totals[0].item() / n, "seconds_per_image": totals[1].item() / n}


def sampling_key(cfg, sampler: Sampler, scale: float) -> dict:
    """The row's SDE setting ('DIFFUSION:NORM:LAST_STEP', SDE samplers only) and guidance interval (when guided and
    not [0, 1]): None otherwise, as in reports written before they existed."""
    s, interval = cfg.sample, list(cfg.sample.cfg_interval)
    return {"sde": f"{s.diffusion}:{s.diffusion_norm:g}:{s.last_step}" if sampler.solver in SDE_SOLVERS else None,
            "cfg_interval": interval if scale != 1 and interval != [0, 1] else None}


def passes_of(row: dict, sampler: Sampler) -> float | None:
    """The network's forward passes per sample of a row (guidance doubles those inside its interval)."""
    if row["nfe"] is None:
        return None
    return sampler_passes(row["nfe"], row["cfg_scale"], sampler.solver, sampler.steps, sampler.schedule,
                          tuple(row["cfg_interval"] or (0.0, 1.0)))


def sample_row(accelerator, model, row: dict, sampler: Sampler, shape, kind: str, labels, extractor, bspp: int,
               dtype, source=None, space=None, stop: StopRequest | None = None, cfg=None) -> dict:
    """This process's share of the row's samples (indices rank, rank + W, ...), generated in memory and reduced
    to features (images) or kept (points); all of them gathered in index order, and the NFE per sample (adaptive
    solvers: the mean over the samples, each of which controls its own steps, so it does not depend on --bspp)."""
    n, adaptive = row["n_samples"], sampler.steps is None
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    values, nfe = [], 0.0
    bar = progress(n, unit="sample", disable=not accelerator.is_main_process, leave=False,
                   desc=f"step {row['step']} {sampler.label}")
    start = time.perf_counter()
    for first in range(0, -(-n // accelerator.num_processes), bspp):  # as many batches on every process
        batch = mine[first: first + bspp]
        if batch:
            x0 = noise(row["seed"], batch, shape, source).to(accelerator.device, dtype)
            y = None if labels is None else labels[batch].to(accelerator.device)
            out = generate(model, x0, sampler.steps, sampler.solver, y=y, schedule=sampler.schedule,
                           cfg_scale=row["cfg_scale"], atol=row["atol"] if adaptive else 0.0,
                           rtol=row["rtol"] if adaptive else 0.0, cond=condition(model, row["seed"], batch),
                           sde=None if cfg is None else sde_sampler(cfg, sampler.solver, row["seed"], batch),
                           cfg_interval=tuple(row.get("cfg_interval") or (0.0, 1.0)))
            nfe += out.nfe * len(batch) if out.sample_nfe is None else out.sample_nfe.sum().item()
            x = (out.x if space is None else space.decode(out.x)).cpu()
            values.append(torch.from_numpy(extractor(to_uint8(x.float()))) if kind == "image" else x.double())
            bar.update(len(batch) * accelerator.num_processes)
            bar.set_postfix(samples_s=f"{bar.n / (time.perf_counter() - start):.1f}", nfe=out.nfe)
        if stop is not None and stop.now(accelerator):
            bar.close()
            raise Stopped
    bar.close()
    width = (values[0].shape[1:] if values else (extractor.dim,) if kind == "image" else shape)
    local = torch.cat(values) if values else torch.zeros(0, *width, dtype=torch.float64)
    total = accelerator.reduce(torch.tensor([nfe], dtype=torch.float64, device=accelerator.device), "sum").item()
    mean_nfe = total / n if adaptive else fixed_grid_nfe(sampler.solver, sampler.steps)
    return {"values": gather_indexed(accelerator, local, n), "nfe": mean_nfe}


def bits_per_dim(accelerator, model, dataset, kind: str, args, cfg, stop: StopRequest) -> float:
    """Mean bits/dim of the first --bpd-n items of a seeded permutation of the dataset, shared over processes,
    integrated with dopri5 at --bpd-tol: fixed-grid solvers of a few steps are far too coarse backwards.

    A Latent-CFM model's density is a mixture over its condition c, log p(x) = log E_p(c)[p(x|c)]; it is bounded
    with c drawn from q(c|x) (the encoder's features of x through the trained posterior layer):
    −log p(x) ≤ E_q[−log p(x|c)] + KL(q(c|x) ‖ N(0, I)), one c per item."""
    n = min(args.bpd_n, len(dataset))
    pick = torch.randperm(len(dataset), generator=seeds.generator("likelihood items", args.seed))[:n]
    mine = pick[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    dtype = next(model.parameters()).dtype
    conditional = getattr(model, "label_embed", None) is not None
    layer = getattr(model, "feature_cond", None)
    encoder = build_feature_encoder(cfg, dataset.shape).to(accelerator.device) if layer is not None else None
    for first in range(0, -(-n // accelerator.num_processes), args.bspp):  # as many batches on every process
        idx = mine[first: first + args.bspp]
        if len(idx):
            x, y = dataset[idx]
            x = x.to(accelerator.device, dtype)
            y = y.to(accelerator.device) if conditional and y is not None else None
            # Item i's noise whatever the batch and processes: dequantization and Hutchinson (stream 0), c (2).
            keys = [("likelihood", args.seed, int(i)) for i in idx]
            cond, kl = {}, torch.zeros(len(idx), dtype=torch.float64, device=accelerator.device)
            if layer is not None:
                eps = torch.stack([torch.randn(layer.cond_dim, generator=seeds.generator(*key, 2))
                                   for key in keys]).to(accelerator.device)
                c, kl = layer.sample(encoder(x), eps)
                cond, kl = {"c": c}, kl.double()
            out = log_likelihood(lambda x, t, y=y, cond=cond: model(x, t, y, **cond), x, None, "dopri5",
                                 atol=args.bpd_tol, rtol=args.bpd_tol, dequantize=kind == "image",
                                 generators=[seeds.generator(*key, 0) for key in keys])
            bpd = out.bpd.double() + kl / (x[0].numel() * math.log(2))
            total += torch.tensor([bpd.sum().item(), len(idx)], dtype=torch.float64, device=accelerator.device)
        if stop.now(accelerator):
            raise Stopped
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])


if __name__ == "__main__":
    run_main(main)
