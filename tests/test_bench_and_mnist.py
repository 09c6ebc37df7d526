"""The benchmark and the MNIST experiments run and produce valid output."""
import json

import pytest
import torch

from fastbn import bench, mnist


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path):
    result = bench.run(bench.parse_args(["--quick", "--device", "cpu", "--min-run-time", "0.01",
                                         "--out", str(tmp_path), "--no-progress"]))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["environment"]["copy_bandwidth_GBps"] > 0
    assert data["contenders"] == ["fastbn", "torch"]
    modes = {c["mode"] for c in data["cases"]}
    assert modes == set(bench.MODES)
    assert {c["fmt"] for c in data["cases"]} == {"nchw", "channels_last"}
    for case in data["cases"]:
        assert all(t > 0 for t in case["times_us"].values()), case
        assert case["speedup"]["torch"] == pytest.approx(case["times_us"]["torch"] / case["times_us"]["fastbn"])
        assert case["fastbn_fraction_of_copy_bw"] > 0
    assert set(data["summary"]) == set(bench.MODES)
    assert result["summary"] == data["summary"]
    for name in ("summary.md", "speedup.png", "bandwidth.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_interleaved_medians_measure_each_step():
    """The timing loop returns seconds per call of each step: steps that sleep
    2 ms and 6 ms come out in that order and about 3x apart."""
    import time

    calls = {"short": 0, "long": 0}

    def step(key, seconds):
        def run():
            calls[key] += 1
            time.sleep(seconds)
        return run

    result = bench.interleaved_medians({"short": step("short", 0.002), "long": step("long", 0.006)},
                                       "cpu", min_run_time=0.1)
    assert set(result) == {"short", "long"}
    assert 0.002 <= result["short"] < 0.004, result
    assert 2.0 < result["long"] / result["short"] < 3.5, result
    assert calls["short"] > calls["long"] > 5  # each got its share of the time, in several blocks


def mnist_data():
    try:
        train, test, _ = mnist.load_data("fashion-mnist", mnist.Path.home() / ".cache" / "fastbn" / "data")
    except mnist.DataNotFound:
        train, test, _ = mnist.random_data(n_train=64 * 300, n_test=256)
    return train, test


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_mnist_losses_agree_step_by_step_in_float64(model_name):
    """300 SGD steps, same seed, weights and data order: in float64 the torch
    and fastbn variants' losses agree to 1e-9 at every step."""
    train, test = mnist_data()
    common = dict(epochs=1, limit_batches=300, device="cpu", evaluate_each_epoch=False, dtype=torch.float64)
    ref = mnist.train(model_name, "torch", train, test, **common)["step_losses"]
    ours = mnist.train(model_name, "fastbn", train, test, **common)["step_losses"]
    none = mnist.train(model_name, "none", train, test, **common)["step_losses"]
    assert len(ref) == len(ours) == 300
    for step, (a, b) in enumerate(zip(ref, ours)):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(a)), (step, a, b)
    # The comparison can fail: training without BN follows another curve.
    assert max(abs(a - b) for a, b in zip(ref, none)) > 1e-2


@pytest.mark.slow
def test_mnist_mlp_float32_losses_agree():
    """In float32 the MLP's curves agree to 1e-4 over 300 steps. (The conv
    net's float32 curves drift further: an fp32 rounding difference flips a
    ReLU or max-pool choice now and then and SGD amplifies it; in float64 they
    agree, see above.)"""
    train, test = mnist_data()
    common = dict(epochs=1, limit_batches=300, device="cpu", evaluate_each_epoch=False)
    ref = mnist.train("mlp", "torch", train, test, **common)["step_losses"]
    ours = mnist.train("mlp", "fastbn", train, test, **common)["step_losses"]
    assert max(abs(a - b) for a, b in zip(ref, ours)) <= 1e-4


def test_mnist_missing_data_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(mnist.DataNotFound, match="apt-get install dataset-fashion-mnist"):
        mnist.load_data("mnist", tmp_path / "empty")


@pytest.mark.slow
def test_mnist_cli_short_run(tmp_path):
    mnist.run(mnist.parse_args(["--random-data", "--epochs", "1", "--limit-batches", "5",
                                "--step-batches", "64", "--step-min-run-time", "0.01", "--out", str(tmp_path)]))
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["training"]) == {"mlp", "conv"}
    assert set(data["training"]["mlp"]) == {"torch", "fastbn", "none"}
    assert len(data["step_times_ms"]) == 2 and all(r["fastbn"] > 0 for r in data["step_times_ms"])
    for name in ("summary.md", "curves.png", "step_times.png"):
        assert (tmp_path / name).stat().st_size > 0
