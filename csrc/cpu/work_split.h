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
