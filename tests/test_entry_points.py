"""The command-line entry points as a new user meets them: usage lines, the
device check, where runs are written, how the MNIST data is found."""
import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from fastbn import _cli, bench, demo, mnist

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"fastbn.bench": bench.parse_args, "fastbn.mnist": mnist.parse_args, "fastbn.demo": demo.parse_args}


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_help_names_the_module(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[module](["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("module,main", [("fastbn.bench", bench.main), ("fastbn.mnist", mnist.main),
                                         ("fastbn.demo", demo.main)])
def test_cuda_without_a_gpu_is_one_message_and_writes_nothing(module, main, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # where the default output folders would go
    argv = ["--device", "cuda"] + (["--random-data"] if module == "fastbn.mnist" else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == (
        f"{module}: --device cuda, but no CUDA device is available "
        "(torch.cuda.is_available() is False); use --device cpu"
    )
    assert list(tmp_path.iterdir()) == []


def _git_ignores(path: str) -> bool:
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_default_run_folders_are_ignored_by_git_and_apart_from_the_reference_results():
    for kind in ("bench", "mnist"):
        folder = _cli.default_run_dir(kind, "cpu")
        assert folder.parent == Path("results") / "runs"
        assert folder.name.startswith(f"{kind}-cpu-")
        assert _git_ignores(str(folder / "results.json"))
    # The README's reference results are tracked, so a run must never write there.
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert "results/cpu/results.json" in tracked and "results/mnist-cpu/results.json" in tracked
    assert not any(path.startswith("results/runs/") for path in tracked)


def test_bench_writes_a_new_run_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench.main(["--device", "cpu", "--shape", "8x3", "--dtypes", "fp32", "--modes", "eval_fwd",
                "--min-run-time", "0.01", "--no-plots", "--no-progress"])
    (runs,) = (tmp_path / "results" / "runs").iterdir()
    assert runs.name.startswith("bench-cpu-")
    assert sorted(p.name for p in runs.iterdir()) == ["results.json", "summary.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["runs"]


# MNIST data: tiny IDX files in torchvision's layout stand in for the datasets.

def _idx_bytes(kind: str, count: int) -> bytes:
    if kind == "images":
        return struct.pack(">IIII", 0x803, count, 28, 28) + bytes(range(256)) * (count * 784 // 256) + bytes(
            count * 784 % 256)
    return struct.pack(">II", 0x801, count) + bytes(i % 10 for i in range(count))


def _write_idx_files(folder: Path, gz: bool, train: int = 16, test: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in mnist.IDX_FILES:
        count = train if name.startswith("train") else test
        data = _idx_bytes("images" if "images" in name else "labels", count)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)


@pytest.fixture
def debian_fashion_mnist(tmp_path, monkeypatch):
    folder = tmp_path / "debian-fashion-mnist"
    _write_idx_files(folder, gz=True)
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", folder)
    return folder


def test_explicit_mnist_that_is_not_there_is_an_error_not_a_fallback(tmp_path, debian_fashion_mnist):
    root = tmp_path / "data"
    with pytest.raises(mnist.DataNotFound) as error:
        mnist.load_data("mnist", root)
    message = str(error.value)
    assert message.startswith(f"no MNIST data: MNIST is not in {root / 'MNIST' / 'raw'}. To get data: ")
    assert "--download" in message
    assert not (root / "FashionMNIST").exists()  # Fashion-MNIST was not even looked at


def test_mnist_found_where_it_is_looked_for(tmp_path, debian_fashion_mnist):
    root = tmp_path / "data"
    _write_idx_files(root / "MNIST" / "raw", gz=False, train=12, test=6)
    (train_x, train_y), (test_x, test_y), description = mnist.load_data("mnist", root)
    assert train_x.shape == (12, 1, 28, 28) and test_y.shape == (6,)
    assert -1 <= train_x.min() and train_x.max() <= 1
    assert description == f"mnist from {root}"


def test_unchosen_dataset_falls_back_to_fashion_mnist_and_says_so(tmp_path, debian_fashion_mnist):
    root = tmp_path / "data"
    (train_x, _), (test_x, _), description = mnist.load_data(None, root)
    assert train_x.shape == (16, 1, 28, 28) and test_x.shape == (8, 1, 28, 28)
    assert description == (
        f"fashion-mnist from {debian_fashion_mnist} (Debian's dataset-fashion-mnist) — MNIST not available "
        f"(MNIST is not in {root / 'MNIST' / 'raw'}), using Fashion-MNIST instead "
        "(same format: 28x28 grey images, 10 classes)"
    )
    assert "\n" not in description


def test_failed_download_is_reported_and_not_suggested_again(tmp_path, monkeypatch, debian_fashion_mnist):
    import torchvision.datasets.mnist as tv_mnist

    def offline(url, *args, **kwargs):
        raise URLError("no internet here")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    with pytest.raises(mnist.DataNotFound) as error:
        mnist.load_data("mnist", root, download=True)
    message = str(error.value)
    assert message.startswith(f"no MNIST data: downloading MNIST into {root / 'MNIST' / 'raw'} failed: "
                              "Error downloading train-images-idx3-ubyte.gz")
    assert "no internet here" in message and "\n" not in message
    assert "`--download`" not in message
    # Without an explicit dataset the failed download is said in the fallback's one line.
    _, _, description = mnist.load_data(None, root, download=True)
    assert "MNIST not available (downloading MNIST into" in description and "no internet here" in description


def test_mnist_cli_with_missing_explicit_dataset_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--device", "cpu", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data")])
    message = str(exit_info.value.code)
    assert message.startswith("fastbn.mnist: no Fashion-MNIST data: Fashion-MNIST is not in ")
    assert f"Debian's dataset-fashion-mnist files are not in {tmp_path / 'nowhere'}" in message
    assert list(work.iterdir()) == []


def test_readme_names_the_default_data_folder():
    assert mnist.DEFAULT_DATA_ROOT == Path.home() / ".cache" / "fastbn" / "data"
    assert "~/.cache/fastbn/data" in (ROOT / "README.md").read_text()


# Benchmark output.

def _case(mode, label, shape, fastbn_us, torch_us):
    case = bench.Case(label, shape, "bf16", "channels_last", mode)
    case.times_us = {"fastbn": fastbn_us, "torch": torch_us}
    return case


def test_benchmark_table_columns_line_up_for_long_case_names():
    cases = [_case("train_fwdbwd", "resnet-cifar b256 with a long name", (256, 32, 32, 32), 12345.6, 23456.7),
             _case("eval_fwd", "bn1d", (8, 3), 1.5, 2.5)]
    metrics = [bench.case_metrics(c, copy_bw=1e10) for c in cases]
    lines = bench.format_table(cases, metrics, ["fastbn", "torch"]).splitlines()
    assert len({len(line) for line in lines}) == 1, lines
    header, _, *rows = lines
    # Every numeric column ends where its header ends.
    for title in ("shape", "fastbn us", "torch us", "x vs torch", "%bw"):
        end = header.index(title) + len(title)
        for row in rows:
            assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (title, row)
    assert rows[0].startswith("train_fwdbwd bf16 channels_last resnet-cifar b256 with a long name  ")


def test_summary_names_the_worst_ratio_plainly():
    assert bench.worst_ratio_label(["fastbn", "torch"]) == "worst time ratio fastbn/torch (below 1 = faster)"
    assert "fastest torch variant" in bench.worst_ratio_label(["fastbn", "torch", "torch_no_cudnn"])


# Plots.

def test_curves_of_one_epoch_have_whole_epoch_ticks_and_a_machine_subtitle(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(mnist, "save_figure", lambda fig, path, title, subtitle: saved.update(
        fig=fig, path=path, subtitle=subtitle))
    epoch = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "valid_loss": 0.4, "valid_acc": 0.85, "wall_s": 1.0}
    results = {
        "environment": {"device": "cpu", "device_name": "CPU", "cpu_model": "Some CPU 9000", "threads": 3,
                        "torch": "2.x", "date": "2026-11-29T01:02:03+00:00"},
        "data": "random data (no dataset files)",
        "training": {"mlp": {v: {"epochs": [epoch]} for v in mnist.VARIANTS}},
    }
    mnist.plot_curves(results, tmp_path)
    assert saved["path"] == tmp_path / "curves.png"
    assert saved["subtitle"].startswith("Some CPU 9000, 3 threads, torch 2.x, 2026-11-29\n")
    for ax in saved["fig"].axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_unreadable_dataset_files_are_reported_as_such(tmp_path, debian_fashion_mnist):
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    _write_idx_files(raw, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")  # truncated header
    with pytest.raises(mnist.DataNotFound, match=rf"no MNIST data: MNIST in {raw} could not be read: "):
        mnist.load_data("mnist", root)
