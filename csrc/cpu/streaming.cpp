// Whether the elementwise passes write their outputs with streaming
// (non-temporal) stores, decided from this machine's cache sizes. Compiled
// once, as baseline code.
//
// The rule: a pass streams its output when the bytes it moves (inputs read
// plus output written) reach 3/4 of the cache that can hold them: the shared
// last-level cache plus the L2 of each thread's core (on the non-inclusive
// caches of current x86 server parts the two hold different lines). Below
// that the output stays cached for the next reader (the next layer, or the
// next call), and plain stores into lines already cached cost no memory
// traffic; above it, streaming saves the read-for-ownership of every output
// line, a third of an elementwise pass's traffic. glibc's memcpy makes the
// same call from the shared cache size (it streams only copies above a
// fraction of it), and FASTBN_CPU_STREAM_MIN_MB overrides the threshold (MiB
// of bytes moved per pass; 0 always streams, inf never).
// Measurements behind it (issue 14): on a 2-core AMD EPYC with 32 MiB of L3
// and 2 threads, fp32 NCHW eval of 4-7 MB tensors took 95-186 us with the old
// fixed rule (stream from 1 MiB of output per thread) and 50-87 us without
// streaming, faster than torch's 58-105 us; the old rule had been tuned on a
// Xeon VM with a 300 MiB LLC (fp32 64x6x28x28 eval, 1.2 MB: 89 us streamed
// against 108 plain on one thread, 53 against 44 on two). Under this rule
// neither machine streams those tensors; both stream passes too big for
// their caches. A sweep on the 2-core EPYC (32 MiB L3, 512 KiB L2, 2
// threads; `python -m fastbn.bench --suite cache --modes eval_fwd --dtypes
// fp32`, whose inputs rotate through copies so that each call reads from
// memory), fastbn's time with FASTBN_CPU_STREAM_MIN_MB=0 over =inf, each
// relative to torch in its own run: 1-4 MiB tensors 1.5-2.4x slower
// streamed, 6.8 MiB 1.33x slower, 8 MiB 0.86-0.96, 16 MiB 0.60-0.69, 32-64
// MiB 0.71-0.85. The break-even (about 14 MiB moved, under half the L3) is
// below this rule's 25 MiB: the rule leaves a pass of 8-12 MiB tensors
// cached, which costs up to ~15% in this benchmark, and keeps their output
// in the L3 for the next reader (the next layer), which the benchmark does
// not measure. The 3/4 factor follows glibc.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace fastbn::cpu {
namespace {

// The rule before the cache sizes were known, for machines that report none.
constexpr int64_t kUnknownCacheStreamMinBytesPerThread = int64_t(2) << 20;


// "32K", "2048K", "32M" as sysfs writes them; 0 when unreadable.
int64_t parse_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) {
    return 0;
  }
  switch (*end) {
    case 'K': return value << 10;
    case 'M': return value << 20;
    case 'G': return value << 30;
    default: return value;
  }
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

CacheSizes query_cache_sizes() {
  CacheSizes out;
  // Linux's view of cpu0's caches (what a VM is given, where cpuid may show
  // the host's): L2 (per core) and the highest level (shared).
  int llc_level = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level_text = read_line(dir + "level");
    if (level_text.empty()) {
      break;
    }
    if (read_line(dir + "type") == "Instruction") {
      continue;
    }
    const int level = std::atoi(level_text.c_str());
    const int64_t size = parse_size(read_line(dir + "size"));
    if (level == 2) {
      out.l2_per_core = size;
    }
    if (level >= 2 && level >= llc_level) {
      llc_level = level;
      out.llc = size;
    }
  }
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  if (out.l2_per_core == 0) {  // no sysfs: glibc's cpuid-based answer
    out.l2_per_core = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  }
  if (out.llc == 0) {
    out.llc = std::max<long>({0L, sysconf(_SC_LEVEL3_CACHE_SIZE), sysconf(_SC_LEVEL2_CACHE_SIZE)});
  }
#endif
  return out;
}

// A threshold override such as FASTBN_CPU_STREAM_MIN_MB, in MiB of bytes
// moved per pass (0: always, inf: never); negative when unset.
double override_mib(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    return -1;
  }
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  TORCH_CHECK(end != text && *end == '\0' && value >= 0,
              name, " must be a number of MiB >= 0 (or inf), got '", text, "'");
  return value;
}

int64_t mib_to_bytes(double mib) {
  return mib * 1048576.0 >= 9.0e18 ? INT64_MAX : static_cast<int64_t>(mib * 1048576.0);
}

}  // namespace

const CacheSizes& machine_cache_sizes() {
  static const CacheSizes sizes = query_cache_sizes();
  return sizes;
}

int64_t stream_min_bytes(const CacheSizes& caches, int64_t threads) {
  if (caches.llc <= 0) {
    return kUnknownCacheStreamMinBytesPerThread * threads;
  }
  return (caches.llc + caches.l2_per_core * threads) / 4 * 3;
}

int64_t active_stream_min_bytes() {
  static const double override = override_mib("FASTBN_CPU_STREAM_MIN_MB");
  if (override >= 0) {
    return mib_to_bytes(override);
  }
  return stream_min_bytes(machine_cache_sizes(), at::get_num_threads());
}

bool stream_pass(int64_t bytes_moved) {
  return bytes_moved >= active_stream_min_bytes();
}

// Software prefetch (kPrefetchBytes ahead, see vec_utils.h) pays off when a
// pass reads from memory and costs when its inputs are already in the
// last-level cache, where the walks of channels-last periods (two streams,
// parameters loaded beside each step) and of channels-first rows become
// bound by memory operations. A pass whose bytes take up less than half the
// LLC is taken to find its input there: written by the layer before, or
// read by the statistics pass just before. Measured on the 2-core EPYC (32
// MiB L3, 2 threads; the benchmark reuses such inputs, and rotates larger
// ones through copies so that they come from memory), fp32 eval, with
// prefetch -> without: 16x64x32x32 (4 MiB, cached) NCHW 120 -> 84 us,
// channels_last 108 -> 86; 32x96x24x24 (7 MiB, cached) 225 -> 187, 190 ->
// 169; from memory, 32x64x32x32 (8 MiB) NCHW 489 -> 588, channels_last 395
// -> 428, and 32x2048x7x7 (12 MiB) channels_last 702 -> 966: those keep it.
// FASTBN_CPU_PREFETCH_MIN_MB overrides the threshold (MiB of bytes moved per
// pass; 0 always prefetches, inf never).
int64_t prefetch_min_bytes(const CacheSizes& caches) {
  return caches.llc / 2;  // unknown caches (0): always prefetch
}

int64_t active_prefetch_min_bytes() {
  static const double override = override_mib("FASTBN_CPU_PREFETCH_MIN_MB");
  return override >= 0 ? mib_to_bytes(override) : prefetch_min_bytes(machine_cache_sizes());
}

bool prefetch_pass(int64_t bytes_moved) {
  return bytes_moved >= active_prefetch_min_bytes();
}

}  // namespace fastbn::cpu
