"""The tutorial's MNIST experiments, with torch's BatchNorm, fastbn's, and none.

    python -m fastbn.mnist [--dataset mnist|fashion-mnist] [--data-root DIR] [--epochs N] ...

Trains the tutorial's MLP (784 -> 100 -> BN1d -> ReLU -> 10, 10 epochs) and
conv net (Conv 1->6 -> BN2d -> ReLU -> pool -> Conv 6->16 -> BN2d -> ReLU ->
pool -> Linear 400->10, 5 epochs) with SGD lr 0.1, batch 64 (test 128),
inputs scaled to [-1, 1]. The torch and fastbn variants share the seed, the
initial weights and the data order, so their curves should agree to rounding.
Also times one training step (forward + backward + SGD step, data resident on
the device) at batch 64 and 1024: eager, and on CUDA captured in a CUDA graph.

Data: --dataset mnist or fashion-mnist from --data-root (default
~/.cache/fastbn/data), --download to fetch it there. Without --dataset, MNIST,
else Fashion-MNIST (also from Debian's dataset-fashion-mnist files), saying so.

Writes results.json, summary.md, curves.png and step_times.png to --out, by
default a new folder results/runs/mnist-<device>-<host>-<date>/ (ignored by
git), once the run is done.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import shutil
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import fastbn

# Timing with fastbn.bench's loop rather than torch.utils.benchmark, whose
# import pulls in torch.utils.cpp_extension and with it a warning about
# CUDA_HOME on machines without a GPU.
from fastbn.bench import interleaved_medians
from fastbn._cli import (PLOT_STYLE, cpu_model, default_run_dir, label_log_axis, machine_line, pyplot,
                         resolve_device, save_figure)
from fastbn.models import MODELS

VARIANTS = ("torch", "fastbn", "none")
VARIANT_LABELS = {"torch": "torch BN", "fastbn": "fastbn BN", "none": "no BN"}
DEFAULT_EPOCHS = {"mlp": 10, "conv": 5}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "fastbn" / "data"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFound(RuntimeError):
    pass


def _stage_debian_fashion_mnist(root: Path) -> None:
    """Decompresses Debian's dataset-fashion-mnist files to where torchvision looks."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        target = raw / name
        if target.exists():
            continue
        source = DEBIAN_FASHION_MNIST / f"{name}.gz"
        with gzip.open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _torchvision_dataset(name: str, root: Path, download: bool):
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)


def _find_dataset(name: str, root: Path, download: bool, tried: list[str]):
    """(train, test, description) of dataset `name`, or None; appends each
    place looked at, and why it failed, to `tried`."""
    folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    try:
        train, test = _torchvision_dataset(name, root, download)
        return train, test, f"{name} from {root}"
    except (RuntimeError, ValueError, OSError, EOFError) as error:  # what missing or bad files raise
        if download:
            tried.append(f"downloading {DATASET_NAMES[name]} into {folder} failed: {_one_line(error)}")
        elif "dataset not found" in str(error).lower():
            tried.append(f"{DATASET_NAMES[name]} is not in {folder}")
        else:  # there, but unreadable (truncated or corrupt files)
            tried.append(f"{DATASET_NAMES[name]} in {folder} could not be read: {_one_line(error)}")
    if name == "fashion-mnist":
        if all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in IDX_FILES):
            _stage_debian_fashion_mnist(root)
            train, test = _torchvision_dataset(name, root, False)
            return train, test, f"fashion-mnist from {DEBIAN_FASHION_MNIST} (Debian's dataset-fashion-mnist)"
        tried.append(f"Debian's dataset-fashion-mnist files are not in {DEBIAN_FASHION_MNIST}")
    return None


def load_data(dataset: str | None, root: Path, download: bool = False):
    """Returns ((train_x, train_y), (test_x, test_y), description).

    Images are float32 in [-1, 1] of shape (N, 1, 28, 28), as the tutorial's
    ToTensor + Normalize((0.5,), (0.5,)). dataset None means not chosen:
    MNIST, else Fashion-MNIST (same format), and the description says so. A
    dataset chosen explicitly is used or the call fails with DataNotFound,
    naming every place tried (and the download error, if one was tried).
    """
    tried: list[str] = []
    wanted = dataset or "mnist"
    found = _find_dataset(wanted, root, download, tried)
    if found is None and dataset is None:
        found = _find_dataset("fashion-mnist", root, False, tried)
        if found is not None:
            train, test, description = found
            found = train, test, (f"{description} — MNIST not available ({tried[0]}), using Fashion-MNIST "
                                  "instead (same format: 28x28 grey images, 10 classes)")
    if found is None:
        hints = [] if download else ["`--download` fetches MNIST or Fashion-MNIST where the internet is reachable"]
        hints += [f"the IDX files can be copied into {root}/MNIST/raw or {root}/FashionMNIST/raw",
                  "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` provides Fashion-MNIST",
                  "`--random-data` trains on random stand-in data"]
        raise DataNotFound(
            f"no {DATASET_NAMES[wanted]} data: " + "; ".join(tried) + ". To get data: " + "; ".join(hints) + "."
        )
    train, test, description = found

    def tensors(ds):
        x = ds.data.to(torch.float32).div_(255).mul_(2).sub_(1).unsqueeze(1)
        return x, ds.targets.clone()

    return tensors(train), tensors(test), description


def random_data(n_train: int = 6400, n_test: int = 1280, seed: int = 0):
    """Stand-in data of the same shape, for runs without any dataset files."""
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))
    return make(n_train), make(n_test), "random data (no dataset files)"


def build(model_name: str, norm: str, seed: int, device: str,
          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    # BatchNorm's initialisation draws no random numbers, so for one seed the
    # three variants get the same conv/linear weights.
    torch.manual_seed(seed)
    return MODELS[model_name](norm).to(device=device, dtype=dtype)


@torch.no_grad()
def evaluate(model, data, batch: int, device: str) -> tuple[float, float]:
    model.eval()
    x_all, y_all = data
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x_all), batch):
        x = x_all[i:i + batch].to(device=device, dtype=next(model.parameters()).dtype)
        y = y_all[i:i + batch].to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train()
    return loss_sum / len(x_all), correct / len(x_all)


def train(model_name: str, norm: str, train_data, test_data, *, epochs: int, batch: int = 64,
          test_batch: int = 128, lr: float = 0.1, seed: int = 0, device: str = "cpu",
          limit_batches: int | None = None, evaluate_each_epoch: bool = True,
          dtype: torch.dtype = torch.float32) -> dict:
    """Trains one variant; returns per-epoch metrics and every step's loss."""
    model = build(model_name, norm, seed, device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed + 1)  # the same data order for every variant
    x_all, y_all = train_data
    history = {"epochs": [], "step_losses": []}
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(x_all), generator=order)
        loss_sum, correct, seen = 0.0, 0, 0
        for step, i in enumerate(range(0, len(x_all), batch)):
            if limit_batches is not None and step >= limit_batches:
                break
            idx = perm[i:i + batch]
            x, y = x_all[idx].to(device=device, dtype=dtype), y_all[idx].to(device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            history["step_losses"].append(value)
            loss_sum += value * len(idx)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(idx)
        wall = time.perf_counter() - start
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "wall_s": wall}
        if evaluate_each_epoch:
            row["valid_loss"], row["valid_acc"] = evaluate(model, test_data, test_batch, device)
        history["epochs"].append(row)
    return history


def step_time_ms(model_name: str, norm: str, batch: int, device: str, graphed: bool,
                 min_run_time: float = 0.5, seed: int = 0) -> float:
    """Median time of one training step (forward, loss, backward, SGD step) with
    the batch resident on the device."""
    model = build(model_name, norm, seed, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    fn = step
    if graphed:
        # Whole-step capture, as in the CUDA graphs documentation: warm up on a
        # side stream, then capture one step and replay it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        fn = graph.replay
    return interleaved_medians({"step": fn}, device, min_run_time)["step"] * 1e3


def plot_curves(results: dict, out: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    models = list(results["training"])
    metrics = [("train_loss", "train loss"), ("valid_loss", "valid loss"), ("valid_acc", "valid accuracy")]
    styles = {"torch": dict(marker="o"), "fastbn": dict(marker="x", linestyle="--"), "none": dict(marker=".")}
    with plt.rc_context(PLOT_STYLE):
        fig, axes = plt.subplots(len(models), len(metrics), figsize=(14, 3.8 * len(models) + 1.2),
                                 squeeze=False, layout="constrained")
        for r, model_name in enumerate(models):
            for c, (key, title) in enumerate(metrics):
                ax = axes[r][c]
                for variant, hist in results["training"][model_name].items():
                    xs = [e["epoch"] for e in hist["epochs"]]
                    ys = [e.get(key) for e in hist["epochs"]]
                    ax.plot(xs, ys, label=VARIANT_LABELS[variant], **styles[variant])
                ax.set_title(f"{model_name}: {title}")
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
                ax.grid(alpha=0.3)
                ax.legend()
        # The data description can be long: wrapped to the figure's width.
        data = textwrap.fill(f"data: {results['data']}", 150)
        save_figure(fig, out / "curves.png", "MNIST experiments: torch BN, fastbn BN and no BN",
                    f"{machine_line(results['environment'])}\n{data}")
        plt.close(fig)


def plot_step_times(results: dict, out: Path) -> None:
    plt = pyplot()
    rows = results["step_times_ms"]
    labels = [f"{r['model']} b{r['batch']} {r['mode']}" for r in rows]
    bar = 0.8 / len(VARIANTS)
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) * len(VARIANTS) / 2 + 2), layout="constrained")
        for k, variant in enumerate(VARIANTS):
            ax.barh([i - 0.4 + (k + 0.5) * bar for i in range(len(rows))], [r[variant] for r in rows],
                    height=bar, label=VARIANT_LABELS[variant])
        ax.set_yticks(list(range(len(rows))), labels)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xscale("log")
        label_log_axis(ax)
        ax.set_xlabel("ms per training step (forward + backward + SGD), median")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
        save_figure(fig, out / "step_times.png", "training-step time", machine_line(results["environment"]))
        plt.close(fig)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# MNIST experiments ({env['device']})",
        "",
        f"{env['date']} on {env['device_name']}, torch {env['torch']}, {env['threads']} threads. Data: {results['data']}.",
        "",
        "| model | variant | epoch | train loss | train acc | valid loss | valid acc | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name, variants in results["training"].items():
        for variant, hist in variants.items():
            for e in hist["epochs"]:
                lines.append(
                    f"| {model_name} | {variant} | {e['epoch']} | {e['train_loss']:.4f} | {e['train_acc']:.4f} | "
                    f"{e.get('valid_loss', float('nan')):.4f} | {e.get('valid_acc', float('nan')):.4f} | {e['wall_s']:.1f} |"
                )
    lines += ["", "Largest per-step loss difference, torch BN vs fastbn BN (same seed, weights and data order):", ""]
    for model_name, diff in results["max_step_loss_diff"].items():
        lines.append(f"- {model_name}: {diff:.3g}")
    if results["step_times_ms"]:
        lines += ["", "| model | batch | mode | torch BN ms | fastbn BN ms | no BN ms | torch/fastbn |", "|---|---|---|---|---|---|---|"]
        for r in results["step_times_ms"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['mode']} | {r['torch']:.3f} | {r['fastbn']:.3f} | "
                f"{r['none']:.3f} | {r['torch'] / r['fastbn']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.mnist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASET_NAMES), default=None,
                        help="default: MNIST, falling back to Fashion-MNIST when MNIST is not there; "
                             "a dataset named here is used or the run stops")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="where the data is looked for and downloaded to (default %(default)s)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download the data into --data-root (needs the internet)")
    parser.add_argument("--random-data", action="store_true", help="train on random stand-in data")
    parser.add_argument("--models", default="mlp,conv", help="comma list of mlp,conv")
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 for the MLP, 5 for the conv net")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--step-batches", default="64,1024", help="batches for step timing ('' to skip)")
    parser.add_argument("--step-min-run-time", type=float, default=0.5)
    parser.add_argument("--skip-training", action="store_true", help="only the step timings")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: a new results/runs/mnist-<device>-<host>-<date>/)")
    return parser.parse_args(argv)


def run(args) -> dict:
    device = resolve_device(args.device, "fastbn.mnist")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    results = {
        "environment": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
            "cpu_model": cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "fastbn_build": {k: v for k, v in fastbn.build_info().items() if k != "library"},
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": None,
        "training": {},
        "max_step_loss_diff": {},
        "step_times_ms": [],
    }
    if not args.skip_training:
        if args.random_data:
            train_data, test_data, description = random_data(seed=args.seed)
        else:
            train_data, test_data, description = load_data(args.dataset, args.data_root, args.download)
        results["data"] = description
        print(f"data: {description}")
        for model_name in models:
            # A few untimed steps per variant first, so that one-time costs
            # (thread pools, first allocations) do not land in one epoch's wall time.
            for variant in VARIANTS:
                train(model_name, variant, train_data, test_data, epochs=1, batch=args.batch,
                      seed=args.seed, device=device, limit_batches=5, evaluate_each_epoch=False)
            epochs = args.epochs or DEFAULT_EPOCHS[model_name]
            results["training"][model_name] = {}
            for variant in VARIANTS:
                hist = train(model_name, variant, train_data, test_data, epochs=epochs, batch=args.batch,
                             lr=args.lr, seed=args.seed, device=device, limit_batches=args.limit_batches)
                results["training"][model_name][variant] = hist
                for e in hist["epochs"]:
                    print(f"{model_name:>4} {variant:>6} epoch {e['epoch']:>2}: train loss {e['train_loss']:.4f} "
                          f"acc {e['train_acc']:.4f} | valid loss {e['valid_loss']:.4f} acc {e['valid_acc']:.4f} "
                          f"| {e['wall_s']:.1f} s")
            t, f = (results["training"][model_name][v]["step_losses"] for v in ("torch", "fastbn"))
            results["max_step_loss_diff"][model_name] = max(abs(a - b) for a, b in zip(t, f))
            print(f"{model_name}: largest per-step loss difference torch vs fastbn: "
                  f"{results['max_step_loss_diff'][model_name]:.3g}")
    batches = [int(b) for b in args.step_batches.split(",") if b]
    modes = ["eager"] + (["cuda-graph"] if device == "cuda" else [])
    for model_name in models:
        for batch in batches:
            for mode in modes:
                row = {"model": model_name, "batch": batch, "mode": mode}
                for variant in VARIANTS:
                    row[variant] = step_time_ms(model_name, variant, batch, device, mode == "cuda-graph",
                                                args.step_min_run_time, args.seed)
                results["step_times_ms"].append(row)
                print(f"step time {model_name} b{batch} {mode}: torch {row['torch']:.3f} ms, "
                      f"fastbn {row['fastbn']:.3f} ms, no BN {row['none']:.3f} ms")
    # Created only now, so that a run that stops early leaves no empty folder.
    out = args.out or default_run_dir("mnist", device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    if results["training"]:
        plot_curves(results, out)
    if results["step_times_ms"]:
        plot_step_times(results, out)
    print(f"wrote {out}/results.json, summary.md and plots")
    return results


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except DataNotFound as error:
        raise SystemExit(f"fastbn.mnist: {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
