"""The one source list and set of compiler flags, shared by setup.py (ahead of
time) and by the JIT loader (torch.utils.cpp_extension.load).

This module imports nothing from fastbn so that setup.py can load it by path.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_NAME = "fastbn._C"
# Where setup.py keeps the ahead-of-time build's object files and ninja log
# between builds (covered by .gitignore's build/).
BUILD_TEMP = ROOT / "build" / "temp"

CPU_SOURCES = [
    "csrc/fastbn.cpp",
    "csrc/autograd.cpp",
    "csrc/legacy_batching.cpp",
    "csrc/cpu/batch_norm_cpu.cpp",
    "csrc/cpu/batch_norm_act_cpu.cpp",
    "csrc/cpu/cpu_isa.cpp",
    "csrc/cpu/output_pool.cpp",
    "csrc/cpu/sync_batch_norm_cpu.cpp",
]
# CPU kernel files (see csrc/cpu/kernels.h): compiled once per instruction-set
# variant. A new kernel file joins by being listed here.
CPU_KERNEL_SOURCES = [
    "csrc/cpu/statistics_kernels.cpp",
    "csrc/cpu/elementwise_kernels.cpp",
    "csrc/cpu/fused_kernels.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/batch_norm_cuda.cu",
    "csrc/cuda/sync_batch_norm_cuda.cu",
    "csrc/cuda/batch_norm_act_cuda.cu",
]
# The SIMT backend's runtime (tests only, never in a user's build): with the
# CUDA_SOURCES rewritten for it, it runs the CUDA kernels on the CPU
# (tests/simt_backend.py builds it).
SIMT_RUNTIME_SOURCES = [
    "csrc/simt/runtime.cpp",
    "csrc/simt/guarded_allocator.cpp",
    "csrc/simt/module.cpp",
]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def use_cuda() -> bool:
    """Whether to compile the CUDA sources.

    Decided from the toolkit and the torch build, not from a visible GPU, so a
    machine without a GPU still compiles (and so checks) the CUDA kernels.
    FASTBN_FORCE_CPU=1 skips them; FASTBN_FORCE_CUDA=1 makes their absence an error.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _env_flag("FASTBN_FORCE_CPU"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if _env_flag("FASTBN_FORCE_CUDA") and not available:
        raise RuntimeError(
            "FASTBN_FORCE_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} "
            "(install a CUDA build of torch and set CUDA_HOME to the toolkit)"
        )
    return available


def _host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> str:
    """The x86 vector ISA the CPU kernels are compiled for.

    The kernels use ATen's at::vec::Vectorized, which picks its width from
    CPU_CAPABILITY_* macros. The extension is built on the machine that runs it
    (pip install from source, or JIT), so it targets that machine's ISA, as
    -march=native would. FASTBN_CPU_ISA=default|avx2|avx512 overrides this,
    e.g. to build for older machines. avx512_bf16 adds the bfloat16 conversion
    instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later).
    """
    requested = os.environ.get("FASTBN_CPU_ISA", "").strip().lower()
    if requested:
        if requested not in _ISA_FLAGS:
            raise ValueError(f"FASTBN_CPU_ISA must be one of {', '.join(_ISA_FLAGS)}, got {requested!r}")
        return requested
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return "default"
    flags = _host_cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16"} <= flags:
        return "avx512_bf16"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}
_ISA_FLAGS["avx512_bf16"] = [*_ISA_FLAGS["avx512"], "-mavx512bf16"]


def cxx_flags() -> list[str]:
    # -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers.
    return ["-O3", "-fopenmp", *_ISA_FLAGS[cpu_isa()]]


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def ld_flags() -> list[str]:
    # libgomp.so.1 resolves to the copy torch already loaded (same soname), so
    # torch.set_num_threads governs fastbn's threads too.
    return ["-fopenmp"]


def sources(with_cuda: bool, absolute: bool = False) -> list[str]:
    files = CPU_SOURCES + CPU_KERNEL_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [str(ROOT / f) for f in files] if absolute else files
