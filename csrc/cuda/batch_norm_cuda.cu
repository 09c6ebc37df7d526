// CUDA kernels and host code for fastbn's batch norm operators.
//
// Training forward: two-stage per-channel Welford reduction (reductions.cuh),
// a finalize kernel (statistics, running-stat update), an elementwise
// normalize. Backward: two-stage gradient sums, a finalize kernel
// (grad_weight, grad_bias), an elementwise grad_input. Everything runs on the
// current stream with no host synchronisation; index math is 32-bit when the
// tensor allows it.
#include "../batch_norm.h"
#include "reductions.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>
#include <type_traits>

namespace fastbn::cuda {
namespace {

constexpr int kElementwiseThreads = 256;
constexpr int kFinalizeThreads = 128;

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return rsqrt(v); }

template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t load_or(const param_t* p, int64_t i, acc_t fallback) {
  return p == nullptr ? fallback : static_cast<acc_t>(p[i]);
}

template <typename index_t, bool kChannelsLast>
__device__ __forceinline__ index_t channel_of(index_t i, index_t C, index_t S) {
  return kChannelsLast ? i % C : (i / S) % C;
}

// ---------------------------------------------------------------------------
// Finalize kernels: one thread per channel merges its P partials in order.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, typename param_t>
__global__ void stats_finalize_kernel(
    const WelfordState<acc_t>* partial, const scalar_t* x, int64_t shift_stride, int64_t P,
    int64_t C, int64_t count, acc_t eps,
    acc_t momentum, acc_t* save_mean, acc_t* save_invstd, param_t* running_mean,
    int64_t running_mean_stride, param_t* running_var, int64_t running_var_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  using Acc = WelfordAccumulator<scalar_t, acc_t>;
  WelfordState<acc_t> s = Acc::identity();
  for (int64_t p = 0; p < P; ++p) {
    s = Acc::merge(s, partial[c * P + p]);
  }
  s.mean += static_cast<acc_t>(x[c * shift_stride]);
  const acc_t var = s.m2 / static_cast<acc_t>(count);
  save_mean[c] = s.mean;
  save_invstd[c] = inv_sqrt(var + eps);
  if (running_mean != nullptr) {
    const acc_t unbiased = s.m2 / static_cast<acc_t>(count - 1);
    param_t& rm = running_mean[c * running_mean_stride];
    param_t& rv = running_var[c * running_var_stride];
    rm = static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(rm) + momentum * s.mean);
    rv = static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(rv) + momentum * unbiased);
  }
}

// Sums each channel's partials; writes the sums for the grad_input kernel and
// the parameter gradients when asked (null pointers skip them).
template <typename acc_t, typename param_t>
__global__ void grad_finalize_kernel(
    const GradSums<acc_t>* partial, int64_t P, int64_t C, const acc_t* invstd, acc_t* sum_dy,
    acc_t* sum_dy_xmu, param_t* grad_weight, param_t* grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  GradSums<acc_t> s{acc_t(0), acc_t(0)};
  for (int64_t p = 0; p < P; ++p) {
    s = GradSumAccumulator<float, acc_t>::merge(s, partial[c * P + p]);
  }
  sum_dy[c] = s.dy;
  sum_dy_xmu[c] = s.dy_xmu;
  if (grad_weight != nullptr) {
    grad_weight[c] = static_cast<param_t>(s.dy_xmu * invstd[c]);
  }
  if (grad_bias != nullptr) {
    grad_bias[c] = static_cast<param_t>(s.dy);
  }
}

// Evaluation: the running statistics as acc_t mean and invstd.
template <typename acc_t, typename param_t>
__global__ void running_stats_kernel(
    const param_t* running_mean, int64_t running_mean_stride, const param_t* running_var,
    int64_t running_var_stride, acc_t eps, int64_t C, acc_t* mean, acc_t* invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) {
    mean[c] = static_cast<acc_t>(running_mean[c * running_mean_stride]);
    invstd[c] = inv_sqrt(static_cast<acc_t>(running_var[c * running_var_stride]) + eps);
  }
}

// ---------------------------------------------------------------------------
// Elementwise kernels (grid-stride loops)
// ---------------------------------------------------------------------------

// y = (x - mean) * invstd * weight + bias
template <typename scalar_t, typename acc_t, typename param_t, typename index_t, bool kChannelsLast>
__global__ void normalize_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, const param_t* __restrict__ weight,
    const param_t* __restrict__ bias, index_t numel, index_t C, index_t S) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = channel_of<index_t, kChannelsLast>(i, C, S);
    const acc_t scale = invstd[c] * load_or(weight, c, acc_t(1));
    const acc_t shift = load_or(bias, c, acc_t(0));
    y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean[c]) * scale + shift);
  }
}

// Training: dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w
// Evaluation: dx = dy * invstd * w
template <typename scalar_t, typename acc_t, typename param_t, typename index_t, bool kChannelsLast,
          bool kTraining>
__global__ void grad_input_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
    const param_t* __restrict__ weight, const acc_t* __restrict__ sum_dy,
    const acc_t* __restrict__ sum_dy_xmu, acc_t inv_count, index_t numel, index_t C, index_t S) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = channel_of<index_t, kChannelsLast>(i, C, S);
    const acc_t inv = invstd[c];
    const acc_t scale = inv * load_or(weight, c, acc_t(1));
    acc_t g = static_cast<acc_t>(dy[i]);
    if constexpr (kTraining) {
      const acc_t xmu = static_cast<acc_t>(x[i]) - mean[c];
      g = g - sum_dy[c] * inv_count - xmu * (inv * inv * sum_dy_xmu[c] * inv_count);
    }
    dx[i] = static_cast<scalar_t>(g * scale);
  }
}

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------

int multiprocessor_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0 = not yet queried
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    if (const int known = cache[device].load(std::memory_order_relaxed)) {
      return known;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per channel (channels-first) or per channel tile (channels-last):
// about four waves of blocks over the chip, each thread still reducing at
// least kMinValuesPerThread values.
int64_t partial_count(const Geometry& g, int device) {
  constexpr int64_t kMinValuesPerThread = 16;
  constexpr int64_t kMaxPartials = 1024;
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessor_count(device));
  int64_t groups, useful;
  if (g.channels_last()) {
    groups = ceil_div(g.C, kTileChannels);
    useful = ceil_div(g.N * g.S, kTileRows * kMinValuesPerThread);
  } else {
    groups = std::min<int64_t>(g.C, 65535);
    useful = ceil_div(g.N * g.S, kReduceThreads * kMinValuesPerThread);
  }
  return std::clamp<int64_t>(std::min(ceil_div(target_blocks, groups), useful), 1, kMaxPartials);
}

dim3 elementwise_grid(int64_t numel, int device) {
  const int64_t blocks = ceil_div(numel, kElementwiseThreads);
  const int64_t cap = 32 * static_cast<int64_t>(multiprocessor_count(device));
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap))));
}

dim3 finalize_grid(int64_t C) {
  return dim3(static_cast<unsigned>(ceil_div(C, kFinalizeThreads)));
}

// 32-bit index math when every index a kernel forms fits: the grid-stride
// loops step past the last element by up to one grid (at most a few million
// elements), so leave that much headroom below INT32_MAX.
bool fits_int32(const Geometry& g) {
  constexpr int64_t kHeadroom = int64_t(1) << 24;
  return g.numel() <= std::numeric_limits<int32_t>::max() - kHeadroom;
}

// Calls f(std::integral_constant<bool, channels_last>, index_t{}) once.
template <typename F>
void dispatch_layout_and_index(const Geometry& g, const F& f) {
  auto with_index = [&](auto channels_last) {
    if (fits_int32(g)) {
      f(channels_last, int32_t{});
    } else {
      f(channels_last, int64_t{});
    }
  };
  if (g.channels_last()) {
    with_index(std::true_type{});
  } else {
    with_index(std::false_type{});
  }
}

// Stage 1 of a per-channel reduction into partial[C * P].
template <typename Acc>
void launch_reduce(
    const Geometry& g, const Acc& acc, typename Acc::State* partial, int64_t P,
    cudaStream_t stream) {
  dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
    using index_t = decltype(index_tag);
    if constexpr (decltype(channels_last)::value) {
      const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kTileChannels)), static_cast<unsigned>(P));
      reduce_channels_last_kernel<Acc, index_t><<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
          acc, partial, static_cast<index_t>(g.N * g.S), static_cast<index_t>(g.C));
    } else {
      const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
      reduce_channels_first_kernel<Acc, index_t><<<grid, kReduceThreads, 0, stream>>>(
          acc, partial, static_cast<index_t>(g.N), static_cast<index_t>(g.C),
          static_cast<index_t>(g.S));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Workspace of `count` values of type T, from the caching allocator.
template <typename T>
T* workspace(Tensor& holder, const Tensor& like, int64_t count) {
  holder = at::empty({static_cast<int64_t>(count * sizeof(T))}, like.options().dtype(at::kByte));
  return reinterpret_cast<T*>(holder.mutable_data_ptr());
}

template <typename T>
T* data_or_null(const Tensor* t) {
  return t == nullptr ? nullptr : t->mutable_data_ptr<T>();
}

// Runs f(param_tag) with param_t = scalar_t, or acc_t when the parameters
// are float32 for a half input (PyTorch's mixed-precision case).
template <typename scalar_t, typename F>
void dispatch_param_type(at::ScalarType param_type, at::ScalarType input_type, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if (param_type == input_type) {
    f(scalar_t{});
  } else {
    f(acc_t{});
  }
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  const Tensor* p = get_if_defined(t);
  return p == nullptr ? Tensor() : p->contiguous();
}

template <typename param_t>
const param_t* const_data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<param_t>() : nullptr;
}

// ---------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cuda(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  const at::ScalarType param_type = check_train_args(input, weight, bias, running_mean, running_var);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t C = input.size(1);
  const auto stat_options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    return {at::empty_like(input), at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x);
  Tensor save_mean = at::empty({C}, stat_options);
  Tensor save_invstd = at::empty({C}, stat_options);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const int64_t P = partial_count(g, device);
  Tensor partial_holder;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param_type<scalar_t>(param_type, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      using Acc = WelfordAccumulator<scalar_t, acc_t>;
      auto* partial = workspace<typename Acc::State>(partial_holder, x, C * P);
      // Index of channel c's first value: c * S, or c in channels-last.
      const int64_t shift_stride = g.channels_last() ? 1 : g.S;
      launch_reduce(g, Acc{x.const_data_ptr<scalar_t>(), shift_stride}, partial, P, stream);

      stats_finalize_kernel<scalar_t, acc_t, param_t>
          <<<finalize_grid(C), kFinalizeThreads, 0, stream>>>(
          partial, x.const_data_ptr<scalar_t>(), shift_stride, P, C, g.reduce_size(), static_cast<acc_t>(eps), static_cast<acc_t>(momentum),
          save_mean.mutable_data_ptr<acc_t>(), save_invstd.mutable_data_ptr<acc_t>(),
          data_or_null<param_t>(rm), rm ? rm->stride(0) : 0, data_or_null<param_t>(rv),
          rv ? rv->stride(0) : 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
        using index_t = decltype(index_tag);
        normalize_kernel<scalar_t, acc_t, param_t, index_t, decltype(channels_last)::value>
            <<<elementwise_grid(g.numel(), device), kElementwiseThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), out.buffer.mutable_data_ptr<scalar_t>(),
                save_mean.const_data_ptr<acc_t>(), save_invstd.const_data_ptr<acc_t>(),
                const_data_or_null<param_t>(w), const_data_or_null<param_t>(b),
                static_cast<index_t>(g.numel()), static_cast<index_t>(g.C),
                static_cast<index_t>(g.S));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  out.finish();
  return {out.result, save_mean, save_invstd};
}

Tensor batch_norm_eval_cuda(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  const at::ScalarType param_type = check_eval_args(input, running_mean, running_var, weight, bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x);
  const int64_t C = g.C;
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const Tensor stats = at::empty({2, C}, input.options().dtype(acc_dtype(input.scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param_type<scalar_t>(param_type, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      acc_t* mean = stats.mutable_data_ptr<acc_t>();
      acc_t* invstd = mean + C;
      running_stats_kernel<acc_t, param_t><<<finalize_grid(C), kFinalizeThreads, 0, stream>>>(
          running_mean.const_data_ptr<param_t>(), running_mean.stride(0),
          running_var.const_data_ptr<param_t>(), running_var.stride(0), static_cast<acc_t>(eps), C,
          mean, invstd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
        using index_t = decltype(index_tag);
        normalize_kernel<scalar_t, acc_t, param_t, index_t, decltype(channels_last)::value>
            <<<elementwise_grid(g.numel(), device), kElementwiseThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), out.buffer.mutable_data_ptr<scalar_t>(), mean, invstd,
                const_data_or_null<param_t>(w), const_data_or_null<param_t>(b),
                static_cast<index_t>(g.numel()), static_cast<index_t>(g.C),
                static_cast<index_t>(g.S));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  out.finish();
  return out.result;
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const at::ScalarType param_type = check_backward_args(grad_output, input, weight, mean, invstd);
  const c10::cuda::CUDAGuard device_guard(input.device());
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
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor mean_c = mean.contiguous();
  const Tensor invstd_c = invstd.contiguous();
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  if (output_mask[1]) grad_weight = at::empty({C}, param_options);
  if (output_mask[2]) grad_bias = at::empty({C}, param_options);
  std::optional<OutputLike> out;
  if (output_mask[0]) out.emplace(input, x);
  const Tensor sums = at::empty({2, C}, input.options().dtype(acc_dtype(input.scalar_type())));
  Tensor partial_holder;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param_type<scalar_t>(param_type, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      acc_t* sum_dy = sums.mutable_data_ptr<acc_t>();
      acc_t* sum_dy_xmu = sum_dy + C;
      if (need_sums) {
        const int64_t P = partial_count(g, device);
        using Acc = GradSumAccumulator<scalar_t, acc_t>;
        auto* partial = workspace<typename Acc::State>(partial_holder, x, C * P);
        launch_reduce(
            g, Acc{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                   mean_c.const_data_ptr<acc_t>()},
            partial, P, stream);
        grad_finalize_kernel<acc_t, param_t><<<finalize_grid(C), kFinalizeThreads, 0, stream>>>(
            partial, P, C, invstd_c.const_data_ptr<acc_t>(), sum_dy, sum_dy_xmu,
            grad_weight ? grad_weight->mutable_data_ptr<param_t>() : nullptr,
            grad_bias ? grad_bias->mutable_data_ptr<param_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!out) {
        return;
      }
      const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.reduce_size());
      dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
        using index_t = decltype(index_tag);
        constexpr bool kChannelsLast = decltype(channels_last)::value;
        const auto launch = [&](auto training_tag) {
          constexpr bool kTraining = decltype(training_tag)::value;
          grad_input_kernel<scalar_t, acc_t, param_t, index_t, kChannelsLast, kTraining>
              <<<elementwise_grid(g.numel(), device), kElementwiseThreads, 0, stream>>>(
              dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              out->buffer.mutable_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
              invstd_c.const_data_ptr<acc_t>(), const_data_or_null<param_t>(w), sum_dy, sum_dy_xmu,
              inv_count, static_cast<index_t>(g.numel()), static_cast<index_t>(g.C),
              static_cast<index_t>(g.S));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (training) {
          launch(std::true_type{});
        } else {
          launch(std::false_type{});
        }
      });
    });
  });
  if (out) {
    out->finish();
    grad_input = out->result;
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn::cuda

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("batch_norm_train", &fastbn::cuda::batch_norm_train_cuda);
  m.impl("batch_norm_eval", &fastbn::cuda::batch_norm_eval_cuda);
  m.impl("batch_norm_backward", &fastbn::cuda::batch_norm_backward_cuda);
}
