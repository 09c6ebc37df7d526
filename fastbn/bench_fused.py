"""Benchmark of the fused batch norm + (residual add +) ReLU, side by side in one run.

    python -m fastbn.bench fused [--quick] [--threads N] [--out DIR] ...

Training forward + backward (gradients of input, residual, weight and bias)
of, per shape:
  - BN+ReLU:      fastbn.batch_norm_act  vs  torch.relu(fastbn.batch_norm(x))
                  (and torch's F.batch_norm + relu);
  - BN+add+ReLU:  fastbn.batch_norm_act(residual=r)  vs
                  torch.relu(fastbn.batch_norm(x) + r)  (and torch's three ops);
then the training step (forward, cross-entropy, backward, SGD) of
torchvision's resnet18 on random data, plain torch against
fastbn.fuse(resnet18) and fastbn.convert(resnet18), and each model's
autograd-saved tensors at the end of the forward (the step's peak of saved
activations; distinct storages counted once).

Times are medians of alternating rounds (fastbn.bench's interleaved_medians).
Writes results.json and summary.md to --out, by default a new folder
results/runs/bench-fused-<device>-<host>-<date>/.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import fastbn
from fastbn._cli import cpu_model, default_run_dir, resolve_device
from fastbn.bench import DTYPES, default_shapes, interleaved_medians, quick_shapes, sync


def _parameters(C, dtype, device):
    weight = (torch.rand(C, device=device) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(C, device=device).to(dtype).requires_grad_()
    return weight, bias, torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)


def kernel_steps(shape, dtype, fmt, device, residual: bool) -> dict:
    """name -> a callable running one training forward + backward."""
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    grad = torch.randn_like(x)
    weight, bias, rm, rv = _parameters(shape[1], dtype, device)
    inputs = [t for t in (x, r, weight, bias) if t is not None]

    def backward(y):
        torch.autograd.grad(y, inputs, grad)

    def fused():
        backward(fastbn.batch_norm_act(x, rm, rv, weight, bias, True, residual=r))

    def fastbn_unfused():
        y = fastbn.batch_norm(x, rm, rv, weight, bias, True)
        backward(torch.relu(y + r if residual else y))

    def torch_unfused():
        y = F.batch_norm(x, rm, rv, weight, bias, True)
        backward(torch.relu(y + r if residual else y))

    return {"fused": fused, "fastbn+torch": fastbn_unfused, "torch": torch_unfused}


def saved_tensor_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one
    forward (held until the backward: the step's peak of saved tensors)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def resnet_step_results(batch, size, device, min_run_time) -> dict:
    torchvision = __import__("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18().to(device)
    variants = {"torch": plain, "fastbn.fuse": fastbn.fuse(torchvision.models.resnet18().to(device)),
                "fastbn.convert": fastbn.convert(torchvision.models.resnet18().to(device))}
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    steps = {}
    for name, model in variants.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            optimizer.step()

        steps[name] = step
    seconds = interleaved_medians(steps, device, min_run_time, rounds=3)
    saved = {name: saved_tensor_bytes(model, x) for name, model in variants.items()}
    return {"step_ms": {k: v * 1e3 for k, v in seconds.items()},
            "saved_MiB": {k: v / 2**20 for k, v in saved.items()}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench fused", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--quick", action="store_true", help="three small shapes and a short resnet run")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per contender and case")
    parser.add_argument("--resnet-batch", type=int, default=16)
    parser.add_argument("--resnet-size", type=int, default=112)
    parser.add_argument("--no-resnet", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, "python -m fastbn.bench fused")
    if args.threads:
        torch.set_num_threads(args.threads)
    min_run_time = args.min_run_time or (0.3 if args.quick else 1.0)
    shapes = quick_shapes(device) if args.quick else default_shapes(device)
    shapes = [(label, shape) for label, shape in shapes if len(shape) == 4]
    dtype = DTYPES[args.dtype]
    rows = []
    for label, shape in shapes:
        for fmt in args.formats.split(","):
            for residual in (False, True):
                steps = kernel_steps(shape, dtype, fmt, device, residual)
                medians = interleaved_medians(steps, device, min_run_time)
                rows.append({"case": "BN+add+ReLU" if residual else "BN+ReLU", "label": label,
                             "shape": list(shape), "format": fmt,
                             "us": {k: v * 1e6 for k, v in medians.items()}})
                row = rows[-1]
                print(f"{row['case']:12} {label:18} {'x'.join(map(str, shape)):16} {fmt:13} "
                      f"fused {row['us']['fused']:9.0f} us  fastbn+torch {row['us']['fastbn+torch']:9.0f} us "
                      f"({row['us']['fastbn+torch'] / row['us']['fused']:.2f}x)  torch {row['us']['torch']:9.0f} us "
                      f"({row['us']['torch'] / row['us']['fused']:.2f}x)", flush=True)
    result = {"device": device, "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "dtype": args.dtype, "kernels": rows}
    if not args.no_resnet:
        batch, size = (2, 64) if args.quick else (args.resnet_batch, args.resnet_size)
        result["resnet18"] = {"batch": batch, "size": size,
                              **resnet_step_results(batch, size, device, min_run_time * 3)}
        print("resnet18 step:", json.dumps(result["resnet18"]), flush=True)
    sync(device)
    out = args.out or default_run_dir("bench-fused", device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(summary(result))
    print(summary(result))
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'}")
    return 0


def summary(result: dict) -> str:
    lines = [f"# Fused BN+ReLU, {result['cpu_model'] if result['device'] == 'cpu' else result['device']}, "
             f"{result['threads']} threads, torch {result['torch']}, {result['dtype']}", "",
             "| case | shape | format | fused us | fastbn BN + torch ops us | speedup | torch us | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["kernels"]:
        us = row["us"]
        lines.append(f"| {row['case']} | {'x'.join(map(str, row['shape']))} | {row['format']} | {us['fused']:.0f} | "
                     f"{us['fastbn+torch']:.0f} | {us['fastbn+torch'] / us['fused']:.2f}x | {us['torch']:.0f} | "
                     f"{us['torch'] / us['fused']:.2f}x |")
    for case in ("BN+ReLU", "BN+add+ReLU"):
        ratios = [r["us"]["fastbn+torch"] / r["us"]["fused"] for r in result["kernels"] if r["case"] == case]
        if ratios:
            lines.append(f"\n{case}: speedup over fastbn BN + torch ops, geometric mean "
                         f"{statistics.geometric_mean(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    if "resnet18" in result:
        r = result["resnet18"]
        lines.append(f"\nresnet18 training step, batch {r['batch']}, {r['size']}x{r['size']}: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in r["step_ms"].items()))
        lines.append("autograd-saved tensors after the forward: " + ", ".join(
            f"{k} {v:.1f} MiB" for k, v in r["saved_MiB"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
