// How the CPU kernels cut their work into parallel items: by shape only, so
// that results do not depend on the number of threads. Per variant (see
// kernels.h).
#pragma once

#include "vec_utils.h"

#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {

// The page size that 4 KiB aliasing and the prefetchers' page limits follow.
constexpr int64_t kPageBytes = 4096;

// Target number of values per parallel work item.
constexpr int64_t kChunkValues = 1 << 16;

template <typename acc_t>
using Stats = std::vector<WelfordStat<acc_t>>;

inline int64_t rows_per_chunk(int64_t row_len) {
  return std::max<int64_t>(1, kChunkValues / std::max<int64_t>(row_len, 1));
}

// at::parallel_for over work items of about `values_per_item` values each;
// runs inline (no thread wake-up) when the whole range is under one chunk.
template <typename F>
void parallel_items(int64_t items, int64_t values_per_item, const F& f) {
  at::parallel_for(0, items, rows_per_chunk(values_per_item), f);
}

// Calls f(std::bool_constant<value>): a runtime flag made a template argument.
template <typename F>
inline void dispatch_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Channels-first rows shorter than this are "short": reducing them channel by
// channel jumps through memory a few hundred bytes at a time, which the
// hardware prefetchers follow badly (the statistics prefetch such rows in
// software; the gradient sums walk them image by image).
constexpr int64_t kShortRow = 512;

// Side-by-side streams. From memory, one core reads a range faster as
// several streams walked side by side than as one: more misses are in
// flight. Standalone, on the AVX2 EPYC (2 threads, 16 MiB read from memory):
// 1273-1363 us along one stream a thread, 823-885 along two, 551-609 along
// four; 64 MiB at 1 thread 8076, 6756 and 5692 us. The walks that read
// large inputs split their range into parts and walk them side by side.
//
// The distance, in periods of `period_bytes`, between the side-by-side parts
// of `whole` periods cut into `parts`: whole / parts, one less when that puts
// the parts a multiple of 4 KiB apart (the same offset within their pages,
// where loads and stores of different parts alias: streaming stores so ran
// 1.6x slower). Still a multiple when the periods are whole pages.
inline int64_t part_stride(int64_t whole, int64_t parts, int64_t period_bytes) {
  int64_t stride = whole / parts;
  if (stride > 1 && stride * period_bytes % kPageBytes == 0) {
    --stride;
  }
  return stride;
}

// Per-position copies of per-channel values for a period of length K (a
// multiple of C * S) in which channel c holds S consecutive positions: S = 1
// for a channels-last period, S = the row length for channels-first images.
// Padded by one step so full-vector loads past K stay in bounds.
template <typename acc_t, int64_t kPad>
std::vector<acc_t> periodic(const acc_t* per_channel, int64_t C, int64_t K, int64_t S = 1) {
  std::vector<acc_t> out(K + kPad, acc_t(0));
  if (S == 1) {
    std::copy_n(per_channel, C, out.begin());  // a fill_n per value costs 0.5 us at C = 100
  } else {
    for (int64_t c = 0; c < C; ++c) {
      std::fill_n(out.begin() + c * S, S, per_channel[c]);
    }
  }
  for (int64_t p = C * S; p < K; p += C * S) {  // K is a multiple of C * S
    std::copy_n(out.begin(), C * S, out.begin() + p);
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
