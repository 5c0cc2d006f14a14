"""A small timm network trained to classify the MNIST digits, as REPA's encoder for the MNIST benches (issue 31).

    python bench/mnist_encoder.py [--model test_resnet] [--resolution 112] [--epochs 2] [--out bench/out/mnist_encoder]
    python bench/align_mnist.py --methods repa --model align.encoder=test_resnet \
        align.weights=bench/out/mnist_encoder/model.safetensors align.resolution=112 align.layer=3 \
        align.projector=conv align.weight=1 --out bench/out/align_mnist_resnet     # REPA aligned with it

REPA's encoders are pretrained on images like the ones generated (DINOv2 on ImageNet-like data); the only
pretrained image network on a machine without network is the FID Inception, an ImageNet classifier that reads a
28-px digit upsampled. This trains a representation of the digits themselves: a timm model (`test_resnet`: a
ResNet of 0.37M parameters whose third stage, intermediate 3, is a 7×7 grid of 192 features at 112 px, the UNet
middle's grid) as a supervised classifier of the first 9,000 of the 10,000 MNIST test digits of ../shared/data/mnist
(the set the flow models of the benches train on), its accuracy measured on the last 1,000. The images are prepared
as align.encoder prepares them (bicubic to the resolution, timm's normalization); a ViT's tokens are average-pooled
for the classifier so that every patch token learns the digit. The weights are saved as safetensors that
`align.weights` loads. Prints the accuracy after each epoch and the minutes the training took.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.images import load_mnist  # noqa: E402
from models.encoders import _takes_img_size, timm_input  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mnist"


def prepare(net: torch.nn.Module, x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Digits in [−1, 1] as align.encoder's TimmEncoder gives them to the network."""
    mean, std = (torch.tensor(net.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return timm_input(x, resolution, mean, std)


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, resolution: int) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum((net(prepare(net, x[i:i + 250], resolution)).argmax(1) == y[i:i + 250]).sum().item()
                      for i in range(0, len(x), 250))
    net.train()
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="test_resnet", help="a timm model (a ViT's tokens are average-pooled)")
    p.add_argument("--resolution", type=int, default=112,
                   help="input size in pixels (112: test_resnet's third stage and test_vit's tokens are 7×7)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=SHARED, help="folder with the MNIST test set's idx files")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mnist_encoder")
    args = p.parse_args()
    import timm

    if not timm.is_model(args.model):
        p.error(f"--model {args.model} is not a timm model")
    dataset = load_mnist(args.data, split="test", download=False)
    x, y = dataset[torch.arange(len(dataset))]
    train_x, train_y, held_x, held_y = x[:9000], y[:9000], x[9000:], y[9000:]
    torch.manual_seed(args.seed)
    # A ViT: fc_norm=False keeps the final norm where the token-pooled model (TimmEncoder's) has it, so keys match.
    vit = {"img_size": args.resolution, "global_pool": "avg", "fc_norm": False} if _takes_img_size(args.model) else {}
    net = timm.create_model(args.model, num_classes=10, **vit)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(train_x) / args.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 50 steps of warmup, then a cosine decay to 0
        optimizer, lambda k: min(1.0, (k + 1) / 50) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), args.batch):
            batch = order[i:i + args.batch]
            loss = F.cross_entropy(net(prepare(net, train_x[batch], args.resolution)), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, accuracy on the 1,000 held-out digits "
              f"{accuracy(net, held_x, held_y, args.resolution):.4f}, {(time.time() - start) / 60:.1f} min",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "model.safetensors"))
    print(f"trained in {(time.time() - start) / 60:.1f} min; weights: {args.out / 'model.safetensors'} "
          f"(align.encoder={args.model} align.weights={args.out / 'model.safetensors'} "
          f"align.resolution={args.resolution}, and align.layer=K for an intermediate)")


if __name__ == "__main__":
    main()
