// CUDA kernels of the fused batch norm + residual add + ReLU operators
// (schemas in csrc/schemas.h):
//   forward:  y = relu((x - mean) * invstd * w + b [+ residual])
//   backward: d = dy * (y > 0); grad_residual = d; batch norm's backward of d.
// The ReLU's mask is the saved output's sign (no pre-activation tensor).
//
// Training forward: the per-channel Welford reduction of reductions.cuh
// (last block per channel group finishes the statistics), then one
// elementwise launch. Backward: the same reduction kernels with an
// accumulator that masks dy, then one elementwise launch that writes
// grad_input and grad_residual together. Evaluation: one elementwise launch.
// Per-channel work on C values (scale, running-stat update, grad_weight)
// runs as ATen ops. The elementwise kernels find each element's channel by
// index arithmetic (a simpler walk than batch_norm_cuda.cu's row and tile
// kernels); 32-bit index math when the tensor allows it.
#include "../batch_norm_act.h"
#include "reductions.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>

namespace fastbn::cuda {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// Reductions: accumulators and finishers for reductions.cuh's kernels
// ---------------------------------------------------------------------------

// Batch statistics of one channel from its merged (shifted) Welford state.
template <typename scalar_t, typename acc_t>
struct MomentsFinisher {
  const scalar_t* x;
  int64_t shift_stride;
  int64_t count;
  acc_t eps;
  acc_t* mean;
  acc_t* invstd;
  acc_t* unbiased_var;

  __device__ void operator()(int64_t c, WelfordState<acc_t> s) const {
    mean[c] = s.mean + static_cast<acc_t>(x[c * shift_stride]);
    invstd[c] = acc_t(1) / sqrt(s.m2 / static_cast<acc_t>(count) + eps);
    unbiased_var[c] = s.m2 / static_cast<acc_t>(count - 1);
  }
};

// sum(d) and sum(d * (x - mean)) with d = dy masked by the output's sign
// (kRelu), else dy.
template <typename scalar_t, typename acc_t, bool kRelu>
struct MaskedGradSumAccumulator : GradSumAccumulator<scalar_t, acc_t> {
  const scalar_t* y;

  template <typename index_t>
  __device__ void add(GradSums<acc_t>& s, index_t i, index_t channel) const {
    acc_t g = static_cast<acc_t>(this->dy[i]);
    if constexpr (kRelu) {
      g = static_cast<acc_t>(y[i]) > acc_t(0) ? g : acc_t(0);
    }
    s.dy += g;
    s.dy_xmu += g * (static_cast<acc_t>(this->x[i]) - this->mean[channel]);
  }
};

template <typename acc_t>
struct SumsFinisher {
  acc_t* sum_d;
  acc_t* sum_d_xmu;
  __device__ void operator()(int64_t c, GradSums<acc_t> s) const {
    sum_d[c] = s.dy;
    sum_d_xmu[c] = s.dy_xmu;
  }
};

// ---------------------------------------------------------------------------
// Elementwise kernels
// ---------------------------------------------------------------------------

template <typename index_t>
__device__ __forceinline__ index_t channel_of(index_t i, index_t C, index_t S, bool channels_last) {
  return channels_last ? i % C : (i / S) % C;
}

// y = act((x - mean) * scale + bias [+ residual]).
template <typename scalar_t, typename acc_t, typename index_t, bool kRelu>
__global__ void normalize_act_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ scale, const acc_t* __restrict__ bias,
    index_t numel, index_t C, index_t S, bool channels_last) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t c = channel_of(i, C, S, channels_last);
    acc_t v = (static_cast<acc_t>(x[i]) - mean[c]) * scale[c] + bias[c];
    if (residual != nullptr) {
      v += static_cast<acc_t>(residual[i]);
    }
    if constexpr (kRelu) {
      v = v > acc_t(0) ? v : acc_t(0);
    }
    y[i] = static_cast<scalar_t>(v);
  }
}

// d = dy masked by y > 0 (kRelu); grad_residual = d (when asked);
// grad_input = (d - mean_d - (x - mean) * xmu_factor) * scale (when asked; in
// evaluation mean_d and xmu_factor are 0 and x is not read).
template <typename scalar_t, typename acc_t, typename index_t, bool kRelu>
__global__ void act_grad_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
    scalar_t* __restrict__ grad_input, scalar_t* __restrict__ grad_residual,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ mean_d,
    const acc_t* __restrict__ xmu_factor, const acc_t* __restrict__ scale, index_t numel, index_t C,
    index_t S, bool channels_last, bool training) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t d = static_cast<acc_t>(dy[i]);
    if constexpr (kRelu) {
      d = static_cast<acc_t>(y[i]) > acc_t(0) ? d : acc_t(0);
    }
    if (grad_residual != nullptr) {
      grad_residual[i] = static_cast<scalar_t>(d);
    }
    if (grad_input != nullptr) {
      const index_t c = channel_of(i, C, S, channels_last);
      acc_t g = d;
      if (training) {
        g = d - mean_d[c] - (static_cast<acc_t>(x[i]) - mean[c]) * xmu_factor[c];
      }
      grad_input[i] = static_cast<scalar_t>(g * scale[c]);
    }
  }
}

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool fits_int32(const Geometry& g) {
  // Grid-stride loops step up to one grid past the end: keep that headroom.
  constexpr int64_t kHeadroom = int64_t(1) << 24;
  return g.numel() <= std::numeric_limits<int32_t>::max() - kHeadroom;
}

template <typename F>
void with_index_type(const Geometry& g, const F& f) {
  if (fits_int32(g)) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

template <typename F>
void with_relu(bool relu, const F& f) {
  if (relu) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

unsigned elementwise_blocks(const Geometry& g) {
  constexpr int64_t kMaxBlocks = 65535;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(g.numel(), kThreads), 1, kMaxBlocks));
}

// One reductions.cuh reduction over every channel: P partial blocks per
// channel (group), each reducing at least 16 values per thread. The arrival
// counters are zeroed for each call (a small memset; batch_norm_cuda.cu keeps
// self-resetting per-stream counters instead).
template <typename Acc, typename Fin>
void reduce_channels(const Geometry& g, const Acc& acc, const Fin& fin, const Tensor& like, cudaStream_t stream) {
  constexpr int64_t kMaxPartials = 64;
  constexpr int64_t kMinValuesPerThread = 16;
  using State = typename Acc::State;
  const int64_t M = g.N * g.S;
  with_index_type(g, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if (g.channels_last()) {
      const int64_t P = std::clamp<int64_t>(ceil_div(M, kTileRows * kMinValuesPerThread), 1, kMaxPartials);
      const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kTileChannels)), static_cast<unsigned>(P));
      const Tensor partial = at::empty({static_cast<int64_t>(g.C * P * sizeof(State))}, like.options().dtype(at::kByte));
      const Tensor counters = at::zeros({static_cast<int64_t>(grid.x)}, like.options().dtype(at::kInt));
      reduce_channels_last_kernel<Acc, Fin, index_t><<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
          acc, fin, reinterpret_cast<State*>(partial.mutable_data_ptr()),
          reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int32_t>()), static_cast<index_t>(M),
          static_cast<index_t>(g.C));
    } else {
      const int64_t P = std::clamp<int64_t>(ceil_div(M, kReduceThreads * kMinValuesPerThread), 1, kMaxPartials);
      const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
      const Tensor partial = at::empty({static_cast<int64_t>(g.C * P * sizeof(State))}, like.options().dtype(at::kByte));
      const Tensor counters = at::zeros({static_cast<int64_t>(grid.y)}, like.options().dtype(at::kInt));
      reduce_channels_first_kernel<Acc, Fin, index_t><<<grid, kReduceThreads, 0, stream>>>(
          acc, fin, reinterpret_cast<State*>(partial.mutable_data_ptr()),
          reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int32_t>()), static_cast<index_t>(g.N),
          static_cast<index_t>(g.C), static_cast<index_t>(g.S));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The forward's elementwise launch, from per-channel mean, scale and bias
// (acc_t tensors of C values).
template <typename scalar_t>
void launch_normalize_act(
    const Geometry& g, const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& mean,
    const Tensor& scale, const Tensor& bias, bool relu, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  with_index_type(g, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    with_relu(relu, [&](auto relu_tag) {
      normalize_act_kernel<scalar_t, acc_t, index_t, decltype(relu_tag)::value>
          <<<elementwise_blocks(g), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
              y.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
              bias.const_data_ptr<acc_t>(), static_cast<index_t>(g.numel()), static_cast<index_t>(g.C),
              static_cast<index_t>(g.S), g.channels_last());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// A per-channel parameter in acc_t, or `fill` without one.
Tensor channel_values(const OptTensor& t, int64_t C, const Tensor& like, at::ScalarType acc, double fill) {
  const Tensor* p = get_if_defined(t);
  return p != nullptr ? p->to(acc).contiguous() : at::full({C}, fill, like.options().dtype(acc));
}

// ---------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train_cuda(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
    bool relu) {
  check_act_train_args(input, residual, weight, bias, running_mean, running_var);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto stat_options = input.options().dtype(acc);
  if (input.numel() == 0) {
    return {at::empty_like(input), at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  const ActForwardInputs in(input, residual);
  const Tensor& x = in.x;
  const Geometry& g = in.g;
  OutputLike out(input, x);
  const Tensor save_mean = at::empty({C}, stat_options);
  const Tensor save_invstd = at::empty({C}, stat_options);
  const Tensor unbiased_var = at::empty({C}, stat_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shift_stride = g.channels_last() ? 1 : g.S;
    const MomentsFinisher<scalar_t, acc_t> finisher{
        x.const_data_ptr<scalar_t>(), shift_stride, g.reduce_size(), static_cast<acc_t>(eps),
        save_mean.mutable_data_ptr<acc_t>(), save_invstd.mutable_data_ptr<acc_t>(),
        unbiased_var.mutable_data_ptr<acc_t>()};
    reduce_channels(
        g, WelfordAccumulator<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), shift_stride}, finisher, x, stream);
  });
  const Tensor scale = save_invstd.mul(channel_values(weight, C, input, acc, 1.0));
  const Tensor shift = channel_values(bias, C, input, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_train_cuda", [&] {
    launch_normalize_act<scalar_t>(g, x, in.residual, out.buffer, save_mean, scale, shift, relu, stream);
  });
  return finish_act_train(out, save_mean, save_invstd, unbiased_var, running_mean, running_var, momentum);
}

Tensor batch_norm_act_eval_cuda(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps, bool relu) {
  check_act_eval_args(input, residual, running_mean, running_var, weight, bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const ActForwardInputs in(input, residual);
  const Tensor& x = in.x;
  const Geometry& g = in.g;
  OutputLike out(input, x);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Tensor mean = running_mean.to(acc).contiguous();
  const Tensor scale = running_var.to(acc).add(eps).rsqrt().mul(channel_values(weight, g.C, input, acc, 1.0));
  const Tensor shift = channel_values(bias, g.C, input, acc, 0.0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_eval_cuda", [&] {
    launch_normalize_act<scalar_t>(g, x, in.residual, out.buffer, mean, scale, shift, relu, stream);
  });
  out.finish();
  return out.result;
}

ActGrads batch_norm_act_backward_cuda(
    const Tensor& grad_output, const OptTensor& output, const Tensor& input,
    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    std::array<bool, 4> output_mask) {
  const at::ScalarType param_type =
      check_act_backward_args(grad_output, output, input, weight, mean, invstd, relu);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t C = input.size(1);
  if (input.numel() == 0) {
    return empty_input_act_grads(input, param_type, output_mask);
  }
  OptTensor grad_weight, grad_bias;
  const Tensor x = to_walkable(input);
  const Tensor dy = to_layout_of(grad_output, x);
  const Tensor y = relu ? to_layout_of(*output, x) : Tensor();
  const Geometry g = geometry_of(x, *direct_layout(x));
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Tensor mean_c = mean.contiguous();
  const Tensor invstd_c = invstd.contiguous();
  const bool need_sums = output_mask[2] || output_mask[3] || (training && output_mask[0]);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  std::optional<OutputLike> dx, dres;
  if (output_mask[0]) dx.emplace(input, x);
  if (output_mask[1]) dres.emplace(input, x);
  const Tensor sums = at::zeros({2, C}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!need_sums) {
      return;
    }
    with_relu(relu, [&](auto relu_tag) {
      MaskedGradSumAccumulator<scalar_t, acc_t, decltype(relu_tag)::value> accumulator;
      accumulator.dy = dy.const_data_ptr<scalar_t>();
      accumulator.x = x.const_data_ptr<scalar_t>();
      accumulator.mean = mean_c.const_data_ptr<acc_t>();
      accumulator.y = relu ? y.const_data_ptr<scalar_t>() : nullptr;
      acc_t* sum_d = sums.mutable_data_ptr<acc_t>();
      reduce_channels(g, accumulator, SumsFinisher<acc_t>{sum_d, sum_d + C}, x, stream);
    });
  });
  const Tensor sum_d = sums[0], sum_d_xmu = sums[1];
  if (output_mask[2]) grad_weight = sum_d_xmu.mul(invstd_c).to(param_type);
  if (output_mask[3]) grad_bias = sum_d.to(param_type);
  if (dx || dres) {
    const double inv_n = 1.0 / static_cast<double>(g.reduce_size());
    const Tensor scale = invstd_c.mul(channel_values(weight, C, input, acc, 1.0));
    const Tensor mean_d = sum_d.mul(inv_n);
    const Tensor xmu_factor = invstd_c.mul(invstd_c).mul(sum_d_xmu).mul(inv_n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_index_type(g, [&](auto index_tag) {
        using index_t = decltype(index_tag);
        with_relu(relu, [&](auto relu_tag) {
          act_grad_kernel<scalar_t, acc_t, index_t, decltype(relu_tag)::value>
              <<<elementwise_blocks(g), kThreads, 0, stream>>>(
                  dy.const_data_ptr<scalar_t>(), relu ? y.const_data_ptr<scalar_t>() : nullptr,
                  x.const_data_ptr<scalar_t>(), dx ? dx->buffer.mutable_data_ptr<scalar_t>() : nullptr,
                  dres ? dres->buffer.mutable_data_ptr<scalar_t>() : nullptr, mean_c.const_data_ptr<acc_t>(),
                  mean_d.const_data_ptr<acc_t>(), xmu_factor.const_data_ptr<acc_t>(),
                  scale.const_data_ptr<acc_t>(), static_cast<index_t>(g.numel()),
                  static_cast<index_t>(g.C), static_cast<index_t>(g.S), g.channels_last(), training);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  return {finished(dx), finished(dres), grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn::cuda

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("batch_norm_act_train", &fastbn::cuda::batch_norm_act_train_cuda);
  m.impl("batch_norm_act_eval", &fastbn::cuda::batch_norm_act_eval_cuda);
  m.impl("batch_norm_act_backward", &fastbn::cuda::batch_norm_act_backward_cuda);
}
