"""Loads the native operators: the ahead-of-time build (fastbn._C) when it is
importable, else a JIT build of the same sources with the same flags."""
from __future__ import annotations

import os
import sys

import torch

from . import _build

_info: dict = {}


def _jit_load() -> dict:
    from torch.utils import cpp_extension

    missing = [s for s in _build.sources(False, absolute=True) if not os.path.exists(s)]
    if missing:
        raise ImportError(
            "fastbn: the compiled extension fastbn._C is missing and the C++ sources for a "
            f"JIT build are not there either ({missing[0]}). Install fastbn with "
            "`pip install .` from a checkout, or run from the checkout itself."
        )
    with_cuda = _build.use_cuda()
    build_dir = os.environ.get("FASTBN_BUILD_DIR")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    print(
        f"fastbn: no prebuilt fastbn._C; building the native extension with "
        f"torch.utils.cpp_extension.load ({'CPU + CUDA' if with_cuda else 'CPU only'}); compiling takes "
        "a few minutes when the cached build is missing or stale ...",
        file=sys.stderr,
        flush=True,
    )
    module = cpp_extension.load(
        name="fastbn_jit",
        sources=_build.sources(with_cuda, absolute=True),
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags() if with_cuda else None,
        extra_ldflags=_build.ld_flags(),
        with_cuda=with_cuda,
        build_directory=build_dir,
        is_python_module=True,
        verbose=os.environ.get("FASTBN_VERBOSE_BUILD") == "1",
    )
    return {"loaded": "jit", "library": module.__file__, "module": module}


def load() -> dict:
    """Loads the extension once; returns {"loaded", "library", "module"}."""
    if _info:
        return _info
    if os.environ.get("FASTBN_JIT") == "1":
        _info.update(_jit_load())
    else:
        try:
            from . import _C  # loading it registers the ops

            _info.update({"loaded": "aot", "library": _C.__file__, "module": _C})
        except ImportError:
            _info.update(_jit_load())
    return _info


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastbn::batch_norm_train", key)


def build_info() -> dict:
    """Which backends are compiled in, how the extension was loaded, and which
    variant of the CPU kernels runs (cpu_isa: the best of cpu_isa_built that
    this CPU runs, capped by FASTBN_CPU_ISA)."""
    module = load()["module"]
    cpu_isa, cpu_isa_built = module.cpu_isa()
    return {
        "loaded": _info.get("loaded"),
        "library": _info.get("library"),
        "backends": [key for key in ("CPU", "CUDA") if _has_kernel(key)],
        "cpu_isa": cpu_isa,
        "cpu_isa_built": list(cpu_isa_built),
        "cpu_caches": dict(zip(("l2_per_core_bytes", "llc_bytes", "stream_min_bytes", "prefetch_min_bytes"), module.cpu_caches())),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
