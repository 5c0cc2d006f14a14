"""lucidrains' rectified-flow-pytorch MeanFlow on this toolkit's MNIST UNet, data, batch and minutes: the peer row of
the few-step table (issue 34). The peer is never a requirement: fetch it into a scratch folder first,

    pip download rectified-flow-pytorch==0.14.0 --no-deps -d /tmp/peer && unzip -o /tmp/peer/*.whl -d /tmp/peer/src
    python bench/peer_meanflow_mnist.py --peer /tmp/peer/src [--minutes 15] [--init TEACHER_CHECKPOINT]

Only its mean_flow.py is loaded (torch and einops; the package's __init__ pulls in its other models). Its MeanFlow
wraps the toolkit's unet-mnist with the interval input (model.time_scale=1, the toolkit's MeanFlow recipe): the peer
runs time from data (0) to noise (1) and calls model(x, τ, τ − r) for the flow noise − data, so the wrapper gives
−u(x, 1 − τ, s = 1 − r). Everything else is the peer's own: its (t, r) sampler (logit-normal(−0.4, 1)), half the
batches plain flow matching, its adaptive weight p = 0.5, its JVP. Training: AdamW at --lr (the toolkit's recipe:
2e-3 from scratch, 5e-4 when fine-tuning from --init, as bench/few_step_mnist.py), batch 64, EMA 0.999, on the
10,000 MNIST test digits, for --minutes of wall clock. FID (clean-fid, 1,000 samples, noise seeded (0, k) as the
toolkit's, EMA weights) at 1 NFE (the peer's one jump), 2 NFE with the peer's own sampler (two Euler steps of the
instantaneous velocity: its `sample(steps=2)`) and 2 NFE with the toolkit's MeanFlow jumps of the same network.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from data import build_dataset  # noqa: E402
from data.images import to_uint8  # noqa: E402
from flows.solvers import generate, noise  # noqa: E402
from metrics import fid  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import init_weights  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mnist"


class PeerTime(torch.nn.Module):
    """The toolkit's average-velocity UNet in the peer's time: model(x, τ, τ − r) = −u(x, 1 − τ, s = 1 − r)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, tau, delta):
        return -self.net(x, 1 - tau, None, s=1 - tau + delta)


def load_peer(folder: Path):
    path = folder / "rectified_flow_pytorch" / "mean_flow.py"
    if not path.is_file():
        sys.exit(f"no rectified_flow_pytorch/mean_flow.py under {folder}; fetch the peer as this script's --help says")
    spec = importlib.util.spec_from_file_location("peer_mean_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MeanFlow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", type=Path, required=True, help="folder holding rectified_flow_pytorch/")
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--init", help="a flow-matching checkpoint of unet-mnist with model.time_scale=1 to fine-tune")
    p.add_argument("--lr", type=float, help="default 5e-4 with --init, 2e-3 without")
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    MeanFlow = load_peer(args.peer)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "mnist_meanflow_unet.yaml", [f"data.path={SHARED}", "data.split=test"])
    dataset = build_dataset(cfg)
    net = build_model(cfg, tuple(dataset.shape))
    if args.init:
        print(init_weights(net, args.init, cfg.model.time_scale))
    peer = MeanFlow(PeerTime(net), data_shape=tuple(dataset.shape))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr or (5e-4 if args.init else 2e-3), weight_decay=0)
    g, steps, start = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while time.perf_counter() - start < args.minutes * 60:
        x1, _ = dataset[torch.randint(0, len(dataset), (64,), generator=g)]
        loss = peer(x1.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        with torch.no_grad():
            for e, w in zip(ema.parameters(), net.parameters()):
                e.lerp_(w, 1 - 0.999)
        if steps % 50 == 0:
            print(f"step {steps}, {(time.perf_counter() - start) / 60:.1f} min, loss {loss.item():.4f}", flush=True)
    print(f"trained {steps} steps in {(time.perf_counter() - start) / 60:.1f} min")

    features = fid.build_features("inception", "clean")
    reference = fid.Reference.load(SHARED / "t10k-fid-stats-clean.npz")
    peer_ema = MeanFlow(PeerTime(ema), data_shape=tuple(dataset.shape))

    def score(make) -> float:
        images = []
        for first in range(0, args.n, 250):
            x0 = noise(0, list(range(first, min(first + 250, args.n))), tuple(dataset.shape))
            with torch.no_grad():
                images.append(to_uint8(make(x0)))
        return fid.image_metrics(features(torch.cat(images)), reference, False, 0)["fid"]

    # The peer samples from its noise at τ = 1: the same noise as the toolkit's at t = 0.
    rows = {"peer, 1 NFE (its one jump)": score(lambda x0: peer_ema.sample(len(x0), noise=x0, steps=1)),
            "peer, 2 NFE (its sampler: 2 Euler steps)": score(
                lambda x0: peer_ema.slow_sample(steps=2, noise=x0)),
            "peer's network, 2 NFE (the toolkit's meanflow jumps)": score(
                lambda x0: generate(ema, x0, 2, "meanflow").x)}
    for name, value in rows.items():
        print(f"| {name} | {steps} steps | {value:.1f} |")


if __name__ == "__main__":
    main()
