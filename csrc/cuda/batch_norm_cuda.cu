// CUDA kernels and host code for fastbn's batch norm operators.
//
// Training forward, two launches: a per-channel Welford reduction whose last
// block per channel group finishes the statistics (save_mean, save_invstd,
// running-stat update, the per-channel scale), then an elementwise
// y = (x - mean) * scale + bias. Backward, two launches: the gradient sums, finished
// likewise (grad_weight, grad_bias), then grad_input. Evaluation, one launch:
// the elementwise kernel computes each channel's scale from the running
// statistics where it first needs them. The mean is subtracted before the
// scale is applied (not folded into x * scale + shift): with a large offset,
// x * scale and mean * scale nearly cancel and fp32 would lose the output's
// digits, as the CPU kernels avoid too. Elementwise kernels find the
// channel once per row (channels-first) or per thread (channels-last), never
// per element, and use 16-byte vectors along channels-first rows when the
// pointers allow. Everything runs on the current stream with no host
// synchronisation; index math is 32-bit when the tensor allows it.
#include "../batch_norm.h"
#include "reductions.cuh"
#include "single_pass.cuh"

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
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastbn::cuda {
namespace {

constexpr int kElementwiseThreads = 256;

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return rsqrt(v); }

template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t load_or(const param_t* p, int64_t i, acc_t fallback) {
  return p == nullptr ? fallback : static_cast<acc_t>(p[i]);
}

// y = (x - mean) * scale + bias: a channel's constants, and the formula.
template <typename acc_t>
struct AffineConstants {
  acc_t mean, scale, bias;
  __device__ acc_t apply(acc_t x) const { return (x - mean) * scale + bias; }
};

// ---------------------------------------------------------------------------
// Finishers: called by the reduction's last block, once per channel, with the
// channel's merged state (reductions.cuh).
// ---------------------------------------------------------------------------

// Statistics: save_mean, save_invstd, the running-stat update, and the
// per-channel scale and bias of the normalisation, y = (x - mean) * scale + bias.
template <typename scalar_t, typename acc_t, typename param_t>
struct StatsFinisher {
  const scalar_t* x;
  int64_t shift_stride;
  int64_t count;
  acc_t eps;
  acc_t momentum;
  acc_t* save_mean;
  acc_t* save_invstd;
  acc_t* scale;
  acc_t* bias_acc;  // the bias in acc_t (0 without one)
  const param_t* weight;
  const param_t* bias;
  param_t* running_mean;
  int64_t running_mean_stride;
  param_t* running_var;
  int64_t running_var_stride;

  using Channel = AffineConstants<acc_t>;

  // The channel's constants from its merged (shifted) state; with `write`,
  // also save_mean, save_invstd and the running statistics.
  __device__ Channel finish(int64_t c, WelfordState<acc_t> s, bool write) const {
    s.mean += static_cast<acc_t>(x[c * shift_stride]);
    const acc_t var = s.m2 / static_cast<acc_t>(count);
    const acc_t invstd = inv_sqrt(var + eps);
    const Channel k{s.mean, invstd * load_or(weight, c, acc_t(1)), load_or(bias, c, acc_t(0))};
    if (!write) {
      return k;
    }
    save_mean[c] = s.mean;
    save_invstd[c] = invstd;
    if (running_mean != nullptr) {
      const acc_t unbiased = s.m2 / static_cast<acc_t>(count - 1);
      param_t& rm = running_mean[c * running_mean_stride];
      param_t& rv = running_var[c * running_var_stride];
      rm = static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(rm) + momentum * s.mean);
      rv = static_cast<param_t>((acc_t(1) - momentum) * static_cast<acc_t>(rv) + momentum * unbiased);
    }
    return k;
  }

  // The two-pass finish: the constants go to the elementwise kernel.
  __device__ void operator()(int64_t c, WelfordState<acc_t> s) const {
    const Channel k = finish(c, s, true);
    scale[c] = k.scale;
    bias_acc[c] = k.bias;
  }
};

template <typename param_t, typename acc_t>
__device__ __forceinline__ void write_parameter_grads(
    param_t* grad_weight, param_t* grad_bias, int64_t c, GradSums<acc_t> s, acc_t invstd) {
  if (grad_weight != nullptr) {
    grad_weight[c] = static_cast<param_t>(s.dy_xmu * invstd);
  }
  if (grad_bias != nullptr) {
    grad_bias[c] = static_cast<param_t>(s.dy);
  }
}

// Gradient sums for the grad_input kernel, and the parameter gradients when
// asked (null pointers skip them).
template <typename acc_t, typename param_t>
struct GradFinisher {
  const acc_t* invstd;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  param_t* grad_weight;
  param_t* grad_bias;

  __device__ void operator()(int64_t c, GradSums<acc_t> s) const {
    sum_dy[c] = s.dy;
    sum_dy_xmu[c] = s.dy_xmu;
    write_parameter_grads(grad_weight, grad_bias, c, s, invstd[c]);
  }
};

// ---------------------------------------------------------------------------
// Elementwise operations: per channel, a few constants (looked up once per
// row or per thread, never per element); per element, one output from one or
// two inputs.
// ---------------------------------------------------------------------------

// y = (x - mean) * scale + bias, the constants precomputed by StatsFinisher.
template <typename acc_t>
struct PrecomputedAffine {
  static constexpr int kInputs = 1;
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* bias;
  using Channel = AffineConstants<acc_t>;
  __device__ Channel channel(int64_t c) const { return {mean[c], scale[c], bias[c]}; }
  __device__ static acc_t apply(const Channel& k, acc_t x, acc_t) { return k.apply(x); }
};

// Evaluation: the constants from the running statistics, computed where the
// channel is first needed (one launch, no statistics kernel before it).
template <typename acc_t, typename param_t>
struct RunningStatsAffine {
  static constexpr int kInputs = 1;
  const param_t* running_mean;
  int64_t running_mean_stride;
  const param_t* running_var;
  int64_t running_var_stride;
  const param_t* weight;
  const param_t* bias;
  acc_t eps;
  using Channel = AffineConstants<acc_t>;
  __device__ Channel channel(int64_t c) const {
    const acc_t scale =
        inv_sqrt(static_cast<acc_t>(running_var[c * running_var_stride]) + eps) * load_or(weight, c, acc_t(1));
    return {static_cast<acc_t>(running_mean[c * running_mean_stride]), scale, load_or(bias, c, acc_t(0))};
  }
  __device__ static acc_t apply(const Channel& k, acc_t x, acc_t) { return k.apply(x); }
};

// Training: dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w
template <typename acc_t, typename param_t>
struct TrainingGradInput {
  static constexpr int kInputs = 2;  // dy, x
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;
  const acc_t* sum_dy;
  const acc_t* sum_dy_xmu;
  acc_t inv_count;
  struct Channel {
    acc_t mean, mean_dy, xmu_factor, scale;
  };
  __device__ static Channel constants(
      acc_t channel_mean, acc_t inv, acc_t w, GradSums<acc_t> s, acc_t inv_count) {
    return {channel_mean, s.dy * inv_count, inv * inv * s.dy_xmu * inv_count, inv * w};
  }
  __device__ Channel channel(int64_t c) const {
    return constants(mean[c], invstd[c], load_or(weight, c, acc_t(1)), {sum_dy[c], sum_dy_xmu[c]}, inv_count);
  }
  __device__ static acc_t apply(const Channel& k, acc_t dy, acc_t x) {
    return (dy - k.mean_dy - (x - k.mean) * k.xmu_factor) * k.scale;
  }
};

// Evaluation: dx = dy * invstd * w
template <typename acc_t, typename param_t>
struct EvalGradInput {
  static constexpr int kInputs = 1;  // dy
  const acc_t* invstd;
  const param_t* weight;
  struct Channel {
    acc_t scale;
  };
  __device__ Channel channel(int64_t c) const { return {invstd[c] * load_or(weight, c, acc_t(1))}; }
  __device__ acc_t apply(const Channel& k, acc_t dy, acc_t) const { return dy * k.scale; }
};

// ---------------------------------------------------------------------------
// Single-pass operations (single_pass.cuh): the reduction and the formula of
// one cooperative launch.
// ---------------------------------------------------------------------------

// Training forward: Welford statistics of x - shift, then y = (x - mean) * scale + bias.
template <typename scalar_t_, typename param_t>
struct SinglePassForward {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = WelfordAccumulator<scalar_t, acc_t>;
  using State = WelfordState<acc_t>;
  using Finisher = StatsFinisher<scalar_t, acc_t, param_t>;
  using Channel = typename Finisher::Channel;
  static constexpr int kInputs = 1;
  Finisher stats;
  const scalar_t* in0;
  const scalar_t* in1;  // unused
  scalar_t* out;

  __device__ acc_t channel_pre(int64_t c) const { return static_cast<acc_t>(stats.x[c * stats.shift_stride]); }
  __device__ static void add(State& s, acc_t shift, acc_t x, acc_t) { Acc::add_value(s, x - shift); }
  __device__ Channel finish(int64_t c, const State& s, bool owner) const { return stats.finish(c, s, owner); }
  __device__ static acc_t apply(const Channel& k, acc_t x, acc_t) { return k.apply(x); }
};

// Training backward: the gradient sums, then grad_input (and grad_weight,
// grad_bias from the owner block).
template <typename scalar_t_, typename param_t>
struct SinglePassBackward {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = GradSumAccumulator<scalar_t, acc_t>;
  using State = GradSums<acc_t>;
  using GradInput = TrainingGradInput<acc_t, param_t>;
  using Channel = typename GradInput::Channel;
  static constexpr int kInputs = 2;
  const scalar_t* in0;  // dy
  const scalar_t* in1;  // x
  scalar_t* out;        // grad_input
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;
  param_t* grad_weight;
  param_t* grad_bias;
  acc_t inv_count;

  __device__ acc_t channel_pre(int64_t c) const { return mean[c]; }
  __device__ static void add(State& s, acc_t channel_mean, acc_t dy, acc_t x) {
    Acc::add_values(s, dy, x, channel_mean);
  }
  __device__ Channel finish(int64_t c, const State& s, bool owner) const {
    const acc_t inv = invstd[c];
    if (owner) {
      write_parameter_grads(grad_weight, grad_bias, c, s, inv);
    }
    return GradInput::constants(mean[c], inv, load_or(weight, c, acc_t(1)), s, inv_count);
  }
  __device__ static acc_t apply(const Channel& k, acc_t dy, acc_t x) { return GradInput::apply(k, dy, x); }
};

// 16 bytes of scalar_t: the unit of a vectorised load or store.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
__device__ __forceinline__ int64_t misalignment_of(const scalar_t* p) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
}

// Applies op to elements [begin, end) of one channel's contiguous run, the
// block's threads striding through it: with `vectorised` (every pointer has
// the same offset within 16 bytes: checked by the host), a scalar head up to
// the first 16-byte boundary, 16-byte vectors, a scalar tail; else scalars.
template <typename scalar_t, typename acc_t, typename Op, typename index_t>
__device__ __forceinline__ void apply_run(
    const Op& op, const typename Op::Channel& k, const scalar_t* __restrict__ in0,
    const scalar_t* __restrict__ in1, scalar_t* __restrict__ out, index_t begin, index_t end,
    bool vectorised) {
  using V = Vec16<scalar_t>;
  index_t vector_begin = end;
  index_t vector_end = end;
  if (vectorised) {
    const index_t head =
        static_cast<index_t>(((16 - misalignment_of(in0 + begin)) % 16) / sizeof(scalar_t));
    vector_begin = begin + (head < end - begin ? head : end - begin);
    vector_end = vector_begin + (end - vector_begin) / V::kSize * V::kSize;
  }
  const auto scalar = [&](index_t i) {
    const acc_t second = Op::kInputs == 2 ? static_cast<acc_t>(in1[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(op.apply(k, static_cast<acc_t>(in0[i]), second));
  };
  for (index_t i = begin + threadIdx.x; i < vector_begin; i += blockDim.x) {
    scalar(i);
  }
  for (index_t i = vector_begin + threadIdx.x * V::kSize; i < vector_end; i += blockDim.x * V::kSize) {
    const V a = *reinterpret_cast<const V*>(in0 + i);
    V b = a;
    if constexpr (Op::kInputs == 2) {
      b = *reinterpret_cast<const V*>(in1 + i);
    }
    V r;
#pragma unroll
    for (int j = 0; j < V::kSize; ++j) {
      const acc_t second = Op::kInputs == 2 ? static_cast<acc_t>(b.v[j]) : acc_t(0);
      r.v[j] = static_cast<scalar_t>(op.apply(k, static_cast<acc_t>(a.v[j]), second));
    }
    *reinterpret_cast<V*>(out + i) = r;
  }
  for (index_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) {
    scalar(i);
  }
}

// Channels-first: the tensor is N * C rows of S contiguous values, each row
// cut into chunks of chunk_len; a block takes (row, chunk) items in turn. The
// channel is found once per item, never per element.
template <typename scalar_t, typename acc_t, typename Op, typename index_t>
__global__ void elementwise_rows_kernel(
    Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
    scalar_t* __restrict__ out, index_t rows, index_t C, index_t S, index_t chunks_per_row,
    index_t chunk_len, bool vectorised) {
  const index_t items = rows * chunks_per_row;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t row = item / chunks_per_row;
    const index_t chunk = item - row * chunks_per_row;
    const index_t c = row % C;
    const typename Op::Channel k = op.channel(c);
    const index_t row_begin = row * S;
    const index_t begin = row_begin + chunk * chunk_len;
    const index_t end = begin + (S - chunk * chunk_len < chunk_len ? S - chunk * chunk_len : chunk_len);
    apply_run<scalar_t, acc_t>(op, k, in0, in1, out, begin, end, vectorised);
  }
}

// Channels-last: block (32 channels, 8 rows), grid (channel tiles, row
// blocks); each thread keeps one channel's constants and walks the rows
// m * C + c with a stride (warps read 32 consecutive channels).
template <typename scalar_t, typename acc_t, typename Op, typename index_t>
__global__ void elementwise_channels_last_kernel(
    Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
    scalar_t* __restrict__ out, index_t M, index_t C) {
  const index_t c = static_cast<index_t>(blockIdx.x) * kTileChannels + threadIdx.x;
  if (c >= C) {
    return;
  }
  const typename Op::Channel k = op.channel(c);
  const index_t stride = static_cast<index_t>(gridDim.y) * kTileRows;
  for (index_t m = static_cast<index_t>(blockIdx.y) * kTileRows + threadIdx.y; m < M; m += stride) {
    const index_t i = m * C + c;
    const acc_t second = Op::kInputs == 2 ? static_cast<acc_t>(in1[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(op.apply(k, static_cast<acc_t>(in0[i]), second));
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

// Values of a channels-first row handed to one block at a time: long rows are
// cut so that the chip has work at small N * C.
constexpr int64_t kRowChunk = 4096;

// Per-(device, stream) arrival counters of the reductions' last-block finish
// (reductions.cuh): zeroed once when created, reset to zero by the kernel that
// used them, so no memset per call. Kernels on one stream run in order, so one
// buffer per stream is enough; a larger request replaces the buffer (the
// caching allocator keeps the old one alive for work already queued).
//
// CUDA graphs: a buffer created while the stream is capturing is zeroed by a
// memset that exists only inside the graph (it runs at each replay, before
// the kernels that use it), so it is kept for that graph alone (alive for
// the process: the graph may be replayed at any time) and never handed to
// an eager call. No host synchronisation either way.
unsigned* arrival_counters(const Tensor& like, int64_t groups, cudaStream_t stream) {
  static std::mutex mutex;
  // Never destroyed: freeing device memory during process exit is unsafe.
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, Tensor>();
  static auto* captured = new std::vector<Tensor>();
  constexpr int64_t kMinCounters = 1024;
  const auto make = [&] { return at::zeros({std::max(groups, kMinCounters)}, like.options().dtype(at::kInt)); };
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const std::lock_guard<std::mutex> lock(mutex);
  if (capture != cudaStreamCaptureStatusNone) {
    captured->push_back(make());
    return reinterpret_cast<unsigned*>(captured->back().mutable_data_ptr<int32_t>());
  }
  Tensor& buffer = (*buffers)[{like.get_device(), stream}];
  if (!buffer.defined() || buffer.numel() < groups) {
    buffer = make();
  }
  return reinterpret_cast<unsigned*>(buffer.mutable_data_ptr<int32_t>());
}

// Blocks of the channels-last elementwise kernel along the rows: about 32
// blocks per SM over the whole grid, at most one per 8 rows.
unsigned channels_last_row_blocks(int64_t M, int64_t tiles, int device) {
  const int64_t target = 32 * static_cast<int64_t>(multiprocessor_count(device));
  return static_cast<unsigned>(
      std::clamp<int64_t>(std::min(ceil_div(target, tiles), ceil_div(M, kTileRows)), 1, 65535));
}

// 32-bit index math when every index a kernel forms fits: the grid-stride
// loops step past the last element by up to one grid (at most a few million
// elements), so leave that much headroom below INT32_MAX.
// FASTBN_CUDA_INDEX64=1 takes the 64-bit kernels at any size, so that the
// tests run them without an 8 GB input.
bool fits_int32(const Geometry& g) {
  constexpr int64_t kHeadroom = int64_t(1) << 24;
  const char* force64 = std::getenv("FASTBN_CUDA_INDEX64");
  if (force64 != nullptr && std::string(force64) == "1") {
    return false;
  }
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

// A per-channel reduction whose last block per channel group hands each
// channel's merged state to fin (one launch; partial holds C * P states).
template <typename Acc, typename Fin>
void launch_reduce(
    const Geometry& g, const Acc& acc, const Fin& fin, typename Acc::State* partial, int64_t P,
    const Tensor& like, cudaStream_t stream) {
  dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
    using index_t = decltype(index_tag);
    if constexpr (decltype(channels_last)::value) {
      const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kTileChannels)), static_cast<unsigned>(P));
      unsigned* counters = arrival_counters(like, grid.x, stream);
      reduce_channels_last_kernel<Acc, Fin, index_t><<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
          acc, fin, partial, counters, static_cast<index_t>(g.N * g.S), static_cast<index_t>(g.C));
    } else {
      const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
      unsigned* counters = arrival_counters(like, grid.y, stream);
      reduce_channels_first_kernel<Acc, Fin, index_t><<<grid, kReduceThreads, 0, stream>>>(
          acc, fin, partial, counters, static_cast<index_t>(g.N), static_cast<index_t>(g.C),
          static_cast<index_t>(g.S));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// 16-byte vectors are used when every pointer sits at the same offset within
// 16 bytes (one scalar head then aligns them all).
template <typename scalar_t>
bool same_alignment(const scalar_t* a, const scalar_t* b, const scalar_t* c) {
  const auto offset = [](const scalar_t* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  return offset(a) == offset(c) && (b == nullptr || offset(b) == offset(c));
}

// One elementwise launch: out = op(in0[, in1]) over the tensor of geometry g.
template <typename scalar_t, typename Op>
void launch_elementwise(
    const Geometry& g, const Op& op, const scalar_t* in0, const scalar_t* in1, scalar_t* out,
    int device, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
    using index_t = decltype(index_tag);
    if constexpr (decltype(channels_last)::value) {
      const int64_t M = g.N * g.S;
      const int64_t tiles = ceil_div(g.C, kTileChannels);
      const dim3 grid(static_cast<unsigned>(tiles), channels_last_row_blocks(M, tiles, device));
      elementwise_channels_last_kernel<scalar_t, acc_t, Op, index_t>
          <<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
              op, in0, in1, out, static_cast<index_t>(M), static_cast<index_t>(g.C));
    } else {
      const int64_t rows = g.N * g.C;
      const int64_t chunks_per_row = ceil_div(g.S, kRowChunk);
      const int64_t cap = 32 * static_cast<int64_t>(multiprocessor_count(device));
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min(rows * chunks_per_row, cap))));
      elementwise_rows_kernel<scalar_t, acc_t, Op, index_t><<<grid, kElementwiseThreads, 0, stream>>>(
          op, in0, in1, out, static_cast<index_t>(rows), static_cast<index_t>(g.C),
          static_cast<index_t>(g.S), static_cast<index_t>(chunks_per_row),
          static_cast<index_t>(std::min(g.S, kRowChunk)), same_alignment(in0, in1, out));
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

// ---------------------------------------------------------------------------
// Path selection: single pass (one cooperative launch, single_pass.cuh) or
// two passes (reduction + elementwise), for training forward and for a
// training backward that computes grad_input.
// ---------------------------------------------------------------------------

enum class Path { kAuto, kSinglePass, kTwoPass };

// FASTBN_CUDA_PATH=auto|single_pass|two_pass, read at every call (one getenv)
// so that tests and benchmarks can switch paths within a process.
Path requested_path() {
  const char* value = std::getenv("FASTBN_CUDA_PATH");
  const std::string v = value == nullptr ? "" : value;
  if (v.empty() || v == "auto") {
    return Path::kAuto;
  }
  if (v == "single_pass") {
    return Path::kSinglePass;
  }
  if (v == "two_pass") {
    return Path::kTwoPass;
  }
  TORCH_CHECK_VALUE(false, "FASTBN_CUDA_PATH must be auto, single_pass or two_pass, got '", v, "'");
}

// The heuristic, in one table: in auto mode the single pass is taken when the
// input (bytes of x) is at most the operator's limit and the data fits on chip.
// Each cooperative block gets 1 / blocks_per_sm of an SM's shared memory.
// The defaults are guesses, not measurements; `python -m fastbn.bench --tune`
// on a GPU measures the crossovers and writes a JSON file with these keys
// (FASTBN_CUDA_PATH_TABLE, else $XDG_CACHE_HOME/fastbn/cuda_path_table.json,
// else ~/.cache/fastbn/cuda_path_table.json), read at the first call that
// needs it (once per file name).
struct PathTable {
  int64_t single_pass_max_bytes_forward = int64_t(8) << 20;
  int64_t single_pass_max_bytes_backward = int64_t(8) << 20;
  int64_t single_pass_blocks_per_sm = 2;
};

std::string path_table_file() {
  if (const char* file = std::getenv("FASTBN_CUDA_PATH_TABLE")) {
    return file;
  }
  if (const char* cache = std::getenv("XDG_CACHE_HOME"); cache != nullptr && *cache != '\0') {
    return std::string(cache) + "/fastbn/cuda_path_table.json";
  }
  const char* home = std::getenv("HOME");
  return home == nullptr ? std::string() : std::string(home) + "/.cache/fastbn/cuda_path_table.json";
}

// The integer after `"key":` in a flat JSON object, if the key is there.
std::optional<int64_t> json_integer(const std::string& text, const std::string& key, const std::string& file) {
  const size_t at = text.find("\"" + key + "\"");
  if (at == std::string::npos) {
    return std::nullopt;
  }
  const size_t colon = text.find(':', at + key.size() + 2);
  TORCH_CHECK(colon != std::string::npos, "fastbn: ", file, ": no value for \"", key, "\"");
  const char* start = text.c_str() + colon + 1;
  char* stop = nullptr;
  const long long value = std::strtoll(start, &stop, 10);
  TORCH_CHECK(stop != start && value >= 0, "fastbn: ", file, ": \"", key, "\" must be a non-negative integer");
  return value;
}

PathTable load_path_table(const std::string& file) {
  PathTable table;
  std::ifstream in(file);
  if (file.empty() || !in) {
    return table;  // no tuned table: the defaults
  }
  std::stringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  for (auto [key, field] : {std::pair{"single_pass_max_bytes_forward", &PathTable::single_pass_max_bytes_forward},
                            std::pair{"single_pass_max_bytes_backward", &PathTable::single_pass_max_bytes_backward},
                            std::pair{"single_pass_blocks_per_sm", &PathTable::single_pass_blocks_per_sm}}) {
    if (const auto v = json_integer(s, key, file)) {
      table.*field = *v;
    }
  }
  TORCH_CHECK(table.single_pass_blocks_per_sm >= 1, "fastbn: ", file, ": \"single_pass_blocks_per_sm\" must be at least 1");
  return table;
}

PathTable path_table() {
  static std::mutex mutex;
  static auto* tables = new std::map<std::string, PathTable>();  // per file name
  const std::string file = path_table_file();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = tables->find(file);
  if (it == tables->end()) {
    it = tables->emplace(file, load_path_table(file)).first;
  }
  return it->second;
}

// How many blocks of a cooperative kernel are resident at once, and the
// dynamic shared memory each may use: from the device's shared memory per SM
// (divided among blocks_per_sm blocks, less the runtime's 1 KiB reserve per
// block) and the occupancy query for that amount, which also accounts for
// registers. Queried once per (device, kernel, blocks_per_sm) and cached.
struct CooperativeCapacity {
  int64_t blocks = 0;          // 0: no cooperative launch on this device
  int64_t smem_per_block = 0;  // bytes
};

template <typename... Params>
CooperativeCapacity cooperative_capacity(void (*kernel)(Params...), int device, int64_t blocks_per_sm) {
  static std::mutex mutex;
  // Keyed by the SM count too: the SIMT backend can change it between calls.
  static auto* cache = new std::map<std::tuple<int, int, const void*, int64_t>, CooperativeCapacity>();
  const int sms = multiprocessor_count(device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, sms, reinterpret_cast<const void*>(kernel), blocks_per_sm);
  if (auto it = cache->find(key); it != cache->end()) {
    return it->second;
  }
  CooperativeCapacity capacity;
  int cooperative = 0, smem_per_sm = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr int64_t kReservedPerBlock = 1024;
  const int64_t smem = std::min<int64_t>(smem_optin, smem_per_sm / blocks_per_sm - kReservedPerBlock) / 16 * 16;
  if (cooperative != 0 && smem > 0) {
    // The kernel's limit at the device's maximum (the launch asks for what it
    // needs), so that no blocks_per_sm choice lowers it under another's.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kReduceThreads, smem));
    capacity = {static_cast<int64_t>(per_sm) * sms, smem};
  }
  cache->emplace(key, capacity);
  return capacity;
}

// How a single-pass launch splits the work: grid of `groups` channel groups
// (channels-first) or channel-tile groups (channels-last) by `parts`; each
// block caches part_len values (rows, channels-last) of each of its channels
// (tiles), cache_len elements per input, smem_bytes in all.
struct SinglePassPlan {
  int64_t groups = 0, parts = 0, part_len = 0, cache_len = 0, smem_bytes = 0;
  CooperativeCapacity capacity;
  bool fits() const { return capacity.blocks > 0 && smem_bytes <= capacity.smem_per_block; }
};

template <typename Op>
SinglePassPlan single_pass_plan(const Geometry& g, CooperativeCapacity capacity) {
  SinglePassPlan plan;
  plan.capacity = capacity;
  if (capacity.blocks == 0) {
    return plan;
  }
  const bool cl = g.channels_last();
  const int64_t units = cl ? ceil_div(g.C, kTileChannels) : g.C;
  const int64_t length = g.N * g.S;  // values per channel, or rows
  // A part holds at least one value per thread (channels-first) or one row per
  // thread row (channels-last): more parts would only add empty blocks.
  const int64_t min_part = cl ? kTileRows : kReduceThreads;
  plan.groups = std::min(units, capacity.blocks);
  plan.parts = std::clamp<int64_t>(std::min(capacity.blocks / plan.groups, ceil_div(length, min_part)), 1, 65535);
  plan.part_len = ceil_div(length, plan.parts);
  plan.cache_len = ceil_div(units, plan.groups) * plan.part_len * (cl ? kTileChannels : 1);
  plan.smem_bytes = static_cast<int64_t>(single_pass_merge_bytes<typename Op::State>()) +
      Op::kInputs * plan.cache_len * static_cast<int64_t>(sizeof(typename Op::scalar_t));
  return plan;
}

// Runs op as one cooperative launch when the path allows it (returns true),
// or returns false for the two-pass kernels. A forced single pass that does
// not fit is an error, raised before anything is written.
template <typename Op>
bool run_single_pass(
    const Geometry& g, const Op& op, Path path, int64_t PathTable::*max_bytes, const Tensor& input,
    const char* what, int device, cudaStream_t stream) {
  if (path == Path::kTwoPass) {
    return false;
  }
  const PathTable table = path_table();
  const int64_t bytes = g.numel() * static_cast<int64_t>(sizeof(typename Op::scalar_t));
  if (path == Path::kAuto && bytes > table.*max_bytes) {
    return false;
  }
  bool launched = false;
  dispatch_layout_and_index(g, [&](auto channels_last, auto index_tag) {
    using index_t = decltype(index_tag);
    constexpr bool cl = decltype(channels_last)::value;
    const auto kernel = [] {
      if constexpr (cl) {
        return &single_pass_channels_last_kernel<Op, index_t>;
      } else {
        return &single_pass_channels_first_kernel<Op, index_t>;
      }
    }();
    const SinglePassPlan plan =
        single_pass_plan<Op>(g, cooperative_capacity(kernel, device, table.single_pass_blocks_per_sm));
    if (!plan.fits()) {
      TORCH_CHECK(path != Path::kSinglePass,
                  "fastbn: FASTBN_CUDA_PATH=single_pass, but a ", what, " of an input of shape ",
                  shape_string(input), " does not fit the single-pass kernel on this device: it needs ",
                  plan.smem_bytes, " bytes of shared memory per block and ", plan.capacity.smem_per_block,
                  " are available (", plan.capacity.blocks,
                  " blocks co-resident); use FASTBN_CUDA_PATH=auto or two_pass for it");
      return;
    }
    Tensor partial_holder;
    auto* partial = workspace<typename Op::State>(partial_holder, input, g.C * plan.parts);
    Op op_arg = op;
    index_t part_len = static_cast<index_t>(plan.part_len);
    index_t cache_len = static_cast<index_t>(plan.cache_len);
    index_t C = static_cast<index_t>(g.C);
    if constexpr (cl) {
      index_t M = static_cast<index_t>(g.N * g.S);
      void* args[] = {&op_arg, &partial, &M, &C, &part_len, &cache_len};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
          single_pass_channels_last_kernel<Op, index_t>,
          dim3(static_cast<unsigned>(plan.groups), static_cast<unsigned>(plan.parts)),
          dim3(kTileChannels, kTileRows), args, static_cast<size_t>(plan.smem_bytes), stream));
    } else {
      index_t N = static_cast<index_t>(g.N);
      index_t S = static_cast<index_t>(g.S);
      void* args[] = {&op_arg, &partial, &N, &C, &S, &part_len, &cache_len};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
          single_pass_channels_first_kernel<Op, index_t>,
          dim3(static_cast<unsigned>(plan.parts), static_cast<unsigned>(plan.groups)), dim3(kReduceThreads),
          args, static_cast<size_t>(plan.smem_bytes), stream));
    }
    launched = true;
  });
  return launched;
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
  const Path path = requested_path();
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
  const Tensor affine = at::empty({2, C}, stat_options);  // scale, bias

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param_type<scalar_t>(param_type, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      using Acc = WelfordAccumulator<scalar_t, acc_t>;
      acc_t* scale = affine.mutable_data_ptr<acc_t>();
      acc_t* bias_acc = scale + C;
      // Index of channel c's first value: c * S, or c in channels-last.
      const int64_t shift_stride = g.channels_last() ? 1 : g.S;
      const StatsFinisher<scalar_t, acc_t, param_t> finisher{
          x.const_data_ptr<scalar_t>(), shift_stride, g.reduce_size(), static_cast<acc_t>(eps),
          static_cast<acc_t>(momentum), save_mean.mutable_data_ptr<acc_t>(),
          save_invstd.mutable_data_ptr<acc_t>(), scale, bias_acc, const_data_or_null<param_t>(w),
          const_data_or_null<param_t>(b), data_or_null<param_t>(rm), rm ? rm->stride(0) : 0,
          data_or_null<param_t>(rv), rv ? rv->stride(0) : 0};
      const SinglePassForward<scalar_t, param_t> single_pass{
          finisher, x.const_data_ptr<scalar_t>(), nullptr, out.buffer.mutable_data_ptr<scalar_t>()};
      if (run_single_pass(g, single_pass, path, &PathTable::single_pass_max_bytes_forward, input,
                          "training forward", device, stream)) {
        return;
      }
      auto* partial = workspace<typename Acc::State>(partial_holder, x, C * P);
      launch_reduce(g, Acc{x.const_data_ptr<scalar_t>(), shift_stride}, finisher, partial, P, x, stream);
      launch_elementwise<scalar_t>(
          g, PrecomputedAffine<acc_t>{save_mean.const_data_ptr<acc_t>(), scale, bias_acc},
          x.const_data_ptr<scalar_t>(), nullptr,
          out.buffer.mutable_data_ptr<scalar_t>(), device, stream);
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
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  const int device = input.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_param_type<scalar_t>(param_type, x.scalar_type(), [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const RunningStatsAffine<acc_t, param_t> op{
          running_mean.const_data_ptr<param_t>(), running_mean.stride(0),
          running_var.const_data_ptr<param_t>(), running_var.stride(0),
          const_data_or_null<param_t>(w), const_data_or_null<param_t>(b), static_cast<acc_t>(eps)};
      launch_elementwise<scalar_t>(
          g, op, x.const_data_ptr<scalar_t>(), nullptr, out.buffer.mutable_data_ptr<scalar_t>(),
          device, stream);
    });
  });
  out.finish();
  return out.result;
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const at::ScalarType param_type = check_backward_args(grad_output, input, weight, mean, invstd);
  const Path path = requested_path();
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
      param_t* grad_weight_ptr = grad_weight ? grad_weight->mutable_data_ptr<param_t>() : nullptr;
      param_t* grad_bias_ptr = grad_bias ? grad_bias->mutable_data_ptr<param_t>() : nullptr;
      const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.reduce_size());
      if (training && out) {
        const SinglePassBackward<scalar_t, param_t> single_pass{
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out->buffer.mutable_data_ptr<scalar_t>(),
            mean_c.const_data_ptr<acc_t>(), invstd_c.const_data_ptr<acc_t>(), const_data_or_null<param_t>(w),
            grad_weight_ptr, grad_bias_ptr, inv_count};
        if (run_single_pass(g, single_pass, path, &PathTable::single_pass_max_bytes_backward, input,
                            "training backward", device, stream)) {
          return;
        }
      }
      if (need_sums) {
        const int64_t P = partial_count(g, device);
        using Acc = GradSumAccumulator<scalar_t, acc_t>;
        auto* partial = workspace<typename Acc::State>(partial_holder, x, C * P);
        const GradFinisher<acc_t, param_t> finisher{
            invstd_c.const_data_ptr<acc_t>(), sum_dy, sum_dy_xmu, grad_weight_ptr, grad_bias_ptr};
        launch_reduce(
            g, Acc{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                   mean_c.const_data_ptr<acc_t>()},
            finisher, partial, P, x, stream);
      }
      if (!out) {
        return;
      }
      scalar_t* dx = out->buffer.mutable_data_ptr<scalar_t>();
      if (training) {
        const TrainingGradInput<acc_t, param_t> op{
            mean_c.const_data_ptr<acc_t>(), invstd_c.const_data_ptr<acc_t>(),
            const_data_or_null<param_t>(w), sum_dy, sum_dy_xmu, inv_count};
        launch_elementwise<scalar_t>(
            g, op, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx, device, stream);
      } else {
        const EvalGradInput<acc_t, param_t> op{invstd_c.const_data_ptr<acc_t>(), const_data_or_null<param_t>(w)};
        launch_elementwise<scalar_t>(g, op, dy.const_data_ptr<scalar_t>(), nullptr, dx, device, stream);
      }
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
