// Vector helpers for the CPU kernels: load/store of scalar_t data as vectors
// of the accumulation type (fp32 for half types), Welford accumulators and
// Chan's merge. Per variant: in fastbn::cpu::CPU_CAPABILITY (see kernels.h).
#pragma once

#include "kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Non-temporal stores: large outputs are written around the caches, which
// saves the read-for-ownership of every output line (a third of a normalise
// pass's memory traffic). Needs an address aligned to kStreamAlign.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
#else
constexpr int64_t kStreamAlign = 0;  // no streaming
#endif

template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

// Orders this thread's streaming stores before what follows (a task's end).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}


// Software prefetch distance for loads that walk memory in order. On the
// machines measured, a core's hardware prefetchers keep too few lines in
// flight for it to read at the memory bandwidth; asking for the line 4 KiB
// ahead raises a core's streaming read rate by about 1.7x. From the cache it
// costs instead: the elementwise passes skip it for inputs likely cached
// (prefetch_pass in streaming.cpp; the loads' kPrefetch = false).
constexpr int64_t kPrefetchBytes = 4096;

// GCC 12 left the per-step helpers of the AVX-512 variant out of line (a
// call per vector step, which clobbers every vector register the walk
// keeps); they are forced inline there. Forcing one level only moved the
// limit to the next (the 16-bit loads, then load_ahead and store), and GCC
// 12 drops the __builtin_prefetch of a plain inline function inlined into a
// forced one, so prefetch() is forced too. The AVX2 variant inlines them
// all by itself; forcing them there changed GCC's other inlining decisions.
#if defined(CPU_CAPABILITY_AVX512)
#define FASTBN_STEP_INLINE C10_ALWAYS_INLINE
#define FASTBN_LAMBDA_INLINE __attribute__((always_inline))  // the same, for a lambda
#else
#define FASTBN_STEP_INLINE inline
#define FASTBN_LAMBDA_INLINE
#endif

// Prefetches the line `bytes_ahead` past p for reading. The address is formed
// as an integer: it may lie past the end of the array (prefetches never fault),
// where pointer arithmetic would be undefined.
FASTBN_STEP_INLINE void prefetch(const void* p, int64_t bytes_ahead) {
#if defined(__GNUC__) || defined(__clang__)
  const auto address = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes_ahead);
  __builtin_prefetch(reinterpret_cast<const void*>(address), /*rw=*/0, /*locality=*/3);
#else
  (void)p;
  (void)bytes_ahead;
#endif
}

// Makes the compiler hold v in a register from here on: a parameter vector
// loaded once for several inputs is otherwise re-read from memory at each
// use (folded into the arithmetic), spending load slots the walks are bound by.
template <typename T>
inline void keep_in_register(Vectorized<T>& v) {
#if defined(__GNUC__) && (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
#if defined(CPU_CAPABILITY_AVX512)
  std::conditional_t<std::is_same_v<T, float>, __m512, __m512d> raw = v;
  asm("" : "+v"(raw));
#else
  std::conditional_t<std::is_same_v<T, float>, __m256, __m256d> raw = v;
  asm("" : "+x"(raw));
#endif
  v = raw;
#else
  (void)v;
#endif
}

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using sVec = Vectorized<scalar_t>;
  using aVec = Vectorized<acc_t>;
  // Elements per step: one full vector of scalar_t, which is kVecs vectors of
  // acc_t (2 for half types, whose vectors hold twice as many lanes).
  static constexpr int64_t kStep = sVec::size();
  static constexpr int kVecs = static_cast<int>(sVec::size() / aVec::size());
  static constexpr int64_t kAccLanes = aVec::size();

  static FASTBN_STEP_INLINE void load(const scalar_t* p, aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0] = aVec::loadu(p);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(sVec::loadu(p));
      v[0] = lo;
      v[1] = hi;
    }
  }
  // Whether load_any_order / store_any_order differ from load / store: bf16
  // on AVX2, where widening in order costs an extract, two zero-extensions
  // and two shifts per step and narrowing a cross-lane permute; unpacking
  // against zero within the 128-bit halves costs two instructions, and the
  // narrowing pack undoes its order.
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kAnyOrderDiffers = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  static constexpr bool kAnyOrderDiffers = false;
#endif
  // A step of kStep values as kVecs vectors whose lanes hold them in an
  // order of this type's choosing (not memory order); store_any_order writes
  // such vectors back in memory order. For passes whose every lane gets the
  // same parameters (a row of one channel), and sums over all lanes.
  template <bool kPrefetch = true>
  static FASTBN_STEP_INLINE void load_any_order(const scalar_t* p, aVec (&v)[kVecs]) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    if constexpr (kAnyOrderDiffers) {
      if constexpr (kPrefetch) {
        prefetch(p, kPrefetchBytes);
      }
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i zero = _mm256_setzero_si256();
      // bf16 is the upper half of a float: values 0-3, 8-11 and 4-7, 12-15.
      v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
      v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
      return;
    }
#endif
    load_ahead<kPrefetch>(p, v);
  }
  // The positions within the step of the values in vector k of load_any_order.
  static inline aVec any_order_positions(int k) {
    if constexpr (kAnyOrderDiffers) {
      return k == 0 ? aVec(0, 1, 2, 3, 8, 9, 10, 11) : aVec(4, 5, 6, 7, 12, 13, 14, 15);
    } else {
      return aVec::arange(static_cast<acc_t>(k * kAccLanes), acc_t(1));
    }
  }
  static FASTBN_STEP_INLINE void store_any_order(scalar_t* p, const aVec (&v)[kVecs]) {
    if constexpr (kAnyOrderDiffers) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_any_order(v));
    } else {
      store(p, v);
    }
  }
  // store_any_order, through the non-temporal path when `stream` and p is aligned.
  static FASTBN_STEP_INLINE void store_any_order(scalar_t* p, const aVec (&v)[kVecs], bool stream) {
    if (stream && kStreamAlign != 0 && reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0) {
      stream_any_order(p, v);
    } else {
      store_any_order(p, v);
    }
  }
  // Reorders each whole step of per-position values (a channels-last period's
  // parameters) so that a vector load at offset k * kAccLanes of a step gives
  // the positions of vector k of load_any_order.
  static inline void to_any_order(std::vector<acc_t>& values) {
    if constexpr (kAnyOrderDiffers) {
      acc_t step[kStep];
      for (size_t at = 0; at + kStep <= values.size(); at += kStep) {
        for (int k = 0; k < kVecs; ++k) {
          acc_t positions[kAccLanes];
          any_order_positions(k).store(positions);
          for (int64_t l = 0; l < kAccLanes; ++l) {
            step[k * kAccLanes + l] = values[at + static_cast<int64_t>(positions[l])];
          }
        }
        std::copy(step, step + kStep, values.begin() + at);
      }
    }
  }
  static FASTBN_STEP_INLINE void stream_any_order(scalar_t* p, const aVec (&v)[kVecs]) {
    if constexpr (kAnyOrderDiffers) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow_any_order(v));
    } else {
      stream_aligned(p, v);
    }
  }
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  // Rounds each float to the nearest bf16 (ties to even; NaN to the quiet
  // NaN 0x7fc0, as c10::BFloat16's own conversion) and packs the two
  // vectors, lanes in load_any_order's order.
  static FASTBN_STEP_INLINE __m256i narrow_any_order(const aVec (&v)[kVecs]) {
    const __m256i rounding = _mm256_set1_epi32(0x7fff);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i nan = _mm256_set1_epi32(0x7fc0);
    __m256i half[2];
    for (int k = 0; k < 2; ++k) {
      const __m256i bits = _mm256_castps_si256(v[k]);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, rounding), odd), 16);
      const __m256 is_nan = _mm256_cmp_ps(v[k], v[k], _CMP_UNORD_Q);
      half[k] = _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(is_nan));
    }
    return _mm256_packus_epi32(half[0], half[1]);
  }
#endif
  // load() for walks in memory order: also prefetches kPrefetchBytes ahead.
  template <bool kPrefetch = true>
  static FASTBN_STEP_INLINE void load_ahead(const scalar_t* p, aVec (&v)[kVecs]) {
    if constexpr (kPrefetch) {
      prefetch(p, kPrefetchBytes);
    }
    load(p, v);
  }
  // Loads n < kStep elements; the other lanes are zero.
  static FASTBN_STEP_INLINE void load_partial(const scalar_t* p, int64_t n, aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0] = aVec::loadu(p, n);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(load_partial_16bit(p, n));
      v[0] = lo;
      v[1] = hi;
    }
  }
  // n < kStep values of a 16-bit type. ATen's AVX2 form copies them with a
  // memcpy call into a stack buffer and loads that, a store-forwarding stall:
  // at every row end of a short-row reduction (bf16 32x2048x7x7: one per 49
  // values) it was the slowest instruction of the loop. Here: a masked load
  // of the whole 32-bit pairs, and an odd last value put into its pair's low
  // half (the masked load never touches memory past the n values).
  static FASTBN_STEP_INLINE sVec load_partial_16bit(const scalar_t* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    const __m256i pair_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i pairs = _mm256_set1_epi32(static_cast<int32_t>(n / 2));
    __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), _mm256_cmpgt_epi32(pairs, pair_index));
    if (n % 2 != 0) {
      uint16_t last;
      std::memcpy(&last, p + n - 1, sizeof(last));
      v = _mm256_blendv_epi8(v, _mm256_set1_epi32(last), _mm256_cmpeq_epi32(pairs, pair_index));
    }
    return sVec(v);
#else
    return sVec::loadu(p, n);  // a masked load with AVX-512
#endif
  }
  static FASTBN_STEP_INLINE void store(scalar_t* p, const aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0].store(p);
    } else {
      narrow(v).store(p);
    }
  }
  // A streaming store at p, which must be kStreamAlign-aligned.
  static FASTBN_STEP_INLINE void stream_aligned(scalar_t* p, const aVec (&v)[kVecs]) {
    if constexpr (kStreamAlign == 0) {
      store(p, v);
    } else if constexpr (kVecs == 1) {
      stream_store(p, v[0]);
    } else {
      stream_store(p, narrow(v));
    }
  }
  // store() through the non-temporal path when `stream` and p is aligned.
  static FASTBN_STEP_INLINE void store(scalar_t* p, const aVec (&v)[kVecs], bool stream) {
    if (!stream || kStreamAlign == 0 || reinterpret_cast<uintptr_t>(p) % kStreamAlign != 0) {
      store(p, v);
    } else if constexpr (kVecs == 1) {
      stream_store(p, v[0]);
    } else {
      stream_store(p, narrow(v));
    }
  }
  // Two float vectors to one vector of the half type, rounding to nearest even.
  static FASTBN_STEP_INLINE sVec narrow(const aVec (&v)[kVecs]) {
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTBN_HAVE_AVX512BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // One instruction instead of ATen's integer rounding sequence, on the
      // CPUs that have it (the variant also runs on AVX-512 CPUs without).
      if (cpu_has_avx512_bf16) {
        return sVec((__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
      }
    }
#endif
    return at::vec::convert_from_float<scalar_t>(v[0], v[1]);
  }
  static FASTBN_STEP_INLINE void store_partial(scalar_t* p, int64_t n, const aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0].store(p, n);
    } else {
      store_partial_16bit(p, n, narrow(v));
    }
  }
  // The counterpart of load_partial_16bit (ATen's AVX2 form: a stack buffer
  // and a memcpy call).
  static FASTBN_STEP_INLINE void store_partial_16bit(scalar_t* p, int64_t n, const sVec& v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    const __m256i pair_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i pairs = _mm256_set1_epi32(static_cast<int32_t>(n / 2));
    const __m256i bits = v;
    _mm256_maskstore_epi32(reinterpret_cast<int*>(p), _mm256_cmpgt_epi32(pairs, pair_index), bits);
    if (n % 2 != 0) {
      // Lane n - 1 is the low half of pair n / 2.
      const __m128i half = n - 1 < 8 ? _mm256_castsi256_si128(bits) : _mm256_extracti128_si256(bits, 1);
      alignas(16) uint16_t lanes[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), half);
      std::memcpy(p + n - 1, &lanes[(n - 1) % 8], sizeof(uint16_t));
    }
#else
    v.store(p, n);
#endif
  }
};

// Merges the first `lanes` lanes of the vector accumulators (mean[j], m2[j]),
// j < kCount (lane l of the whole lies in vector l / L), all of whose lanes saw
// `n` values. Groups of equal size combine exactly without divisions:
// mean = average of the means, M2 = sum of the M2s + n * sum of the squared
// deviations of the means from it (Chan's formula applied to k equal groups).
template <typename acc_t, int kCount>
inline void merge_lanes(
    WelfordStat<acc_t>& into, int64_t n, const Vectorized<acc_t> (&mean)[kCount],
    const Vectorized<acc_t> (&m2)[kCount], int64_t lanes) {
  using aVec = Vectorized<acc_t>;
  constexpr int64_t L = aVec::size();
  if (n == 0 || lanes <= 0) {
    return;
  }
  const aVec zero(acc_t(0));
  // Lanes past `lanes` read as zero.
  const auto valid = [&](const aVec& v, int j) {
    const int64_t count = lanes - j * L;
    return count >= L ? v : aVec::set(zero, v, std::max<int64_t>(count, 0));
  };
  aVec sum_mean = zero, sum_m2 = zero;
  for (int j = 0; j < kCount; ++j) {
    sum_mean = sum_mean + valid(mean[j], j);
    sum_m2 = sum_m2 + valid(m2[j], j);
  }
  const auto add = [](aVec& u, aVec& v) { return u + v; };
  const acc_t group_mean = at::vec::vec_reduce_all<acc_t>(add, sum_mean) / static_cast<acc_t>(lanes);
  const aVec gm(group_mean);
  aVec spread = zero;
  for (int j = 0; j < kCount; ++j) {
    const aVec d = valid(mean[j] - gm, j);
    spread = at::vec::fmadd(d, d, spread);
  }
  const acc_t total_m2 = at::vec::vec_reduce_all<acc_t>(add, sum_m2) +
      static_cast<acc_t>(n) * at::vec::vec_reduce_all<acc_t>(add, spread);
  into.merge(WelfordStat<acc_t>{n * lanes, group_mean, total_m2});
}

// Welford over rows of `len` contiguous values that all belong to one channel
// (the channels-first layout). Each row is cut the same way: full rounds of
// kAcc vectors, then a tail of up to kAcc vectors whose last one may be
// partial. Round accumulators share one count (rounds so far), tail slots
// another (rows so far), so one scalar reciprocal serves a whole round or
// tail. Lanes of a partial vector past the row's end accumulate garbage and
// are left out when the lanes are merged.
template <typename scalar_t>
struct RowWelford {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  static constexpr int kAcc = 4;
  static constexpr int kStepsPerRound = kAcc / IO::kVecs;
  static constexpr int64_t kRound = kStepsPerRound * IO::kStep;
  // Rows shorter than kPrefetchBytes that are walked with a stride (one
  // channel's rows of a channels-first tensor) are prefetched this many rows
  // ahead: the hardware prefetchers do not follow strides across pages.
  static constexpr int64_t kPrefetchRows = 4;

  explicit RowWelford(int64_t len) : len_(len) {
    for (int j = 0; j < kAcc; ++j) {
      mean_[j] = m2_[j] = tail_mean_[j] = tail_m2_[j] = aVec(acc_t(0));
    }
  }

  // Accumulates the row's values minus `shift` (see batch_stats_* for why).
  inline void add_row(const scalar_t* p, const aVec& shift) {
    add_rows(p, 0, 1, shift);
  }

  // add_row for `rows` rows, `stride` elements apart.
  inline void add_rows(const scalar_t* p, int64_t stride, int64_t rows, const aVec& shift) {
    const int64_t tail = len_ % kRound;
    add_rows_with_tail<0, false>(static_cast<int>((tail + IO::kStep - 1) / IO::kStep), p, stride, rows, 0, shift);
  }

  // add_row of the rows at p and p + partner, walked side by side: two
  // streams through memory (see part_stride in work_split.h).
  inline void add_row_pair(const scalar_t* p, int64_t partner, const aVec& shift) {
    const int64_t tail = len_ % kRound;
    add_rows_with_tail<0, true>(static_cast<int>((tail + IO::kStep - 1) / IO::kStep), p, 0, 1, partner, shift);
  }

  WelfordStat<acc_t> result() const {
    WelfordStat<acc_t> out;
    // Every lane of the round accumulators saw `rounds_` values; the first
    // len_ % kRound lanes of the tail ones saw `rows_`.
    merge_lanes(out, rounds_, mean_, m2_, kRound);
    merge_lanes(out, rows_, tail_mean_, tail_m2_, len_ % kRound);
    return out;
  }

 private:
  static inline void update(aVec& mean, aVec& m2, const aVec& v, const aVec& gain) {
    const aVec d = v - mean;
    mean = at::vec::fmadd(d, gain, mean);
    m2 = at::vec::fmadd(d, v - mean, m2);
  }

  // Runs add_rows_impl<kTailSteps> for kTailSteps = tail_steps (0 to
  // kStepsPerRound, the vector steps of a row's tail).
  template <int kTry, bool kPair>
  inline void add_rows_with_tail(
      int tail_steps, const scalar_t* p, int64_t stride, int64_t rows, int64_t partner, const aVec& shift) {
    if constexpr (kTry <= kStepsPerRound) {
      if (tail_steps == kTry) {
        add_rows_impl<kTry, kPair>(p, stride, rows, partner, shift);
      } else {
        add_rows_with_tail<kTry + 1, kPair>(tail_steps, p, stride, rows, partner, shift);
      }
    }
  }

  // The state lives in local variables while the rows are added: kept in
  // members, every update would be a load and a store (vector stores may
  // alias anything, so the compiler cannot keep members in registers across
  // them). With the tail's step count a constant, every accumulator index is
  // one too, and all of them stay in registers.
  // kPair: each row with its partner (the row `partner` values on), a round
  // of one, then the same round of the other.
  template <int kTailSteps, bool kPair>
  inline void add_rows_impl(const scalar_t* p, int64_t stride, int64_t rows, int64_t partner, const aVec& shift) {
    constexpr int kSides = kPair ? 2 : 1;
    const int64_t len = len_;
    const int64_t full = len / kRound * kRound;
    // Values in the tail's last step (kStep when it is a full one).
    const int64_t last = len - full - (kTailSteps - 1) * IO::kStep;
    const int64_t row_bytes = len * static_cast<int64_t>(sizeof(scalar_t));
    const bool prefetch_rows = stride != 0 && row_bytes < kPrefetchBytes;
    aVec mean[kAcc], m2[kAcc], tail_mean[kAcc], tail_m2[kAcc];
#pragma GCC unroll 4
    for (int j = 0; j < kAcc; ++j) {
      mean[j] = mean_[j];
      m2[j] = m2_[j];
      tail_mean[j] = tail_mean_[j];
      tail_m2[j] = tail_m2_[j];
    }
    int64_t rounds = rounds_, tail_rows = rows_;
    for (int64_t r = 0; r < rows; ++r, p += stride) {
      if (prefetch_rows) {
        const int64_t ahead = kPrefetchRows * stride * static_cast<int64_t>(sizeof(scalar_t));
        for (int64_t offset = 0; offset < row_bytes + 63; offset += 64) {
          prefetch(p, ahead + offset);
        }
      }
      for (int64_t i = 0; i < full; i += kRound) {
#pragma GCC unroll 2
        for (int side = 0; side < kSides; ++side) {
          const scalar_t* row = p + side * partner;
          ++rounds;
          const aVec gain(acc_t(1) / static_cast<acc_t>(rounds));
#pragma GCC unroll 4
          for (int s = 0; s < kStepsPerRound; ++s) {
            aVec v[IO::kVecs];
            IO::load_any_order(row + i + s * IO::kStep, v);  // all lanes merge alike
#pragma GCC unroll 2
            for (int k = 0; k < IO::kVecs; ++k) {
              update(mean[s * IO::kVecs + k], m2[s * IO::kVecs + k], v[k] - shift, gain);
            }
          }
        }
      }
      if constexpr (kTailSteps > 0) {
#pragma GCC unroll 2
        for (int side = 0; side < kSides; ++side) {
          const scalar_t* row = p + side * partner;
          ++tail_rows;
          const aVec gain(acc_t(1) / static_cast<acc_t>(tail_rows));
#pragma GCC unroll 4
          for (int s = 0; s < kTailSteps; ++s) {
            aVec v[IO::kVecs];
            if (s + 1 < kTailSteps || last == IO::kStep) {
              IO::load(row + full + s * IO::kStep, v);
            } else {
              IO::load_partial(row + full + s * IO::kStep, last, v);
            }
#pragma GCC unroll 2
            for (int k = 0; k < IO::kVecs; ++k) {
              update(tail_mean[s * IO::kVecs + k], tail_m2[s * IO::kVecs + k], v[k] - shift, gain);
            }
          }
        }
      }
    }
    rounds_ = rounds;
    rows_ = tail_rows;
#pragma GCC unroll 4
    for (int j = 0; j < kAcc; ++j) {
      mean_[j] = mean[j];
      m2_[j] = m2[j];
      tail_mean_[j] = tail_mean[j];
      tail_m2_[j] = tail_m2[j];
    }
  }

  int64_t len_;
  aVec mean_[kAcc], m2_[kAcc];
  int64_t rounds_ = 0;
  aVec tail_mean_[kAcc], tail_m2_[kAcc];
  int64_t rows_ = 0;
};

// Channels-last rows hold C consecutive channels. A "period" of K = lcm(C,
// kStep) values (K / C rows) starts every time on channel 0, so per-position
// vectors of length K cover every channel with full vectors, even for C = 3.
// Very large odd C would make K huge; then the period is one row and its last
// C % kStep positions are handled by scalar code.
// Short periods are repeated up to kMinPeriod values so that the inner loops
// run long enough to amortise their set-up.
// They are never made longer than the tensor needs (`total` values).
template <typename scalar_t>
inline int64_t channels_last_period(int64_t C, int64_t total) {
  constexpr int64_t step = VecIO<scalar_t>::kStep;
  constexpr int64_t kMaxPeriod = 16384;
  constexpr int64_t kMinPeriod = 512;
  const int64_t K = C / std::gcd(C, step) * step;
  if (K > kMaxPeriod) {
    return C;
  }
  const int64_t repeats = std::min(kMinPeriod / K, (total + K - 1) / K);
  return K * std::max<int64_t>(1, repeats);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
