// CPU kernels for fastbn's batch norm operators.
//
// Layouts (see batch_norm.h):
//  - channels-last: the tensor is a flat array whose position p holds channel
//    p % C; a period of K values (a multiple of C and of the vector width)
//    maps every lane to a fixed channel, so per-position vectors of length K
//    replace per-channel scalars and even C = 3 runs on full vectors.
//  - channels-first: a row of S contiguous values belongs to one channel.
//    Reductions pick one of three walks by shape: long rows of small
//    channels in fused channel blocks (reduce, then transform while the block
//    is in cache); the gradient sums of short rows (S < kShortRow) image by
//    image with one accumulator per channel; otherwise (channel, block of
//    rows) items, which prefetch short rows ahead.
// Elementwise passes walk memory in order, with streaming stores for large
// outputs, which come from a block pool (output_pool.h).
// Work is split into chunks whose size depends on the shape only, and
// partials are merged in chunk order: results do not depend on the number of
// threads.
#include "../batch_norm.h"
#include "output_pool.h"
#include "vec_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

namespace fastbn::cpu {
namespace {

// Target number of values per parallel work item.
constexpr int64_t kChunkValues = 1 << 16;

template <typename acc_t>
using Stats = std::vector<WelfordStat<acc_t>>;

int64_t rows_per_chunk(int64_t row_len) {
  return std::max<int64_t>(1, kChunkValues / std::max<int64_t>(row_len, 1));
}

// at::parallel_for over work items of about `values_per_item` values each;
// runs inline (no thread wake-up) when the whole range is under one chunk.
template <typename F>
void parallel_items(int64_t items, int64_t values_per_item, const F& f) {
  at::parallel_for(0, items, rows_per_chunk(values_per_item), f);
}

// Channels-first rows shorter than this are "short": reducing them channel by
// channel jumps through memory a few hundred bytes at a time, which the
// hardware prefetchers follow badly (the statistics prefetch such rows in
// software; the gradient sums walk them image by image).
constexpr int64_t kShortRow = 512;
// Largest accumulator state (one accumulator per channel, the part a row
// touches) for walking short rows image by image, in memory order: half the
// L2 cache of the machines measured.
constexpr int64_t kMaxWalkStateBytes = int64_t(512) << 10;

bool walk_images(const Geometry& g, int64_t touched_bytes_per_channel) {
  return g.S < kShortRow && g.C * touched_bytes_per_channel <= kMaxWalkStateBytes;
}

// Images per chunk when walking images: about kChunkValues values, and at
// least 4096 per channel, so that turning each channel's vector accumulator
// into a result (a few dozen lane merges) stays cheap next to the work.
int64_t images_per_chunk(const Geometry& g) {
  return std::max(rows_per_chunk(g.C * g.S), (4096 + g.S - 1) / g.S);
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
  Stats<acc_t> partial(g.C * chunks);
  parallel_items(g.C * chunks, std::min(rpc, g.N) * g.S, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / chunks;
      const int64_t n0 = (item % chunks) * rpc;
      const int64_t n1 = std::min(g.N, n0 + rpc);
      partial[item] = shifted_channel_stats(x, g, c, n0, n1);
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
int64_t periods_per_chunk(int64_t K, int64_t periods) {
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
  const int64_t group_bytes = 4 * K * static_cast<int64_t>(sizeof(scalar_t));
  int64_t n = 0;
  int64_t p = p0;
  // Four periods at a time: their statistics are formed in registers
  // (two pairs, then the pair of pairs) and merged into the accumulators
  // with one Chan step, which reads and writes them a quarter as often.
  for (; K_vec == K && p + 4 <= p1; p += 4) {
    const scalar_t* rows[4] = {x + p * K, x + (p + 1) * K, x + (p + 2) * K, x + (p + 3) * K};
    const acc_t frac = acc_t(4) / static_cast<acc_t>(n + 4);
    const aVec v_frac(frac), v_weight(static_cast<acc_t>(n) * frac), half(acc_t(0.5));
    for (int64_t j = 0; j < K; j += IO::kStep) {
      aVec v[4][IO::kVecs];
      for (int r = 0; r < 4; ++r) {
        prefetch(rows[r] + j, group_bytes);  // the same place in the next group
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

// The two sums over channels-first rows of one channel.
template <typename scalar_t>
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
    // Local copies of the sums, as in RowWelford::add_row.
    aVec sum_dy[IO::kVecs], sum_dy_xmu[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      sum_dy[k] = dy_[k];
      sum_dy_xmu[k] = dy_xmu_[k];
    }
    const aVec mean = mean_;
    for (int64_t s = 0; s < len; s += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - s);
      aVec vdy[IO::kVecs], vx[IO::kVecs];
      if (n == IO::kStep) {
        IO::load_ahead(dy + s, vdy);
        IO::load_ahead(x + s, vx);
      } else {
        // Zero-filled lanes: dy = 0 adds nothing to either sum.
        IO::load_partial(dy + s, n, vdy);
        IO::load_partial(x + s, n, vx);
      }
      for (int k = 0; k < IO::kVecs; ++k) {
        sum_dy[k] = sum_dy[k] + vdy[k];
        sum_dy_xmu[k] = at::vec::fmadd(vdy[k], vx[k] - mean, sum_dy_xmu[k]);
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

template <typename scalar_t>
void grad_sums_channels_first(
    const scalar_t* dy, const scalar_t* x, const Geometry& g,
    const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sum_dy,
    at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  if (walk_images(g, sizeof(GradSumsAcc<scalar_t>))) {
    // Short rows: in memory order, as in batch_stats_channels_first.
    const int64_t ipc = images_per_chunk(g);
    const int64_t chunks = (g.N + ipc - 1) / ipc;
    std::vector<acc_t> part_dy(chunks * g.C), part_dy_xmu(chunks * g.C);
    parallel_items(chunks, std::min(ipc, g.N) * g.C * g.S, [&](int64_t begin, int64_t end) {
      std::vector<GradSumsAcc<scalar_t>> accs;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        accs.clear();
        for (int64_t c = 0; c < g.C; ++c) {
          accs.emplace_back(mean[c]);
        }
        for (int64_t n = chunk * ipc; n < std::min(g.N, (chunk + 1) * ipc); ++n) {
          for (int64_t c = 0; c < g.C; ++c) {
            const int64_t base = (n * g.C + c) * g.S;
            accs[c].add_row(dy + base, x + base, g.S);
          }
        }
        for (int64_t c = 0; c < g.C; ++c) {
          std::tie(part_dy[chunk * g.C + c], part_dy_xmu[chunk * g.C + c]) = accs[c].result();
        }
      }
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
      GradSumsAcc<scalar_t> acc(mean[c]);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t base = (n * g.C + c) * g.S;
        acc.add_row(dy + base, x + base, g.S);
      }
      std::tie(part_dy[item], part_dy_xmu[item]) = acc.result();
    }
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

// Adds sum(dy) and sum(dy * (x - mean)) of every position of a channels-last
// period of K values over the periods p0 <= p < p1 (the last one may end at
// `total`) into a_dy[K] and a_dy_xmu[K]. Sizes and pointers are parameters,
// not lambda captures: see channels_last_period_stats.
template <typename scalar_t>
void channels_last_period_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t K, int64_t total, int64_t p0, int64_t p1,
    const at::opmath_type<scalar_t>* mean_p, at::opmath_type<scalar_t>* a_dy,
    at::opmath_type<scalar_t>* a_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  const int64_t group_bytes = 4 * K * static_cast<int64_t>(sizeof(scalar_t));
  int64_t p = p0;
  // Four whole periods at a time: the accumulators and the periodic
  // means are read and written once per four.
  for (; K % IO::kStep == 0 && p + 4 <= p1 && (p + 4) * K <= total; p += 4) {
    for (int64_t j = 0; j < K; j += IO::kStep) {
      aVec vdy[4][IO::kVecs], vx[4][IO::kVecs];
      for (int r = 0; r < 4; ++r) {
        const int64_t at = (p + r) * K + j;
        prefetch(dy + at, group_bytes);  // the same place in the next group
        prefetch(x + at, group_bytes);
        IO::load(dy + at, vdy[r]);
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
  for (; p < p1; ++p) {
    const int64_t base = p * K;
    const int64_t len = std::min(K, total - base);
    for (int64_t j = 0; j < len; j += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - j);
      aVec vdy[IO::kVecs], vx[IO::kVecs];
      if (n == IO::kStep) {
        IO::load_ahead(dy + base + j, vdy);
        IO::load_ahead(x + base + j, vx);
      } else {
        IO::load_partial(dy + base + j, n, vdy);
        IO::load_partial(x + base + j, n, vx);
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

template <typename scalar_t>
void grad_sums_channels_last(
    const scalar_t* dy, const scalar_t* x, const Geometry& g,
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

  parallel_items(chunks, ppc * K, [&](int64_t begin, int64_t end) {
    // One step of padding: the last step of a period may run past K.
    std::vector<acc_t> a_dy(K + IO::kStep), a_dy_xmu(K + IO::kStep);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(a_dy.begin(), a_dy.end(), acc_t(0));
      std::fill(a_dy_xmu.begin(), a_dy_xmu.end(), acc_t(0));
      const int64_t p0 = chunk * ppc;
      channels_last_period_grad_sums(dy, x, K, total, p0, std::min(periods, p0 + ppc),
                                     mean_p.data(), a_dy.data(), a_dy_xmu.data());
      acc_t* out_dy = part_dy.data() + chunk * C;
      acc_t* out_dy_xmu = part_dy_xmu.data() + chunk * C;
      for (int64_t r = 0; r < K; r += C) {  // K is a multiple of C
        for (int64_t c = 0; c < C; ++c) {
          out_dy[c] += a_dy[r + c];
          out_dy_xmu[c] += a_dy_xmu[r + c];
        }
      }
    }
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

// ---------------------------------------------------------------------------
// Elementwise: out = f(inputs..., per-channel parameters...)
// ---------------------------------------------------------------------------

// Applies `op(const aVec (&in)[kIn], const aVec (&param)[kParams]) -> aVec`
// to the `len` values starting at `base`; `param_at(offset within the run,
// aVec (&param)[kParams])` supplies the parameter vectors.
// `stream` writes full vectors with non-temporal stores (large outputs).
template <typename scalar_t, int kIn, int kParams, typename ParamAt, typename Op>
inline void map_run(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t base, int64_t len,
    const ParamAt& param_at, const Op& op, bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  const scalar_t* src[kIn];  // a local copy: see map_periods
  for (int i = 0; i < kIn; ++i) {
    src[i] = in[i];
  }
  // The values [j, j + n), n <= kStep.
  const auto apply = [&](int64_t j, int64_t n) {
    aVec v[kIn][IO::kVecs];
    for (int i = 0; i < kIn; ++i) {
      if (n == IO::kStep) {
        IO::load_ahead(src[i] + base + j, v[i]);
      } else {
        IO::load_partial(src[i] + base + j, n, v[i]);
      }
    }
    aVec result[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      aVec args[kIn];
      for (int i = 0; i < kIn; ++i) {
        args[i] = v[i][k];
      }
      aVec prm[kParams];
      param_at(j + k * IO::kAccLanes, prm);
      result[k] = op(args, prm);
    }
    if (n == IO::kStep) {
      IO::store(out + base + j, result, stream);
    } else {
      IO::store_partial(out + base + j, n, result);
    }
  };
  int64_t j = 0;
  if (stream && kStreamAlign != 0) {
    // Streaming stores need aligned addresses (IO::store falls back to plain
    // ones): a partial vector first brings the rest of the run to one. Rows
    // of bf16 28x28 images start misaligned every other row.
    const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + base) % kStreamAlign);
    if (misaligned != 0) {
      j = std::min<int64_t>(len, (kStreamAlign - misaligned) / static_cast<int64_t>(sizeof(scalar_t)));
      apply(0, j);
    }
  }
  for (; j < len; j += IO::kStep) {
    apply(j, std::min<int64_t>(IO::kStep, len - j));
  }
}

// Outputs of at least this many bytes per thread are written with streaming
// stores: with the input beside them they overflow a core's L2 (2 MiB on the
// machines measured), so keeping them cached only evicts the input. Hence per
// thread: fp32 64x6x28x28 eval (1.2 MB out) took 89 us streamed against 108
// plain on one thread, but 53 against 44 on two.
constexpr int64_t kStreamMinBytesPerThread = int64_t(1) << 20;

template <typename scalar_t>
bool stream_output(const Geometry& g) {
  return g.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytesPerThread * at::get_num_threads();
}

// map_run over one channels-first row, whose parameters are the same for all
// its values.
template <typename scalar_t, int kIn, int kParams, typename Op>
inline void map_row(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t base, int64_t len,
    const at::opmath_type<scalar_t> (&values)[kParams], const Op& op, bool stream) {
  using aVec = Vectorized<at::opmath_type<scalar_t>>;
  aVec broadcast[kParams];
  for (int i = 0; i < kParams; ++i) {
    broadcast[i] = aVec(values[i]);
  }
  map_run<scalar_t, kIn, kParams>(
      in, out, base, len,
      [&](int64_t, aVec (&prm)[kParams]) {
        for (int i = 0; i < kParams; ++i) {
          prm[i] = broadcast[i];
        }
      },
      op, stream);
}

// map_row over the channels-first rows r0 <= r < r1 as one flat run, for short
// rows (kAccLanes <= S): a vector then spans at most two rows, and takes its
// parameters from the current row's channel, or a blend of the two. Saves
// the per-row set-up and the partial vector at the end of every row.
template <typename scalar_t, int kIn, int kParams, typename Op>
void map_rows_flat(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t r0, int64_t r1, const Geometry& g,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op, bool stream) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const aVec lane_index = aVec::arange(acc_t(0), acc_t(1));
  int64_t row = r0;
  int64_t row_end = (r0 + 1) * g.S;  // element index where `row` ends
  aVec cur[kParams], next[kParams];
  const auto load_params = [&](int64_t r, aVec (&dst)[kParams]) {
    const int64_t c = r % g.C;
    for (int i = 0; i < kParams; ++i) {
      dst[i] = aVec(params[i][c]);
    }
  };
  load_params(row, cur);
  load_params(row + 1, next);
  map_run<scalar_t, kIn, kParams>(
      in, out, r0 * g.S, (r1 - r0) * g.S,
      [&](int64_t off, aVec (&prm)[kParams]) {
        const int64_t lane0 = r0 * g.S + off;
        if (lane0 >= row_end) {  // entered the next row
          ++row;
          row_end += g.S;
          for (int i = 0; i < kParams; ++i) {
            cur[i] = next[i];
          }
          load_params(row + 1, next);
        }
        if (lane0 + IO::kAccLanes <= row_end) {
          for (int i = 0; i < kParams; ++i) {
            prm[i] = cur[i];
          }
        } else {
          const auto in_next = lane_index >= aVec(static_cast<acc_t>(row_end - lane0));
          for (int i = 0; i < kParams; ++i) {
            prm[i] = aVec::blendv(cur[i], next[i], in_next);
          }
        }
      },
      op, stream);
}

// map_run over the channels-last periods p0 <= p < p1 of K values (the last
// may end at `total`); `periodic_params[i]` holds K values, one per position
// of the period. The arrays are copied into locals first: through the
// references the compiler would reload them after every store (vector types
// may alias anything).
template <typename scalar_t, int kIn, int kParams, typename Op>
void map_periods(
    const scalar_t* const (&inputs)[kIn], scalar_t* out, int64_t K, int64_t total, int64_t p0,
    int64_t p1, const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op,
    bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  const scalar_t* in[kIn];
  for (int i = 0; i < kIn; ++i) {
    in[i] = inputs[i];
  }
  const at::opmath_type<scalar_t>* param[kParams];
  for (int i = 0; i < kParams; ++i) {
    param[i] = periodic_params[i];
  }
  constexpr int kGroup = 4;  // periods sharing one load of the parameters
  const int64_t group_bytes = kGroup * K * static_cast<int64_t>(sizeof(scalar_t));
  int64_t p = p0;
  for (; K % IO::kStep == 0 && p + kGroup <= p1 && (p + kGroup) * K <= total; p += kGroup) {
    for (int64_t j = 0; j < K; j += IO::kStep) {
      aVec prm[IO::kVecs][kParams];
      for (int k = 0; k < IO::kVecs; ++k) {
        for (int i = 0; i < kParams; ++i) {
          prm[k][i] = aVec::loadu(param[i] + j + k * IO::kAccLanes);
        }
      }
      for (int r = 0; r < kGroup; ++r) {
        const int64_t at = (p + r) * K + j;
        aVec v[kIn][IO::kVecs];
        for (int i = 0; i < kIn; ++i) {
          prefetch(in[i] + at, group_bytes);  // the same place in the next group
          IO::load(in[i] + at, v[i]);
        }
        aVec result[IO::kVecs];
        for (int k = 0; k < IO::kVecs; ++k) {
          aVec args[kIn];
          for (int i = 0; i < kIn; ++i) {
            args[i] = v[i][k];
          }
          result[k] = op(args, prm[k]);
        }
        IO::store(out + at, result, stream);
      }
    }
  }
  for (; p < p1; ++p) {
    map_run<scalar_t, kIn, kParams>(
        in, out, p * K, std::min(K, total - p * K),
        [&](int64_t off, aVec (&prm)[kParams]) {
          for (int i = 0; i < kParams; ++i) {
            prm[i] = aVec::loadu(param[i] + off);
          }
        },
        op, stream);
  }
}

// Most parameter registers map_short_period may hold; the rest of the
// vector registers (32 with AVX-512, 16 otherwise) carry the inputs and
// results. Beyond this the compiler would spill them to the stack.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxParamRegisters = 18;
#else
constexpr int kMaxParamRegisters = 8;
#endif

// map_run over the channels-last values [begin, end) (begin a multiple of
// KS * kStep) for a short base period of KS steps (the channel pattern repeats
// every KS * kStep values): the parameters of the whole period stay in
// registers and the values are walked in memory order, so each output costs
// one load and one store, where map_periods also loads parameters.
template <int KS, typename scalar_t, int kIn, int kParams, typename Op>
void map_short_period(
    const scalar_t* const (&inputs)[kIn], scalar_t* out, int64_t begin, int64_t end,
    const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op,
    bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  constexpr int64_t kPeriod = KS * IO::kStep;
  const scalar_t* in[kIn];  // locals: see map_periods
  for (int i = 0; i < kIn; ++i) {
    in[i] = inputs[i];
  }
  aVec prm[KS][IO::kVecs][kParams];
  for (int s = 0; s < KS; ++s) {
    for (int k = 0; k < IO::kVecs; ++k) {
      for (int i = 0; i < kParams; ++i) {
        prm[s][k][i] = aVec::loadu(periodic_params[i] + s * IO::kStep + k * IO::kAccLanes);
      }
    }
  }
  int64_t at = begin;
  for (; at + kPeriod <= end; at += kPeriod) {
    for (int s = 0; s < KS; ++s) {
      const int64_t pos = at + s * IO::kStep;
      aVec v[kIn][IO::kVecs];
      for (int i = 0; i < kIn; ++i) {
        IO::load_ahead(in[i] + pos, v[i]);
      }
      aVec result[IO::kVecs];
      for (int k = 0; k < IO::kVecs; ++k) {
        aVec args[kIn];
        for (int i = 0; i < kIn; ++i) {
          args[i] = v[i][k];
        }
        result[k] = op(args, prm[s][k]);
      }
      IO::store(out + pos, result, stream);
    }
  }
  if (at < end) {  // the last partial period of the tensor
    map_run<scalar_t, kIn, kParams>(
        in, out, at, end - at,
        [&](int64_t off, aVec (&p)[kParams]) {
          for (int i = 0; i < kParams; ++i) {
            p[i] = aVec::loadu(periodic_params[i] + off);
          }
        },
        op, stream);
  }
}

// Steps in the base channels-last period of C channels (the shortest run of
// whole steps after which the channel pattern repeats).
template <typename scalar_t>
int64_t base_period_steps(int64_t C) {
  constexpr int64_t step = VecIO<scalar_t>::kStep;
  return C / std::gcd(C, step);
}

// Runs map_short_period<KS> for KS = `steps` when its parameters fit the
// register budget; returns false when they do not (or steps > 4).
template <typename scalar_t, int kIn, int kParams, typename Op>
bool try_map_short_period(
    int64_t steps, const scalar_t* const (&in)[kIn], scalar_t* out, int64_t begin, int64_t end,
    const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op,
    bool stream) {
  constexpr int kRegsPerStep = VecIO<scalar_t>::kVecs * kParams;
  bool done = false;
  const auto run = [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    if constexpr (KS * kRegsPerStep <= kMaxParamRegisters) {
      map_short_period<KS, scalar_t, kIn, kParams>(in, out, begin, end, periodic_params, op, stream);
      done = true;
    }
  };
  switch (steps) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    default: break;
  }
  return done;
}

// out = op(inputs..., per-channel parameters...) over the whole tensor;
// `params[i]` holds one value per channel.
// Largest period (in values) for walking channels-first images like
// channels-last periods: its per-position parameters (up to 4 arrays) stay
// in L1. Measured against rows: 1.2-12x faster for images of up to 2048
// values (64x16x10x10, 64x32x50, 512x64x2x2), slower on one thread beyond
// (1024x6x20x20, 2400 values: 1.1x).
constexpr int64_t kMaxImagePeriod = 2048;

template <typename scalar_t, int kIn, int kParams, typename Op>
void channel_map(
    const Geometry& g, const scalar_t* const (&in)[kIn], scalar_t* out,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;

  const bool stream = stream_output<scalar_t>(g);
  // The channel pattern repeats every `pattern` values: every row of C in
  // channels-last, every image of C * S in channels-first. Small images are
  // walked like channels-last periods (per-position parameters, full vectors
  // across row ends); rows of other channels-first tensors one by one, or
  // as one flat run when short.
  const int64_t pattern = g.channels_last() ? g.C : g.C * g.S;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(pattern, total);
  if (!g.channels_last() && (K > kMaxImagePeriod || K % IO::kStep != 0)) {
    const int64_t rows = g.N * g.C;
    const bool flat = g.S < kShortRow && g.S >= IO::kAccLanes;
    parallel_items(rows, g.S, [&](int64_t begin, int64_t end) {
      if (flat) {
        map_rows_flat<scalar_t, kIn, kParams>(in, out, begin, end, g, params, op, stream);
      } else {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t c = r % g.C;
          acc_t values[kParams];
          for (int i = 0; i < kParams; ++i) {
            values[i] = params[i][c];
          }
          map_row<scalar_t, kIn, kParams>(in, out, r * g.S, g.S, values, op, stream);
        }
      }
      stream_fence();
    });
    return;
  }

  const int64_t periods = (total + K - 1) / K;
  const int64_t S = g.channels_last() ? 1 : g.S;
  std::vector<std::vector<acc_t>> periodic_params;
  const acc_t* param_ptr[kParams];
  for (int i = 0; i < kParams; ++i) {
    periodic_params.push_back(periodic<acc_t, IO::kStep>(params[i], g.C, K, S));
    param_ptr[i] = periodic_params.back().data();
  }
  const int64_t steps = base_period_steps<scalar_t>(pattern);
  parallel_items(periods, K, [&](int64_t begin, int64_t end) {
    if (!try_map_short_period<scalar_t, kIn, kParams>(
            steps, in, out, begin * K, std::min(total, end * K), param_ptr, op, stream)) {
      map_periods<scalar_t, kIn, kParams>(in, out, K, total, begin, end, param_ptr, op, stream);
    }
    stream_fence();
  });
}

// The elementwise formulas, in the form channel_map / map_row apply them.

// y = (x - mean) * scale + bias; params {mean, scale, bias}. Subtracting first
// keeps inputs with a large offset accurate, unlike x * scale + (bias - mean * scale).
struct Normalize {
  template <typename V>
  V operator()(const V (&v)[1], const V (&p)[3]) const {
    return at::vec::fmadd(v[0] - p[0], p[1], p[2]);
  }
};

// Training: dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w
// inputs {dy, x}; params {mean, mean(dy), invstd^2 * mean(dy * (x - mean)), invstd * w}.
struct GradInputTrain {
  template <typename V>
  V operator()(const V (&v)[2], const V (&p)[4]) const {
    return (v[0] - at::vec::fmadd(v[1] - p[0], p[2], p[1])) * p[3];
  }
};

// Evaluation: dx = dy * invstd * w; inputs {dy}; params {invstd * w}.
struct GradInputEval {
  template <typename V>
  V operator()(const V (&v)[1], const V (&p)[1]) const {
    return v[0] * p[0];
  }
};

// Channels-first tensors with long rows (kShortRow values or more) and small
// channels take the fused path: a task
// takes a block of consecutive channels holding at most kFusedBlockBytes (of
// the inputs read), reduces them and transforms them right away, while their
// values are still in the core's cache, so the inputs are read from memory
// once instead of twice. Both passes walk the block image by image, in memory
// order. The blocks depend on the shape only, so results do not depend on the
// thread count.
constexpr int64_t kFusedBlockBytes = int64_t(1) << 20;

struct ChannelBlocks {
  int64_t count;  // tasks
  int64_t size;   // channels per task (the last task may have fewer)
};

std::optional<ChannelBlocks> fused_channel_blocks(const Geometry& g, int64_t bytes_per_position) {
  const int64_t channel_bytes = g.N * g.S * bytes_per_position;
  if (g.channels_last() || g.S < kShortRow || channel_bytes > kFusedBlockBytes) {
    return std::nullopt;
  }
  const int64_t max_size = std::max<int64_t>(1, kFusedBlockBytes / channel_bytes);
  const int64_t count = (g.C + max_size - 1) / max_size;
  const int64_t size = (g.C + count - 1) / count;  // balanced blocks
  const int64_t blocks = (g.C + size - 1) / size;
  // A single block runs on one thread: only worth it for small tensors.
  if (blocks < 2 && g.C * channel_bytes > kChunkValues * bytes_per_position) {
    return std::nullopt;
  }
  return ChannelBlocks{blocks, size};
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Output allocation from the pool (see output_pool.h).
auto pooled_like(const Tensor& input) {
  return [dtype = input.scalar_type()](at::IntArrayRef sizes, at::IntArrayRef strides) {
    return empty_pooled(sizes, strides, dtype);
  };
}

// Copies a per-channel tensor (any float dtype, any stride) into acc_t values;
// `fill` when the tensor is absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const Tensor* t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t == nullptr) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "fastbn_read", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<acc_t>(p[c * stride]);
    }
  });
  return out;
}

// running = (1 - momentum) * running + momentum * value, in place.
template <typename acc_t>
void blend_into(const Tensor& running, const std::vector<acc_t>& value, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "fastbn_running", [&] {
    scalar_t* p = running.mutable_data_ptr<scalar_t>();
    const int64_t stride = running.stride(0);
    const acc_t m = static_cast<acc_t>(momentum);
    for (size_t c = 0; c < value.size(); ++c) {
      const acc_t old = static_cast<acc_t>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>((acc_t(1) - m) * old + m * value[c]);
    }
  });
}

template <typename acc_t>
void write_channel_values(const Tensor& t, const std::vector<acc_t>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastbn_write", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) {
      p[c] = static_cast<scalar_t>(values[c]);
    }
  });
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

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  check_train_args(input, weight, bias, running_mean, running_var);
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);

  const int64_t C = input.size(1);
  const auto stat_options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    // PyTorch returns an empty output and leaves the running statistics alone.
    return {at::empty_like(input), at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x, pooled_like(input));
  Tensor save_mean = at::empty({C}, stat_options);
  Tensor save_invstd = at::empty({C}, stat_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = out.buffer.mutable_data_ptr<scalar_t>();
    const int64_t n = g.reduce_size();
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    std::vector<acc_t> mean(C), invstd(C), unbiased(C);
    const scalar_t* in[1] = {x_ptr};
    const auto blocks = fused_channel_blocks(g, sizeof(scalar_t));
    const bool stream = stream_output<scalar_t>(g);
    if (blocks) {
      using aVec = Vectorized<acc_t>;
      parallel_items(blocks->count, blocks->size * n, [&](int64_t begin, int64_t end) {
        std::vector<RowWelford<scalar_t>> accs;
        std::vector<aVec> shifts;
        for (int64_t block = begin; block < end; ++block) {
          const int64_t c0 = block * blocks->size;
          const int64_t c1 = std::min(C, c0 + blocks->size);
          accs.assign(c1 - c0, RowWelford<scalar_t>(g.S));
          shifts.clear();
          for (int64_t c = c0; c < c1; ++c) {
            shifts.emplace_back(static_cast<acc_t>(x_ptr[c * g.S]));
          }
          for (int64_t i = 0; i < g.N; ++i) {
            for (int64_t c = c0; c < c1; ++c) {
              accs[c - c0].add_row(x_ptr + (i * C + c) * g.S, shifts[c - c0]);
            }
          }
          for (int64_t c = c0; c < c1; ++c) {
            WelfordStat<acc_t> stat = accs[c - c0].result();
            stat.mean += static_cast<acc_t>(x_ptr[c * g.S]);
            finish_stats(&stat, 1, n, eps, &mean[c], &invstd[c], &unbiased[c]);
          }
          for (int64_t i = 0; i < g.N; ++i) {
            for (int64_t c = c0; c < c1; ++c) {
              const acc_t values[3] = {mean[c], invstd[c] * w[c], b[c]};
              map_row<scalar_t, 1, 3>(in, y_ptr, (i * C + c) * g.S, g.S, values, Normalize{}, stream);
            }
          }
        }
        stream_fence();
      });
    } else {
      std::vector<WelfordStat<acc_t>> stats(C);
      if (g.channels_last()) {
        batch_stats_channels_last(x_ptr, g, stats.data());
      } else {
        batch_stats_channels_first(x_ptr, g, stats.data());
      }
      finish_stats(stats.data(), C, n, eps, mean.data(), invstd.data(), unbiased.data());
      std::vector<acc_t> scale(C);
      for (int64_t c = 0; c < C; ++c) {
        scale[c] = invstd[c] * w[c];
      }
      const acc_t* prm[3] = {mean.data(), scale.data(), b.data()};
      channel_map<scalar_t, 1, 3>(g, in, y_ptr, prm, Normalize{});
    }
    write_channel_values(save_mean, mean);
    write_channel_values(save_invstd, invstd);
    if (rm != nullptr) {
      blend_into(*rm, mean, momentum);
      blend_into(*rv, unbiased, momentum);
    }
  });
  out.finish();
  return {out.result, save_mean, save_invstd};
}

Tensor batch_norm_eval_cpu(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  check_eval_args(input, running_mean, running_var, weight, bias);
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x, pooled_like(input));
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> mean = channel_values<acc_t>(&running_mean, C, acc_t(0));
    std::vector<acc_t> scale = channel_values<acc_t>(&running_var, C, acc_t(0));
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w[c] / std::sqrt(scale[c] + static_cast<acc_t>(eps));
    }
    const scalar_t* in[1] = {x.const_data_ptr<scalar_t>()};
    const acc_t* prm[3] = {mean.data(), scale.data(), b.data()};
    channel_map<scalar_t, 1, 3>(g, in, out.buffer.mutable_data_ptr<scalar_t>(), prm, Normalize{});
  });
  out.finish();
  return out.result;
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
    const Tensor& mean, const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const at::ScalarType param_type = check_backward_args(grad_output, input, weight, mean, invstd);

  const int64_t C = input.size(1);
  const auto param_options = input.options().dtype(param_type);
  OptTensor grad_input, grad_weight, grad_bias;
  if (input.numel() == 0) {
    if (output_mask[0]) grad_input = at::empty_like(input);
    if (output_mask[1]) grad_weight = at::zeros({C}, param_options);
    if (output_mask[2]) grad_bias = at::zeros({C}, param_options);
    return {grad_input, grad_weight, grad_bias};
  }
  const Tensor x = to_walkable(input);
  const Tensor dy = to_layout_of(grad_output, x);
  const Geometry g = geometry_of(x, *direct_layout(x));
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);

  std::optional<OutputLike> out;
  if (output_mask[0]) {
    out.emplace(input, x, pooled_like(input));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = out ? out->buffer.mutable_data_ptr<scalar_t>() : nullptr;
    const std::vector<acc_t> mu = channel_values<acc_t>(&mean, C, acc_t(0));
    const std::vector<acc_t> inv = channel_values<acc_t>(&invstd, C, acc_t(0));
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.reduce_size());
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xmu(C, acc_t(0));
    // grad_input's per-channel parameters (see GradInputTrain / GradInputEval).
    const auto train_params = [&](int64_t c, acc_t (&p)[4]) {
      p[0] = mu[c];
      p[1] = sum_dy[c] * inv_n;
      p[2] = inv[c] * inv[c] * sum_dy_xmu[c] * inv_n;
      p[3] = inv[c] * w[c];
    };
    const scalar_t* in_train[2] = {dy_ptr, x_ptr};
    const scalar_t* in_eval[1] = {dy_ptr};

    const auto blocks = need_sums ? fused_channel_blocks(g, 2 * sizeof(scalar_t)) : std::nullopt;
    const bool stream = stream_output<scalar_t>(g);
    if (blocks) {
      parallel_items(blocks->count, 2 * blocks->size * g.reduce_size(), [&](int64_t begin, int64_t end) {
        std::vector<GradSumsAcc<scalar_t>> accs;
        for (int64_t block = begin; block < end; ++block) {
          const int64_t c0 = block * blocks->size;
          const int64_t c1 = std::min(C, c0 + blocks->size);
          accs.clear();
          for (int64_t c = c0; c < c1; ++c) {
            accs.emplace_back(mu[c]);
          }
          for (int64_t i = 0; i < g.N; ++i) {
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t base = (i * C + c) * g.S;
              accs[c - c0].add_row(dy_ptr + base, x_ptr + base, g.S);
            }
          }
          for (int64_t c = c0; c < c1; ++c) {
            std::tie(sum_dy[c], sum_dy_xmu[c]) = accs[c - c0].result();
          }
          if (dx_ptr == nullptr) {
            continue;
          }
          for (int64_t i = 0; i < g.N; ++i) {
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t base = (i * C + c) * g.S;
              acc_t p[4];
              train_params(c, p);
              if (training) {
                map_row<scalar_t, 2, 4>(in_train, dx_ptr, base, g.S, p, GradInputTrain{}, stream);
              } else {
                const acc_t p_eval[1] = {p[3]};
                map_row<scalar_t, 1, 1>(in_eval, dx_ptr, base, g.S, p_eval, GradInputEval{}, stream);
              }
            }
          }
        }
        stream_fence();
      });
    } else {
      if (need_sums) {
        if (g.channels_last()) {
          grad_sums_channels_last(dy_ptr, x_ptr, g, mu.data(), sum_dy.data(), sum_dy_xmu.data());
        } else {
          grad_sums_channels_first(dy_ptr, x_ptr, g, mu.data(), sum_dy.data(), sum_dy_xmu.data());
        }
      }
      if (dx_ptr != nullptr) {
        std::vector<acc_t> columns[4];
        for (auto& column : columns) {
          column.resize(C);
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t p[4];
          train_params(c, p);
          for (int k = 0; k < 4; ++k) {
            columns[k][c] = p[k];
          }
        }
        if (training) {
          const acc_t* prm[4] = {columns[0].data(), columns[1].data(), columns[2].data(), columns[3].data()};
          channel_map<scalar_t, 2, 4>(g, in_train, dx_ptr, prm, GradInputTrain{});
        } else {
          const acc_t* prm[1] = {columns[3].data()};
          channel_map<scalar_t, 1, 1>(g, in_eval, dx_ptr, prm, GradInputEval{});
        }
      }
    }
    if (output_mask[1]) {
      std::vector<acc_t> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * inv[c];
      grad_weight = at::empty({C}, param_options);
      write_channel_values(*grad_weight, gw);
    }
    if (output_mask[2]) {
      grad_bias = at::empty({C}, param_options);
      write_channel_values(*grad_bias, sum_dy);
    }
  });
  if (out) {
    out->finish();
    grad_input = out->result;
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn::cpu

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm_train", &fastbn::cpu::batch_norm_train_cpu);
  m.impl("batch_norm_eval", &fastbn::cpu::batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &fastbn::cpu::batch_norm_backward_cpu);
}
