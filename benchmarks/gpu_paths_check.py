"""GPU check of the CUDA paths (run by benchmarks/gpu_check.sh; needs a GPU).

For each path (FASTBN_CUDA_PATH=single_pass, two_pass, auto) and a few
shapes, dtypes and layouts: training forward + backward and eval against the
float64 reference, with outputs that would show an unwritten element (the
caching allocator is filled with NaN first); the number of kernels each
operator launches, counted by torch.profiler (training forward and backward
at most 2, 1 on the single pass, eval 1); and a CUDA-graph capture and replay
of a training step on each path, compared with the eager result.

    python benchmarks/gpu_paths_check.py [--small] [--no-profile] [--no-graphs]

--small: a few tiny shapes and no profiler or graphs, for compute-sanitizer
(memcheck, racecheck), where every kernel runs many times slower.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastbn  # noqa: E402
from fastbn import cuda_paths  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SHAPES = [((64, 6, 28, 28), "nchw"), ((64, 16, 10, 10), "channels_last"), ((1024, 6, 28, 28), "nchw"),
          ((8, 1, 4097), "nchw"), ((33, 7), "nchw"), ((4, 40, 3, 5, 7), "channels_last"),
          ((32, 64, 56, 56), "nchw")]
SMALL_SHAPES = [((4, 3, 9, 5), "nchw"), ((4, 37, 3, 3), "channels_last"), ((5, 1, 301), "nchw")]


def make(shape, fmt, dtype):
    x = (torch.randn(shape, dtype=torch.float64, device="cuda") * 2 + 0.5).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def poison():
    """Leaves NaN-filled blocks in the caching allocator."""
    blocks = [torch.full((1 << 24,), float("nan"), device="cuda") for _ in range(4)]
    del blocks


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(shape, fmt, dtype, path) -> list[str]:
    failures = []
    C = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = make(shape, fmt, dtype)
    w = torch.rand(C, device="cuda", dtype=pdtype) + 0.5
    b = torch.randn(C, device="cuda", dtype=pdtype)
    rm, rv = torch.randn(C, device="cuda", dtype=pdtype), torch.rand(C, device="cuda", dtype=pdtype) + 0.5
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    dy = torch.randn_like(x)
    poison()
    with cuda_paths.forced_path(path):
        try:
            xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            y = fastbn.batch_norm(xi, rm, rv, wi, bi, training=True)
            grads = torch.autograd.grad(y, (xi, wi, bi), dy)
            ye = fastbn.batch_norm(x, rm, rv, w, b, training=False)
        except RuntimeError as error:
            if path == "single_pass" and cuda_paths.does_not_fit(error):
                return []
            raise
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    yr = fastbn.reference.batch_norm(xr, rm_ref, rv_ref, wr, br, training=True)
    grads_r = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    ye_r = fastbn.reference.batch_norm(x.double(), rm_ref, rv_ref, w.double(), b.double(), training=False)
    what = f"{path} {tuple(shape)} {fmt} {dtype}"
    for name, ours, ref in [("y", y, yr), ("dx", grads[0], grads_r[0]), ("dw", grads[1], grads_r[1]),
                            ("db", grads[2], grads_r[2]), ("running_mean", rm, rm_ref),
                            ("running_var", rv, rv_ref), ("eval y", ye, ye_r)]:
        err = rel_err(ours, ref)
        if not err <= TOL[dtype]:  # NaN fails too
            failures.append(f"{what}: {name} relative error {err:.2e} > {TOL[dtype]:.0e}")
    return failures


def kernel_counts(shape, fmt, path) -> dict[str, int]:
    """Kernels launched by each operator, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    x = make(shape, fmt, torch.float32)
    C = shape[1]
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    dy = torch.randn_like(x)
    counts = {}
    with cuda_paths.forced_path(path):
        y, mean, invstd = torch.ops.fastbn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)  # warm-up
        ops = {
            "train": lambda: torch.ops.fastbn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5),
            "backward": lambda: torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True,
                                                                      [True, True, True]),
            "eval": lambda: torch.ops.fastbn.batch_norm_eval(x, rm, rv, w, b, 1e-5),
        }
        for name, op in ops.items():
            op()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                op()
                torch.cuda.synchronize()
            counts[name] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower())
    return counts


def graph_check(shape, fmt, path) -> list[str]:
    """A training step captured in a CUDA graph and replayed on fresh data
    matches the same step run eagerly."""
    x_static = make(shape, fmt, torch.float32)
    C = shape[1]
    w = (torch.rand(C, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(C, device="cuda").requires_grad_()
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    dy_static = torch.randn_like(x_static)
    with cuda_paths.forced_path(path):
        def step():
            xi = x_static.requires_grad_()
            y = fastbn.batch_norm(xi, rm, rv, w, b, training=True)
            return (y, *torch.autograd.grad(y, (xi, w, b), dy_static))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up on a side stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        x_static.data.copy_(make(shape, fmt, torch.float32))
        dy_static.copy_(torch.randn_like(dy_static))
        rm_before, rv_before = rm.clone(), rv.clone()
        graph.replay()
        torch.cuda.synchronize()
        replayed = [o.clone() for o in outs]
        rm_graph, rv_graph = rm.clone(), rv.clone()
        rm.copy_(rm_before)
        rv.copy_(rv_before)
        eager = step()
    failures = []
    for name, a, e in zip(["y", "dx", "dw", "db"], replayed, eager):
        if not torch.allclose(a, e, rtol=1e-5, atol=1e-5):
            failures.append(f"graph {path} {shape} {fmt}: {name} differs from eager by {(a - e).abs().max().item():.2e}")
    if not (torch.allclose(rm_graph, rm) and torch.allclose(rv_graph, rv)):
        failures.append(f"graph {path} {shape} {fmt}: running statistics differ from eager")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-graphs", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_paths_check needs a CUDA device")
    torch.manual_seed(0)
    shapes = SMALL_SHAPES if args.small else SHAPES
    dtypes = ["fp32"] if args.small else list(DTYPES)
    paths = ["single_pass", "two_pass"] if args.small else ["single_pass", "two_pass", "auto"]
    failures = []
    for shape, fmt in shapes:
        for dtype in dtypes:
            for path in paths:
                failures += check_case(shape, fmt, DTYPES[dtype], path)
    print(f"correctness: {len(shapes) * len(dtypes) * len(paths)} cases, {len(failures)} failures")
    if not args.small and not args.no_profile:
        limits = {"single_pass": {"train": 1, "backward": 1, "eval": 1},
                  "two_pass": {"train": 2, "backward": 2, "eval": 1}}
        for shape, fmt in [((64, 6, 28, 28), "nchw"), ((64, 16, 10, 10), "channels_last")]:
            for path, limit in limits.items():
                counts = kernel_counts(shape, fmt, path)
                print(f"kernels per operator, {path} {shape} {fmt}: {counts}")
                for op, n in counts.items():
                    if n > limit[op] or n == 0:
                        failures.append(f"{path} {shape} {fmt}: {op} launched {n} kernels (limit {limit[op]})")
    if not args.small and not args.no_graphs:
        for path in ("single_pass", "two_pass"):
            for shape, fmt in [((64, 6, 28, 28), "nchw"), ((64, 16, 10, 10), "channels_last")]:
                failures += graph_check(shape, fmt, path)
        print("CUDA graphs: captured and replayed")
    for f in failures:
        print("FAIL", f)
    print("gpu_paths_check:", "ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
