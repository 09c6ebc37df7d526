// Opens the AVX-512 variant of a kernel file: fastbn/_build.py generates, for
// every file of CPU_KERNEL_SOURCES, a translation unit that includes this
// header, the kernel file, then isa_avx512_end.h.
//
// Why a target pragma in a wrapper: torch.utils.cpp_extension compiles every
// source of an extension with the same flags (setup.py and JIT load alike),
// so per-file -mavx512f is not available from the one source list; a second
// extension module, or objects compiled outside ninja, would each need a
// loader or a build path of their own. `#pragma GCC target` gives the
// functions defined after it the AVX-512 instruction sets, and nothing else.
//
// The trap it must avoid: inline and template functions of std, c10 and ATen
// are emitted as weak symbols in every object that uses them, and the linker
// keeps one copy for all callers; a copy compiled for AVX-512 would then run
// on AVX2 machines too and die with SIGILL. Hence:
//  1. every ISA-neutral header the kernels use is included here first, before
//     the pragma, so its functions are baseline code (their include guards
//     keep the kernel file's own includes from parsing them again);
//  2. at::vec (per CPU_CAPABILITY, like fastbn's own kernel headers) is
//     parsed after it, inside the at::vec::AVX512 inline namespace, which is
//     why CPU_CAPABILITY is switched here before vec.h is first included;
//  3. everything the kernel file defines is in fastbn::cpu::AVX512.
// tests/test_cpu_isa.py disassembles the built library and fails if any
// function outside those namespaces contains AVX-512 instructions.
// GCC's C++ front end does not define __AVX512F__ & co. under the pragma
// (it preprocesses first), so the code tests CPU_CAPABILITY_AVX512 instead.
#include "kernels.h"

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/MathConstants.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
#include <c10/util/complex.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/TypeCast.h>
#include <c10/util/bit_cast.h>
#include <c10/util/generic_math.h>
#include <c10/util/Load.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <immintrin.h>
#include <iostream>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <ostream>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY_DEFAULT
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#undef FASTBN_ISA_INDEX
#define FASTBN_ISA_INDEX 1

#pragma GCC push_options
#if defined(__clang__)
#error "the AVX-512 variant needs GCC's target pragma; fastbn/_build.py builds it with GCC only"
#elif __GNUC__ >= 10
// BF16 (Cooper Lake, Sapphire Rapids, Zen 4): used only where
// cpu_has_avx512_bf16() says the CPU has it (see VecIO::narrow).
#define FASTBN_HAVE_AVX512BF16
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#endif

// sleef.h declares the AVX-512 functions at::vec's AVX-512 classes call only
// under __AVX512F__, which GCC's C++ front end does not define for a target
// pragma: defined for that header alone (declarations only, no code).
#if !defined(__AVX512F__)
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX512F__
#else
#include <sleef.h>
#endif
