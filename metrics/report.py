"""The evaluation report of a run: one row per measured protocol in RUN/eval/report.json, and the files made from it
(report.csv, report.md with a table per protocol and the best row marked, fid.png).

A row's KEY fields say what was measured (checkpoint, weights, sampler, guidance, samples, seed, reference, ...):
a row with the same key is the same measurement, which evaluate.py skips when the report has it, so an interrupted
evaluation continues where it stopped. Every change is made under a lock and written atomically, so evaluations
writing one report at once lose no row. Each row records the library versions and the toolkit's commit.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import io
import json
import platform
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from errors import UserError, atomic_write
from flows.sampling import Sampler
from flows.solvers import forward_passes

# The settings that define a row: a row with the same values is the same measurement.
KEY = ("step", "weights", "solver", "steps", "schedule", "atol", "rtol", "cfg_scale", "n_samples", "seed",
       "reference", "mode", "features", "task", "mask", "factor", "method", "pnp_alpha", "sde", "cfg_interval",
       "guidance")


# Columns of report.csv and report.md, in order.
COLUMNS = ("step", "weights", "solver", "steps", "schedule", "sde", "cfg_scale", "cfg_interval", "guidance", "nfe",
           "forward_passes", "guide_cost", "fid", "kid", "kid_std", "precision", "recall", "w2", "mmd", "bpd",
           "n_samples", "seed", "reference", "mode", "features", "seconds", "task", "mask", "factor", "method", "psnr",
           "ssim", "measurement_error", "raw_measurement_error", "seconds_per_image")


def sampling_protocol(n: int, seed: int, extractor, reference: str, kid: bool = False, bpd_n: int = 0,
                      bpd_tol: float = 0.0, latent_cfm: bool = False, pr: bool = False) -> str:
    """How evaluate.py's sampling rows are measured, in words: images through `extractor` against the reference, or
    (extractor None) 2-D points against n dataset points; with bpd_n > 0 also the bits per dimension."""
    if extractor is not None:
        protocol = (f"{n} samples per row from noise seeded by ({seed}, k), uint8 images, {extractor.description} "
                    f"features, Fréchet distance to {reference}"
                    + ("; KID: unbiased MMD² with the cubic kernel over 100 subsets of up to 1000" if kid else "")
                    + (f"; precision and recall: k = 3 nearest-neighbour balls (Kynkäänniemi et al. 2019) against "
                       f"{n} reference images drawn with seed {seed}" if pr else ""))
    else:
        protocol = (f"{n} samples per row from noise seeded by ({seed}, k), W2 by exact optimal assignment and MMD² "
                    f"(Gaussian kernels, bandwidths 0.1-5) to {n} points of the dataset drawn with seed {seed}")
    protocol += ("; NFE: velocity evaluations per sample (adaptive solvers: the mean over the samples, each "
                 "controlling its own steps); forward passes: 2·NFE under guidance (conditional and unconditional "
                 "rows)")
    if bpd_n:
        protocol += (f"; bits/dim of {bpd_n} dataset items by the instantaneous change of variables "
                     f"(dopri5, atol = rtol = {bpd_tol:g}), "
                     + ("uniform dequantization onto bins of width 2/255 centred on the training values, Hutchinson "
                        "divergence" if extractor is not None else "exact divergence")
                     + ("; Latent-CFM: the upper bound E_q[−log p(x|c)] + KL(q(c|x) ‖ N(0, I)), one c per item"
                        if latent_cfm else ""))
    return protocol


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
        extra = [c for c in ("kid", "precision", "recall", "mmd", "bpd") if any(r.get(c) is not None for r in group)]
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
            if r.get("guidance"):
                sampler += f", {r['guidance']}" + (f" (guide: {r['guide_cost']:.2f}× the model's FLOPs per pass)"
                                                   if r.get("guide_cost") is not None else "")
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
        cfg = (f", cfg {r['cfg_scale']:g}" if r["cfg_scale"] != 1 else "") + \
            (f" {r['guidance'].split(':')[0]}" if r.get("guidance") else "")
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
    root = Path(__file__).resolve().parent.parent  # the toolkit's folder
    if (root / ".git").exists():
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        found["toolkit"] = (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
                            if commit else "unknown")
    return found
