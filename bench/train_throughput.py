"""Training throughput (images/s) of the image models: train.py beside a bare loop, and beside torchcfm; the
model FLOPs of a step and the MFU they imply.

    python bench/train_throughput.py [--models unet-cifar10 DiT-S/2] [--batch 32] [--steps 5] [--device cpu]
    python bench/train_throughput.py --models DiT-B/2 --shape 4 32 32 --batch 256 --mixed-precision bf16 --compile
    python bench/train_throughput.py --models DiT-XL/2 --shape 4 32 32 --find-batch [--grad-checkpoint]
    PYTHONPATH=/path/to/site-with-torchcfm python bench/train_throughput.py     # adds torchcfm's UNet
    PYTHONPATH=/path/to/site-with-torchcfm python bench/train_throughput.py --parts --repeats 8

For each model on CIFAR-10-shaped data (3×32×32, random pixels written as CIFAR-10's own files; other --shape: random
latent-like arrays read as data.name=fields):
- bare: the same model and AdamW in a plain loop: draw x0 and t, forward, loss, backward, step. Nothing else.
- train.py: the toolkit's training loop as a user runs it (data loader, objective, gradient clipping,
  EMA, loss per t-bin, logging), timed by its own samples/s over steps [steps + 1, 2·steps]
  (the first `steps` warm up; previews and checkpoints fall outside the timed window).
- torchcfm (unet-cifar10 only, when importable): its UNetModelWrapper with the CIFAR-10 arguments and
  the training step of its CIFAR-10 example: ConditionalFlowMatcher, Adam, gradient clipping, EMA.
Runs alternate in ABBA order (bare, train.py, torchcfm, then torchcfm, train.py, bare) --repeats times;
the best of each is reported, and train.py's ratio to each other loop, best against best and the
median of the ratios within each repeat.

Model FLOPs: forward + backward of the network per image, counted by torch's FLOP counter (matrix multiplies,
convolutions and attention; not the optimizer, the EMA or elementwise work), and MFU = images/s × FLOPs per image /
the device's dense peak: bf16 with --mixed-precision bf16 (or fp16), TF32 otherwise (train.py turns TF32 on), from
the table PEAK_TFLOPS for the named GPU, or --peak-tflops. With --grad-checkpoint the recomputed forward passes are
work the GPU does but not model FLOPs: MFU counts the model's FLOPs only, as is usual.
--find-batch (CUDA): the largest batch (doubling from 8) whose bare training step fits in the GPU's memory, with the
memory a step takes at each size.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import update_weights  # noqa: E402
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.ema import EMA  # noqa: E402

SHAPE = (3, 32, 32)
# Dense (no sparsity) peak TFLOP/s by GPU name: (bf16 / fp16 tensor cores, TF32 tensor cores), from the vendors'
# data sheets (SXM forms). A name not here needs --peak-tflops.
PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0), "L40S": (362.05, 183.0),
               "A10G": (70.0, 35.0), "L4": (121.0, 60.0), "RTX 4090": (165.2, 82.6)}


def peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    """The dense peak of the device at the run's precision and where it comes from: --peak-tflops, the table's entry
    for the GPU, or on the CPU the rate of a large float32 matrix multiply measured here."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        a = torch.randn(2048, 2048)
        return 2 * 2048**3 / time_steps(lambda: a @ a, 5, 2, device) / 1e12, "a 2048² float32 matmul measured here"
    name = torch.cuda.get_device_name(device)
    low_precision = args.mixed_precision in ("bf16", "fp16")
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (half, f"{key} bf16 data sheet") if low_precision else (tf32, f"{key} TF32 data sheet")
    return None, ""


def flops_per_image(name: str, shape: tuple[int, ...], device: torch.device) -> float:
    """The network's forward + backward FLOPs per image (torch's FLOP counter on a batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(load_config(None, [f"model.name={name}"]), shape).to(device)
    x, t = torch.randn(2, *shape, device=device), torch.rand(2, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    return counter.get_total_flops() / 2


def fake_cifar(folder: Path, n: int = 512) -> Path:
    """Random pixels in CIFAR-10's python-batch format, so train.py reads them as data.name=cifar10."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(batches / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, n))}, f)
    return folder


def fake_latents(folder: Path, shape: tuple[int, ...], n: int = 512) -> Path:
    """Random arrays of `shape` (latents of 256 px images: 4 32 32), which train.py reads as data.name=fields."""
    path = folder / "latents.npy"
    np.save(path, np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32))
    return path


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step of `step()`, over `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bare(name: str, args, device: torch.device, batch: int | None = None) -> tuple[float, int | None]:
    """Images/s of the bare loop, and its peak memory in bytes (CUDA; None elsewhere)."""
    batch = batch or args.batch
    cfg = load_config(None, [f"model.name={name}"])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py sets them
    torch.manual_seed(0)
    model = build_model(cfg, args.shape).to(device).train()
    model.grad_checkpoint = args.grad_checkpoint
    # As train.py makes it: fused on CUDA, foreach on the CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    if args.compile:
        model = torch.compile(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x1 = torch.rand(batch, *args.shape, device=device) * 2 - 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)

    def step():
        x0, t = torch.randn_like(x1), torch.rand(batch, device=device)
        x_t = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            v = model(x_t, t)
        loss = (v.float() - (x1 - x0)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(step, args.steps, args.warmup, device)
    return batch / seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def find_batch(name: str, args, device: torch.device) -> None:
    """Double the batch from 8 until the bare step runs out of GPU memory; print each size's memory."""
    batch, fits = 8, 0
    while True:
        try:
            _, memory = bare(name, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}), device, batch)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits = batch
        print(f"  {name} batch {batch}: fits, {memory / 2**30:.1f} GiB at most", flush=True)
        batch *= 2
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    print(f"{name}: the largest batch that fits is {fits} (powers of 2 from 8; {total:.0f} GiB GPU, mixed precision "
          f"{args.mixed_precision}, grad_checkpoint {args.grad_checkpoint}, compile {args.compile})", flush=True)


def toolkit(name: str, args, data: Path, run: Path, extra: list[str] = ()) -> float:
    """train.py's images/s on the fake CIFAR-10 data, with `extra` config overrides."""
    where = (["data.name=cifar10", f"data.path={data}", "data.split=test", "data.download=false"]
             if data.is_dir() else ["data.name=fields", f"data.path={data}"])
    overrides = [*extra, f"model.name={name}", *where, f"train.batch_size={args.batch}",
                 f"train.steps={2 * args.steps}", f"train.log_every={args.steps}", "train.preview_every=0",
                 "train.preview_images=1", "train.preview_steps=1", f"train.checkpoint_every={2 * args.steps}",
                 "train.trackers=[]", f"train.mixed_precision={args.mixed_precision}", f"train.compile={args.compile}",
                 f"train.grad_checkpoint={args.grad_checkpoint}"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "-e", str(run), *overrides], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"train.py failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["samples_per_s"]  # steps [steps + 1, 2·steps]


def torchcfm_parts(device: torch.device):
    """torchcfm's CIFAR-10 UNet, its EMA copy, optimizer and flow matcher, as its CIFAR-10 example makes them."""
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(0)
    net = UNetModelWrapper(dim=SHAPE, num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                           num_head_channels=64, attention_resolutions="16", dropout=0.1).to(device)
    return net, copy.deepcopy(net), torch.optim.Adam(net.parameters(), lr=2e-4), ConditionalFlowMatcher(sigma=0.0)


def torchcfm_update(net, ema_net, optimizer) -> None:
    """What torchcfm's CIFAR-10 example does after the backward pass: clipping, Adam, its EMA."""
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():  # a per-tensor update of the state dict
        source = net.state_dict()
        for key, value in ema_net.state_dict().items():
            value.copy_(value * 0.9999 + source[key] * (1 - 0.9999))


def torchcfm_step(args, device: torch.device) -> float:
    net, ema_net, optimizer, fm = torchcfm_parts(device)
    x1 = torch.rand(args.batch, *SHAPE, device=device) * 2 - 1

    def step():  # the training step of torchcfm's examples/images/cifar10
        optimizer.zero_grad()
        x0 = torch.randn_like(x1)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((net(t, xt) - ut) ** 2)
        loss.backward()
        torchcfm_update(net, ema_net, optimizer)

    return args.batch / time_steps(step, args.steps, args.warmup, device)


def step_parts(args, device: torch.device) -> None:
    """The CIFAR-10 UNet's training step in two parts, ours beside torchcfm's, for machines where whole steps vary
    more between runs than the two loops differ: the network's forward + backward (its FLOPs, which do not vary,
    and its time) and the rest of the step (clipping, optimizer, EMA, zeroing the gradients: train.py's
    calls, on a model prepared by accelerate as train.py prepares it). Alternated --repeats times; medians."""
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(None, ["model.name=unet-cifar10"])
    torch.manual_seed(0)
    model = build_model(cfg, SHAPE).to(device)
    ema = EMA(model, cfg.train.ema_decay, warmup=False)
    accelerator = Accelerator(cpu=device.type == "cpu")
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=2e-4, foreach=True))
    params = list(model.parameters())
    net, ema_net, adam, _ = torchcfm_parts(device)
    x = torch.rand(args.batch, *SHAPE, device=device) * 2 - 1
    t = torch.rand(args.batch, device=device)

    steps = itertools.count(1)

    def ours_update():
        update_weights(accelerator, params, optimizer, ema, model, next(steps), 1.0)

    def theirs_update():
        torchcfm_update(net, ema_net, adam)
        adam.zero_grad()

    loops = {"ours": (model, lambda: model(x, t).square().mean().backward(), ours_update),
             "torchcfm": (net, lambda: net(t, x).square().mean().backward(), theirs_update)}
    flops, seconds = {}, {(label, part): [] for label in loops for part in ("network", "rest")}
    for label, (_, forward_backward, update) in loops.items():
        with FlopCounterMode(display=False) as counter:
            forward_backward()
        flops[label] = counter.get_total_flops()
        update()  # also the warmup
    for r in range(args.repeats):
        for label in loops if r % 2 == 0 else list(loops)[::-1]:
            _, forward_backward, update = loops[label]
            seconds[label, "network"].append(time_steps(forward_backward, 1, 0, device))
            seconds[label, "rest"].append(time_steps(update, 1, 0, device))
    print(f"unet-cifar10 step in parts, batch {args.batch}, median of {args.repeats} alternated repeats:")
    for label, (module, _, _) in loops.items():
        print(f"  {label:8s} {sum(p.numel() for p in module.parameters()):,} parameters; "
              f"forward + backward {flops[label] / 1e12:.4f} TFLOP, "
              f"{np.median(seconds[label, 'network']):.3f} s; clipping + optimizer + EMA "
              f"{np.median(seconds[label, 'rest']) * 1e3:.1f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["unet-cifar10", "DiT-S/2"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (and as many warmup steps for train.py)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the bare loops are timed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile=true for train.py)")
    p.add_argument("--shape", type=int, nargs="+", default=list(SHAPE), metavar="C H W",
                   help="data shape (default 3 32 32, CIFAR-10; e.g. 4 32 32 for 256 px latents)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing (train.grad_checkpoint)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense peak for the MFU (default: PEAK_TFLOPS for the named GPU)")
    p.add_argument("--find-batch", action="store_true",
                   help="instead of timing: the largest batch whose bare step fits in the GPU's memory (CUDA)")
    p.add_argument("--parts", action="store_true",
                   help="instead of whole steps: the UNet step beside torchcfm's in two parts, the network's forward "
                        "+ backward (FLOPs and seconds) and the rest (clipping, optimizer, EMA); needs torchcfm")
    args = p.parse_args()
    args.shape = tuple(args.shape)
    device = torch.device(args.device)
    if args.find_batch:
        if device.type != "cuda":
            raise SystemExit("error: --find-batch measures GPU memory; run it with a CUDA device")
        for name in args.models:
            find_batch(name, args, device)
        return
    try:
        import torchcfm  # noqa: F401
        have_torchcfm = True
    except ImportError:
        have_torchcfm = False
    if args.parts:
        if not have_torchcfm:
            raise SystemExit("error: --parts compares with torchcfm, which is not importable; pip install torchcfm "
                             "in a scratch folder and put it on PYTHONPATH")
        return step_parts(args, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    peak, source = peak_tflops(args, device)
    print(f"device {device} ({where}), shape {args.shape}, batch {args.batch}, {args.steps} timed steps, mixed "
          f"precision {args.mixed_precision}, compile {args.compile}, grad_checkpoint {args.grad_checkpoint}, torch "
          f"{torch.__version__}; peak "
          + (f"{peak:.3g} TFLOP/s ({source})" if peak else "unknown (no MFU; --peak-tflops)"))
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_cifar(Path(tmp) / "cifar") if args.shape == SHAPE else fake_latents(Path(tmp), args.shape)
        for name in args.models:
            flops = flops_per_image(name, args.shape, device)
            print(f"  {name}: {flops / 1e9:.2f} GFLOP per image (forward + backward)", flush=True)
            runs: dict[str, list[float]] = {}
            labels = ["bare", "train.py"]
            if name == "unet-cifar10" and have_torchcfm and args.mixed_precision == "no":
                labels.append("torchcfm")
            for r in range(args.repeats):
                for label in labels if r % 2 == 0 else labels[::-1]:  # ABBA order: drift cancels out
                    if label == "bare":
                        value, memory = bare(name, args, device)
                    elif label == "train.py":
                        value = toolkit(name, args, data, Path(tmp) / f"run_{name.replace('/', '_')}_{r}")
                    else:
                        value = torchcfm_step(args, device)
                    runs.setdefault(label, []).append(value)
                    shown = f", {memory / 2**30:.1f} GiB at most" if label == "bare" and memory else ""
                    print(f"  {name} {label} repeat {r}: {value:.2f} images/s{shown}", flush=True)
            print(summary(name, runs, flops, peak), flush=True)


def summary(name: str, runs: dict[str, list[float]], flops: float = 0.0, peak: float | None = None) -> str:
    """Best images/s of each loop (with the model TFLOP/s and MFU they imply), and train.py's ratio to the others:
    best against best, and the median of the ratios within each repeat (the steadier figure where the machine drifts
    between repeats)."""
    best = {label: max(values) for label, values in runs.items()}

    def rate(value: float) -> str:
        if not flops:
            return f"{value:.2f}"
        achieved = value * flops / 1e12
        return f"{value:.2f} ({achieved:.3g} TFLOP/s" + (f", MFU {achieved / peak:.1%})" if peak else ")")

    line = f"{name}: " + ", ".join(f"{label} {rate(value)}" for label, value in best.items()) + " images/s (best)"
    for other in [label for label in runs if label != "train.py"]:
        ratios = np.array(runs["train.py"]) / np.array(runs[other])
        line += (f"; train.py / {other}: best {best['train.py'] / best[other]:.3f}, median per repeat "
                 f"{np.median(ratios):.3f} (of {', '.join(f'{r:.3f}' for r in ratios)})")
    return line


if __name__ == "__main__":
    main()
