// Which instruction-set variant of the CPU kernels runs (see kernels.h).
// Compiled once.
#include "kernels.h"

namespace fastbn::cpu {

CpuIsa active_isa() {
  return CpuIsa::kBaseline;
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

}  // namespace fastbn::cpu
