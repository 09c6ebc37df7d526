"""Build and loading: one source list, build_info, and the JIT path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbn
from fastbn import _build

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_file_is_in_the_one_source_list():
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".cu"}}
    assert on_disk == set(_build.CPU_SOURCES + _build.CUDA_SOURCES + _build.SIMT_RUNTIME_SOURCES)
    assert not set(_build.SIMT_RUNTIME_SOURCES) & set(_build.sources(True)), "SIMT is tests only"
    setup_py = (ROOT / "setup.py").read_text()
    assert "_build.sources(" in setup_py and "csrc/" not in setup_py


def test_build_info_reports_backends():
    info = fastbn.build_info()
    assert info["loaded"] in {"aot", "jit"}
    assert "CPU" in info["backends"]
    if os.environ.get("FASTBN_EXPECT_CUDA") == "1":
        # CI builds the CUDA sources even without a GPU: they must be compiled in.
        assert "CUDA" in info["backends"], info
    if torch.cuda.is_available():
        assert "CUDA" in info["backends"], info


@pytest.mark.slow
def test_jit_build_loads_and_runs(tmp_path):
    """With FASTBN_JIT=1 the same sources are compiled by cpp_extension.load and used."""
    script = (
        "import torch, fastbn\n"
        "info = fastbn.build_info()\n"
        "assert info['loaded'] == 'jit', info\n"
        "x = torch.randn(6, 4, 5)\n"
        "y = fastbn.batch_norm(x, None, None, training=True)\n"
        "ref = fastbn.reference.batch_norm(x.double(), None, None, training=True)\n"
        "torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)\n"
        "print('jit ok', info['backends'])\n"
    )
    env = dict(os.environ, FASTBN_JIT="1", FASTBN_FORCE_CPU="1", FASTBN_BUILD_DIR=str(tmp_path / "build"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jit ok" in result.stdout
    assert "building the native extension" in result.stderr
