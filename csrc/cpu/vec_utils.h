// Vector helpers for the CPU kernels: load/store of scalar_t data as vectors
// of the accumulation type (fp32 for half types), Welford accumulators and
// Chan's merge.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <numeric>

namespace fastbn::cpu {

using at::vec::Vectorized;

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

  static inline void load(const scalar_t* p, aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0] = aVec::loadu(p);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(sVec::loadu(p));
      v[0] = lo;
      v[1] = hi;
    }
  }
  // Loads n < kStep elements; the other lanes are zero.
  static inline void load_partial(const scalar_t* p, int64_t n, aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0] = aVec::loadu(p, n);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(sVec::loadu(p, n));
      v[0] = lo;
      v[1] = hi;
    }
  }
  static inline void store(scalar_t* p, const aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
  static inline void store_partial(scalar_t* p, int64_t n, const aVec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0].store(p, n);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, n);
    }
  }
};

// Running (count, mean, M2) of a set of values.
template <typename acc_t>
struct WelfordStat {
  int64_t n = 0;
  acc_t mean = 0;
  acc_t m2 = 0;

  inline void add(acc_t x) {
    ++n;
    const acc_t d = x - mean;
    mean += d / static_cast<acc_t>(n);
    m2 += d * (x - mean);
  }
  // Chan et al.'s parallel merge of two partial results.
  inline void merge(const WelfordStat& o) {
    if (o.n == 0) {
      return;
    }
    if (n == 0) {
      *this = o;
      return;
    }
    const int64_t total = n + o.n;
    const acc_t o_frac = static_cast<acc_t>(o.n) / static_cast<acc_t>(total);
    const acc_t delta = o.mean - mean;
    mean += delta * o_frac;
    m2 += o.m2 + delta * delta * static_cast<acc_t>(n) * o_frac;
    n = total;
  }
};

// Merges the lanes of a vector accumulator whose lanes all saw `n` values.
template <typename acc_t>
inline void merge_lanes(
    WelfordStat<acc_t>& into, int64_t n, const Vectorized<acc_t>& mean,
    const Vectorized<acc_t>& m2) {
  if (n == 0) {
    return;
  }
  constexpr int64_t L = Vectorized<acc_t>::size();
  acc_t means[L];
  acc_t m2s[L];
  mean.store(means);
  m2.store(m2s);
  for (int64_t l = 0; l < L; ++l) {
    into.merge(WelfordStat<acc_t>{n, means[l], m2s[l]});
  }
}

// Welford over rows of contiguous values that all belong to one channel
// (the channels-first layout). Full rounds update kAcc independent vector
// accumulators that share one count, so one reciprocal serves a round; the
// remainder of each row goes to a tail accumulator with per-lane counts.
template <typename scalar_t>
struct RowWelford {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  static constexpr int kAcc = 4;
  static constexpr int kStepsPerRound = kAcc / IO::kVecs;
  static constexpr int64_t kRound = kStepsPerRound * IO::kStep;

  aVec mean[kAcc];
  aVec m2[kAcc];
  int64_t rounds = 0;
  aVec tail_mean{acc_t(0)};
  aVec tail_m2{acc_t(0)};
  aVec tail_n{acc_t(0)};

  RowWelford() {
    for (int j = 0; j < kAcc; ++j) {
      mean[j] = aVec(acc_t(0));
      m2[j] = aVec(acc_t(0));
    }
  }

  inline void add_tail(const aVec& x, const aVec& active) {
    tail_n = tail_n + active;
    const aVec gain = active / at::vec::maximum(tail_n, aVec(acc_t(1)));
    const aVec d = x - tail_mean;
    tail_mean = at::vec::fmadd(d, gain, tail_mean);
    tail_m2 = at::vec::fmadd(d * active, x - tail_mean, tail_m2);
  }

  // Accumulates x - shift (see batch_stats_* for why).
  inline void add_row(const scalar_t* p, int64_t len, const aVec& shift) {
    int64_t i = 0;
    for (; i + kRound <= len; i += kRound) {
      ++rounds;
      const aVec gain(acc_t(1) / static_cast<acc_t>(rounds));
      for (int s = 0; s < kStepsPerRound; ++s) {
        aVec v[IO::kVecs];
        IO::load(p + i + s * IO::kStep, v);
        for (int k = 0; k < IO::kVecs; ++k) {
          const int j = s * IO::kVecs + k;
          v[k] = v[k] - shift;
          const aVec d = v[k] - mean[j];
          mean[j] = at::vec::fmadd(d, gain, mean[j]);
          m2[j] = at::vec::fmadd(d, v[k] - mean[j], m2[j]);
        }
      }
    }
    for (; i < len; i += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - i);
      aVec v[IO::kVecs];
      if (n == IO::kStep) {
        IO::load(p + i, v);
      } else {
        IO::load_partial(p + i, n, v);
      }
      for (int k = 0; k < IO::kVecs; ++k) {
        const int64_t lanes = std::clamp<int64_t>(n - k * IO::kAccLanes, 0, IO::kAccLanes);
        add_tail(v[k] - shift, lane_mask(lanes));
      }
    }
  }

  // 1 in the first `lanes` lanes, 0 elsewhere.
  static inline aVec lane_mask(int64_t lanes) {
    if (lanes == IO::kAccLanes) {
      return aVec(acc_t(1));
    }
    alignas(64) acc_t m[IO::kAccLanes];
    for (int64_t l = 0; l < IO::kAccLanes; ++l) {
      m[l] = l < lanes ? acc_t(1) : acc_t(0);
    }
    return aVec::loadu(m);
  }

  WelfordStat<acc_t> result() const {
    WelfordStat<acc_t> out;
    for (int j = 0; j < kAcc; ++j) {
      merge_lanes(out, rounds, mean[j], m2[j]);
    }
    acc_t ns[IO::kAccLanes];
    acc_t means[IO::kAccLanes];
    acc_t m2s[IO::kAccLanes];
    tail_n.store(ns);
    tail_mean.store(means);
    tail_m2.store(m2s);
    for (int64_t l = 0; l < IO::kAccLanes; ++l) {
      out.merge(WelfordStat<acc_t>{static_cast<int64_t>(ns[l]), means[l], m2s[l]});
    }
    return out;
  }
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

}  // namespace fastbn::cpu
