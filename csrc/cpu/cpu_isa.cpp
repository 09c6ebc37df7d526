// Which instruction-set variant of the CPU kernels runs (see kernels.h):
// the best one that was built and that this CPU (and its OS) runs, capped by
// FASTBN_CPU_ISA. Compiled once, as baseline code.
#include "kernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace fastbn::cpu {
namespace {

bool cpu_runs_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  // libgcc's checks include the OS saving the AVX-512 registers (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Whether the kernels were built for `isa`: every kernel file registers all
// its kernels, so one stub tells.
bool built(CpuIsa isa) {
  return batch_stats_kernel.variants[static_cast<int>(isa)].f32 != nullptr;
}

CpuIsa choose() {
  CpuIsa best = CpuIsa::kBaseline;
  if (built(CpuIsa::kAvx512) && cpu_runs_avx512()) {
    best = CpuIsa::kAvx512;
  }
  const char* cap = std::getenv("FASTBN_CPU_ISA");
  if (cap == nullptr || *cap == '\0') {
    return best;
  }
  const std::string requested(cap);
  for (int i = 0; i < kCpuIsaCount; ++i) {
    if (requested == isa_name(static_cast<CpuIsa>(i))) {
      return std::min(best, static_cast<CpuIsa>(i));
    }
  }
  TORCH_CHECK(false, "FASTBN_CPU_ISA must be one of ", isa_name(CpuIsa::kBaseline), ", ",
              isa_name(CpuIsa::kAvx512), " (the most capable CPU kernel variant to use), got '", requested,
              "'");
}

}  // namespace

CpuIsa active_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

bool isa_built(CpuIsa isa) {
  return built(isa);
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline:
#if defined(CPU_CAPABILITY_AVX2)
      return "avx2";
#else
      return "default";
#endif
    case CpuIsa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

extern const bool cpu_has_avx512_bf16 = [] {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  return cpu_runs_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}();

}  // namespace fastbn::cpu
