// CPU kernels for fastbn's batch norm operators.
//
// Both layouts are walked in memory order:
//  - channels-first: a row of S contiguous values belongs to one channel;
//    work items are (channel, block of N) and per-channel values broadcast.
//  - channels-last: the tensor is a flat array whose position p holds channel
//    p % C; a period of K values (a multiple of C and of the vector width)
//    maps every lane to a fixed channel, so per-position vectors of length K
//    replace per-channel scalars and even C = 3 runs on full vectors.
// Reductions are split into chunks whose size depends on the shape only, and
// partials are merged in chunk order: results do not depend on the number of
// threads.
#include "../batch_norm.h"
#include "vec_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
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

// Per-position copies of per-channel values for a channels-last period of
// length K, padded by one step so full-vector loads past K stay in bounds.
template <typename acc_t, int64_t kPad>
std::vector<acc_t> periodic(const acc_t* per_channel, int64_t C, int64_t K) {
  std::vector<acc_t> out(K + kPad, acc_t(0));
  for (int64_t p = 0; p < K; p += C) {  // K is a multiple of C
    std::copy(per_channel, per_channel + C, out.begin() + p);
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

template <typename scalar_t>
void batch_stats_channels_first(
    const scalar_t* x, const Geometry& g, WelfordStat<at::opmath_type<scalar_t>>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rpc = rows_per_chunk(g.S);
  const int64_t chunks = (g.N + rpc - 1) / rpc;
  Stats<acc_t> partial(g.C * chunks);
  parallel_items(g.C * chunks, std::min(rpc, g.N) * g.S, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / chunks;
      const int64_t n0 = (item % chunks) * rpc;
      const int64_t n1 = std::min(g.N, n0 + rpc);
      const auto shift = static_cast<acc_t>(x[c * g.S]);
      RowWelford<scalar_t> acc;
      for (int64_t n = n0; n < n1; ++n) {
        acc.add_row(x + (n * g.C + c) * g.S, g.S, Vectorized<acc_t>(shift));
      }
      partial[item] = acc.result();
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

template <typename scalar_t>
void batch_stats_channels_last(
    const scalar_t* x, const Geometry& g, WelfordStat<at::opmath_type<scalar_t>>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const int64_t C = g.C;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(C, total);
  const int64_t K_vec = K - K % IO::kStep;  // positions updated by vectors
  const int64_t periods = total / K;
  const int64_t ppc = rows_per_chunk(K);
  const int64_t chunks = (periods + ppc - 1) / ppc;
  // One extra partial for the values after the last whole period.
  Stats<acc_t> partial((chunks + 1) * C);
  std::vector<acc_t> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t>(x[c]);
  }
  const std::vector<acc_t> shift_p = periodic<acc_t, IO::kStep>(shift.data(), C, K);

  parallel_items(chunks, ppc * K, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(K), m2(K);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(mean.begin(), mean.end(), acc_t(0));
      std::fill(m2.begin(), m2.end(), acc_t(0));
      const int64_t p0 = chunk * ppc;
      const int64_t p1 = std::min(periods, p0 + ppc);
      int64_t n = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* row = x + p * K;
        ++n;
        const acc_t gain_s = acc_t(1) / static_cast<acc_t>(n);
        const aVec gain(gain_s);
        for (int64_t j = 0; j < K_vec; j += IO::kStep) {
          aVec v[IO::kVecs];
          IO::load(row + j, v);
          for (int k = 0; k < IO::kVecs; ++k) {
            const int64_t off = j + k * IO::kAccLanes;
            v[k] = v[k] - aVec::loadu(shift_p.data() + off);
            aVec m = aVec::loadu(mean.data() + off);
            aVec q = aVec::loadu(m2.data() + off);
            const aVec d = v[k] - m;
            m = at::vec::fmadd(d, gain, m);
            q = at::vec::fmadd(d, v[k] - m, q);
            m.store(mean.data() + off);
            q.store(m2.data() + off);
          }
        }
        for (int64_t j = K_vec; j < K; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]) - shift_p[j];
          const acc_t d = v - mean[j];
          mean[j] += d * gain_s;
          m2[j] += d * (v - mean[j]);
        }
      }
      WelfordStat<acc_t>* chan = partial.data() + chunk * C;
      for (int64_t j = 0; j < K; ++j) {
        chan[j % C].merge(WelfordStat<acc_t>{n, mean[j], m2[j]});
      }
    }
  });
  WelfordStat<acc_t>* rest = partial.data() + chunks * C;
  for (int64_t i = periods * K; i < total; ++i) {
    rest[i % C].add(static_cast<acc_t>(x[i]) - shift[i % C]);
  }
  for (int64_t c = 0; c < C; ++c) {
    WelfordStat<acc_t> s;
    for (int64_t k = 0; k <= chunks; ++k) {
      s.merge(partial[k * C + c]);
    }
    s.mean += shift[c];
    out[c] = s;
  }
}

// ---------------------------------------------------------------------------
// Per-channel sums for the backward: sum(dy) and sum(dy * (x - mean))
// ---------------------------------------------------------------------------

template <typename scalar_t>
void grad_sums_channels_first(
    const scalar_t* dy, const scalar_t* x, const Geometry& g,
    const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sum_dy,
    at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const int64_t rpc = rows_per_chunk(g.S);
  const int64_t chunks = (g.N + rpc - 1) / rpc;
  std::vector<acc_t> part_dy(g.C * chunks), part_dy_xmu(g.C * chunks);
  parallel_items(g.C * chunks, std::min(rpc, g.N) * g.S, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / chunks;
      const int64_t n0 = (item % chunks) * rpc;
      const int64_t n1 = std::min(g.N, n0 + rpc);
      const aVec m(mean[c]);
      aVec acc_dy[IO::kVecs], acc_dy_xmu[IO::kVecs];
      for (int k = 0; k < IO::kVecs; ++k) {
        acc_dy[k] = aVec(acc_t(0));
        acc_dy_xmu[k] = aVec(acc_t(0));
      }
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t base = (n * g.C + c) * g.S;
        for (int64_t s = 0; s < g.S; s += IO::kStep) {
          const int64_t len = std::min<int64_t>(IO::kStep, g.S - s);
          aVec vdy[IO::kVecs], vx[IO::kVecs];
          if (len == IO::kStep) {
            IO::load(dy + base + s, vdy);
            IO::load(x + base + s, vx);
          } else {
            // Zero-filled lanes: dy = 0 adds nothing to either sum.
            IO::load_partial(dy + base + s, len, vdy);
            IO::load_partial(x + base + s, len, vx);
          }
          for (int k = 0; k < IO::kVecs; ++k) {
            acc_dy[k] = acc_dy[k] + vdy[k];
            acc_dy_xmu[k] = at::vec::fmadd(vdy[k], vx[k] - m, acc_dy_xmu[k]);
          }
        }
      }
      for (int k = 1; k < IO::kVecs; ++k) {
        acc_dy[0] = acc_dy[0] + acc_dy[k];
        acc_dy_xmu[0] = acc_dy_xmu[0] + acc_dy_xmu[k];
      }
      part_dy[item] = at::vec::vec_reduce_all<acc_t>(
          [](aVec& a, aVec& b) { return a + b; }, acc_dy[0]);
      part_dy_xmu[item] = at::vec::vec_reduce_all<acc_t>(
          [](aVec& a, aVec& b) { return a + b; }, acc_dy_xmu[0]);
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

template <typename scalar_t>
void grad_sums_channels_last(
    const scalar_t* dy, const scalar_t* x, const Geometry& g,
    const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sum_dy,
    at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const int64_t C = g.C;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(C, total);
  const int64_t periods = (total + K - 1) / K;  // the last one may be partial
  const int64_t ppc = rows_per_chunk(K);
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
      const int64_t p1 = std::min(periods, p0 + ppc);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * K;
        const int64_t len = std::min(K, total - base);
        for (int64_t j = 0; j < len; j += IO::kStep) {
          const int64_t n = std::min<int64_t>(IO::kStep, len - j);
          aVec vdy[IO::kVecs], vx[IO::kVecs];
          if (n == IO::kStep) {
            IO::load(dy + base + j, vdy);
            IO::load(x + base + j, vx);
          } else {
            IO::load_partial(dy + base + j, n, vdy);
            IO::load_partial(x + base + j, n, vx);
          }
          for (int k = 0; k < IO::kVecs; ++k) {
            const int64_t off = j + k * IO::kAccLanes;
            const aVec m = aVec::loadu(mean_p.data() + off);
            const aVec s_dy = aVec::loadu(a_dy.data() + off) + vdy[k];
            const aVec s_dy_xmu =
                at::vec::fmadd(vdy[k], vx[k] - m, aVec::loadu(a_dy_xmu.data() + off));
            s_dy.store(a_dy.data() + off);
            s_dy_xmu.store(a_dy_xmu.data() + off);
          }
        }
      }
      acc_t* out_dy = part_dy.data() + chunk * C;
      acc_t* out_dy_xmu = part_dy_xmu.data() + chunk * C;
      for (int64_t j = 0; j < K; ++j) {
        out_dy[j % C] += a_dy[j];
        out_dy_xmu[j % C] += a_dy_xmu[j];
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

// `op(const aVec (&in)[kIn], const aVec (&param)[kParams]) -> aVec` is applied
// to every element; `params[i]` holds one value per channel.
template <typename scalar_t, int kIn, int kParams, typename Op>
void channel_map(
    const Geometry& g, const scalar_t* const (&in)[kIn], scalar_t* out,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;

  // Processes `len` values starting at `base`, whose parameter vectors are
  // read from `param_at(offset within the run)`.
  auto run = [&](int64_t base, int64_t len, auto&& param_at) {
    for (int64_t j = 0; j < len; j += IO::kStep) {
      const int64_t n = std::min<int64_t>(IO::kStep, len - j);
      aVec v[kIn][IO::kVecs];
      for (int i = 0; i < kIn; ++i) {
        if (n == IO::kStep) {
          IO::load(in[i] + base + j, v[i]);
        } else {
          IO::load_partial(in[i] + base + j, n, v[i]);
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
        IO::store(out + base + j, result);
      } else {
        IO::store_partial(out + base + j, n, result);
      }
    }
  };

  if (!g.channels_last()) {
    const int64_t rows = g.N * g.C;
    parallel_items(rows, g.S, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % g.C;
        aVec broadcast[kParams];
        for (int i = 0; i < kParams; ++i) {
          broadcast[i] = aVec(params[i][c]);
        }
        run(r * g.S, g.S, [&](int64_t, aVec (&prm)[kParams]) {
          for (int i = 0; i < kParams; ++i) {
            prm[i] = broadcast[i];
          }
        });
      }
    });
    return;
  }

  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(g.C, total);
  const int64_t periods = (total + K - 1) / K;
  std::vector<std::vector<acc_t>> periodic_params;
  for (int i = 0; i < kParams; ++i) {
    periodic_params.push_back(periodic<acc_t, IO::kStep>(params[i], g.C, K));
  }
  parallel_items(periods, K, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      run(p * K, std::min(K, total - p * K), [&](int64_t off, aVec (&prm)[kParams]) {
        for (int i = 0; i < kParams; ++i) {
          prm[i] = aVec::loadu(periodic_params[i].data() + off);
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

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
  OutputLike out(input, x);
  Tensor save_mean = at::empty({C}, stat_options);
  Tensor save_invstd = at::empty({C}, stat_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    std::vector<WelfordStat<acc_t>> stats(C);
    if (g.channels_last()) {
      batch_stats_channels_last(x_ptr, g, stats.data());
    } else {
      batch_stats_channels_first(x_ptr, g, stats.data());
    }
    const int64_t n = g.reduce_size();
    std::vector<acc_t> mean(C), invstd(C), scale(C), unbiased(C);
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = stats[c].mean;
      const acc_t var = stats[c].m2 / static_cast<acc_t>(n);
      invstd[c] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      scale[c] = invstd[c] * w[c];
      unbiased[c] = stats[c].m2 / static_cast<acc_t>(n - 1);
    }
    const scalar_t* in[1] = {x_ptr};
    const acc_t* prm[3] = {mean.data(), scale.data(), b.data()};
    using aVec = Vectorized<acc_t>;
    channel_map<scalar_t, 1, 3>(
        g, in, out.buffer.mutable_data_ptr<scalar_t>(), prm,
        [](const aVec (&v)[1], const aVec (&p)[3]) { return at::vec::fmadd(v[0] - p[0], p[1], p[2]); });
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
  OutputLike out(input, x);
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using aVec = Vectorized<acc_t>;
    const std::vector<acc_t> mean = channel_values<acc_t>(&running_mean, C, acc_t(0));
    std::vector<acc_t> scale = channel_values<acc_t>(&running_var, C, acc_t(0));
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w[c] / std::sqrt(scale[c] + static_cast<acc_t>(eps));
    }
    const scalar_t* in[1] = {x.const_data_ptr<scalar_t>()};
    const acc_t* prm[3] = {mean.data(), scale.data(), b.data()};
    // (x - mean) * scale + bias: subtracting first keeps inputs with a large
    // offset accurate, unlike x * scale + (bias - mean * scale).
    channel_map<scalar_t, 1, 3>(
        g, in, out.buffer.mutable_data_ptr<scalar_t>(), prm,
        [](const aVec (&v)[1], const aVec (&p)[3]) { return at::vec::fmadd(v[0] - p[0], p[1], p[2]); });
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using aVec = Vectorized<acc_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const std::vector<acc_t> mu = channel_values<acc_t>(&mean, C, acc_t(0));
    const std::vector<acc_t> inv = channel_values<acc_t>(&invstd, C, acc_t(0));
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xmu(C, acc_t(0));
    if (need_sums) {
      if (g.channels_last()) {
        grad_sums_channels_last(dy_ptr, x_ptr, g, mu.data(), sum_dy.data(), sum_dy_xmu.data());
      } else {
        grad_sums_channels_first(dy_ptr, x_ptr, g, mu.data(), sum_dy.data(), sum_dy_xmu.data());
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
    if (!output_mask[0]) {
      return;
    }
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    std::vector<acc_t> scale(C);
    for (int64_t c = 0; c < C; ++c) scale[c] = inv[c] * w[c];
    OutputLike out(input, x);
    scalar_t* dx_ptr = out.buffer.mutable_data_ptr<scalar_t>();
    if (training) {
      // dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.reduce_size());
      std::vector<acc_t> mean_dy(C), proj(C);
      for (int64_t c = 0; c < C; ++c) {
        mean_dy[c] = sum_dy[c] * inv_n;
        proj[c] = inv[c] * inv[c] * sum_dy_xmu[c] * inv_n;
      }
      const scalar_t* in[2] = {dy_ptr, x_ptr};
      const acc_t* prm[4] = {mu.data(), mean_dy.data(), proj.data(), scale.data()};
      channel_map<scalar_t, 2, 4>(
          g, in, dx_ptr, prm, [](const aVec (&v)[2], const aVec (&p)[4]) {
            return (v[0] - at::vec::fmadd(v[1] - p[0], p[2], p[1])) * p[3];
          });
    } else {
      const scalar_t* in[1] = {dy_ptr};
      const acc_t* prm[1] = {scale.data()};
      channel_map<scalar_t, 1, 1>(
          g, in, dx_ptr, prm, [](const aVec (&v)[1], const aVec (&p)[1]) { return v[0] * p[0]; });
    }
    out.finish();
    grad_input = out.result;
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn::cpu

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm_train", &fastbn::cpu::batch_norm_train_cpu);
  m.impl("batch_norm_eval", &fastbn::cpu::batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &fastbn::cpu::batch_norm_backward_cpu);
}
