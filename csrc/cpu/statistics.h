// Per-channel statistics: batch statistics (Welford with Chan merges) and
// the backward's sums, for both layouts. Per variant (see kernels.h); the
// kernels reached from the entry points are in statistics_kernels.cpp.
//
// Channels-first reductions pick one of three walks by shape: long rows of
// small channels in fused channel blocks (fused_kernels.cpp); the gradient
// sums of short rows (S < kShortRow) image by image with one accumulator per
// channel; otherwise (channel, block of rows) items, which prefetch short rows
// ahead. Channels-last tensors are walked as periods of K values (see
// channels_last_period). Partials are merged in chunk order.
#pragma once

#include "vec_utils.h"
#include "work_split.h"

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {

// Largest accumulator state (one accumulator per channel, the part a row
// touches) for walking short rows image by image, in memory order: half the
// L2 cache of the machines measured.
constexpr int64_t kMaxWalkStateBytes = int64_t(512) << 10;

inline bool walk_images(const Geometry& g, int64_t touched_bytes_per_channel) {
  return g.S < kShortRow && g.C * touched_bytes_per_channel <= kMaxWalkStateBytes;
}

// Images per chunk when walking images: about kChunkValues values, and at
// least 4096 per channel, so that turning each channel's vector accumulator
// into a result (a few dozen lane merges) stays cheap next to the work.
inline int64_t images_per_chunk(const Geometry& g) {
  return std::max(rows_per_chunk(g.C * g.S), (4096 + g.S - 1) / g.S);
}

// ---------------------------------------------------------------------------
// Batch statistics (Welford, Chan merge)
// ---------------------------------------------------------------------------
//
// Welford runs on x - shift[c], shift[c] being the channel's first value:
// with a large offset (x = 1e4 + noise) the running mean of x itself sits
// where fp32 cannot represent the small updates mean += (x - mean) / n, and
// they are lost; the shifted values are O(spread), where it can. The mean is
// shifted back at the end; the variance does not change.

// Statistics of x - x[c, first] for channel c over the rows n0 <= n < n1 of
// a channels-first tensor (partials stay shifted until they are merged).
template <typename scalar_t>
WelfordStat<at::opmath_type<scalar_t>> shifted_channel_stats(
    const scalar_t* x, const Geometry& g, int64_t c, int64_t n0, int64_t n1) {
  using acc_t = at::opmath_type<scalar_t>;
  const Vectorized<acc_t> shift(static_cast<acc_t>(x[c * g.S]));
  RowWelford<scalar_t> acc(g.S);
  acc.add_rows(x + (n0 * g.C + c) * g.S, g.C * g.S, n1 - n0, shift);
  return acc.result();
}

// Statistics of channel c over the short rows n0 <= n < n1, minus the
// channel's first value, in two passes: the sum gives the mean, then the
// squared deviations from it are summed (the second pass reads the rows from
// L1). The vector sums run across the rows, and the item ends with two lane
// reductions, where RowWelford ends with two lane merges of four accumulator
// pairs and updates, per row, more accumulators than AVX2's 16 registers hold
// when rows have a tail: for items of few values (few images of short rows)
// those costs dominate. A row's last, partial step is a whole-step load
// masked to the row (the values past it belong to the next row), except
// where that would read past the tensor's end.
// Used for items of at most kTwoPassMaxItemValues values (N * S). Training
// forward at 2 threads on an AVX2 EPYC (8 MiB L3), against RowWelford in one
// process: bf16 32x2048x7x7 2540 -> 2057 us (torch 2129; RowWelford was
// the one case slower than torch in the benchmark), fp32 32x2048x7x7 alike
// (2397-3815 us against 2329-2501 over three runs), fp32 32x128x8x8
// 144 -> 130, 32x64x3x3 59 -> 45, bf16 8x512x14x14 459 -> 402, fp32
// 674 -> 573. For larger items it was mixed to slower: fp32 16x256x16x16
// (4096 values) 614 -> 746, bf16 1024x16x10x10 964 -> 1072.
constexpr int64_t kTwoPassMaxItemValues = 2048;

template <typename scalar_t>
WelfordStat<at::opmath_type<scalar_t>> short_row_channel_stats(
    const scalar_t* x, const Geometry& g, int64_t c, int64_t n0, int64_t n1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const int64_t S = g.S;
  const int64_t whole = S / IO::kStep * IO::kStep;
  const int64_t stride = g.C * S;
  const scalar_t* const x_end = x + g.numel();
  const aVec all_set = aVec(acc_t(0)) == aVec(acc_t(0));
  aVec last_mask[IO::kVecs];  // the row's lanes of its last step, in memory order
  for (int k = 0; k < IO::kVecs; ++k) {
    const int64_t valid = S % IO::kStep - k * IO::kAccLanes;
    last_mask[k] = aVec::set(aVec(acc_t(0)), all_set, std::clamp<int64_t>(valid, 0, IO::kAccLanes));
  }
  const aVec zero(acc_t(0));
  const auto add = [](aVec& u, aVec& v) { return u + v; };
  const scalar_t* first_row = x + (n0 * g.C + c) * S;
  // The sum of term(., v - offset) over the rows' values; two sets of
  // accumulators, alternating by row (shorter dependency chains).
  const auto pass = [&](const aVec& offset, auto term) {
    aVec acc[2][IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      acc[0][k] = acc[1][k] = zero;
    }
    const auto add_row = [&](const scalar_t* row, aVec (&a)[IO::kVecs]) {
      for (int64_t j = 0; j < whole; j += IO::kStep) {
        aVec v[IO::kVecs];
        IO::template load_any_order<false>(row + j, v);  // every lane is summed alike
        for (int k = 0; k < IO::kVecs; ++k) {
          a[k] = term(a[k], v[k] - offset);
        }
      }
      if (whole < S) {
        aVec v[IO::kVecs];
        if (row + whole + IO::kStep <= x_end) {
          IO::load(row + whole, v);
        } else {
          IO::load_partial(row + whole, S - whole, v);
        }
        for (int k = 0; k < IO::kVecs; ++k) {
          a[k] = aVec::blendv(a[k], term(a[k], v[k] - offset), last_mask[k]);
        }
      }
    };
    const scalar_t* row = first_row;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2, row += 2 * stride) {
      add_row(row, acc[0]);
      add_row(row + stride, acc[1]);
    }
    if (n < n1) {
      add_row(row, acc[0]);
    }
    aVec total = acc[0][0] + acc[1][0];
    for (int k = 1; k < IO::kVecs; ++k) {
      total = total + acc[0][k] + acc[1][k];
    }
    return at::vec::vec_reduce_all<acc_t>(add, total);
  };
  const acc_t shift = static_cast<acc_t>(x[c * S]);
  const int64_t count = (n1 - n0) * S;
  const acc_t mean = pass(aVec(shift), [](const aVec& a, const aVec& d) { return a + d; }) / static_cast<acc_t>(count);
  const aVec m(mean);
  const acc_t m2 = pass(aVec(shift), [&m](const aVec& a, const aVec& d) {
    const aVec e = d - m;
    return at::vec::fmadd(e, e, a);
  });
  return WelfordStat<acc_t>{count, mean, m2};
}

template <typename scalar_t>
void batch_stats_channels_first(
    const scalar_t* x, const Geometry& g, WelfordStat<at::opmath_type<scalar_t>>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  // (channel, block of rows) items, whatever the row length: measured against
  // walking short rows image by image (one accumulator per channel), items
  // with their rows prefetched were faster for most shapes (up to 1.4x at
  // 128x128x8x8), slower for few (bf16 1024x16x10x10).
  const int64_t rpc = rows_per_chunk(g.S);
  const int64_t chunks = (g.N + rpc - 1) / rpc;
  const bool two_pass = g.S < kShortRow && std::min(rpc, g.N) * g.S <= kTwoPassMaxItemValues;
  std::vector<WelfordStat<acc_t>> partial(g.C * chunks);
  parallel_items(g.C * chunks, std::min(rpc, g.N) * g.S, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / chunks;
      const int64_t n0 = (item % chunks) * rpc;
      const int64_t n1 = std::min(g.N, n0 + rpc);
      partial[item] = two_pass ? short_row_channel_stats(x, g, c, n0, n1) : shifted_channel_stats(x, g, c, n0, n1);
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    WelfordStat<acc_t> s;
    for (int64_t k = 0; k < chunks; ++k) {
      s.merge(partial[c * chunks + k]);
    }
    s.mean += static_cast<acc_t>(x[c * g.S]);
    out[c] = s;
  }
}

// Chan merge of (n_b, mean_b[K], m2_b[K]) into (n_a, mean_a[K], m2_a[K]), where
// every position of a side has the same count: one vectorised pass.
template <typename acc_t>
void merge_positions(
    int64_t& n_a, acc_t* mean_a, acc_t* m2_a, int64_t n_b, const acc_t* mean_b, const acc_t* m2_b,
    int64_t K) {
  using aVec = Vectorized<acc_t>;
  if (n_b == 0) {
    return;
  }
  if (n_a == 0) {
    std::copy(mean_b, mean_b + K, mean_a);
    std::copy(m2_b, m2_b + K, m2_a);
    n_a = n_b;
    return;
  }
  const acc_t frac = static_cast<acc_t>(n_b) / static_cast<acc_t>(n_a + n_b);
  const acc_t weight = static_cast<acc_t>(n_a) * frac;
  int64_t p = 0;
  for (; p + aVec::size() <= K; p += aVec::size()) {
    const aVec ma = aVec::loadu(mean_a + p);
    const aVec delta = aVec::loadu(mean_b + p) - ma;
    at::vec::fmadd(delta, aVec(frac), ma).store(mean_a + p);
    const aVec m2 = aVec::loadu(m2_a + p) + aVec::loadu(m2_b + p);
    at::vec::fmadd(delta * delta, aVec(weight), m2).store(m2_a + p);
  }
  for (; p < K; ++p) {
    const acc_t delta = mean_b[p] - mean_a[p];
    mean_a[p] += delta * frac;
    m2_a[p] += m2_b[p] + delta * delta * weight;
  }
  n_a += n_b;
}

// Periods per parallel chunk for channels-last reductions: about
// kChunkValues values, and at least 64 periods so that the per-chunk
// partials (K values each) stay small next to the data; but at most an
// eighth of the periods (in whole groups of 4, and at least 16), so that a few
// threads get even shares: 5 chunks would give 2 threads 3 and 2. The chunks
// depend on the shape only, so results do not depend on the thread count.
inline int64_t periods_per_chunk(int64_t K, int64_t periods) {
  const int64_t by_size = std::max<int64_t>(64, rows_per_chunk(K));
  const int64_t eighth = (periods + 31) / 32 * 4;
  return std::max<int64_t>(16, std::min(by_size, eighth));
}

// Welford state of every position of a channels-last period of K values
// over the periods p0 <= p < p1 of x, into (mean[K], m2[K]) (zeroed). A
// function of its own, with its sizes and pointers as parameters: in a
// lambda they would be captures, which every accumulator store (vector types
// may alias anything) forces the compiler to reload.
template <typename scalar_t>
void channels_last_period_stats(
    const scalar_t* x, int64_t K, int64_t p0, int64_t p1,
    const at::opmath_type<scalar_t>* shift_p, at::opmath_type<scalar_t>* mean,
    at::opmath_type<scalar_t>* m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const int64_t K_vec = K - K % IO::kStep;  // positions updated by vectors
  int64_t n = 0;
  int64_t p = p0;
  // Four periods at a time: their statistics are formed in registers
  // (two pairs, then the pair of pairs) and merged into the accumulators
  // with one Chan step, which reads and writes them a quarter as often.
  // The four lie a quarter of the range apart (periods p, p + q, p + 2q,
  // p + 3q): four streams through memory (see part_stride). Against four
  // adjacent periods, at 2 threads, training forward (this reduction, then
  // the normalisation): channels_last bf16 64x64x64x64 5933 -> 4898 us, fp32
  // 32x128x32x32 1854 -> 1400, bf16 32x128x32x32 1618 -> 1284.
  const int64_t q = K_vec == K ? part_stride(p1 - p0, 4, K * static_cast<int64_t>(sizeof(scalar_t))) : 0;
  for (; p < p0 + q; ++p) {
    const scalar_t* rows[4] = {x + p * K, x + (p + q) * K, x + (p + 2 * q) * K, x + (p + 3 * q) * K};
    const acc_t frac = acc_t(4) / static_cast<acc_t>(n + 4);
    const aVec v_frac(frac), v_weight(static_cast<acc_t>(n) * frac), half(acc_t(0.5));
    for (int64_t j = 0; j < K; j += IO::kStep) {
      aVec v[4][IO::kVecs];
      for (int r = 0; r < 4; ++r) {
        prefetch(rows[r] + j, kPrefetchBytes);
        IO::load(rows[r] + j, v[r]);
      }
      for (int k = 0; k < IO::kVecs; ++k) {
        const int64_t off = j + k * IO::kAccLanes;
        const aVec shift = aVec::loadu(shift_p + off);
        const aVec a = v[0][k] - shift, b = v[1][k] - shift;
        const aVec c = v[2][k] - shift, d = v[3][k] - shift;
        const aVec ab = b - a, cd = d - c;
        const aVec mean_ab = at::vec::fmadd(ab, half, a), mean_cd = at::vec::fmadd(cd, half, c);
        const aVec between = mean_cd - mean_ab;
        const aVec mean4 = at::vec::fmadd(between, half, mean_ab);
        // M2 of four values: (a-b)^2/2 + (c-d)^2/2 + (mean_cd - mean_ab)^2
        const aVec m2_4 = at::vec::fmadd(between, between, (ab * ab + cd * cd) * half);
        aVec m = aVec::loadu(mean + off);
        const aVec delta = mean4 - m;
        m = at::vec::fmadd(delta, v_frac, m);
        const aVec q = aVec::loadu(m2 + off) + at::vec::fmadd(delta * delta, v_weight, m2_4);
        m.store(mean + off);
        q.store(m2 + off);
      }
    }
    n += 4;
  }
  p = p0 + 4 * q;  // the rest one by one
  for (; p < p1; ++p) {
    const scalar_t* row = x + p * K;
    ++n;
    const acc_t gain_s = acc_t(1) / static_cast<acc_t>(n);
    const aVec gain(gain_s);
    for (int64_t j = 0; j < K_vec; j += IO::kStep) {
      aVec v[IO::kVecs];
      IO::load_ahead(row + j, v);
      for (int k = 0; k < IO::kVecs; ++k) {
        const int64_t off = j + k * IO::kAccLanes;
        const aVec vs = v[k] - aVec::loadu(shift_p + off);
        aVec m = aVec::loadu(mean + off);
        aVec q = aVec::loadu(m2 + off);
        const aVec d = vs - m;
        m = at::vec::fmadd(d, gain, m);
        q = at::vec::fmadd(d, vs - m, q);
        m.store(mean + off);
        q.store(m2 + off);
      }
    }
    for (int64_t j = K_vec; j < K; ++j) {
      const acc_t v = static_cast<acc_t>(row[j]) - shift_p[j];
      const acc_t d = v - mean[j];
      mean[j] += d * gain_s;
      m2[j] += d * (v - mean[j]);
    }
  }
}

template <typename scalar_t>
void batch_stats_channels_last(
    const scalar_t* x, const Geometry& g, WelfordStat<at::opmath_type<scalar_t>>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = g.C;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(C, total);
  const int64_t periods = total / K;
  const int64_t ppc = periods_per_chunk(K, periods);
  const int64_t chunks = (periods + ppc - 1) / ppc;
  std::vector<acc_t> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t>(x[c]);
  }
  const std::vector<acc_t> shift_p = periodic<acc_t, IO::kStep>(shift.data(), C, K);
  // Per chunk: Welford state of every position of the period.
  std::vector<acc_t> part_mean(chunks * K, acc_t(0)), part_m2(chunks * K, acc_t(0));

  parallel_items(chunks, ppc * K, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t p0 = chunk * ppc;
      channels_last_period_stats(x, K, p0, std::min(periods, p0 + ppc), shift_p.data(),
                                 part_mean.data() + chunk * K, part_m2.data() + chunk * K);
    }
  });
  // Merge the chunks in order, then fold positions into channels.
  std::vector<acc_t> mean(K, acc_t(0)), m2(K, acc_t(0));
  int64_t n = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t count = std::min(periods, (chunk + 1) * ppc) - chunk * ppc;
    merge_positions(n, mean.data(), m2.data(), count, part_mean.data() + chunk * K,
                    part_m2.data() + chunk * K, K);
  }
  // Channel c holds the K / C positions r * C + c, all with count n: equal
  // groups combine without divisions (see merge_lanes).
  std::vector<WelfordStat<acc_t>> stats(C);
  const int64_t R = K / C;
  for (int64_t c = 0; n > 0 && c < C; ++c) {
    acc_t sum_mean = 0, sum_m2 = 0;
    for (int64_t r = 0; r < R; ++r) {
      sum_mean += mean[r * C + c];
      sum_m2 += m2[r * C + c];
    }
    const acc_t group_mean = sum_mean / static_cast<acc_t>(R);
    acc_t spread = 0;
    for (int64_t r = 0; r < R; ++r) {
      const acc_t d = mean[r * C + c] - group_mean;
      spread += d * d;
    }
    stats[c] = WelfordStat<acc_t>{n * R, group_mean, sum_m2 + static_cast<acc_t>(n) * spread};
  }
  for (int64_t i = periods * K; i < total; ++i) {  // after the last whole period
    stats[i % C].add(static_cast<acc_t>(x[i]) - shift[i % C]);
  }
  for (int64_t c = 0; c < C; ++c) {
    out[c] = WelfordStat<acc_t>{stats[c].n, stats[c].mean + shift[c], stats[c].m2};
  }
}

// ---------------------------------------------------------------------------
// Per-channel sums for the backward: sum(dy) and sum(dy * (x - mean))
// ---------------------------------------------------------------------------

// Where the backward's gradient d comes from: plain batch norm sums dy
// itself; after a fused ReLU (see fused_kernels.cpp) d = dy where the saved
// output y > 0 and 0 elsewhere (torch's threshold_backward: y <= 0 gives 0, so
// an output of exactly 0 gets no gradient, and NaN keeps dy). `kWrite` also
// stores d (grad_residual of the fused residual add).
struct GradSource {
  bool masked = false;  // d = dy * (y > 0)
  bool write = false;   // store d
};

template <bool kMasked, typename aVec>
inline aVec masked_grad(const aVec& dy, const aVec& y) {
  if constexpr (kMasked) {
    return aVec::blendv(dy, aVec(0), y <= aVec(0));
  } else {
    return dy;
  }
}

// Calls f(std::bool_constant<masked>, std::bool_constant<write>).
template <typename F>
inline void dispatch_grad_source(const GradSource& source, const F& f) {
  const auto with_write = [&](auto masked) {
    if (source.write) {
      f(masked, std::true_type{});
    } else {
      f(masked, std::false_type{});
    }
  };
  if (source.masked) {
    with_write(std::true_type{});
  } else {
    with_write(std::false_type{});
  }
}

// Whether the written d (grad_residual) goes around the caches: grad_input
// reads it back right after, so only when d alone is past them (a pass-sized
// rule streamed an 8 MB d on a 32 MiB L3, and the fused BN+add+ReLU backward
// of channels_last 32x64x32x32 ran at 0.91x of the unfused ops).
inline bool stream_written_grad(int64_t d_bytes) {
  return stream_pass(d_bytes);
}

// p + offset where the pointer is used (kUsed), else null: no arithmetic on
// the null pointers of unused inputs.
template <bool kUsed, typename T>
inline T* offset_if(T* p, int64_t offset) {
  if constexpr (kUsed) {
    return p + offset;
  } else {
    return nullptr;
  }
}

// The gradient d of one step at dy (y: the saved output when kMasked),
// stored at d_out when kWrite. kAnyOrder: a whole step's lanes come in
// load_any_order's order (for sums over every lane of one channel).
template <typename scalar_t, bool kMasked, bool kWrite, bool kAnyOrder = false>
inline void load_grad_step(
    const scalar_t* dy, const scalar_t* y, scalar_t* d_out, int64_t n, bool stream,
    typename VecIO<scalar_t>::aVec (&d)[VecIO<scalar_t>::kVecs]) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  aVec vy[IO::kVecs];
  if (n == IO::kStep && kAnyOrder) {
    IO::load_any_order(dy, d);
    if constexpr (kMasked) IO::load_any_order(y, vy);
  } else if (n == IO::kStep) {
    IO::load_ahead(dy, d);
    if constexpr (kMasked) IO::load_ahead(y, vy);
  } else {
    // Zero-filled lanes: dy = 0 adds nothing to either sum.
    IO::load_partial(dy, n, d);
    if constexpr (kMasked) IO::load_partial(y, n, vy);
  }
  if constexpr (kMasked) {
    for (int k = 0; k < IO::kVecs; ++k) {
      d[k] = masked_grad<true>(d[k], vy[k]);
    }
  }
  if constexpr (kWrite) {
    if (n == IO::kStep && kAnyOrder) {
      IO::store_any_order(d_out, d, stream);
    } else if (n == IO::kStep) {
      IO::store(d_out, d, stream);
    } else {
      IO::store_partial(d_out, n, d);
    }
  }
}

// The two sums over channels-first rows of one channel.
template <typename scalar_t, bool kMasked = false, bool kWrite = false>
struct GradSumsAcc {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;

  explicit GradSumsAcc(acc_t mean) : mean_(mean) {
    for (int k = 0; k < IO::kVecs; ++k) {
      dy_[k] = dy_xmu_[k] = aVec(acc_t(0));
    }
  }

  inline void add_row(const scalar_t* dy, const scalar_t* x, int64_t len) {
    add_row(dy, nullptr, x, nullptr, len, false);
  }

  // y: the saved output (kMasked); d_out: where d goes (kWrite).
  inline void add_row(const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out,
                      int64_t len, bool stream) {
    add_rows_side_by_side<1>(dy, y, x, d_out, 0, len, stream);
  }

  // add_row of the rows at offsets 0 and `partner`, walked side by side: two
  // streams through memory for each input (see part_stride in work_split.h).
  inline void add_row_pair(const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out,
                           int64_t partner, int64_t len, bool stream) {
    add_rows_side_by_side<2>(dy, y, x, d_out, partner, len, stream);
  }

  template <int kSides>
  inline void add_rows_side_by_side(const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out,
                                    int64_t partner, int64_t len, bool stream) {
    // Local copies of the sums, as in RowWelford::add_row.
    aVec sum_dy[IO::kVecs], sum_dy_xmu[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      sum_dy[k] = dy_[k];
      sum_dy_xmu[k] = dy_xmu_[k];
    }
    const aVec mean = mean_;
    for (int64_t s = 0; s < len; s += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - s);
#pragma GCC unroll 2
      for (int side = 0; side < kSides; ++side) {
        const int64_t at = s + side * partner;
        aVec vdy[IO::kVecs], vx[IO::kVecs];
        // Every lane is of this channel: whole steps in any order (cheaper
        // bf16 widening on AVX2), the same for dy, y, x and d.
        load_grad_step<scalar_t, kMasked, kWrite, true>(dy + at, offset_if<kMasked>(y, at),
                                                         offset_if<kWrite>(d_out, at), n, stream, vdy);
        if (n == IO::kStep) {
          IO::load_any_order(x + at, vx);
        } else {
          IO::load_partial(x + at, n, vx);
        }
        for (int k = 0; k < IO::kVecs; ++k) {
          sum_dy[k] = sum_dy[k] + vdy[k];
          sum_dy_xmu[k] = at::vec::fmadd(vdy[k], vx[k] - mean, sum_dy_xmu[k]);
        }
      }
    }
    for (int k = 0; k < IO::kVecs; ++k) {
      dy_[k] = sum_dy[k];
      dy_xmu_[k] = sum_dy_xmu[k];
    }
  }

  // (sum(dy), sum(dy * (x - mean)))
  std::pair<acc_t, acc_t> result() const {
    aVec a = dy_[0], b = dy_xmu_[0];
    for (int k = 1; k < IO::kVecs; ++k) {
      a = a + dy_[k];
      b = b + dy_xmu_[k];
    }
    const auto add = [](aVec& u, aVec& v) { return u + v; };
    return {at::vec::vec_reduce_all<acc_t>(add, a), at::vec::vec_reduce_all<acc_t>(add, b)};
  }

 private:
  aVec mean_;
  aVec dy_[IO::kVecs], dy_xmu_[IO::kVecs];
};

// grad_sums_channels_first / _last: sum(d) and sum(d * (x - mean)) per
// channel, d from dy as `GradSource` says (y: the saved output when masked;
// d_out: where d is written, when written).
template <typename scalar_t, bool kMasked, bool kWrite>
void grad_sums_channels_first(
    const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out, const Geometry& g,
    const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sum_dy,
    at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Acc = GradSumsAcc<scalar_t, kMasked, kWrite>;
  const bool stream = kWrite && stream_written_grad(g.numel() * static_cast<int64_t>(sizeof(scalar_t)));
  const auto add_row = [&](Acc& acc, int64_t base) {
    acc.add_row(dy + base, offset_if<kMasked>(y, base), x + base, offset_if<kWrite>(d_out, base), g.S, stream);
  };
  if (walk_images(g, sizeof(Acc))) {
    // Short rows: in memory order, as in batch_stats_channels_first.
    const int64_t ipc = images_per_chunk(g);
    const int64_t chunks = (g.N + ipc - 1) / ipc;
    std::vector<acc_t> part_dy(chunks * g.C), part_dy_xmu(chunks * g.C);
    parallel_items(chunks, std::min(ipc, g.N) * g.C * g.S, [&](int64_t begin, int64_t end) {
      std::vector<Acc> accs;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        accs.clear();
        for (int64_t c = 0; c < g.C; ++c) {
          accs.emplace_back(mean[c]);
        }
        for (int64_t n = chunk * ipc; n < std::min(g.N, (chunk + 1) * ipc); ++n) {
          for (int64_t c = 0; c < g.C; ++c) {
            add_row(accs[c], (n * g.C + c) * g.S);
          }
        }
        for (int64_t c = 0; c < g.C; ++c) {
          std::tie(part_dy[chunk * g.C + c], part_dy_xmu[chunk * g.C + c]) = accs[c].result();
        }
      }
      if (kWrite) stream_fence();
    });
    for (int64_t c = 0; c < g.C; ++c) {
      acc_t a = 0, b = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        a += part_dy[k * g.C + c];
        b += part_dy_xmu[k * g.C + c];
      }
      sum_dy[c] = a;
      sum_dy_xmu[c] = b;
    }
    return;
  }
  const int64_t rpc = rows_per_chunk(g.S);
  const int64_t chunks = (g.N + rpc - 1) / rpc;
  std::vector<acc_t> part_dy(g.C * chunks), part_dy_xmu(g.C * chunks);
  parallel_items(g.C * chunks, std::min(rpc, g.N) * g.S, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / chunks;
      const int64_t n0 = (item % chunks) * rpc;
      const int64_t n1 = std::min(g.N, n0 + rpc);
      Acc acc(mean[c]);
      for (int64_t n = n0; n < n1; ++n) {
        add_row(acc, (n * g.C + c) * g.S);
      }
      std::tie(part_dy[item], part_dy_xmu[item]) = acc.result();
    }
    if (kWrite) stream_fence();
  });
  for (int64_t c = 0; c < g.C; ++c) {
    acc_t a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += part_dy[c * chunks + k];
      b += part_dy_xmu[c * chunks + k];
    }
    sum_dy[c] = a;
    sum_dy_xmu[c] = b;
  }
}

// Adds sum(d) and sum(d * (x - mean)) of every position of a channels-last
// period of K values over the periods p0 <= p < p1 (the last one may end at
// `total`) into a_dy[K] and a_dy_xmu[K]. Sizes and pointers are parameters,
// not lambda captures: see channels_last_period_stats.
template <typename scalar_t, bool kMasked, bool kWrite>
void channels_last_period_grad_sums(
    const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out, int64_t K, int64_t total,
    int64_t p0, int64_t p1, const at::opmath_type<scalar_t>* mean_p, at::opmath_type<scalar_t>* a_dy,
    at::opmath_type<scalar_t>* a_dy_xmu, bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  int64_t p = p0;
  // Four whole periods at a time: the accumulators and the periodic
  // means are read and written once per four. As in
  // channels_last_period_stats, the four lie a quarter of the range apart:
  // with both changes, channels_last forward+backward took 1.05-1.24x the
  // time of NCHW (in one process, 2 threads: bf16 64x64x64x64, fp32 and bf16
  // 32x128x32x32, fp32 32x512x28x28, bf16 32x256x56x56), 1.5-1.6x before.
  const int64_t whole = std::max<int64_t>(0, std::min(p1, total / K) - p0);
  const int64_t q = K % IO::kStep == 0 ? part_stride(whole, 4, K * static_cast<int64_t>(sizeof(scalar_t))) : 0;
  for (; p < p0 + q; ++p) {
    for (int64_t j = 0; j < K; j += IO::kStep) {
      aVec vdy[4][IO::kVecs], vx[4][IO::kVecs];
      for (int r = 0; r < 4; ++r) {
        const int64_t at = (p + r * q) * K + j;
        prefetch(dy + at, kPrefetchBytes);
        prefetch(x + at, kPrefetchBytes);
        if constexpr (kMasked) {
          prefetch(y + at, kPrefetchBytes);
          aVec vy[IO::kVecs];
          IO::load(dy + at, vdy[r]);
          IO::load(y + at, vy);
          for (int k = 0; k < IO::kVecs; ++k) {
            vdy[r][k] = masked_grad<true>(vdy[r][k], vy[k]);
          }
        } else {
          IO::load(dy + at, vdy[r]);
        }
        if constexpr (kWrite) {
          IO::store(d_out + at, vdy[r], stream);
        }
        IO::load(x + at, vx[r]);
      }
      for (int k = 0; k < IO::kVecs; ++k) {
        const int64_t off = j + k * IO::kAccLanes;
        const aVec m = aVec::loadu(mean_p + off);
        aVec s_dy = aVec::loadu(a_dy + off);
        aVec s_dy_xmu = aVec::loadu(a_dy_xmu + off);
        for (int r = 0; r < 4; ++r) {
          s_dy = s_dy + vdy[r][k];
          s_dy_xmu = at::vec::fmadd(vdy[r][k], vx[r][k] - m, s_dy_xmu);
        }
        s_dy.store(a_dy + off);
        s_dy_xmu.store(a_dy_xmu + off);
      }
    }
  }
  p = p0 + 4 * q;  // the rest one by one
  for (; p < p1; ++p) {
    const int64_t base = p * K;
    const int64_t len = std::min(K, total - base);
    for (int64_t j = 0; j < len; j += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - j);
      const int64_t at = base + j;
      aVec vdy[IO::kVecs], vx[IO::kVecs];
      load_grad_step<scalar_t, kMasked, kWrite>(dy + at, offset_if<kMasked>(y, at), offset_if<kWrite>(d_out, at),
                                                n, stream, vdy);
      if (n == IO::kStep) {
        IO::load_ahead(x + at, vx);
      } else {
        IO::load_partial(x + at, n, vx);
      }
      for (int k = 0; k < IO::kVecs; ++k) {
        const int64_t off = j + k * IO::kAccLanes;
        const aVec m = aVec::loadu(mean_p + off);
        const aVec s_dy = aVec::loadu(a_dy + off) + vdy[k];
        const aVec s_dy_xmu =
            at::vec::fmadd(vdy[k], vx[k] - m, aVec::loadu(a_dy_xmu + off));
        s_dy.store(a_dy + off);
        s_dy_xmu.store(a_dy_xmu + off);
      }
    }
  }
}

template <typename scalar_t, bool kMasked, bool kWrite>
void grad_sums_channels_last(
    const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* d_out, const Geometry& g,
    const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sum_dy,
    at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = g.C;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(C, total);
  const int64_t periods = (total + K - 1) / K;  // the last one may be partial
  const int64_t ppc = periods_per_chunk(K, periods);
  const int64_t chunks = (periods + ppc - 1) / ppc;
  const std::vector<acc_t> mean_p = periodic<acc_t, IO::kStep>(mean, C, K);
  std::vector<acc_t> part_dy(chunks * C, acc_t(0)), part_dy_xmu(chunks * C, acc_t(0));
  const bool stream = kWrite && stream_written_grad(g.numel() * static_cast<int64_t>(sizeof(scalar_t)));

  parallel_items(chunks, ppc * K, [&](int64_t begin, int64_t end) {
    // One step of padding: the last step of a period may run past K.
    std::vector<acc_t> a_dy(K + IO::kStep), a_dy_xmu(K + IO::kStep);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(a_dy.begin(), a_dy.end(), acc_t(0));
      std::fill(a_dy_xmu.begin(), a_dy_xmu.end(), acc_t(0));
      const int64_t p0 = chunk * ppc;
      channels_last_period_grad_sums<scalar_t, kMasked, kWrite>(
          dy, y, x, d_out, K, total, p0, std::min(periods, p0 + ppc), mean_p.data(), a_dy.data(),
          a_dy_xmu.data(), stream);
      acc_t* out_dy = part_dy.data() + chunk * C;
      acc_t* out_dy_xmu = part_dy_xmu.data() + chunk * C;
      for (int64_t r = 0; r < K; r += C) {  // K is a multiple of C
        for (int64_t c = 0; c < C; ++c) {
          out_dy[c] += a_dy[r + c];
          out_dy_xmu[c] += a_dy_xmu[r + c];
        }
      }
    }
    if (kWrite) stream_fence();
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += part_dy[k * C + c];
      b += part_dy_xmu[k * C + c];
    }
    sum_dy[c] = a;
    sum_dy_xmu[c] = b;
  }
}

// Per-channel results of the batch statistics of n values each: the mean,
// invstd = 1 / sqrt(biased variance + eps), and the unbiased variance for the
// running estimate. Vectorised: with a hundred channels the scalar divisions
// and square roots cost as much as normalising a 64x100 input. Vector division
// and square root round correctly, like the scalar ones, so the values are
// the same either way.
template <typename acc_t>
void finish_stats(const WelfordStat<acc_t>* stats, int64_t C, int64_t n, double eps,
                  acc_t* mean, acc_t* invstd, acc_t* unbiased) {
  using aVec = Vectorized<acc_t>;
  const acc_t count = static_cast<acc_t>(n), count_1 = static_cast<acc_t>(n - 1);
  const acc_t epsilon = static_cast<acc_t>(eps);
  int64_t c = 0;
  if (C >= aVec::size()) {
    acc_t m2[aVec::size()];
    const aVec v_count(count), v_count_1(count_1), v_eps(epsilon), one(acc_t(1));
    for (; c + aVec::size() <= C; c += aVec::size()) {
      for (int64_t i = 0; i < aVec::size(); ++i) {
        mean[c + i] = stats[c + i].mean;
        m2[i] = stats[c + i].m2;
      }
      const aVec q = aVec::loadu(m2);
      (one / (q / v_count + v_eps).sqrt()).store(invstd + c);
      (q / v_count_1).store(unbiased + c);
    }
  }
  for (; c < C; ++c) {
    mean[c] = stats[c].mean;
    invstd[c] = acc_t(1) / std::sqrt(stats[c].m2 / count + epsilon);
    unbiased[c] = stats[c].m2 / count_1;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
