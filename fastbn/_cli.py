"""What the command-line entry points (fastbn.bench, fastbn.mnist,
fastbn.demo) share: the device choice and where a run's files go."""
from __future__ import annotations

import datetime as _dt
import socket
from pathlib import Path
from typing import Optional

import torch

# Runs write here by default: a folder per run, which .gitignore covers, so a
# run never replaces the reference results committed in results/<name>/.
RUNS_DIR = Path("results") / "runs"


def resolve_device(requested: Optional[str], prog: str) -> str:
    """The device to run on: `requested`, else cuda when a GPU is there.

    Asking for cuda without a GPU ends the program with one line, before
    anything is written.
    """
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"{prog}: --device cuda, but no CUDA device is available "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    return requested


def default_run_dir(kind: str, device: str) -> Path:
    """results/runs/<kind>-<device>-<host>-<UTC date and time>/."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%SZ")
    host = socket.gethostname().split(".")[0] or "host"
    return RUNS_DIR / f"{kind}-{device}-{host}-{stamp}"


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B13"."""
    import contextlib
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(env: dict) -> str:
    """The subtitle of a run's plots: where, how many threads, which torch, when."""
    where = env["device_name"] if env["device"] == "cuda" else env.get("cpu_model") or env["device_name"]
    threads = f"{env['threads']} thread{'' if env['threads'] == 1 else 's'}"
    return f"{where}, {threads}, torch {env['torch']}, {env['date'][:10]}"


# Plots are read scaled down on a screen: fonts a little larger than matplotlib's.
PLOT_STYLE = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 14,
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, subtitle: str) -> None:
    """Titles the figure (a bold title and the machine line under it) and
    saves it cropped to its content."""
    fig.suptitle(f"{title}\n{subtitle}", fontsize=PLOT_STYLE["figure.titlesize"])
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)


def label_log_axis(ax, suffix: str = "") -> None:
    """Labels a log-scale x axis at 1-2-5 steps (e.g. "2x", "50") instead of
    powers of ten only, on both the bottom and top of the plot."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = ax.get_xlim()
    steps = [m * 10.0 ** e for e in range(-3, 6) for m in (1, 2, 5)]
    ax.set_xticks([t for t in steps if low <= t <= high])
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}{suffix}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labeltop=True)
