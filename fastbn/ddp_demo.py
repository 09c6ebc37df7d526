"""Data-parallel training with fastbn.SyncBatchNorm, to be started by torchrun:

    torchrun --nproc-per-node 2 -m fastbn.ddp_demo [--steps 20] [--batch 16]

Each process trains the tutorial's conv net (fastbn/models.py) under
DistributedDataParallel on its own share of a random MNIST-shaped batch; the
batch norm statistics are those of the global batch. gloo on CPU, NCCL with
one GPU per process when CUDA is available (--device forces one). Rank 0
prints the loss; at the end every rank checks that its parameters equal
rank 0's.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastbn
from fastbn.models import conv_net


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m fastbn.ddp_demo",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="images per process and step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("start it with torchrun, e.g. torchrun --nproc-per-node 2 -m fastbn.ddp_demo")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = fastbn.convert(conv_net("torch"), sync=True).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(1 + rank)  # each rank its own share
        for step in range(args.steps):
            images = torch.randn(args.batch, 1, 28, 28, generator=data).to(device)
            labels = torch.randint(0, 10, (args.batch,), generator=data).to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(images), labels)
            loss.backward()
            optimizer.step()
            summed = loss.detach().clone()
            dist.all_reduce(summed)
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  mean loss over {world_size} processes {summed.item() / world_size:.4f}")
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        same = torch.equal(flat, reference)
        if not same:
            print(f"rank {rank}: parameters differ from rank 0's")
        elif rank == 0:
            print(f"parameters identical on all {world_size} processes")
        return 0 if same else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
