"""A few SGD steps of the tutorial's MNIST conv net on random data, with torch's
BatchNorm2d and with fastbn's side by side, from the same initial weights and
the same batches. Prints both losses per step and their largest difference."""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import fastbn
from fastbn._cli import resolve_device
from fastbn.models import conv_net


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.device = resolve_device(args.device, "fastbn.demo")

    torch.manual_seed(args.seed)
    reference = conv_net("torch").to(args.device)
    ours = fastbn.convert(copy.deepcopy(reference))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, ours)]
    info = fastbn.build_info()
    print(f"fastbn {fastbn.__version__} ({info['loaded']}, backends {', '.join(info['backends'])}) "
          f"on {args.device}, torch {torch.__version__}")
    print(f"{'step':>4} {'torch loss':>12} {'fastbn loss':>12} {'|diff|':>10}")
    worst = 0.0
    for step in range(args.steps):
        x = torch.rand(args.batch, 1, 28, 28, device=args.device) * 2 - 1
        y = torch.randint(0, 10, (args.batch,), device=args.device)
        losses = []
        for model, opt in zip((reference, ours), optimizers):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diff = abs(losses[0] - losses[1])
        worst = max(worst, diff)
        print(f"{step:>4} {losses[0]:>12.6f} {losses[1]:>12.6f} {diff:>10.2e}")
    print(f"largest loss difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
