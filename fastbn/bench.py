"""Kernel benchmark: fastbn against PyTorch's BatchNorm, side by side in one run.

    python -m fastbn.bench [--quick] [--device cpu|cuda] [--out DIR] ...

Contenders, case by case: fastbn; torch (F.batch_norm with cuDNN enabled,
what users get); on the GPU also torch with cuDNN disabled (ATen's kernels)
and torch.compile'd F.batch_norm (Inductor). Cases: training forward,
training forward+backward, eval forward, over shapes, dtypes and memory
formats. Times are medians over blocks of back-to-back calls (CUDA events on
the GPU, the host clock on the CPU) after warm-up; the contenders and both
memory formats of a shape, dtype and mode are timed in alternating rounds, so
drift in the machine's speed falls on all of them alike (torch.utils.benchmark
times one callable at a time, hence the small loop here); inputs are random
and, when large, rotate through enough copies that they do
not sit in the last-level cache between repetitions.

Effective bandwidth uses a stated byte model, in elements of the input read
or written: two-pass kernels move 3N (forward: read x twice, write y),
5N (backward: read x, dy twice, write dx) and 2N (eval: read x, write y);
the floors are 2N, 3N and 2N. It is reported as a fraction of the copy
bandwidth (dst.copy_(src), 2 bytes moved per byte copied) measured in the
same run.

On the GPU, fastbn is also timed under each forced CUDA path
(FASTBN_CUDA_PATH=single_pass / two_pass, training modes; a single pass that
does not fit the device is left out) beside the torch contenders: paths.txt.
`--tune` (GPU only) measures where the single pass stops beating two passes
and writes the path table the kernels read (fastbn/cuda_paths.py).

Writes results.json (every number, device, versions, date), summary.md,
speedup.png and bandwidth.png to --out, by default a new folder
results/runs/bench-<device>-<host>-<date>/ (ignored by git; the reference
results the README cites are in results/cpu/ and results/cpu-1thread/).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastbn
from fastbn import cuda_paths
from fastbn._cli import (PLOT_STYLE, cpu_model, default_run_dir, label_log_axis, machine_line, pyplot,
                         resolve_device, save_figure)

MODES = ("train_fwd", "train_fwdbwd", "eval_fwd")
# Elements moved per input element: (two-pass model, floor).
BYTE_MODEL = {"train_fwd": (3, 2), "train_fwdbwd": (8, 5), "eval_fwd": (2, 2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def tutorial_shapes(batch: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"mlp-bn1d b{batch}", (batch, 100)),
        (f"conv-bn1 b{batch}", (batch, 6, 28, 28)),
        (f"conv-bn2 b{batch}", (batch, 16, 10, 10)),
    ]


def resnet_shapes(batch: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [(batch, 64, 112, 112), (batch, 256, 56, 56), (batch, 512, 28, 28), (batch, 2048, 7, 7)]
    out = [(f"resnet b{batch}", s) for s in shapes]
    out.append(("resnet-cifar b256" if batch == 64 else f"resnet-cifar b{batch * 4}", (batch * 4, 32, 32, 32)))
    return out


BN1D_SHAPES = [("bn1d", (8192, 1024)), ("bn1d", (65536, 256))]


def cache_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Tensors of 1 to 64 MiB in float32 (half that in bfloat16), where the
    cache effects change: from within a core's L2 share, through fitting the
    last-level cache of a small machine (32 MiB), to well past it."""
    shapes = [(16, 64, 16, 16), (32, 64, 16, 16), (16, 64, 32, 32), (32, 96, 24, 24), (32, 64, 32, 32),
              (32, 128, 32, 32), (64, 128, 32, 32), (64, 64, 64, 64)]
    return [(f"cache {math.prod(s) * 4 / 2**20:.3g}MiB", s) for s in shapes]


def default_shapes(device: str) -> list[tuple[str, tuple[int, ...]]]:
    resnet_batch = 64 if device == "cuda" else 32
    shapes = tutorial_shapes(64) + tutorial_shapes(1024) + resnet_shapes(resnet_batch) + BN1D_SHAPES
    return shapes + cache_shapes() if device == "cpu" else shapes


def quick_shapes(device: str) -> list[tuple[str, tuple[int, ...]]]:
    return [("mlp-bn1d b64", (64, 100)), ("conv-bn1 b64", (64, 6, 28, 28)), ("conv-bn2 b1024", (1024, 16, 10, 10))]


@dataclass
class Case:
    label: str
    shape: tuple[int, ...]
    dtype: str
    fmt: str  # "nchw" or "channels_last"
    mode: str
    times_us: dict[str, float] = field(default_factory=dict)
    # CUDA: fastbn under each forced path (fastbn/cuda_paths.py), where a mode has two.
    path_times_us: dict[str, float] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_element(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def name(self) -> str:
        return f"{self.mode} {self.dtype} {self.fmt} {'x'.join(map(str, self.shape))}"


def make_cases(shapes, dtypes, formats, modes) -> list[Case]:
    cases = []
    for label, shape in shapes:
        for dtype in dtypes:
            for fmt in formats:
                if fmt == "channels_last" and len(shape) not in (4, 5):
                    continue
                for mode in modes:
                    cases.append(Case(label, tuple(shape), dtype, fmt, mode))
    return cases


def cpu_caches() -> dict[str, str]:
    """CPU cache sizes as Linux reports them for cpu0, e.g. {"L1d": "48K", "L2": "2048K", "L3": "..."}."""
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
            caches[f"L{level}{suffix}"] = (index / "size").read_text().strip()
    return caches


def caches_text(env: dict) -> str:
    return ", ".join(f"{level} {size}" for level, size in env.get("cpu_caches", {}).items()) or "unknown"


def last_level_cache_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).L2_cache_size
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or (32 << 20)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], number: int, device: str) -> float:
    """Mean seconds per call over `number` back-to-back calls: CUDA events
    around the block on the GPU, the host clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    begin = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - begin) / number


def calls_per_block(fn: Callable[[], object], device: str, target: float) -> int:
    """Calls that take about `target` seconds (at least one); also warms up."""
    number = 1
    while True:
        elapsed = seconds_per_call(fn, number, device) * number
        if elapsed >= target / 2 or number >= 1 << 16:
            return max(1, round(number * target / max(elapsed, 1e-9)))
        number *= 4


def interleaved_medians(steps: dict, device: str, min_run_time: float, rounds: int = 6) -> dict:
    """Median seconds per call of each step, timed in alternating rounds.

    Each step gets about min_run_time, in `rounds` slices taken in turn (each
    round starting with the next step), so that drift in the machine's speed (other tenants of a shared host, clock
    changes) falls on all of them alike instead of on whichever ran last.
    A slice is several blocks of calls (a block lasts about a fifth of a
    slice, and at least one call); the result is the median over all blocks.
    The garbage collector is off while timing, as in timeit.
    """
    slice_seconds = min_run_time / rounds
    for fn in steps.values():
        for _ in range(3):  # warm-up (and compilation for torch.compile)
            fn()
    sync(device)
    numbers = {key: calls_per_block(fn, device, slice_seconds / 5) for key, fn in steps.items()}
    times: dict = {key: [] for key in steps}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = list(steps.items())
        for round_index in range(rounds):
            # Each round starts with the next step, so that none always runs
            # first (or right after the same neighbour).
            shift = round_index % len(order)
            for key, fn in order[shift:] + order[:shift]:
                spent = 0.0
                while True:
                    per_call = seconds_per_call(fn, numbers[key], device)
                    times[key].append(per_call)
                    spent += per_call * numbers[key]
                    if spent >= slice_seconds * 0.9:
                        break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: statistics.median(t) for key, t in times.items()}


def copy_bandwidth(device: str, min_run_time: float) -> float:
    """Bytes per second moved by dst.copy_(src) on buffers far larger than the cache."""
    nbytes = max(4 * last_level_cache_bytes(device), 256 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, min_run_time)["copy"]
    return 2 * nbytes / seconds


class Inputs:
    """Random inputs for one case; large ones rotate through several copies."""

    def __init__(self, case: Case, device: str, cache_bytes: int):
        dtype = DTYPES[case.dtype]
        nbytes = case.numel * case.bytes_per_element
        copies = 1 if nbytes * 4 < cache_bytes else min(8, max(2, math.ceil(3 * cache_bytes / nbytes)))
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        C = case.shape[1]
        needs_grad = case.mode == "train_fwdbwd"

        def tensor():
            t = torch.randn(case.shape, device=device, dtype=dtype) * 2 + 0.5
            if case.fmt == "channels_last":
                t = t.contiguous(memory_format=fmt)
            return t.requires_grad_(needs_grad)

        self.xs = [tensor() for _ in range(copies)]
        self.dys = [torch.randn_like(x).detach() for x in self.xs] if needs_grad else None
        pdtype = dtype if dtype == torch.float64 else torch.float32  # autocast's choice
        self.weight = (torch.rand(C, device=device, dtype=pdtype) + 0.5).requires_grad_(needs_grad)
        self.bias = torch.randn(C, device=device, dtype=pdtype).requires_grad_(needs_grad)
        self.running_mean = torch.randn(C, device=device, dtype=pdtype)
        self.running_var = torch.rand(C, device=device, dtype=pdtype) + 0.5
        self.next = 0

    def take(self):
        i = self.next
        self.next = (i + 1) % len(self.xs)
        return self.xs[i], (self.dys[i] if self.dys else None)


def make_step(fn, case: Case, inputs: Inputs) -> Callable[[], object]:
    training = case.mode != "eval_fwd"
    w, b, rm, rv = inputs.weight, inputs.bias, inputs.running_mean, inputs.running_var
    if case.mode == "train_fwdbwd":
        def step():
            x, dy = inputs.take()
            y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
            return torch.autograd.grad(y, (x, w, b), dy)
    else:
        def step():
            x, _ = inputs.take()
            with torch.no_grad():
                return fn(x, rm, rv, w, b, training, 0.1, 1e-5)
    return step


def torch_without_cudnn(*args):
    with torch.backends.cudnn.flags(enabled=False):
        return F.batch_norm(*args)


def contenders(device: str, compile_: bool) -> dict[str, Callable]:
    out = {"fastbn": fastbn.batch_norm, "torch": F.batch_norm}
    if device == "cuda":
        out["torch_no_cudnn"] = torch_without_cudnn
        if compile_:
            out["torch_compile"] = torch.compile(F.batch_norm)
    return out


def environment(device: str, copy_bw: float) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
        "cpu_model": cpu_model(),
        "cpu_caches": cpu_caches(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "fastbn": fastbn.__version__,
        "fastbn_build": {k: v for k, v in fastbn.build_info().items() if k != "library"},
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "byte_model": {m: {"two_pass": a, "floor": f} for m, (a, f) in BYTE_MODEL.items()},
    }
    return info


def case_metrics(case: Case, copy_bw: float) -> dict:
    t = {k: v / 1e6 for k, v in case.times_us.items()}
    nbytes = case.numel * case.bytes_per_element
    model, floor = BYTE_MODEL[case.mode]
    ours = t["fastbn"]
    others = {k: v for k, v in t.items() if k != "fastbn"}
    best_torch = min(others.values())
    return {
        "speedup": {k: v / ours for k, v in others.items()},
        "ratio_vs_best_torch": ours / best_torch,
        "fastbn_fraction_of_copy_bw": model * nbytes / ours / copy_bw,
        "fastbn_fraction_of_copy_bw_floor": floor * nbytes / ours / copy_bw,
        "torch_fraction_of_copy_bw": model * nbytes / t["torch"] / copy_bw,
        "floor_us": floor * nbytes / copy_bw * 1e6,
    }


def geomean(values) -> float:
    values = list(values)
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def summarize(cases: list[Case], metrics: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rows = [m for c, m in zip(cases, metrics) if c.mode == mode]
        if not rows:
            continue
        out[mode] = {
            "cases": len(rows),
            "geomean_speedup": {k: geomean(r["speedup"][k] for r in rows) for k in rows[0]["speedup"]},
            "worst_ratio_vs_best_torch": max(r["ratio_vs_best_torch"] for r in rows),
            **layout_summary([c for c in cases if c.mode == mode]),
        }
    return out


def layout_summary(cases: list[Case]) -> dict:
    """For tensors timed in both formats: the worst ratio of fastbn's
    channels_last time to its NCHW time, and of its channels_last time to the
    faster of torch's two formats (below 1: fastbn is faster)."""
    pairs: dict[tuple, dict[str, Case]] = {}
    for c in cases:
        pairs.setdefault((c.label, c.shape, c.dtype), {})[c.fmt] = c
    both = [p for p in pairs.values() if {"nchw", "channels_last"} <= set(p)]
    if not both:
        return {}
    return {
        "format_pairs": len(both),
        "worst_channels_last_over_nchw": max(p["channels_last"].times_us["fastbn"] / p["nchw"].times_us["fastbn"]
                                             for p in both),
        "worst_channels_last_vs_torch_best_format": max(
            p["channels_last"].times_us["fastbn"] / min(p[f].times_us[n] for f in p for n in p[f].times_us
                                                        if n != "fastbn")
            for p in both),
    }


def format_table(cases: list[Case], metrics: list[dict], names: list[str]) -> str:
    """A plain-text table whose columns are as wide as their longest entry."""
    others = [n for n in names if n != "fastbn"]
    header = ["case", "shape", *(f"{n} us" for n in names), *(f"x vs {n}" for n in others), "%bw"]
    rows = [
        [f"{c.mode} {c.dtype} {c.fmt} {c.label}", "x".join(map(str, c.shape)),
         *(f"{c.times_us[n]:.1f}" for n in names), *(f"{m['speedup'][n]:.2f}" for n in others),
         f"{100 * m['fastbn_fraction_of_copy_bw']:.0f}"]
        for c, m in zip(cases, metrics)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):  # the case name left-aligned, the numbers right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths)))

    head = line(header)
    return "\n".join([head, "-" * len(head), *(line(row) for row in rows)])


def worst_ratio_label(names: list[str]) -> str:
    """What summarize's worst_ratio_vs_best_torch is, in words."""
    torch_contenders = [n for n in names if n != "fastbn"]
    versus = "torch" if len(torch_contenders) == 1 else "fastest torch variant"
    return f"worst time ratio fastbn/{versus} (below 1 = faster)"


LAYOUT_LABEL = "worst fastbn channels_last/NCHW time"
LAYOUT_TORCH_LABEL = "worst fastbn channels_last/torch best format time"


def markdown_summary(env: dict, cases: list[Case], metrics: list[dict], summary: dict, names: list[str]) -> str:
    lines = [
        f"# fastbn kernel benchmark ({env['device']})",
        "",
        f"{env['date']} on {env['device_name']} ({env['cpu_model']}; caches {caches_text(env)}), "
        f"{env['threads']} threads, "
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"copy bandwidth {env['copy_bandwidth_GBps']:.1f} GB/s.",
        "",
        "Speedup = contender time / fastbn time (> 1: fastbn is faster). %bw: fastbn's effective "
        "bandwidth under the two-pass byte model (3N fwd, 5N bwd, 2N eval) as a share of the copy bandwidth.",
        "",
        "| mode | cases | " + " | ".join(f"geomean vs {n}" for n in names if n != "fastbn") + f" | {worst_ratio_label(names)} |",
        "|---|---|" + "---|" * (len(names) - 1) + "---|",
    ]
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {s['cases']} | "
            + " | ".join(f"{s['geomean_speedup'][n]:.2f}x" for n in names if n != "fastbn")
            + f" | {s['worst_ratio_vs_best_torch']:.2f} |"
        )
    layouts = {mode: s for mode, s in summary.items() if "format_pairs" in s}
    if layouts:
        lines += ["", f"| mode | tensors in both formats | {LAYOUT_LABEL} | {LAYOUT_TORCH_LABEL} |", "|---|---|---|---|"]
        lines += [f"| {mode} | {s['format_pairs']} | {s['worst_channels_last_over_nchw']:.2f} | "
                  f"{s['worst_channels_last_vs_torch_best_format']:.2f} |" for mode, s in layouts.items()]
    lines += [
        "",
        "| case | shape | " + " | ".join(f"{n} us" for n in names) + " | "
        + " | ".join(f"x vs {n}" for n in names if n != "fastbn") + " | %bw |",
        "|---|---|" + "---|" * len(names) + "---|" * (len(names) - 1) + "---|",
    ]
    for c, m in zip(cases, metrics):
        lines.append(
            f"| {c.mode} {c.dtype} {c.fmt} {c.label} | {'x'.join(map(str, c.shape))} | "
            + " | ".join(f"{c.times_us[n]:.1f}" for n in names)
            + " | "
            + " | ".join(f"{m['speedup'][n]:.2f}" for n in names if n != "fastbn")
            + f" | {100 * m['fastbn_fraction_of_copy_bw']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(cases: list[Case], metrics: list[dict], names: list[str], out: Path, env: dict) -> list[str]:
    """speedup.png and bandwidth.png: one bar group per case, the figure as
    tall as its cases need, the machine in the subtitle."""
    plt = pyplot()
    labels = [f"{c.mode} {c.dtype} {c.fmt} {'x'.join(map(str, c.shape))}" for c in cases]
    rows = range(len(cases))
    # About 0.2 in per case keeps 10-point labels apart; the rest is titles and axis.
    size = (12, 0.2 * len(cases) + 2.2)
    subtitle = machine_line(env)
    others = [n for n in names if n != "fastbn"]

    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        bar = 0.8 / len(others)
        for k, n in enumerate(others):
            ax.barh([i - 0.4 + (k + 0.5) * bar for i in rows], [m["speedup"][n] for m in metrics],
                    height=bar, label=f"vs {n}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(rows), labels)
        ax.set_ylim(len(cases) - 0.5, -0.5)  # first case on top, no empty band
        ax.set_xscale("log")
        label_log_axis(ax, "x")
        ax.set_xlabel("speedup of fastbn (contender time / fastbn time; right of the line = faster)")
        ax.grid(axis="x", alpha=0.3)
        if len(others) > 1:
            ax.legend(loc="lower right")
        save_figure(fig, out / "speedup.png", "fastbn speedup over " + ", ".join(others), subtitle)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=size, layout="constrained")
        ax.barh([i - 0.2 for i in rows], [100 * m["fastbn_fraction_of_copy_bw"] for m in metrics],
                height=0.4, label="fastbn")
        ax.barh([i + 0.2 for i in rows], [100 * m["torch_fraction_of_copy_bw"] for m in metrics],
                height=0.4, label="torch")
        ax.set_yticks(list(rows), labels)
        ax.set_ylim(len(cases) - 0.5, -0.5)
        ax.tick_params(axis="x", labeltop=True)
        ax.set_xlabel("effective bandwidth, % of copy bandwidth (two-pass byte model)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right")
        save_figure(fig, out / "bandwidth.png", "fraction of copy bandwidth", subtitle)
        plt.close(fig)
    return ["speedup.png", "bandwidth.png"]


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    dims = tuple(int(d) for d in text.lower().replace("(", "").replace(")", "").replace(",", "x").split("x") if d)
    if len(dims) < 2:
        raise argparse.ArgumentTypeError(f"shape needs at least 2 dimensions, got {text!r}")
    return ("custom", dims)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    parser.add_argument("--suite", choices=["default", "cache"], default="default",
                        help="cache: only the CPU suite's 1-64 MiB tensors (cache_shapes), in both formats")
    parser.add_argument("--shape", dest="shapes", type=parse_shape, action="append",
                        help="a shape such as 64x256x56x56 (repeatable); default: the suite")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16,fp64 "
                        "(default: fp32,fp16,bf16 on cuda, fp32,bf16 on cpu)")
    parser.add_argument("--formats", default="nchw,channels_last", help="comma list of nchw,channels_last")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per contender and case (default 0.25, quick 0.05)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: a new results/runs/bench-<device>-<host>-<date>/)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--tune", action="store_true",
                        help="GPU only: measure where the CUDA single pass stops beating two passes and write "
                             "the path table the kernels read (--out FILE, default fastbn.cuda_paths.table_file())")
    return parser.parse_args(argv)


def run(args) -> dict:
    device = resolve_device(args.device, "fastbn.bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if device == "cuda" else "fp32,bf16")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    formats = args.formats.split(",")
    modes = args.modes.split(",")
    if args.quick:
        shapes = args.shapes or quick_shapes(device)
        dtypes = dtypes if args.dtypes else ["fp32", "bf16"]
    elif args.suite == "cache":
        shapes = args.shapes or cache_shapes()
    else:
        shapes = args.shapes or default_shapes(device)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.25)
    out = args.out or default_run_dir("bench", device)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    copy_bw = copy_bandwidth(device, min_run_time)
    env = environment(device, copy_bw)
    fns = contenders(device, compile_=not args.no_compile and device == "cuda")
    names = list(fns)
    cases = make_cases(shapes, dtypes, formats, modes)
    cache = last_level_cache_bytes(device)
    partial = out / "results.partial.json"  # what is done so far, if the run is cut short
    # The memory formats of a shape, dtype and mode are timed together, every
    # contender on each, so that the layouts are compared under the same drift.
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.label, case.shape, case.dtype, case.mode), []).append(case)
    done: list[Case] = []
    progress = tqdm(total=len(cases), desc="fastbn.bench", unit="case", disable=args.no_progress)
    for index, group in enumerate(groups.values(), 1):
        inputs = [Inputs(case, device, cache) for case in group]
        steps = {(i, name): make_step(fn, case, inputs[i])
                 for i, case in enumerate(group) for name, fn in fns.items()}
        if device == "cuda":
            steps.update(cuda_paths.path_steps(group, inputs, make_step, fastbn.batch_norm))
        for (i, name), seconds in interleaved_medians(steps, device, min_run_time).items():
            if name.startswith("path:"):
                group[i].path_times_us[name[len("path:"):]] = 1e6 * seconds
            else:
                group[i].times_us[name] = 1e6 * seconds
        del inputs, steps
        done += group
        progress.update(len(group))
        if index % 5 == 0:
            partial.write_text(json.dumps(
                {"environment": env, "contenders": names,
                 "cases": [dict(asdict(c), name=c.name) for c in done]}, indent=1))
    progress.close()
    metrics = [case_metrics(c, copy_bw) for c in cases]
    summary = summarize(cases, metrics)

    table = format_table(cases, metrics, names)
    print(f"\n{env['device_name']} ({env['cpu_model']}; caches {caches_text(env)}), threads {env['threads']}, "
          f"torch {env['torch']}, copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(table)
    for mode, s in summary.items():
        speedups = ", ".join(f"{k} {v:.2f}x" for k, v in s["geomean_speedup"].items())
        print(f"{mode}: geomean speedup of fastbn over {speedups}; "
              f"{worst_ratio_label(names)}: {s['worst_ratio_vs_best_torch']:.2f}")
        if "format_pairs" in s:
            print(f"{mode}: {LAYOUT_LABEL} {s['worst_channels_last_over_nchw']:.2f}, "
                  f"{LAYOUT_TORCH_LABEL} {s['worst_channels_last_vs_torch_best_format']:.2f}")

    result = {
        "environment": env,
        "contenders": names,
        "cases": [dict(asdict(c), name=c.name, numel=c.numel, **m) for c, m in zip(cases, metrics)],
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    paths_table = cuda_paths.format_paths(cases, [n for n in names if n != "fastbn"])
    if paths_table:
        print("\nfastbn per CUDA path (FASTBN_CUDA_PATH), beside torch:\n" + paths_table)
        (out / "paths.txt").write_text(paths_table + "\n")
    partial.unlink(missing_ok=True)
    (out / "summary.md").write_text(markdown_summary(env, cases, metrics, summary, names))
    files = ["results.json", "summary.md"]
    if not args.no_plots:
        files += plot(cases, metrics, names, out, env)
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fused"]:  # the fused BN+ReLU benchmark lives in fastbn/bench_fused.py
        from .bench_fused import main as fused_main
        return fused_main(argv[1:])
    args = parse_args(argv)
    if args.tune:
        cuda_paths.tune(args.out, args.min_run_time or 0.1)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
