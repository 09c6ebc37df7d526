// The fused reduce-then-transform kernels of kernels.h (channels-first
// tensors with long rows and small channels), compiled once per variant.
#include "elementwise.h"
#include "kernels.h"
#include "statistics.h"

#include <optional>
#include <tuple>
#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {
namespace {

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

// The reductions of a block read images i and i + half side by side, two
// streams through memory (see part_stride in work_split.h); returns half
// (0: one image at a time). Against one image at a time, NCHW at 2 threads
// in one process (with the row pairs of channel_map's passes): forward
// fp32 32x64x32x32 1035 -> 951 us, 32x256x56x56 9827 -> 9311, bf16
// 32x128x32x32 1393 -> 1351; forward+backward 2872 -> 2483, 26727 -> 24654,
// 3142 -> 2936.
template <typename scalar_t>
int64_t image_pairs(const Geometry& g) {
  return part_stride(g.N, 2, g.C * g.S * static_cast<int64_t>(sizeof(scalar_t)));
}

template <typename scalar_t>
bool train_fused(const Geometry& g, const scalar_t* x_ptr, const scalar_t* residual, scalar_t* y_ptr,
                 Epilogue epilogue, const acc_type<scalar_t>* w, const acc_type<scalar_t>* b, double eps,
                 acc_type<scalar_t>* mean, acc_type<scalar_t>* invstd, acc_type<scalar_t>* unbiased) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  const auto blocks = fused_channel_blocks(g, sizeof(scalar_t));
  if (!blocks) {
    return false;
  }
  const int64_t C = g.C;
  const int64_t n = g.reduce_size();
  const bool stream = stream_output<scalar_t>(g, residual != nullptr ? 2 : 1);
  const bool prefetch = prefetch_input<scalar_t>(g, residual != nullptr ? 2 : 1);
  // The output of the rows of channel c in image i, once its statistics are known.
  const auto normalize_row = [&](int64_t i, int64_t c) {
    constexpr int kParams = kNormalizeParams<scalar_t>;
    acc_t values[kParams];
    normalize_params<scalar_t>(mean[c], invstd[c] * w[c], b[c], values);
    const int64_t base = (i * C + c) * g.S;
    dispatch_bool(epilogue.relu, [&](auto relu) {
      constexpr bool kRelu = decltype(relu)::value;
      if (residual != nullptr) {
        const scalar_t* in[2] = {x_ptr, residual};
        map_row<scalar_t, 2, kParams>(in, y_ptr, base, g.S, values, NormalizeAct<2, kRelu, kParams>{}, stream,
                                      prefetch);
      } else {
        const scalar_t* in[1] = {x_ptr};
        map_row<scalar_t, 1, kParams>(in, y_ptr, base, g.S, values, NormalizeAct<1, kRelu, kParams>{}, stream,
                                      prefetch);
      }
    });
  };
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
      // Images i and i + half side by side: two streams (image_pairs).
      const int64_t half = image_pairs<scalar_t>(g);
      for (int64_t i = 0; i < half; ++i) {
        for (int64_t c = c0; c < c1; ++c) {
          accs[c - c0].add_row_pair(x_ptr + (i * C + c) * g.S, half * C * g.S, shifts[c - c0]);
        }
      }
      for (int64_t i = 2 * half; i < g.N; ++i) {
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
          normalize_row(i, c);
        }
      }
    }
    stream_fence();
  });
  return true;
}

// The backward of one block of channels: the sums of its rows, then their
// grad_input right away, while the rows are in cache.
template <typename scalar_t, bool kMasked, bool kWrite>
void backward_block(const Geometry& g, const GradInput<scalar_t>& d, const scalar_t* x_ptr, scalar_t* dx_ptr,
                    bool training, const acc_type<scalar_t>* mu, const acc_type<scalar_t>* inv,
                    const acc_type<scalar_t>* w, acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu,
                    int64_t c0, int64_t c1, bool stream,
                    std::vector<GradSumsAcc<scalar_t, kMasked, kWrite>>& accs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = g.C;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.reduce_size());
  accs.clear();
  for (int64_t c = c0; c < c1; ++c) {
    accs.emplace_back(mu[c]);
  }
  // Images i and i + half side by side (image_pairs); not where d is
  // written, whose stores would then alias the partner's loads.
  const int64_t half = kWrite ? 0 : image_pairs<scalar_t>(g);
  for (int64_t i = 0; i < half; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (i * C + c) * g.S;
      accs[c - c0].add_row_pair(d.dy + base, offset_if<kMasked>(d.y, base), x_ptr + base, nullptr,
                                half * C * g.S, g.S, /*stream=*/false);
    }
  }
  for (int64_t i = 2 * half; i < g.N; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (i * C + c) * g.S;
      accs[c - c0].add_row(d.dy + base, offset_if<kMasked>(d.y, base), x_ptr + base,
                           offset_if<kWrite>(d.d_out, base), g.S, /*stream=*/false);
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    std::tie(sum_dy[c], sum_dy_xmu[c]) = accs[c - c0].result();
  }
  if (dx_ptr == nullptr) {
    return;
  }
  // grad_input re-reads the rows the sums just read, from the L2: it prefetches
  // them whatever the tensor's size. Against the pass rule (prefetch_input),
  // fp32 and bf16 16x64x32x32 forward+backward at 2 threads measured the same
  // within this host's spread (500-900 us either way).
  constexpr bool kPrefetchRows = true;
  // With d written, grad_input reads it back (one input instead of dy and y).
  constexpr bool kMaskedInput = kMasked && !kWrite;
  const scalar_t* d_in = kWrite ? d.d_out : d.dy;
  for (int64_t i = 0; i < g.N; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (i * C + c) * g.S;
      const acc_t scale = inv[c] * w[c];
      if (training) {
        // The parameters of GradInputTrain (see kernels.h's GradInputTrainFn).
        const acc_t p[4] = {mu[c], sum_dy[c] * inv_n, inv[c] * inv[c] * sum_dy_xmu[c] * inv_n, scale};
        if constexpr (kMaskedInput) {
          const scalar_t* in[3] = {d_in, d.y, x_ptr};
          map_row<scalar_t, 3, 4>(in, dx_ptr, base, g.S, p, GradInputTrain<true>{}, stream, kPrefetchRows);
        } else {
          const scalar_t* in[2] = {d_in, x_ptr};
          map_row<scalar_t, 2, 4>(in, dx_ptr, base, g.S, p, GradInputTrain<false>{}, stream, kPrefetchRows);
        }
      } else {
        const acc_t p_eval[1] = {scale};
        if constexpr (kMaskedInput) {
          const scalar_t* in[2] = {d_in, d.y};
          map_row<scalar_t, 2, 1>(in, dx_ptr, base, g.S, p_eval, GradInputEval<true>{}, stream, kPrefetchRows);
        } else {
          const scalar_t* in[1] = {d_in};
          map_row<scalar_t, 1, 1>(in, dx_ptr, base, g.S, p_eval, GradInputEval<false>{}, stream, kPrefetchRows);
        }
      }
    }
  }
}

template <typename scalar_t>
bool backward_fused(const Geometry& g, const GradInput<scalar_t>& d, const scalar_t* x_ptr, scalar_t* dx_ptr,
                    bool training, const acc_type<scalar_t>* mu, const acc_type<scalar_t>* inv,
                    const acc_type<scalar_t>* w, acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu) {
  const int inputs = 2 + (d.y != nullptr ? 1 : 0);  // read per position by the sums
  const auto blocks = fused_channel_blocks(g, inputs * sizeof(scalar_t));
  if (!blocks) {
    return false;
  }
  const bool stream = stream_output<scalar_t>(g, inputs);
  // (d itself is read back from the cache within its block: never streamed.)
  dispatch_grad_source(GradSource{d.y != nullptr, d.d_out != nullptr}, [&](auto masked, auto write) {
    constexpr bool kMasked = decltype(masked)::value, kWrite = decltype(write)::value;
    parallel_items(blocks->count, inputs * blocks->size * g.reduce_size(), [&](int64_t begin, int64_t end) {
      std::vector<GradSumsAcc<scalar_t, kMasked, kWrite>> accs;
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c0 = block * blocks->size;
        backward_block<scalar_t, kMasked, kWrite>(g, d, x_ptr, dx_ptr, training, mu, inv, w, sum_dy, sum_dy_xmu,
                                                  c0, std::min(g.C, c0 + blocks->size), stream, accs);
      }
      stream_fence();
    });
  });
  return true;
}

FASTBN_REGISTER_KERNEL(train_fused_kernel, train_fused);
FASTBN_REGISTER_KERNEL(backward_fused_kernel, backward_fused);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
