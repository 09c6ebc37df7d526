// CUDA kernels of the SyncBatchNorm operators (schemas.h; the layer is
// fastbn/sync.py).
//
// The local reductions reuse reductions.cuh (Welford statistics and gradient
// sums, last-block finish, fixed merge order); the finishers here write the
// packed tensors the processes exchange. Merging the gathered statistics is
// one thread per channel walking the ranks in order, so every rank computes
// bitwise the same result. The elementwise passes are plain grid-stride
// loops. Everything runs on the current stream without host synchronisation
// (momentum=None reads num_batches_tracked on the device).
#include "../sync_batch_norm.h"
#include "reductions.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace fastbn::cuda {
namespace {

constexpr int kThreads = 256;

int64_t ceil_div_i64(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float reciprocal_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return rsqrt(v); }

// Writes a channel's local (count, mean, M2) into the packed [3, C] stats.
template <typename scalar_t, typename acc_t>
struct PackStats {
  const scalar_t* x;
  int64_t shift_stride;  // the Welford shift: x[c * shift_stride] (see reductions.cuh)
  int64_t C;
  acc_t* stats;
  __device__ void operator()(int64_t c, WelfordState<acc_t> s) const {
    stats[c] = s.n;
    stats[C + c] = s.mean + static_cast<acc_t>(x[c * shift_stride]);
    stats[2 * C + c] = s.m2;
  }
};

// Writes a channel's local gradient sums into the packed [2, C] sums.
template <typename acc_t>
struct PackSums {
  int64_t C;
  acc_t* sums;
  __device__ void operator()(int64_t c, GradSums<acc_t> s) const {
    sums[c] = s.dy;
    sums[C + c] = s.dy_xmu;
  }
};

// Blocks per channel group (channels-first: one channel; channels-last: a
// tile of 32): about 4 blocks per SM over the grid, but no block with less
// than a few thousand values.
int64_t blocks_per_group(const Geometry& g, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t groups =
      g.channels_last() ? ceil_div_i64(g.C, kTileChannels) : std::min<int64_t>(g.C, 65535);
  const int64_t rows_per_block = g.channels_last() ? kTileRows : kReduceThreads;
  const int64_t useful = ceil_div_i64(g.N * g.S, rows_per_block * 16);
  return std::clamp<int64_t>(std::min(ceil_div_i64(4 * int64_t(sms), groups), useful), 1, 65535);
}

// One reduction launch (reductions.cuh) over the tensor of geometry g.
template <typename Acc, typename Fin>
void launch_reduce(const Geometry& g, const Acc& acc, const Fin& fin, const Tensor& like, cudaStream_t stream) {
  using State = typename Acc::State;
  const int64_t P = blocks_per_group(g, like.get_device());
  const Tensor partial = at::empty(
      {static_cast<int64_t>(g.C * P * sizeof(State))}, like.options().dtype(at::kByte));
  auto* partial_ptr = reinterpret_cast<State*>(partial.data_ptr());
  if (g.channels_last()) {
    const dim3 grid(static_cast<unsigned>(ceil_div_i64(g.C, kTileChannels)), static_cast<unsigned>(P));
    // Arrival counters start at zero; the kernel leaves them at zero.
    const Tensor counters = at::zeros({static_cast<int64_t>(grid.x)}, like.options().dtype(at::kInt));
    reduce_channels_last_kernel<Acc, Fin, int64_t><<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
        acc, fin, partial_ptr, reinterpret_cast<unsigned*>(counters.data_ptr()), g.N * g.S, g.C);
  } else {
    const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
    const Tensor counters = at::zeros({static_cast<int64_t>(grid.y)}, like.options().dtype(at::kInt));
    reduce_channels_first_kernel<Acc, Fin, int64_t><<<grid, kReduceThreads, 0, stream>>>(
        acc, fin, partial_ptr, reinterpret_cast<unsigned*>(counters.data_ptr()), g.N, g.C, g.S);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Channel of element i: channels-first (n, c, s) at (n * C + c) * S + s;
// channels-last (m, c) at m * C + c.
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t S, bool channels_last) {
  return channels_last ? i % C : (i / S) % C;
}

// y = (x - mean) * invstd * weight + bias
template <typename scalar_t, typename acc_t, typename param_t>
__global__ void normalize_kernel(
    const scalar_t* x, scalar_t* y, const acc_t* mean, const acc_t* invstd, const param_t* weight,
    const param_t* bias, int64_t numel, int64_t C, int64_t S, bool channels_last) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t c = channel_of(i, C, S, channels_last);
    const acc_t scale = invstd[c] * (weight == nullptr ? acc_t(1) : static_cast<acc_t>(weight[c]));
    const acc_t shift = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c]);
    y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean[c]) * scale + shift);
  }
}

// dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * weight
template <typename scalar_t, typename acc_t, typename param_t>
__global__ void grad_input_kernel(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t* mean, const acc_t* invstd,
    const param_t* weight, const acc_t* sums, const acc_t* count, int64_t numel, int64_t C, int64_t S,
    bool channels_last) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t c = channel_of(i, C, S, channels_last);
    const acc_t inv = invstd[c];
    const acc_t mean_dy = sums[c] / count[c];
    const acc_t xmu_factor = inv * inv * sums[C + c] / count[c];
    const acc_t scale = inv * (weight == nullptr ? acc_t(1) : static_cast<acc_t>(weight[c]));
    dx[i] = static_cast<scalar_t>(
        (static_cast<acc_t>(dy[i]) - mean_dy - (static_cast<acc_t>(x[i]) - mean[c]) * xmu_factor) * scale);
  }
}

unsigned elementwise_blocks(int64_t numel, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div_i64(numel, kThreads), 1, 32 * int64_t(sms)));
}

// Chan's merge over the ranks in order, one thread per channel, then the
// running-statistics update with the global unbiased variance.
template <typename acc_t, typename param_t>
__global__ void merge_stats_kernel(
    const acc_t* stats, int64_t world, int64_t C, acc_t* mean_out, acc_t* invstd_out, acc_t* count_out,
    param_t* running_mean, int64_t rm_stride, param_t* running_var, int64_t rv_stride,
    const int64_t* num_batches_tracked, acc_t momentum, acc_t eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  using Welford = WelfordAccumulator<float, acc_t>;  // only its merge is used
  WelfordState<acc_t> s = Welford::identity();
  for (int64_t r = 0; r < world; ++r) {
    const acc_t* rank = stats + r * kStatsRows * C;
    s = Welford::merge(s, {rank[C + c], rank[2 * C + c], rank[c]});
  }
  mean_out[c] = s.mean;
  invstd_out[c] = reciprocal_sqrt(s.m2 / s.n + eps);
  count_out[c] = s.n;
  if (running_mean == nullptr) {
    return;
  }
  const acc_t factor = num_batches_tracked == nullptr
      ? momentum
      : static_cast<acc_t>(1.0 / (static_cast<double>(*num_batches_tracked) + 1.0));
  const acc_t unbiased = s.m2 / (s.n - acc_t(1));
  param_t& rm = running_mean[c * rm_stride];
  param_t& rv = running_var[c * rv_stride];
  rm = static_cast<param_t>((acc_t(1) - factor) * static_cast<acc_t>(rm) + factor * s.mean);
  rv = static_cast<param_t>((acc_t(1) - factor) * static_cast<acc_t>(rv) + factor * unbiased);
}

template <typename T>
const T* data_or_null(const Tensor* t) {
  return t == nullptr ? nullptr : t->const_data_ptr<T>();
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  const Tensor* p = get_if_defined(t);
  return p == nullptr ? Tensor() : p->contiguous();
}

const Tensor* defined_or_null(const Tensor& t) { return t.defined() ? &t : nullptr; }

// ---------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------

Tensor sync_batch_norm_stats_cuda(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var) {
  check_sync_stats_args(input, weight, bias, running_mean, running_var);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t C = input.size(1);
  const auto options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    return at::zeros({kStatsRows, C}, options);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  Tensor stats = at::empty({kStatsRows, C}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shift_stride = g.channels_last() ? 1 : g.S;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    launch_reduce(
        g, WelfordAccumulator<scalar_t, acc_t>{xp, shift_stride},
        PackStats<scalar_t, acc_t>{xp, shift_stride, C, stats.mutable_data_ptr<acc_t>()}, x, stream);
  });
  return stats;
}

std::tuple<Tensor, Tensor, Tensor> sync_batch_norm_gather_stats_cuda(
    const Tensor& stats, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, double momentum, double eps) {
  const int64_t C = check_sync_gather_args(stats, running_mean, running_var, num_batches_tracked);
  const c10::cuda::CUDAGuard device_guard(stats.device());
  const Tensor gathered = stats.contiguous();
  Tensor mean = at::empty({C}, gathered.options());
  Tensor invstd = at::empty({C}, gathered.options());
  Tensor count = at::empty({C}, gathered.options());
  if (C == 0) {
    return {mean, invstd, count};
  }
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);
  const Tensor* nbt = get_if_defined(num_batches_tracked);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(stats.get_device());
  const unsigned blocks = static_cast<unsigned>(ceil_div_i64(C, kThreads));
  AT_DISPATCH_FLOATING_TYPES(gathered.scalar_type(), "sync_batch_norm_gather_stats_cuda", [&] {
    using acc_t = scalar_t;
    const at::ScalarType param_type = rm != nullptr ? rm->scalar_type() : gathered.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_type, "sync_running_stats_cuda", [&] {
      using param_t = scalar_t;
      merge_stats_kernel<acc_t, param_t><<<blocks, kThreads, 0, stream>>>(
          gathered.const_data_ptr<acc_t>(), gathered.size(0), C, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(), count.mutable_data_ptr<acc_t>(),
          rm ? rm->mutable_data_ptr<param_t>() : nullptr, rm ? rm->stride(0) : 0,
          rv ? rv->mutable_data_ptr<param_t>() : nullptr, rv ? rv->stride(0) : 0,
          nbt ? nbt->const_data_ptr<int64_t>() : nullptr, static_cast<acc_t>(momentum),
          static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd, count};
}

Tensor sync_batch_norm_elemt_cuda(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
    const Tensor& invstd) {
  check_sync_elemt_args(input, weight, bias, mean, invstd);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  const Tensor mu = mean.contiguous();
  const Tensor istd = invstd.contiguous();
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param<scalar_t>(w.defined() ? &w : defined_or_null(b), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      normalize_kernel<scalar_t, acc_t, param_t><<<elementwise_blocks(g.numel(), device), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.buffer.mutable_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
          istd.const_data_ptr<acc_t>(), data_or_null<param_t>(defined_or_null(w)),
          data_or_null<param_t>(defined_or_null(b)), g.numel(), g.C, g.S, g.channels_last());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  out.finish();
  return out.result;
}

Tensor sync_batch_norm_backward_reduce_cuda(const Tensor& grad_output, const Tensor& input, const Tensor& mean) {
  check_sync_backward_reduce_args(grad_output, input, mean);
  const c10::cuda::CUDAGuard device_guard(input.device());
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_reduce(
        g, GradSumAccumulator<scalar_t, acc_t>{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                               mu.const_data_ptr<acc_t>()},
        PackSums<acc_t>{C, sums.mutable_data_ptr<acc_t>()}, x, stream);
  });
  return sums;
}

Tensor sync_batch_norm_backward_elemt_cuda(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, const Tensor& sums, const Tensor& count) {
  check_sync_backward_elemt_args(grad_output, input, weight, mean, invstd, sums, count);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  const Tensor dy = to_layout_of(grad_output, x);
  OutputLike out(input, x);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor mu = mean.contiguous();
  const Tensor istd = invstd.contiguous();
  const Tensor global_sums = sums.contiguous();
  const Tensor n = count.contiguous();
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param<scalar_t>(defined_or_null(w), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      grad_input_kernel<scalar_t, acc_t, param_t><<<elementwise_blocks(g.numel(), device), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.buffer.mutable_data_ptr<scalar_t>(),
          mu.const_data_ptr<acc_t>(), istd.const_data_ptr<acc_t>(), data_or_null<param_t>(defined_or_null(w)),
          global_sums.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>(), g.numel(), g.C, g.S, g.channels_last());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  out.finish();
  return out.result;
}

}  // namespace
}  // namespace fastbn::cuda

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("sync_batch_norm_stats", &fastbn::cuda::sync_batch_norm_stats_cuda);
  m.impl("sync_batch_norm_gather_stats", &fastbn::cuda::sync_batch_norm_gather_stats_cuda);
  m.impl("sync_batch_norm_elemt", &fastbn::cuda::sync_batch_norm_elemt_cuda);
  m.impl("sync_batch_norm_backward_reduce", &fastbn::cuda::sync_batch_norm_backward_reduce_cuda);
  m.impl("sync_batch_norm_backward_elemt", &fastbn::cuda::sync_batch_norm_backward_elemt_cuda);
}
