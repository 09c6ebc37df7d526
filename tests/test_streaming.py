"""The streaming-store and software-prefetch decisions (csrc/cpu/streaming.cpp):
the rules on the cache sizes of the machines issue 14 names, this machine's
cache sizes as queried, and the FASTBN_CPU_STREAM_MIN_MB and
FASTBN_CPU_PREFETCH_MIN_MB overrides."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn
from fastbn import _loader
from helpers import run_correctness_subset

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB = 1 << 10, 1 << 20


def rule(l2, llc, threads):
    return _loader.load()["module"].stream_min_bytes(l2, llc, threads)


def eval_bytes_moved(tensor_bytes):  # read x, write y
    return 2 * tensor_bytes


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name, l2, llc", [
    ("Xeon VM, 300 MiB LLC", 2 * MiB, 300 * MiB),
    ("EPYC of issue 14, 32 MiB L3, 2 MiB L2", 2 * MiB, 32 * MiB),
    ("this EPYC, 32 MiB L3, 512 KiB L2", 512 * KiB, 32 * MiB),
])
def test_rule_on_the_issues_machines(name, l2, llc, threads):
    threshold = rule(l2, llc, threads)
    # The issue's eval tensors of 4-7 MB ran faster without streaming on the
    # 32 MiB EPYC (and fit every cache here): not streamed.
    for mb in (4, 7):
        assert eval_bytes_moved(mb * 1_000_000) < threshold, name
    # A pass that cannot stay in the cache anyway streams.
    assert 4 * (llc + threads * l2) >= threshold
    assert eval_bytes_moved(2 * (llc + threads * l2)) >= threshold
    # More threads bring more L2.
    assert rule(l2, llc, threads + 1) > threshold


def prefetch_rule(l2, llc):
    return _loader.load()["module"].prefetch_min_bytes(l2, llc)


@pytest.mark.parametrize("name, l2, llc", [
    ("Xeon VM, 300 MiB LLC", 2 * MiB, 300 * MiB),
    ("EPYC of issue 14, 32 MiB L3, 2 MiB L2", 2 * MiB, 32 * MiB),
    ("this EPYC, 32 MiB L3, 512 KiB L2", 512 * KiB, 32 * MiB),
])
def test_prefetch_rule_on_the_issues_machines(name, l2, llc):
    threshold = prefetch_rule(l2, llc)
    # Eval of 4-7 MB tensors finds its input in a 32 MiB or larger LLC: no
    # software prefetch (it cost 15-30% there).
    for mb in (4, 7):
        assert eval_bytes_moved(mb * 1_000_000) < threshold, name
    # Passes over half the LLC prefetch (from memory it saved 10-30%); so do
    # all passes that stream.
    assert eval_bytes_moved(llc // 4) >= threshold
    for threads in (1, 2, 8):
        assert rule(l2, llc, threads) >= threshold


def test_prefetch_rule_without_cache_sizes_always_prefetches():
    assert prefetch_rule(0, 0) == 0


def test_rule_without_cache_sizes_falls_back_per_thread():
    assert rule(0, 0, 2) == 2 * rule(0, 0, 1) > 0


def sysfs_size(level: int) -> int:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if int((index / "level").read_text()) == level and (index / "type").read_text().strip() != "Instruction":
            text = (index / "size").read_text().strip()
            return int(text[:-1]) * {"K": KiB, "M": MiB}[text[-1]] if text[-1] in "KM" else int(text)
    return 0


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/cache/index0").exists(), reason="no sysfs cache info")
def test_build_info_reports_this_machines_caches():
    caches = fastbn.build_info()["cpu_caches"]
    assert caches["l2_per_core_bytes"] == sysfs_size(2)
    assert caches["llc_bytes"] == max(sysfs_size(3), sysfs_size(2))
    if "FASTBN_CPU_STREAM_MIN_MB" not in os.environ:
        import torch
        assert caches["stream_min_bytes"] == rule(sysfs_size(2), caches["llc_bytes"], torch.get_num_threads())
    if "FASTBN_CPU_PREFETCH_MIN_MB" not in os.environ:
        assert caches["prefetch_min_bytes"] == prefetch_rule(sysfs_size(2), caches["llc_bytes"])


OVERRIDES = {"FASTBN_CPU_STREAM_MIN_MB": "stream_min_bytes", "FASTBN_CPU_PREFETCH_MIN_MB": "prefetch_min_bytes"}


@pytest.mark.parametrize("variable", OVERRIDES)
@pytest.mark.parametrize("value, expected", [("0", 0), ("1.5", 3 * MiB // 2), ("inf", 2**63 - 1)])
def test_override(variable, value, expected):
    code = f"import fastbn; print(fastbn.build_info()['cpu_caches']['{OVERRIDES[variable]}'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, variable: value})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == expected


@pytest.mark.parametrize("variable", OVERRIDES)
def test_bad_override_is_a_clear_error(variable):
    code = "import fastbn\ntry:\n    fastbn.build_info()\nexcept RuntimeError as e:\n    print('ERROR', e)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, variable: "lots"})
    assert f"{variable} must be a number of MiB" in out.stdout, out.stdout + out.stderr


def test_correctness_with_every_output_streamed():
    """With the threshold at 0 every pass streams its output (aligned full
    vectors through non-temporal stores, the rest plainly): the kernels'
    streaming forms (row walks, the short-row flat walk, channels-last
    periods, misaligned rows, 16-bit types) against the fp64 reference."""
    check = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.build_info()['cpu_caches']['stream_min_bytes'])"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FASTBN_CPU_STREAM_MIN_MB": "0"})
    assert check.stdout.split()[-1] == "0", check.stderr
    run_correctness_subset({**os.environ, "FASTBN_CPU_STREAM_MIN_MB": "0"})


def test_correctness_with_every_pass_prefetching():
    """With the prefetch threshold at 0 every pass prefetches its inputs, as
    passes over half the LLC do (the suite's small tensors otherwise take the
    walks without it): the prefetching forms against the fp64 reference."""
    run_correctness_subset({**os.environ, "FASTBN_CPU_PREFETCH_MIN_MB": "0"})


def test_correctness_with_every_pass_streamed_and_prefetching():
    """Both thresholds at 0, as for passes over tensors larger than the
    cache: channels-first rows then go in pairs half the range apart (two
    streams), which must leave the streaming stores' alignment alone."""
    run_correctness_subset({**os.environ, "FASTBN_CPU_STREAM_MIN_MB": "0", "FASTBN_CPU_PREFETCH_MIN_MB": "0"})
