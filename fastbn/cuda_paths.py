"""The CUDA kernels' paths, for the benchmark: each forced path timed beside
the contenders (``python -m fastbn.bench --device cuda``), and the tuner that
measures the crossovers and writes the path table the kernels read
(``python -m fastbn.bench --tune``).

Paths (csrc/cuda/batch_norm_cuda.cu): training forward and a training
backward that computes grad_input run either as one cooperative launch that
keeps the data on chip ("single_pass", when it fits) or as a reduction plus
an elementwise kernel ("two_pass"). ``FASTBN_CUDA_PATH=auto|single_pass|two_pass``
picks one per call (read at every call); auto consults the table: the single
pass is taken up to ``single_pass_max_bytes_forward`` / ``_backward`` bytes
of input when it fits, each cooperative block getting
1 / ``single_pass_blocks_per_sm`` of an SM's shared memory. The table file is
``FASTBN_CUDA_PATH_TABLE``, else ``$XDG_CACHE_HOME/fastbn/cuda_path_table.json``,
else ``~/.cache/fastbn/cuda_path_table.json``; the kernels read it at the
first call that needs it (once per file name per process).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable

PATHS = ("single_pass", "two_pass")
# The defaults compiled into the kernels (PathTable in batch_norm_cuda.cu).
DEFAULT_TABLE = {"single_pass_max_bytes_forward": 8 << 20, "single_pass_max_bytes_backward": 8 << 20,
                 "single_pass_blocks_per_sm": 2}
BLOCKS_PER_SM_CHOICES = (1, 2, 4)


def table_file() -> Path:
    """Where the kernels look for the path table (as path_table_file() in C++)."""
    if os.environ.get("FASTBN_CUDA_PATH_TABLE"):
        return Path(os.environ["FASTBN_CUDA_PATH_TABLE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fastbn" / "cuda_path_table.json"
    return Path.home() / ".cache" / "fastbn" / "cuda_path_table.json"


@contextlib.contextmanager
def forced_path(path: str | None, table: Path | None = None):
    """FASTBN_CUDA_PATH (and optionally FASTBN_CUDA_PATH_TABLE) set for the block."""
    saved = {k: os.environ.get(k) for k in ("FASTBN_CUDA_PATH", "FASTBN_CUDA_PATH_TABLE")}
    if path is not None:
        os.environ["FASTBN_CUDA_PATH"] = path
    if table is not None:
        os.environ["FASTBN_CUDA_PATH_TABLE"] = str(table)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_path(step: Callable[[], object], path: str) -> Callable[[], object]:
    """The step (forward and backward alike) under a forced path. Switching
    the environment costs about a microsecond per call, counted in the time."""
    def run():
        with forced_path(path):
            return step()
    return run


def does_not_fit(error: RuntimeError) -> bool:
    return "does not fit the single-pass kernel" in str(error)


def path_steps(group, inputs, make_step, batch_norm) -> dict:
    """Steps keyed (case index, "path:<path>") for the modes that have two
    paths; a forced single pass that does not fit the device is left out."""
    steps = {}
    for i, case in enumerate(group):
        if case.mode == "eval_fwd":
            continue  # one path only
        for path in PATHS:
            step = with_path(make_step(batch_norm, case, inputs[i]), path)
            try:
                step()
            except RuntimeError as error:
                if path == "single_pass" and does_not_fit(error):
                    continue
                raise
            steps[(i, f"path:{path}")] = step
    return steps


def format_paths(cases, torch_names: list[str]) -> str:
    """Per case with two paths: fastbn per path and auto, beside the torch
    contenders, and which path is faster."""
    header = ["case", "auto us", *(f"{p} us" for p in PATHS), *(f"{n} us" for n in torch_names), "faster path"]
    rows = []
    for c in cases:
        if not c.path_times_us:
            continue
        times = [c.path_times_us.get(p) for p in PATHS]
        present = {p: t for p, t in zip(PATHS, times) if t is not None}
        rows.append([c.name, f"{c.times_us['fastbn']:.1f}",
                     *("-" if t is None else f"{t:.1f}" for t in times),
                     *(f"{c.times_us[n]:.1f}" for n in torch_names),
                     min(present, key=present.get)])
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# ---------------------------------------------------------------------------
# Tuning: the crossover from measurements (pure functions, unit-tested on
# synthetic timings), and the GPU sweep that measures them.
# ---------------------------------------------------------------------------

def crossover_bytes(points: list[tuple[int, float | None, float]]) -> int:
    """points: (input bytes, single-pass seconds or None if it did not fit,
    two-pass seconds). The largest size up to which the single pass is at
    least as fast at every measured size; 0 if it never is."""
    limit = 0
    for nbytes, single, two in sorted(points):
        if single is None or single > two:
            break
        limit = nbytes
    return limit


def best_blocks_per_sm(single_times: dict[int, dict[int, float | None]]) -> int:
    """single_times[blocks_per_sm][bytes] = single-pass seconds (None: did not
    fit). The choice with the lowest geometric mean over the sizes every
    choice fits; ties and no common size go to the compiled default."""
    default = DEFAULT_TABLE["single_pass_blocks_per_sm"]
    common = set.intersection(*({b for b, t in times.items() if t is not None} for times in single_times.values()))
    if not common:
        return default

    def score(bps):
        return math.fsum(math.log(single_times[bps][b]) for b in common)

    return min(sorted(single_times, key=lambda b: (b != default, b)), key=score)


def make_table(forward: list, backward: list, blocks_per_sm: int, device_name: str) -> dict:
    return {
        "device": device_name,
        "single_pass_max_bytes_forward": crossover_bytes(forward),
        "single_pass_max_bytes_backward": crossover_bytes(backward),
        "single_pass_blocks_per_sm": blocks_per_sm,
        "measurements": {"forward": forward, "backward": backward},
    }


def write_table(table: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)  # the kernels never read a half-written table
    return path


def tune_shapes() -> list[tuple[int, ...]]:
    """fp32 NCHW inputs from 64 KiB to 64 MiB: C = 16 and 64 at 28x28 and 56x56."""
    shapes = []
    for c, hw in ((16, 28), (64, 56)):
        n = 1
        while n * c * hw * hw * 4 <= 64 << 20:
            if n * c * hw * hw * 4 >= 64 << 10:
                shapes.append((n, c, hw, hw))
            n *= 2
    return sorted(set(shapes), key=math.prod)


def tune(out: Path | None, min_run_time: float) -> dict:
    """Measures single pass against two passes for training forward and
    forward+backward over tune_shapes(), at each blocks-per-SM choice, and
    writes the table (to `out`, default table_file())."""
    import tempfile

    import torch

    import fastbn
    from fastbn import bench

    if not torch.cuda.is_available():
        raise SystemExit("--tune measures the CUDA kernels' crossovers on a GPU; this machine has no CUDA device")
    device = "cuda"
    cache = bench.last_level_cache_bytes(device)
    huge = {"single_pass_max_bytes_forward": 1 << 62, "single_pass_max_bytes_backward": 1 << 62}
    single: dict[str, dict[int, dict[int, float | None]]] = {"train_fwd": {}, "train_fwdbwd": {}}
    two: dict[str, dict[int, float]] = {"train_fwd": {}, "train_fwdbwd": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for bps in BLOCKS_PER_SM_CHOICES:
            table = write_table(dict(huge, single_pass_blocks_per_sm=bps), Path(tmp) / f"bps{bps}.json")
            with forced_path(None, table):
                for shape in tune_shapes():
                    for mode in single:
                        case = bench.Case("tune", shape, "fp32", "nchw", mode)
                        inputs = bench.Inputs(case, device, cache)
                        steps = path_steps([case], [inputs], bench.make_step, fastbn.batch_norm)
                        if bps != BLOCKS_PER_SM_CHOICES[0]:
                            steps.pop((0, "path:two_pass"), None)  # the same kernels at every choice
                        times = bench.interleaved_medians(steps, device, min_run_time)
                        nbytes = math.prod(shape) * 4
                        single[mode].setdefault(bps, {})[nbytes] = times.get((0, "path:single_pass"))
                        if (0, "path:two_pass") in times:
                            two[mode][nbytes] = times[(0, "path:two_pass")]
                        print(f"blocks/SM {bps} {mode} {shape}: " + ", ".join(
                            f"{k[1][5:]} {v * 1e6:.1f} us" for k, v in times.items()), flush=True)
    merged = {b: {n: (single["train_fwd"][b][n] or 0) + (single["train_fwdbwd"][b][n] or 0)
                  if single["train_fwd"][b][n] is not None and single["train_fwdbwd"][b][n] is not None else None
                  for n in single["train_fwd"][b]} for b in single["train_fwd"]}
    bps = best_blocks_per_sm(merged)
    forward = [(n, single["train_fwd"][bps][n], two["train_fwd"][n]) for n in sorted(two["train_fwd"])]
    # The backward's crossover from forward+backward times less the forward's.
    backward = [(n, None if single["train_fwdbwd"][bps][n] is None or single["train_fwd"][bps][n] is None
                 else single["train_fwdbwd"][bps][n] - single["train_fwd"][bps][n],
                 two["train_fwdbwd"][n] - two["train_fwd"][n]) for n in sorted(two["train_fwdbwd"])]
    result = make_table(forward, backward, bps, torch.cuda.get_device_name(0))
    path = write_table(result, out or table_file())
    print(f"wrote {path}: forward single pass up to {result['single_pass_max_bytes_forward']} bytes, "
          f"backward up to {result['single_pass_max_bytes_backward']} bytes, {bps} blocks per SM")
    return result
