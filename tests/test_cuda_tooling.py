"""The GPU tooling that cannot run here, checked for what it can be: the path
tuner's table logic on synthetic timings, `--tune` refusing without a GPU,
and benchmarks/gpu_check.sh's syntax and results layout (at most 8 files, no
deeper than 2 folders, everything in the archive)."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import fastbn
from conftest import SIMT
from fastbn import cuda_paths

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_crossover_is_the_last_size_before_the_single_pass_loses():
    points = [(1 << 20, 10e-6, 20e-6), (1 << 22, 30e-6, 40e-6), (1 << 24, 90e-6, 80e-6), (1 << 26, 300e-6, 310e-6)]
    # It loses at 16 MiB: a later win (noise, or a cache effect) does not extend the range.
    assert cuda_paths.crossover_bytes(points) == 1 << 22
    assert cuda_paths.crossover_bytes(list(reversed(points))) == 1 << 22  # order of measurement does not matter
    assert cuda_paths.crossover_bytes([(1 << 20, 30e-6, 20e-6)]) == 0
    # Stops where the single pass no longer fits.
    assert cuda_paths.crossover_bytes([(1 << 20, 10e-6, 20e-6), (1 << 22, None, 40e-6)]) == 1 << 20


def test_blocks_per_sm_choice_compares_sizes_every_choice_fits():
    times = {1: {10: 2.0, 20: 4.0, 40: 9.0}, 2: {10: 1.0, 20: 3.0, 40: None}, 4: {10: 1.5, 20: 3.5, 40: None}}
    assert cuda_paths.best_blocks_per_sm(times) == 2
    assert cuda_paths.best_blocks_per_sm({1: {10: None}, 2: {10: None}}) == cuda_paths.DEFAULT_TABLE[
        "single_pass_blocks_per_sm"]


def test_written_table_holds_the_keys_the_kernels_read(tmp_path):
    forward = [(1 << 20, 10e-6, 20e-6), (1 << 22, 50e-6, 40e-6)]
    backward = [(1 << 20, 10e-6, 30e-6), (1 << 22, 35e-6, 40e-6)]
    table = cuda_paths.make_table(forward, backward, 4, "Test GPU")
    path = cuda_paths.write_table(table, tmp_path / "sub" / "table.json")
    written = json.loads(path.read_text())
    assert written["single_pass_max_bytes_forward"] == 1 << 20
    assert written["single_pass_max_bytes_backward"] == 1 << 22
    assert written["single_pass_blocks_per_sm"] == 4
    assert set(cuda_paths.DEFAULT_TABLE) <= set(written)
    assert not list(path.parent.glob("*.tmp"))


def test_table_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBN_CUDA_PATH_TABLE", str(tmp_path / "t.json"))
    assert cuda_paths.table_file() == tmp_path / "t.json"
    monkeypatch.delenv("FASTBN_CUDA_PATH_TABLE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cuda_paths.table_file() == tmp_path / "fastbn" / "cuda_path_table.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_tune_refuses_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastbn.bench", "--tune", "--out", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "--tune measures the CUDA kernels' crossovers on a GPU" in result.stderr
    assert not (tmp_path / "t.json").exists()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True, timeout=30)


def test_gpu_check_packs_results_into_at_most_8_files_2_folders_deep(tmp_path):
    out = tmp_path / "out"
    deep = out / "work" / "bench" / "nested" / "deeper"
    deep.mkdir(parents=True)
    for i in range(12):
        (out / "work" / f"log{i}.log").write_text(f"log {i}\n")
    (deep / "results.json").write_text("{}")
    (out / "work" / "summary.txt").write_text("summary\n")
    (out / "work" / "bench" / "paths.txt").write_text("paths\n")
    keep = ["summary.txt", "paths.txt", "missing.txt", *(f"log{i}.log" for i in range(12))]
    subprocess.run(["bash", "-c", f'source "{GPU_CHECK}" && pack_results "$0" "$@"', str(out), *keep],
                   check=True, timeout=60)
    entries = list(out.rglob("*"))
    assert all(e.is_file() for e in entries), entries  # no folders at all
    assert len(entries) <= 8
    names = {e.name for e in entries}
    assert {"results.tar.gz", "summary.txt", "paths.txt"} <= names
    with tarfile.open(out / "results.tar.gz") as archive:
        members = archive.getnames()
    assert any(m.endswith("nested/deeper/results.json") for m in members)
    assert sum(m.endswith(".log") for m in members) == 12
    assert (out / "summary.txt").read_text() == "summary\n"


@pytest.mark.skipif(not SIMT, reason="FASTBN_SIMT=0")
def test_bench_path_steps_on_the_simt_backend():
    """The benchmark's per-path steps, run on the SIMT backend (the CUDA
    kernels on CPU tensors): both paths for a small input, only two passes
    for one the single pass cannot hold, none for eval; the table lists
    them beside the torch contenders."""
    import simt_backend
    from fastbn import bench

    small = bench.Case("t", (4, 3, 8, 8), "fp32", "nchw", "train_fwdbwd")
    large = bench.Case("t", (2, 1, 130000), "fp32", "nchw", "train_fwd")
    evaluation = bench.Case("t", (4, 3, 8, 8), "fp32", "nchw", "eval_fwd")
    group = [small, large, evaluation]
    inputs = [bench.Inputs(c, "cpu", 1 << 30) for c in group]
    with simt_backend.active() as backend:
        steps = cuda_paths.path_steps(group, inputs, bench.make_step, fastbn.batch_norm)
        assert sorted(steps) == [(0, "path:single_pass"), (0, "path:two_pass"), (1, "path:two_pass")]
        backend.calls.clear()
        steps[(0, "path:single_pass")]()
        assert [len(call.launches) for call in backend.calls] == [1, 1]  # forward, backward
    for case in group:
        case.times_us = {"fastbn": 10.0, "torch": 20.0}
    small.path_times_us = {"single_pass": 8.0, "two_pass": 12.0}
    large.path_times_us = {"two_pass": 30.0}
    table = cuda_paths.format_paths(group, ["torch"])
    lines = table.splitlines()
    assert lines[0].split() == ["case", "auto", "us", "single_pass", "us", "two_pass", "us", "torch", "us",
                                "faster", "path"]
    assert lines[2].split()[-5:] == ["10.0", "8.0", "12.0", "20.0", "single_pass"]
    assert lines[3].split()[-5:] == ["10.0", "-", "30.0", "20.0", "two_pass"]
    assert len(lines) == 4  # eval has one path: no row
