// CPU kernels of the SyncBatchNorm operators (schemas.h; the layer is
// fastbn/sync.py).
//
// Self-contained: written while batch_norm_cpu.cpp had no internal kernel
// interface to call into. Statistics are exact in the sense fastbn's other
// kernels are: blocks of up to kBlockValues values per channel are reduced in
// two passes (mean, then squared deviations from it), and blocks are combined
// with Chan's merge, so a large offset costs no digits. Work is split by
// shape only and partials are merged in a fixed order: the results do not
// depend on the number of threads.
#include "../sync_batch_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastbn::cpu {
namespace {

constexpr int64_t kBlockValues = 4096;
// Channels-last rows per parallel work item (a multiple of the block rows).
constexpr int64_t kMinChunkValues = int64_t(1) << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chan et al.'s merge of (nb, mean_b, m2_b) into (n, mean, m2); an empty side
// leaves the other exactly as it was. The same formula as the CUDA merge
// (reductions.cuh), so both backends combine ranks alike.
template <typename acc_t>
inline void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t mean_b, acc_t m2_b) {
  if (nb == acc_t(0)) {
    return;
  }
  if (n == acc_t(0)) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const acc_t total = n + nb;
  const acc_t b_frac = nb / total;
  const acc_t delta = mean_b - mean;
  mean += delta * b_frac;
  m2 = m2 + m2_b + delta * delta * n * b_frac;
  n = total;
}

// Sum of len contiguous values, four independent accumulators (vectorisable).
template <typename scalar_t, typename acc_t>
inline acc_t block_sum(const scalar_t* x, int64_t len) {
  acc_t a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      a[k] += static_cast<acc_t>(x[i + k]);
    }
  }
  for (; i < len; ++i) {
    a[0] += static_cast<acc_t>(x[i]);
  }
  return (a[0] + a[1]) + (a[2] + a[3]);
}

template <typename scalar_t, typename acc_t>
inline acc_t block_squared_deviation(const scalar_t* x, int64_t len, acc_t mean) {
  acc_t a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const acc_t d = static_cast<acc_t>(x[i + k]) - mean;
      a[k] += d * d;
    }
  }
  for (; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    a[0] += d * d;
  }
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// out[0 * C + c] = count, out[1 * C + c] = mean, out[2 * C + c] = M2.
template <typename scalar_t>
void local_stats_channels_first(const Geometry& g, const scalar_t* x, at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t n = 0, mean = 0, m2 = 0;
      for (int64_t i = 0; i < g.N; ++i) {
        const scalar_t* row = x + (i * g.C + c) * g.S;
        for (int64_t s = 0; s < g.S; s += kBlockValues) {
          const int64_t len = std::min(kBlockValues, g.S - s);
          const acc_t block_mean = block_sum<scalar_t, acc_t>(row + s, len) / static_cast<acc_t>(len);
          const acc_t block_m2 = block_squared_deviation<scalar_t, acc_t>(row + s, len, block_mean);
          chan_merge(n, mean, m2, static_cast<acc_t>(len), block_mean, block_m2);
        }
      }
      out[c] = n;
      out[g.C + c] = mean;
      out[2 * g.C + c] = m2;
    }
  });
}

// Channels-last: rows of C values. Blocks of `block_rows` rows are reduced in
// two passes, every channel at once (the inner loops run along the channels),
// and merged into their chunk's partial; the chunks' partials are merged in
// order at the end.
template <typename scalar_t>
void local_stats_channels_last(const Geometry& g, const scalar_t* x, at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const int64_t M = g.N * g.S;
  const int64_t block_rows = std::max<int64_t>(1, kBlockValues / C);
  const int64_t chunk_rows = block_rows * std::max<int64_t>(1, kMinChunkValues / (block_rows * C));
  const int64_t chunks = ceil_div(M, chunk_rows);
  std::vector<acc_t> counts(chunks, acc_t(0));
  std::vector<acc_t> means(chunks * C, acc_t(0));
  std::vector<acc_t> m2s(chunks * C, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> block_mean(C), block_m2(C);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* mean = means.data() + k * C;
      acc_t* m2 = m2s.data() + k * C;
      const int64_t end = std::min(M, (k + 1) * chunk_rows);
      for (int64_t r0 = k * chunk_rows; r0 < end; r0 += block_rows) {
        const int64_t rows = std::min(block_rows, end - r0);
        const scalar_t* block = x + r0 * C;
        std::fill(block_mean.begin(), block_mean.end(), acc_t(0));
        std::fill(block_m2.begin(), block_m2.end(), acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            block_mean[c] += static_cast<acc_t>(block[r * C + c]);
          }
        }
        const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
        for (int64_t c = 0; c < C; ++c) {
          block_mean[c] *= inv_rows;
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = static_cast<acc_t>(block[r * C + c]) - block_mean[c];
            block_m2[c] += d * d;
          }
        }
        const acc_t n_before = counts[k];
        for (int64_t c = 0; c < C; ++c) {
          acc_t n = n_before;
          chan_merge(n, mean[c], m2[c], static_cast<acc_t>(rows), block_mean[c], block_m2[c]);
        }
        counts[k] = n_before + static_cast<acc_t>(rows);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t n = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      chan_merge(n, mean, m2, counts[k], means[k * C + c], m2s[k * C + c]);
    }
    out[c] = n;
    out[C + c] = mean;
    out[2 * C + c] = m2;
  }
}

Tensor sync_batch_norm_stats_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var) {
  check_sync_stats_args(input, weight, bias, running_mean, running_var);
  const int64_t C = input.size(1);
  const auto options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    return at::zeros({kStatsRows, C}, options);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  Tensor stats = at::empty({kStatsRows, C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.channels_last()) {
      local_stats_channels_last<scalar_t>(g, x.const_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    } else {
      local_stats_channels_first<scalar_t>(g, x.const_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    }
  });
  return stats;
}

std::tuple<Tensor, Tensor, Tensor> sync_batch_norm_gather_stats_cpu(
    const Tensor& stats, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, double momentum, double eps) {
  const int64_t C = check_sync_gather_args(stats, running_mean, running_var, num_batches_tracked);
  const Tensor gathered = stats.contiguous();
  const int64_t world = gathered.size(0);
  Tensor mean = at::empty({C}, gathered.options());
  Tensor invstd = at::empty({C}, gathered.options());
  Tensor count = at::empty({C}, gathered.options());
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);
  const Tensor* nbt = get_if_defined(num_batches_tracked);
  // momentum=None: the cumulative average over the batches seen, this one included.
  const double factor =
      nbt == nullptr ? momentum : 1.0 / (static_cast<double>(nbt->item<int64_t>()) + 1.0);
  AT_DISPATCH_FLOATING_TYPES(gathered.scalar_type(), "sync_batch_norm_gather_stats", [&] {
    using acc_t = scalar_t;
    const acc_t* s = gathered.const_data_ptr<acc_t>();
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    acc_t* count_out = count.mutable_data_ptr<acc_t>();
    std::vector<acc_t> m2_of(C);
    // In rank order: every rank merges the same values the same way.
    for (int64_t c = 0; c < C; ++c) {
      acc_t n = 0, mu = 0, m2 = 0;
      for (int64_t r = 0; r < world; ++r) {
        const acc_t* rank = s + r * kStatsRows * C;
        chan_merge(n, mu, m2, rank[c], rank[C + c], rank[2 * C + c]);
      }
      mean_out[c] = mu;
      invstd_out[c] = acc_t(1) / std::sqrt(m2 / n + static_cast<acc_t>(eps));
      count_out[c] = n;
      m2_of[c] = m2;
    }
    if (rm == nullptr) {
      return;
    }
    const acc_t f = static_cast<acc_t>(factor);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm->scalar_type(), "sync_running_stats", [&] {
      using param_t = scalar_t;
      param_t* rm_data = rm->mutable_data_ptr<param_t>();
      param_t* rv_data = rv->mutable_data_ptr<param_t>();
      const int64_t rm_stride = rm->stride(0), rv_stride = rv->stride(0);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t unbiased = m2_of[c] / (count_out[c] - acc_t(1));
        param_t& rmc = rm_data[c * rm_stride];
        param_t& rvc = rv_data[c * rv_stride];
        rmc = static_cast<param_t>((acc_t(1) - f) * static_cast<acc_t>(rmc) + f * mean_out[c]);
        rvc = static_cast<param_t>((acc_t(1) - f) * static_cast<acc_t>(rvc) + f * unbiased);
      }
    });
  });
  return {mean, invstd, count};
}

// out[i] = value(c, i) for every element i of channel c, in memory order
// (channels-first rows in parallel, or channels-last rows of C values).
template <typename scalar_t, typename Value>
void map_elements(const Geometry& g, scalar_t* out, const Value& value) {
  if (g.channels_last()) {
    const int64_t M = g.N * g.S;
    at::parallel_for(0, M, std::max<int64_t>(1, kBlockValues / g.C), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t c = 0; c < g.C; ++c) {
          const int64_t i = m * g.C + c;
          out[i] = static_cast<scalar_t>(value(c, i));
        }
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kBlockValues / g.S), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % g.C;
        for (int64_t i = r * g.S; i < (r + 1) * g.S; ++i) {
          out[i] = static_cast<scalar_t>(value(c, i));
        }
      }
    });
  }
}

// Per-channel constants of the elementwise passes, in acc_t.
template <typename acc_t, typename param_t>
std::vector<acc_t> channel_values(const Tensor* t, int64_t C, acc_t fallback) {
  std::vector<acc_t> v(C, fallback);
  if (t != nullptr) {
    const param_t* p = t->const_data_ptr<param_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) {
      v[c] = static_cast<acc_t>(p[c * stride]);
    }
  }
  return v;
}

Tensor sync_batch_norm_elemt_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
    const Tensor& invstd) {
  check_sync_elemt_args(input, weight, bias, mean, invstd);
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x);
  const Tensor* w = get_if_defined(weight);
  const Tensor* b = get_if_defined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param<scalar_t>(w != nullptr ? w : b, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const std::vector<acc_t> mu = channel_values<acc_t, acc_t>(&mean, g.C, 0);
      std::vector<acc_t> scale = channel_values<acc_t, param_t>(w, g.C, 1);
      const std::vector<acc_t> istd = channel_values<acc_t, acc_t>(&invstd, g.C, 0);
      for (int64_t c = 0; c < g.C; ++c) {
        scale[c] *= istd[c];
      }
      const std::vector<acc_t> shift = channel_values<acc_t, param_t>(b, g.C, 0);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      map_elements(g, out.buffer.mutable_data_ptr<scalar_t>(), [&](int64_t c, int64_t i) {
        return (static_cast<acc_t>(xp[i]) - mu[c]) * scale[c] + shift[c];
      });
    });
  });
  out.finish();
  return out.result;
}

// sum(dy) and sum(dy * (x - mean)) per channel, into out[0 * C + c] and
// out[1 * C + c]; blocks of up to kBlockValues values accumulate in acc_t and
// are added up in double.
template <typename scalar_t>
void grad_sums(const Geometry& g, const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* mean,
               at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  if (!g.channels_last()) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double total_dy = 0, total_dy_xmu = 0;
        const acc_t mu = mean[c];
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t base = (n * C + c) * g.S;
          for (int64_t s0 = 0; s0 < g.S; s0 += kBlockValues) {
            const int64_t s1 = std::min(g.S, s0 + kBlockValues);
            acc_t a_dy = 0, a_dy_xmu = 0;
            for (int64_t i = base + s0; i < base + s1; ++i) {
              const acc_t d = static_cast<acc_t>(dy[i]);
              a_dy += d;
              a_dy_xmu += d * (static_cast<acc_t>(x[i]) - mu);
            }
            total_dy += a_dy;
            total_dy_xmu += a_dy_xmu;
          }
        }
        out[c] = static_cast<acc_t>(total_dy);
        out[C + c] = static_cast<acc_t>(total_dy_xmu);
      }
    });
    return;
  }
  const int64_t M = g.N * g.S;
  const int64_t chunk_rows = std::max<int64_t>(1, kMinChunkValues / C);
  const int64_t chunks = ceil_div(M, chunk_rows);
  std::vector<double> partial(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* p_dy = partial.data() + k * 2 * C;
      double* p_dy_xmu = p_dy + C;
      for (int64_t m = k * chunk_rows; m < std::min(M, (k + 1) * chunk_rows); ++m) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(dy[m * C + c]);
          p_dy[c] += d;
          p_dy_xmu[c] += d * (static_cast<acc_t>(x[m * C + c]) - mean[c]);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double total_dy = 0, total_dy_xmu = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      total_dy += partial[k * 2 * C + c];
      total_dy_xmu += partial[k * 2 * C + C + c];
    }
    out[c] = static_cast<acc_t>(total_dy);
    out[C + c] = static_cast<acc_t>(total_dy_xmu);
  }
}

Tensor sync_batch_norm_backward_reduce_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& mean) {
  check_sync_backward_reduce_args(grad_output, input, mean);
  const int64_t C = input.size(1);
  const auto options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    return at::zeros({kSumsRows, C}, options);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  const Tensor dy = to_layout_of(grad_output, x);
  const Tensor mu = mean.contiguous();
  Tensor sums = at::empty({kSumsRows, C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_sums<scalar_t>(g, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
                        sums.mutable_data_ptr<acc_t>());
  });
  return sums;
}

Tensor sync_batch_norm_backward_elemt_cpu(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, const Tensor& sums, const Tensor& count) {
  check_sync_backward_elemt_args(grad_output, input, weight, mean, invstd, sums, count);
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  const Tensor dy = to_layout_of(grad_output, x);
  OutputLike out(input, x);
  const Tensor* w = get_if_defined(weight);
  const Tensor global_sums = sums.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param<scalar_t>(w, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const int64_t C = g.C;
      const std::vector<acc_t> mu = channel_values<acc_t, acc_t>(&mean, C, 0);
      const std::vector<acc_t> istd = channel_values<acc_t, acc_t>(&invstd, C, 0);
      const std::vector<acc_t> n = channel_values<acc_t, acc_t>(&count, C, 0);
      std::vector<acc_t> scale = channel_values<acc_t, param_t>(w, C, 1);
      std::vector<acc_t> mean_dy(C), xmu_factor(C);
      const acc_t* s = global_sums.const_data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        mean_dy[c] = s[c] / n[c];
        xmu_factor[c] = istd[c] * istd[c] * s[C + c] / n[c];
        scale[c] *= istd[c];
      }
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      map_elements(g, out.buffer.mutable_data_ptr<scalar_t>(), [&](int64_t c, int64_t i) {
        return (static_cast<acc_t>(dyp[i]) - mean_dy[c] - (static_cast<acc_t>(xp[i]) - mu[c]) * xmu_factor[c]) *
            scale[c];
      });
    });
  });
  out.finish();
  return out.result;
}

}  // namespace
}  // namespace fastbn::cpu

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("sync_batch_norm_stats", &fastbn::cpu::sync_batch_norm_stats_cpu);
  m.impl("sync_batch_norm_gather_stats", &fastbn::cpu::sync_batch_norm_gather_stats_cpu);
  m.impl("sync_batch_norm_elemt", &fastbn::cpu::sync_batch_norm_elemt_cpu);
  m.impl("sync_batch_norm_backward_reduce", &fastbn::cpu::sync_batch_norm_backward_reduce_cpu);
  m.impl("sync_batch_norm_backward_elemt", &fastbn::cpu::sync_batch_norm_backward_elemt_cpu);
}
