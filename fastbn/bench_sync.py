"""SyncBatchNorm benchmark: one training step (forward + backward) of a
synchronised layer against a local one, in the same processes, same run.

    python -m fastbn.bench_sync [--device cpu|cuda] [--world-size 2] [--shape N,C,H,W] ...

CPU: `--world-size` gloo processes (default 2, one thread each unless
--threads), each with its own batch of --shape; fastbn.SyncBatchNorm against
fastbn.BatchNorm2d on the same per-process input. The collectives' share is
reported two ways: (sync - local) / sync, and the time of the step's two
collectives alone (all_gather of [3, C], all_reduce of [2, C]) / sync.
CUDA: NCCL, one process per GPU, fastbn.SyncBatchNorm against
torch.nn.SyncBatchNorm; with one GPU, world size 1 through the synchronised
path of both (fastbn.sync.sync_batch_norm and torch's SyncBatchNorm function,
collectives included).

Times are medians over rounds of --steps back-to-back steps after warm-up;
the contenders alternate round by round, and every round starts at a
barrier, so all ranks time the same thing at the same time. Rank 0 prints a
table and writes results.json to --out when given.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastbn
from fastbn._cli import cpu_model


def _parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) < 2:
        raise argparse.ArgumentTypeError(f"shape needs at least 2 dimensions, got {text!r}")
    return shape


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_round_ms(contenders: dict, device, steps: int, rounds: int, warmup: int) -> dict:
    """Median per-step milliseconds of each contender, rounds alternating."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            dist.barrier()
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3 / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def _training_step(layer, x, grad):
    def step():
        x.grad = None
        layer(x).backward(grad)
    return step


def _worker(rank: int, world_size: int, init_file: str, args: dict, result_file: str) -> None:
    device = torch.device(args["device"], rank if args["device"] == "cuda" else 0) \
        if args["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args["threads"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dtype = getattr(torch, args["dtype"])
        shape = tuple(args["shape"])
        C = shape[1]
        rows = []
        for fmt in args["formats"]:
            x = torch.randn(shape, device=device, dtype=dtype)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
            x.requires_grad_()
            grad = torch.randn_like(x)
            ours = fastbn.SyncBatchNorm(C, device=device, dtype=dtype if dtype == torch.float64 else None)
            contenders = {"fastbn SyncBatchNorm": _training_step(ours, x, grad)}
            if device.type == "cpu":
                local_class = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d}.get(
                    len(shape), fastbn.BatchNorm3d)
                local = local_class(C, device=device, dtype=dtype if dtype == torch.float64 else None)
                contenders["fastbn BatchNorm (local)"] = _training_step(local, x, grad)
                stats = torch.empty(3, C, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                gathered = stats.new_empty((world_size * 3, C))
                sums = stats.new_empty(2, C)

                def collectives():
                    fastbn.sync._all_gather_into_tensor(gathered, stats)
                    dist.all_reduce(sums)
                contenders["collectives alone"] = collectives
            else:
                theirs = torch.nn.SyncBatchNorm(C, device=device, dtype=dtype if dtype == torch.float64 else None)
                if world_size > 1:
                    contenders["torch.nn.SyncBatchNorm"] = _training_step(theirs, x, grad)
                else:
                    contenders = _world_one_contenders(ours, theirs, x, grad)
            ms = _median_round_ms(contenders, device, args["steps"], args["rounds"], args["warmup"])
            rows.append({"format": fmt, "ms": ms})
        if rank == 0:
            Path(result_file).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _world_one_contenders(ours, theirs, x, grad) -> dict:
    """One GPU: both libraries' synchronised paths at world size 1 (the layers
    themselves skip the collectives there)."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    group = dist.group.WORLD

    def fastbn_step():
        x.grad = None
        fastbn.sync.sync_batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, None,
                                    0.1, ours.eps, group, 1).backward(grad)

    def torch_step():
        x.grad = None
        TorchSyncFunction.apply(x, theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var,
                                theirs.eps, 0.1, group, 1).backward(grad)

    return {"fastbn (sync path, world 1)": fastbn_step, "torch.nn.SyncBatchNorm (sync path, world 1)": torch_step}


def run(args: argparse.Namespace) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        world_size = args.world_size or max(1, min(torch.cuda.device_count(), 8))
    else:
        world_size = args.world_size or 2
    settings = {
        "device": device, "shape": list(args.shape), "dtype": args.dtype, "formats": args.formats.split(","),
        "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "rendezvous"), settings, result_file),
                           nprocs=world_size, start_method="spawn")
        rows = json.loads(Path(result_file).read_text())
    return {
        "settings": settings,
        "world_size": world_size,
        "machine": torch.cuda.get_device_name() if device == "cuda" else cpu_model() or platform.processor(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def summary(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"SyncBatchNorm training step (forward + backward), world size {result['world_size']}, "
        f"{s['device']} ({result['machine']}), per-process input {tuple(s['shape'])} {s['dtype']}, "
        f"{s['threads']} thread(s) per process, torch {result['torch']}, {result['date']}",
        "",
    ]
    for row in result["rows"]:
        ms = row["ms"]
        lines.append(f"{row['format']}:")
        for name, value in ms.items():
            lines.append(f"  {name:48s} {value * 1e3:10.1f} us")
        sync = ms.get("fastbn SyncBatchNorm")
        if sync and "fastbn BatchNorm (local)" in ms:
            local = ms["fastbn BatchNorm (local)"]
            lines.append(f"  sync / local: {sync / local:.2f}x; (sync - local) / sync: {(sync - local) / sync:.0%}; "
                         f"collectives alone / sync: {ms['collectives alone'] / sync:.0%}")
        if sync and "torch.nn.SyncBatchNorm" in ms:
            lines.append(f"  speedup over torch.nn.SyncBatchNorm: {ms['torch.nn.SyncBatchNorm'] / sync:.2f}x")
        if "fastbn (sync path, world 1)" in ms:
            ratio = ms["torch.nn.SyncBatchNorm (sync path, world 1)"] / ms["fastbn (sync path, world 1)"]
            lines.append(f"  speedup over torch's sync path: {ratio:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench_sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes (CPU default 2; CUDA default: one per GPU)")
    parser.add_argument("--shape", type=_parse_shape, default=(32, 64, 28, 28), help="per-process input N,C,H,W")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--formats", default="nchw,channels_last", help="comma list of nchw,channels_last")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and summary.md")
    args = parser.parse_args(argv)
    result = run(args)
    text = summary(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        (args.out / "summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
