"""Build and loading: one source list, build_info, and the JIT path."""
import os
import shutil
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
    assert on_disk == set(_build.CPU_SOURCES + _build.CPU_KERNEL_SOURCES + _build.CUDA_SOURCES + _build.SIMT_RUNTIME_SOURCES)
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


def test_ahead_of_time_build_keeps_its_objects_for_the_next_build(tmp_path):
    """setup.py keeps the object files and ninja's log in build/temp (pip would
    build in a fresh temporary folder each time), so rebuilding with nothing
    changed compiles nothing: ninja's dry run over that log has no work to do,
    and the loaded library was linked from those objects."""
    info = fastbn.build_info()
    build_temp = _build.BUILD_TEMP
    if info["loaded"] != "aot" or not (build_temp / "build.ninja").exists():
        pytest.skip("fastbn was not built ahead of time (pip install / scripts/setup.sh) from this checkout")
    objects = [build_temp / Path(s).with_suffix(".o") for s in _build.sources("CUDA" in info["backends"])]
    logged = {line.split("\t")[3] for line in (build_temp / ".ninja_log").read_text().splitlines()[1:]}
    assert {str(o) for o in objects} <= logged, (objects, logged)
    assert Path(info["library"]).stat().st_mtime >= max(o.stat().st_mtime for o in objects)
    # The dry run works on a copy of the log: a ninja of another version would
    # discard the original. torch's build.ninja names every file by its full path.
    for name in ("build.ninja", ".ninja_log", ".ninja_deps"):
        shutil.copy2(build_temp / name, tmp_path / name)
    # setup.sh builds with the venv's ninja (its PATH starts with .venv/bin).
    ninja = shutil.which("ninja", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    dry_run = subprocess.run([ninja, "-C", str(tmp_path), "-n", "-d", "explain"],
                             capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    assert "no work to do" in dry_run.stdout, (
        "a rebuild would compile (sources changed since the last build? run `bash scripts/setup.sh`):\n"
        + dry_run.stdout + dry_run.stderr)


def test_loading_the_prebuilt_extension_does_not_import_cpp_extension():
    """torch.utils.cpp_extension looks for CUDA_HOME when imported and, on a
    machine with a CUDA toolkit but no GPU, warns "No CUDA runtime is found".
    Importing fastbn and its entry points (AOT build) must not import it."""
    if fastbn.build_info()["loaded"] != "aot":
        pytest.skip("the JIT build imports torch.utils.cpp_extension to compile")
    script = (
        "import sys, fastbn, fastbn.bench, fastbn.mnist, fastbn.demo\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch.utils.cpp_extension')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTBN_JIT"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "No CUDA runtime is found" not in result.stderr
