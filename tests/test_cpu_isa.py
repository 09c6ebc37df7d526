"""The CPU kernels' instruction-set variants (csrc/cpu/kernels.h, cpu_isa.cpp):
the variant in use and the FASTBN_CPU_ISA cap, correctness under every variant
this CPU runs (forced by the cap), no AVX-512 instruction outside the
AVX-512 variant's functions (the weak-symbol trap: such code would be run on
AVX2-only machines and die with SIGILL), and the elementwise walks' software
prefetch where they were built to have it."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_correctness_subset

import fastbn
from fastbn import _build, _loader

ROOT = Path(__file__).resolve().parent.parent
# /proc/cpuinfo flags a variant needs (the baseline's are what the whole
# extension is compiled for).
VARIANT_CPU_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def built_variants() -> list[str]:
    x86 = platform.machine().lower() in {"x86_64", "amd64"}
    return (["avx2"] if x86 else ["default"]) + _build.cpu_kernel_variants()


def missing_flags(variant: str) -> set[str]:
    return VARIANT_CPU_FLAGS.get(variant, set()) - cpu_flags()


def python(code: str, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_build_info_reports_the_best_variant_this_cpu_runs():
    info = fastbn.build_info()
    assert info["cpu_isa_built"] == built_variants()
    runnable = [v for v in built_variants() if not missing_flags(v)]
    cap = os.environ.get("FASTBN_CPU_ISA")
    if cap:
        runnable = runnable[: built_variants().index(cap) + 1]
    assert info["cpu_isa"] == runnable[-1]


@pytest.mark.parametrize("cap", ["avx2", "avx512"])
def test_cap_limits_the_variant(cap):
    if cap not in built_variants():
        pytest.skip(f"the {cap} variant is not built here (built: {built_variants()})")
    out = python("import fastbn; print(fastbn.build_info()['cpu_isa'])", FASTBN_CPU_ISA=cap)
    assert out.returncode == 0, out.stderr
    runnable = [v for v in built_variants()[: built_variants().index(cap) + 1] if not missing_flags(v)]
    assert out.stdout.split()[-1] == runnable[-1]


def test_unknown_cap_is_a_clear_error():
    code = (
        "import torch, fastbn\n"
        "try:\n"
        "    fastbn.batch_norm(torch.randn(4, 3), None, None, training=True)\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    out = python(code, FASTBN_CPU_ISA="sse9")
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "FASTBN_CPU_ISA must be one of" in out.stdout and "'sse9'" in out.stdout


@pytest.mark.parametrize("variant", ["avx2", "avx512"])
def test_correctness_under_each_variant(variant):
    if variant not in built_variants():
        pytest.skip(f"the {variant} variant is not built here (built: {built_variants()})")
    if missing_flags(variant):
        pytest.skip(f"this CPU cannot run the {variant} variant: {', '.join(sorted(missing_flags(variant)))} "
                    "missing from /proc/cpuinfo")
    env = {**os.environ, "FASTBN_CPU_ISA": variant}
    check = python("import fastbn; print(fastbn.build_info()['cpu_isa'])", FASTBN_CPU_ISA=variant)
    assert check.stdout.split()[-1] == variant, check.stderr
    run_correctness_subset(env)


# Instructions only AVX-512 (EVEX encoding) has: its registers (zmm, xmm/ymm
# 16-31, mask registers), embedded broadcast, and mnemonics without a VEX form.
EVEX = re.compile(
    r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}|\bk(mov|and|andn|or|xor|xnor|not|test|ortest|"
    r"shiftl|shiftr|add|unpck)[bwdq]\b|\bvmovdq[au](8|16|32|64)\b|\bvpternlog|\bvperm[it]2|\bv(broadcast|insert|"
    r"extract)[if](32x|64x)|\bvcvtne2?ps2bf16|\bvdpbf16ps|\bvpmov[bwdq]2m|\bvpmovm2|\bvrcp14|\bvrsqrt14|\bvscalef|"
    r"\bvfixupimm|\bvgetexp|\bvgetmant|\bvrndscale|\bvreduce[ps]|\bv(p)?compress|\bv(p)?expand|\bvpconflict|"
    r"\bvplzcnt|\bvpro[lr]v?[dq]\b|\bvpsra[v]?q\b|\bvpabsq|\bvpm(ax|in)[su]q|\bvpmullq|\bvcvt\w*2u[dq]|\bvcvtu")


def test_no_avx512_instruction_outside_the_avx512_variant():
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    if "avx512" not in built_variants():
        pytest.skip("no AVX-512 variant is built here")
    library = _loader.load()["library"]
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    function, in_variant = "", False
    variant_evex = 0
    offenders: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if line.endswith(">:"):  # "0000000000012340 <name>:"
            function = line[line.index("<") + 1: -2]
            # The variant's functions, and templates instantiated for its types
            # (reached only from it).
            in_variant = "::AVX512::" in function
        elif "\t" in line and EVEX.search(line):
            if in_variant:
                variant_evex += 1
            else:
                offenders.setdefault(function, line.strip())
    assert variant_evex > 0, "found no AVX-512 code in the AVX-512 variant: the check would see nothing"
    assert not offenders, "AVX-512 instructions outside the AVX-512 variant:\n" + "\n".join(
        f"{f}: {insn}" for f, insn in list(offenders.items())[:20])


# A walk instantiated to prefetch (kPrefetch, the template argument after the
# store kind kStream) must issue prefetch instructions, one instantiated not
# to must not: GCC 12 silently drops the __builtin_prefetch of a plain inline
# function inlined into a forced-inline one (see FASTBN_STEP_INLINE in
# csrc/cpu/vec_utils.h), which would leave every pass from memory without it.
PREFETCH_WALK = re.compile(
    r"::(?:map_rows_flat_walk|map_periods_walk)<(?:true|false), (true|false),|::map_short_period<\d+, (?:true|false), (true|false),")


def test_walks_built_to_prefetch_issue_prefetches():
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    library = _loader.load()["library"]
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    prefetches: dict[str, int] = {}
    wants: dict[str, bool] = {}
    function = None
    for line in out.stdout.splitlines():
        if line.endswith(">:"):
            name = line[line.index("<") + 1: -2]
            # The walks themselves (not their lambdas, nor PLT stubs).
            match = PREFETCH_WALK.search(name) if "@plt" not in name and "{lambda" not in name else None
            function = name if match else None
            if match:
                wants[name] = (match.group(1) or match.group(2)) == "true"
                prefetches[name] = 0
        elif function is not None and "\tprefetch" in line:
            prefetches[function] += 1
    assert any(wants.values()) and not all(wants.values()), (
        f"found {len(wants)} out-of-line walks, not both kinds: the check would see nothing")
    lost = [name for name, want in wants.items() if want and prefetches[name] == 0]
    stray = [name for name, want in wants.items() if not want and prefetches[name] > 0]
    assert not lost, f"{len(lost)} walks built to prefetch issue no prefetch, e.g.:\n" + "\n".join(lost[:5])
    assert not stray, f"{len(stray)} walks built not to prefetch issue prefetches, e.g.:\n" + "\n".join(stray[:5])
